// Slot, eviction and position bookkeeping for StreamingLLM KV caches.
//
// Framework-free: integers in, integers out. The tensors live elsewhere (torch, on any device); this header only
// decides where each token goes and which positions everything has.
//
// Layout of one stream's KV buffer: `capacity = num_sinks + window` slots.
//   slots [0, S)      the first S tokens of the stream (the attention sinks), never evicted;
//   slots [S, S + W)  a ring holding the most recent tokens; token j >= S lives in slot S + (j - S) mod W.
// After t tokens the buffer holds min(t, S + W) tokens, the newest included: like the paper's code (evict before
// append), the token being decoded counts towards the S + W.
//
// Positions. The paper assigns positions inside the cache: sinks at 0..S-1, window tokens after them in arrival
// order. RoPE scores depend only on the distance between query and key, and the window is contiguous and ends at the
// query, so window keys keep their true distances; only the sinks move. This core therefore tracks two things:
//   * the model frame: the position the model rotates token j with is j - frame_base. Window keys are stored rotated
//     in that frame and never touched, except when the frame is re-based (frame_base changes by D: every stored
//     window key must then be re-rotated by -D; `pending_shift` carries D until the caller has done that);
//   * the sink shift: sinks are stored rotated at their in-cache positions 0..S-1. For the newest token t the
//     paper's in-cache distance to sink s is min(t, S+W-1) - s, so sink s must be rotated to model position
//     s + sink_shift with sink_shift = evicted(t) - frame_base, evicted(t) = max(0, t + 1 - (S + W)).
// Re-basing keeps model positions small (below S + W - 1 + rebase_interval) so that float32 RoPE angles stay exact
// however long the stream runs.
//
// Memory contract. The ring writes only into memory it owns or into a caller's array for the duration of one call:
//   * step() writes its per-stream outputs into arrays the ring allocates once, in the constructor, and never
//     reallocates (step_output() points into them for the ring's whole lifetime; the Python binding hands them out as
//     read-only views that keep the ring alive). No caller memory is ever kept between calls.
//   * slots(), evicted(), plan() write into the output pointer passed to that very call; a caller must keep the
//     memory alive and in place for the call (the binding holds the exporter's reference and runs no Python code
//     between taking the pointer and the last write).
// Work is bounded by memory: no loop runs over a caller's count unless it fills a caller's array of that length, so a
// huge count costs O(1) (or O(window) where the ring itself must be walked).
//
// Counter limits, checked by every operation and by restore(): 0 <= seen <= 2^63 - 2, and the model position of
// the next token (seen - frame_base) is in 0..2^63 - 2, and |pending_shift| <= 2^63 - 1. No arithmetic below can
// overflow within them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace pystream {

class SinkRing {
public:
    struct Stream {
        int64_t seen = 0;           // tokens appended so far == index of the next token
        int64_t frame_base = 0;     // model position of token j is j - frame_base
        int64_t pending_shift = 0;  // frame change not yet applied to the stored window keys
    };

    // Per-step outputs of step(), one array of num_streams entries each, owned by the ring (see the memory contract
    // above) so that the hot call takes no arguments and writes no memory it does not own.
    enum StepOutput : int {
        kSlot = 0,          // slot the new token was written to
        kSinkShift,         // rotate sink s to model position s + sink_shift
        kPendingShift,      // re-rotate stored window keys by -pending_shift (then it is cleared)
        kOccupied,          // slots holding a token after the step
        kNumStepOutputs
    };

    static constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
    // A batch larger than this is refused: the ring allocates a few words per stream, and a real KV cache of this
    // many streams would not fit in any memory anyway.
    static constexpr int64_t kMaxStreams = int64_t{1} << 20;
    static constexpr uint32_t kSnapshotMagic = 0x50534b31;  // "PSK1"
    static constexpr uint32_t kSnapshotVersion = 1;

    SinkRing(int64_t num_streams, int64_t num_sinks, int64_t window, int64_t rebase_interval) {
        if (num_streams < 1 || num_streams > kMaxStreams)
            throw std::invalid_argument("num_streams must be in 1.." + std::to_string(kMaxStreams) + ", got " +
                                        std::to_string(num_streams));
        if (num_sinks < 0)
            throw std::invalid_argument("num_sinks must be >= 0, got " + std::to_string(num_sinks));
        if (window < 0)
            throw std::invalid_argument("window must be >= 0, got " + std::to_string(window));
        if (num_sinks + window == 0)
            throw std::invalid_argument("num_sinks + window must be > 0: a cache of 0 slots holds nothing");
        if (window == 0)
            throw std::invalid_argument(
                "window must be >= 1: the newest token always occupies a window slot (num_sinks=" +
                std::to_string(num_sinks) + ")");
        if (rebase_interval < 1)
            throw std::invalid_argument("rebase_interval must be >= 1, got " + std::to_string(rebase_interval));
        if (num_sinks > kMax / 4 || window > kMax / 4 || rebase_interval > kMax / 4)
            throw std::invalid_argument("num_sinks, window and rebase_interval must each be < 2^61");
        sinks_ = num_sinks;
        window_ = window;
        rebase_interval_ = rebase_interval;
        streams_.assign(static_cast<size_t>(num_streams), Stream{});
        // Allocated once: step_output() pointers stay valid for the ring's lifetime.
        outputs_.assign(static_cast<size_t>(kNumStepOutputs * num_streams), 0);
    }

    // ---- geometry -------------------------------------------------------------------------------------------------
    int64_t num_streams() const { return static_cast<int64_t>(streams_.size()); }
    int64_t num_sinks() const { return sinks_; }
    int64_t window() const { return window_; }
    int64_t capacity() const { return sinks_ + window_; }
    int64_t rebase_interval() const { return rebase_interval_; }
    // Model positions handed out by plan() stay below this bound.
    int64_t max_position() const { return capacity() - 1 + rebase_interval_; }

    // ---- per-stream state -----------------------------------------------------------------------------------------
    const Stream &stream(int64_t b) const { return streams_[index(b)]; }
    int64_t seen(int64_t b) const { return stream(b).seen; }
    int64_t frame_base(int64_t b) const { return stream(b).frame_base; }
    int64_t pending_shift(int64_t b) const { return stream(b).pending_shift; }
    int64_t occupied(int64_t b) const { return std::min(seen(b), capacity()); }
    int64_t evicted_count(int64_t b) const { return evicted_after(seen(b)); }
    int64_t next_position(int64_t b) const { return seen(b) - frame_base(b); }
    // Shift of the sinks for attention by the newest token (the last one appended).
    int64_t sink_shift(int64_t b) const {
        const Stream &s = stream(b);
        return sink_shift_of(s.seen > 0 ? s.seen - 1 : 0, s.frame_base);
    }

    // Slot that token `token` is (or would be) written to; pure function of the geometry.
    int64_t slot_for_token(int64_t token) const {
        if (token < 0) throw std::invalid_argument("token index must be >= 0, got " + std::to_string(token));
        return token < sinks_ ? token : sinks_ + (token - sinks_) % window_;
    }

    // Token index held by `slot` in stream b, or -1 when the slot is empty.
    int64_t token_in_slot(int64_t b, int64_t slot) const {
        const int64_t t = seen(b);
        check_slot(slot);
        if (slot < sinks_) return slot < t ? slot : -1;
        if (t <= slot) return -1;  // ring not reached yet
        // newest token j < t with j >= S and (j - S) mod W == slot - S
        const int64_t r = slot - sinks_;
        const int64_t last = t - 1;
        const int64_t k = (last - sinks_ - r) / window_;  // last - S - r >= 0 here
        return sinks_ + r + k * window_;
    }

    // In-cache (paper) position of `slot` in stream b: sinks 0..S-1, window tokens after them in arrival order.
    // -1 for an empty slot.
    int64_t position_of_slot(int64_t b, int64_t slot) const {
        const int64_t token = token_in_slot(b, slot);
        if (token < 0) return -1;
        if (token < sinks_) return token;
        const int64_t first_window_token = std::max(sinks_, seen(b) - window_);
        return sinks_ + (token - first_window_token);
    }

    // ---- operations -----------------------------------------------------------------------------------------------
    // Append `n` tokens to stream b: O(1) work. The slot and the evicted token (-1 if none) of every token, in
    // order, can be had from slots() / evicted() (filled before the tokens are booked).
    void append(int64_t b, int64_t n) {
        Stream &s = streams_[index(b)];
        if (n < 0) throw std::invalid_argument("cannot append a negative number of tokens: " + std::to_string(n));
        check_room(s, n);
        s.seen += n;
    }

    // Slots the next n tokens of stream b go to, written to out[0..n). A chunk longer than the window overwrites its
    // own early tokens; the slots say so. O(n): the caller's array has n elements.
    void slots(int64_t b, int64_t n, int64_t *out) const {
        const Stream &s = stream(b);
        check_room(s, n);
        for (int64_t i = 0; i < n; ++i) out[i] = slot_for_token(s.seen + i);
    }

    // Token evicted by each of the next n tokens of stream b (-1: none), written to out[0..n).
    void evicted(int64_t b, int64_t n, int64_t *out) const {
        const Stream &s = stream(b);
        check_room(s, n);
        for (int64_t i = 0; i < n; ++i) out[i] = evicted_by(s.seen + i);
    }

    // The decode step: one token appended to every stream. Fills the ring's step outputs (step_output) and returns
    // the slot if every stream wrote to the same one (the common, lockstep case), else -1.
    int64_t step() {
        for (const Stream &s : streams_) check_room(s, 1);
        int64_t common = -2;
        const int64_t nb = num_streams();
        int64_t *out_slot = outputs_.data() + kSlot * nb;
        int64_t *out_sink_shift = outputs_.data() + kSinkShift * nb;
        int64_t *out_pending = outputs_.data() + kPendingShift * nb;
        int64_t *out_occupied = outputs_.data() + kOccupied * nb;
        for (int64_t b = 0; b < nb; ++b) {
            Stream &s = streams_[static_cast<size_t>(b)];
            const int64_t token = s.seen;
            const int64_t slot = slot_for_token(token);
            out_slot[b] = slot;
            out_sink_shift[b] = sink_shift_of(token, s.frame_base);
            out_pending[b] = s.pending_shift;
            s.pending_shift = 0;
            s.seen = token + 1;
            out_occupied[b] = std::min(s.seen, capacity());
            common = (common == -2 || common == slot) ? slot : -1;
        }
        return common;
    }

    // The ring's own array of num_streams() entries for one step output (see StepOutput), valid and at the same
    // address for the ring's lifetime; step() overwrites it.
    const int64_t *step_output(StepOutput which) const {
        if (which < 0 || which >= kNumStepOutputs)
            throw std::out_of_range("unknown step output " + std::to_string(static_cast<int>(which)));
        return outputs_.data() + static_cast<int64_t>(which) * num_streams();
    }

    // Does nothing: the floor a benchmark of step() through the same binding is measured against.
    int64_t noop() const { return 0; }

    // Take the pending frame change of stream b (re-rotate stored window keys by -shift) and clear it.
    int64_t take_pending_shift(int64_t b) {
        Stream &s = streams_[index(b)];
        const int64_t shift = s.pending_shift;
        s.pending_shift = 0;
        return shift;
    }

    // Model positions for the next n tokens of stream b, re-basing the frame first if they would pass
    // max_position(). A re-base moves the frame so that the last of the n tokens sits at capacity - 1 (its in-cache
    // position once the cache is full), and adds the change to pending_shift. Writes n positions to positions_out.
    // Returns the frame change made now (0 when none).
    int64_t plan(int64_t b, int64_t n, int64_t *positions_out) {
        Stream &s = streams_[index(b)];
        if (n < 1) throw std::invalid_argument("plan needs n >= 1 tokens, got " + std::to_string(n));
        check_room(s, n);
        const int64_t last = s.seen + n - 1;
        int64_t shift = 0;
        if (last - s.frame_base > max_position()) {
            // The frame never puts a token before position 0, even for a chunk longer than the cache.
            const int64_t new_base = std::min(s.seen, last - (capacity() - 1));
            shift = new_base - s.frame_base;
            const int64_t pending = checked_pending(s, shift);
            s.frame_base = new_base;
            s.pending_shift = pending;
        }
        if (positions_out)
            for (int64_t i = 0; i < n; ++i) positions_out[i] = s.seen + i - s.frame_base;
        return shift;
    }

    // The caller rotated (or will rotate) the next token of stream b at model position `position`: adopt that frame.
    // Returns the frame change (0 when the position was the expected one).
    int64_t adopt(int64_t b, int64_t position) {
        Stream &s = streams_[index(b)];
        if (position < 0) throw std::invalid_argument("model positions must be >= 0, got " + std::to_string(position));
        if (position > kMax - 1) throw std::overflow_error("model positions must be < 2^63 - 1");
        const int64_t new_base = s.seen - position;
        const int64_t shift = new_base - s.frame_base;  // both bases in [seen - (2^63 - 2), seen]: no overflow
        const int64_t pending = checked_pending(s, shift);
        s.frame_base = new_base;
        s.pending_shift = pending;
        return shift;
    }

    void reset(int64_t b) { streams_[index(b)] = Stream{}; }
    void reset_all() { std::fill(streams_.begin(), streams_.end(), Stream{}); }

    // Put stream b in the state a stream of `seen` tokens leaves, without feeding them. The frame is chosen as plan()
    // would leave it after the last of them, so the next model position is small.
    void fast_forward(int64_t b, int64_t seen) {
        Stream &s = streams_[index(b)];
        if (seen < s.seen)
            throw std::invalid_argument("fast_forward cannot go back: stream " + std::to_string(b) + " has seen " +
                                        std::to_string(s.seen) + " tokens, asked for " + std::to_string(seen) +
                                        " (reset the stream first)");
        if (seen == kMax) throw std::overflow_error("fast_forward target must be < 2^63 - 1");
        s.seen = seen;
        s.frame_base = std::max<int64_t>(0, seen - (capacity() - 1));
        s.pending_shift = 0;
    }

    // ---- snapshot / restore ---------------------------------------------------------------------------------------
    std::vector<uint8_t> snapshot() const {
        std::vector<int64_t> words;
        words.reserve(4 + 3 * streams_.size());
        words.push_back(num_streams());
        words.push_back(sinks_);
        words.push_back(window_);
        words.push_back(rebase_interval_);
        for (const Stream &s : streams_) {
            words.push_back(s.seen);
            words.push_back(s.frame_base);
            words.push_back(s.pending_shift);
        }
        std::vector<uint8_t> bytes(8 + words.size() * 8);
        const uint32_t header[2] = {kSnapshotMagic, kSnapshotVersion};
        std::memcpy(bytes.data(), header, 8);
        std::memcpy(bytes.data() + 8, words.data(), words.size() * 8);
        return bytes;
    }

    // Restores a snapshot of a ring with the same geometry. Validates everything before changing anything.
    void restore(const uint8_t *data, size_t size) {
        if (size < 8 + 4 * 8) throw std::invalid_argument("snapshot too short: " + std::to_string(size) + " bytes");
        uint32_t header[2];
        std::memcpy(header, data, 8);
        if (header[0] != kSnapshotMagic) throw std::invalid_argument("not a SinkRing snapshot (bad magic)");
        if (header[1] != kSnapshotVersion)
            throw std::invalid_argument("snapshot version " + std::to_string(header[1]) + " is not supported (this is " +
                                        std::to_string(kSnapshotVersion) + ")");
        if ((size - 8) % 8 != 0) throw std::invalid_argument("snapshot length is not a whole number of fields");
        std::vector<int64_t> words((size - 8) / 8);
        std::memcpy(words.data(), data + 8, size - 8);
        if (words[0] != num_streams() || words[1] != sinks_ || words[2] != window_ || words[3] != rebase_interval_)
            throw std::invalid_argument(
                "snapshot geometry (streams=" + std::to_string(words[0]) + ", sinks=" + std::to_string(words[1]) +
                ", window=" + std::to_string(words[2]) + ", rebase_interval=" + std::to_string(words[3]) +
                ") does not match this ring (streams=" + std::to_string(num_streams()) +
                ", sinks=" + std::to_string(sinks_) + ", window=" + std::to_string(window_) +
                ", rebase_interval=" + std::to_string(rebase_interval_) + ")");
        if (words.size() != 4 + 3 * streams_.size())
            throw std::invalid_argument("snapshot has the wrong number of fields for its stream count");
        std::vector<Stream> restored(streams_.size());
        for (size_t i = 0; i < streams_.size(); ++i) {
            restored[i] = Stream{words[4 + 3 * i], words[5 + 3 * i], words[6 + 3 * i]};
            check_reachable(restored[i], i);
        }
        streams_.swap(restored);
    }

private:
    size_t index(int64_t b) const {
        if (b < 0 || b >= num_streams())
            throw std::out_of_range("unknown stream " + std::to_string(b) + ": this ring has " +
                                    std::to_string(num_streams()) + " streams (0.." +
                                    std::to_string(num_streams() - 1) + ")");
        return static_cast<size_t>(b);
    }
    void check_slot(int64_t slot) const {
        if (slot < 0 || slot >= capacity())
            throw std::out_of_range("slot " + std::to_string(slot) + " is outside 0.." + std::to_string(capacity() - 1));
    }
    // Room for n more tokens: the token count and the model position of the last of them stay <= 2^63 - 2.
    static void check_room(const Stream &s, int64_t n) {
        if (n > kMax - 1 - s.seen || n > kMax - 1 - (s.seen - s.frame_base))
            throw std::overflow_error("stream position would pass 2^63 - 1");
    }
    // pending_shift + shift, refused (nothing changed) if it would leave -(2^63 - 1)..2^63 - 1.
    static int64_t checked_pending(const Stream &s, int64_t shift) {
        if ((shift > 0 && s.pending_shift > kMax - shift) || (shift < 0 && s.pending_shift < -kMax - shift))
            throw std::overflow_error("the pending frame change would pass 2^63 - 1: apply it (take_pending_shift) "
                                      "before moving the frame again");
        return s.pending_shift + shift;
    }
    // A snapshot's stream must be one that some sequence of operations reaches. Every change of frame_base adds the
    // same change to pending_shift, which is cleared at some earlier point (frame base f0 <= seen0 <= seen, with
    // f0 >= seen0 - (2^63 - 2)); so pending_shift = frame_base - f0 lies in
    // [-(seen - frame_base), frame_base + 2^63 - 2], within the limit checked_pending keeps.
    static void check_reachable(const Stream &s, size_t i) {
        const std::string where = "snapshot stream " + std::to_string(i) + ": ";
        if (s.seen < 0 || s.seen > kMax - 1)
            throw std::invalid_argument(where + "seen=" + std::to_string(s.seen) + " is outside 0..2^63 - 2");
        // next model position seen - frame_base in 0..2^63 - 2, written without overflow
        if (s.frame_base > s.seen || s.frame_base < s.seen - (kMax - 1))
            throw std::invalid_argument(where + "frame_base=" + std::to_string(s.frame_base) +
                                        " puts the next model position outside 0..2^63 - 2 (seen=" +
                                        std::to_string(s.seen) + ")");
        const int64_t next_position = s.seen - s.frame_base;
        const int64_t highest = s.frame_base >= 1 ? kMax : s.frame_base + (kMax - 1);
        if (s.pending_shift < -next_position || s.pending_shift > highest)
            throw std::invalid_argument(where + "pending_shift=" + std::to_string(s.pending_shift) +
                                        " is outside what a stream reaches: " + std::to_string(-next_position) +
                                        ".." + std::to_string(highest) + " (seen=" + std::to_string(s.seen) +
                                        ", frame_base=" + std::to_string(s.frame_base) + ")");
    }
    int64_t evicted_after(int64_t seen) const { return std::max<int64_t>(0, seen - capacity()); }
    // Writing token j into the ring evicts token j - W when that one was a window token.
    int64_t evicted_by(int64_t token) const {
        return (token >= sinks_ && token - window_ >= sinks_) ? token - window_ : -1;
    }
    // Sink shift for attention by token t: sinks move to s + evicted(t) - frame_base.
    int64_t sink_shift_of(int64_t token, int64_t frame_base) const {
        return evicted_after(token + 1) - frame_base;
    }

    int64_t sinks_ = 0, window_ = 0, rebase_interval_ = 1;
    std::vector<Stream> streams_;
    std::vector<int64_t> outputs_;  // [kNumStepOutputs][num_streams]; sized once, never reallocated
};

}  // namespace pystream
