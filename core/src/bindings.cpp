// Python binding of pystream::SinkRing. Thin on purpose: it validates arguments, turns C++ exceptions into readable
// Python errors (std::invalid_argument -> ValueError, std::out_of_range -> IndexError, std::overflow_error ->
// OverflowError, a bad array -> TypeError) and hands the work to the header.
//
// Memory contract (see sink_ring.hpp): the ring keeps no pointer into Python-owned memory. step() fills arrays the
// ring owns, exposed as read-only views (`outputs`) whose owner is the ring; an array passed to append/plan/positions/
// tokens is written only during that call, while the binding holds the exporter's reference to it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <string>
#include <utility>

#include "pystream/sink_ring.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using pystream::SinkRing;

namespace {

std::string python_type_name(nb::handle h) { return nb::type_name(h.type()).c_str(); }

// An int64 array that C++ may write into: 1-D, contiguous, on the CPU, writable, of exactly `length` elements.
// Anything else is a TypeError naming `what` and the problem; nothing is ever converted, so a write can never land in
// a silent copy.
//
// Memory safety: the returned ndarray holds the exporter's reference (DLPack capsule or buffer view) and must stay
// alive while its data is written; write right after this call, before any other Python object is touched (a cast of
// another argument may run Python code, which could resize or free this array's storage). The ring never keeps the
// pointer beyond the call.
nb::ndarray<> int64_out(nb::handle obj, const char *what, int64_t length) {
    if (!nb::ndarray_check(obj))
        throw nb::type_error((std::string(what) + " must be an int64 array (numpy or torch), got " + python_type_name(obj))
                                 .c_str());
    nb::ndarray<> arr;
    if (!nb::try_cast(obj, arr, /*convert=*/false))
        throw nb::type_error((std::string(what) + " is read-only; pass a writable int64 array").c_str());
    if (arr.dtype() != nb::dtype<int64_t>())
        throw nb::type_error((std::string(what) + " must have dtype int64").c_str());
    if (arr.device_type() != nb::device::cpu::value)
        throw nb::type_error((std::string(what) + " must live in CPU memory").c_str());
    if (arr.ndim() != 1)
        throw nb::type_error(
            (std::string(what) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions").c_str());
    if (arr.shape(0) > 1 && arr.stride(0) != 1)
        throw nb::type_error((std::string(what) + " must be contiguous").c_str());
    if (static_cast<int64_t>(arr.shape(0)) != length)
        throw nb::value_error((std::string(what) + " must have " + std::to_string(length) + " elements, got " +
                               std::to_string(arr.shape(0)))
                                  .c_str());
    return arr;
}

int64_t *data_of(nb::ndarray<> &arr) { return static_cast<int64_t *>(arr.data()); }

// The step outputs, by name: read-only numpy views of the ring's own arrays (see SinkRing::StepOutput).
constexpr std::pair<const char *, SinkRing::StepOutput> kStepOutputs[] = {
    {"slot", SinkRing::kSlot},
    {"sink_shift", SinkRing::kSinkShift},
    {"pending_shift", SinkRing::kPendingShift},
    {"occupied", SinkRing::kOccupied},
};

using OutputView = nb::ndarray<nb::numpy, const int64_t, nb::ndim<1>, nb::c_contig>;

}  // namespace

NB_MODULE(_core, m) {
    m.doc() = "pystream's C++ core: slot, eviction and position bookkeeping for StreamingLLM KV caches.";

    nb::register_exception_translator([](const std::exception_ptr &p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const std::overflow_error &e) {
            PyErr_SetString(PyExc_OverflowError, e.what());
        }
    });

    nb::class_<SinkRing>(m, "SinkRing", R"doc(
Bookkeeping for `num_streams` independent token streams sharing one preallocated KV layout of
`num_sinks` sink slots followed by a ring of `window` slots per stream (`capacity = num_sinks + window`).

Integers in, integers out: it never touches a tensor. The caller writes token `j` of stream `b` to
`buffer[b, :, slot, :]` of a `[num_streams, kv_heads, capacity, head_dim]` buffer.

Positions: the model rotates token `j` at `j - frame_base(b)`; sinks are kept at their in-cache positions and rotated
for each query to `s + sink_shift(b)`; a re-base (see `plan`) changes `frame_base` and leaves a `pending_shift` by
which stored window keys must be rotated back.
)doc")
        .def(nb::init<int64_t, int64_t, int64_t, int64_t>(), "num_streams"_a, "num_sinks"_a, "window"_a,
             "rebase_interval"_a)
        .def_prop_ro("num_streams", &SinkRing::num_streams)
        .def_prop_ro("num_sinks", &SinkRing::num_sinks)
        .def_prop_ro("window", &SinkRing::window)
        .def_prop_ro("capacity", &SinkRing::capacity)
        .def_prop_ro("rebase_interval", &SinkRing::rebase_interval)
        .def_prop_ro("max_position", &SinkRing::max_position, "Model positions handed out by `plan` stay <= this.")
        .def("seen", &SinkRing::seen, "stream"_a, "Tokens appended to the stream so far.")
        .def("frame_base", &SinkRing::frame_base, "stream"_a)
        .def("pending_shift", &SinkRing::pending_shift, "stream"_a)
        .def("occupied", &SinkRing::occupied, "stream"_a, "Slots holding a token.")
        .def("evicted_count", &SinkRing::evicted_count, "stream"_a)
        .def("next_position", &SinkRing::next_position, "stream"_a, "Model position of the next token.")
        .def("sink_shift", &SinkRing::sink_shift, "stream"_a, "Sink shift for attention by the newest token.")
        .def("slot_for_token", &SinkRing::slot_for_token, "token"_a)
        .def("token_in_slot", &SinkRing::token_in_slot, "stream"_a, "slot"_a, "Token index in the slot, -1 if empty.")
        .def(
            "positions",
            [](const SinkRing &r, int64_t stream, nb::handle out) {
                r.stream(stream);  // validates the index before the array
                nb::ndarray<> arr = int64_out(out, "out", r.capacity());
                int64_t *p = data_of(arr);
                for (int64_t s = 0; s < r.capacity(); ++s) p[s] = r.position_of_slot(stream, s);
            },
            "stream"_a, "out"_a, "Fill `out[capacity]` with the in-cache position of every slot (-1 if empty).")
        .def(
            "tokens",
            [](const SinkRing &r, int64_t stream, nb::handle out) {
                r.stream(stream);
                nb::ndarray<> arr = int64_out(out, "out", r.capacity());
                int64_t *p = data_of(arr);
                for (int64_t s = 0; s < r.capacity(); ++s) p[s] = r.token_in_slot(stream, s);
            },
            "stream"_a, "out"_a, "Fill `out[capacity]` with the token index held by every slot (-1 if empty).")
        .def(
            "append",
            [](SinkRing &r, int64_t stream, int64_t n, nb::handle slots, nb::handle evicted) {
                r.stream(stream);
                if (n < 0)
                    throw std::invalid_argument("cannot append a negative number of tokens: " + std::to_string(n));
                // Each array is cast and filled before the next is looked at (see int64_out); the ring changes last,
                // so an error leaves it unchanged (arrays filled before the error keep what was written).
                if (!slots.is_none()) {
                    nb::ndarray<> arr = int64_out(slots, "slots", n);
                    r.slots(stream, n, data_of(arr));
                }
                if (!evicted.is_none()) {
                    nb::ndarray<> arr = int64_out(evicted, "evicted", n);
                    r.evicted(stream, n, data_of(arr));
                }
                r.append(stream, n);
            },
            "stream"_a, "n"_a, "slots"_a = nb::none(), "evicted"_a = nb::none(),
            "Append `n` tokens to one stream; fill `slots[n]` and `evicted[n]` (-1: nothing evicted) if given. "
            "O(1) without arrays, whatever `n`.")
        .def("step", &SinkRing::step,
             "Append one token to every stream and fill the ring's step outputs (see `outputs`). Returns the slot "
             "when all streams wrote to the same one, else -1. The per-token hot call: it takes no arguments.")
        .def_prop_ro(
            "outputs",
            [](SinkRing &r) {
                nb::object owner = nb::find(&r);  // the views keep the ring, and so its arrays, alive
                nb::dict views;
                const size_t n = static_cast<size_t>(r.num_streams());
                for (const auto &[name, which] : kStepOutputs)
                    views[name] = OutputView(r.step_output(which), {n}, owner).cast();
                return views;
            },
            "What each `step` wrote, per stream: a dict of read-only int64 numpy arrays of `num_streams` elements, "
            "views of arrays the ring owns and `step` overwrites in place (read them after each step; a view keeps "
            "the ring alive). `slot`: the slot the token went to; `sink_shift`: rotate sink s to model position "
            "s + sink_shift; `pending_shift`: re-rotate the stored window keys by -pending_shift; `occupied`: slots "
            "holding a token. The ring never writes into memory it does not own between calls.")
        .def("noop", &SinkRing::noop,
             "Does nothing and returns 0: the floor a benchmark of `step` through this binding is measured against.")
        .def("take_pending_shift", &SinkRing::take_pending_shift, "stream"_a)
        .def(
            "plan",
            [](SinkRing &r, int64_t stream, int64_t n, nb::handle out) {
                r.stream(stream);
                if (n < 1) throw std::invalid_argument("plan needs n >= 1 tokens, got " + std::to_string(n));
                if (out.is_none()) return r.plan(stream, n, nullptr);
                nb::ndarray<> arr = int64_out(out, "out", n);
                return r.plan(stream, n, data_of(arr));
            },
            "stream"_a, "n"_a, "out"_a = nb::none(),
            "Model positions for the next `n` tokens (written to `out[n]`), re-basing the frame first when they "
            "would pass `max_position`. Returns the frame change made (0: none).")
        .def("adopt", &SinkRing::adopt, "stream"_a, "position"_a,
             "The next token is rotated at model position `position`: adopt that frame. Returns the change.")
        .def("reset", &SinkRing::reset, "stream"_a)
        .def("reset_all", &SinkRing::reset_all)
        .def("fast_forward", &SinkRing::fast_forward, "stream"_a, "seen"_a,
             "Put the stream in the state `seen` tokens leave, without feeding them.")
        .def("snapshot",
             [](const SinkRing &r) {
                 auto bytes = r.snapshot();
                 return nb::bytes(reinterpret_cast<const char *>(bytes.data()), bytes.size());
             })
        .def(
            "restore",
            [](SinkRing &r, nb::bytes data) {
                r.restore(reinterpret_cast<const uint8_t *>(data.c_str()), data.size());
            },
            "data"_a, "Restore a `snapshot()` of a ring with the same geometry; nothing changes on error.");
}
