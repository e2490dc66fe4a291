// Python binding of pystream::SinkRing. Thin on purpose: it validates arguments, turns C++ exceptions into readable
// Python errors (std::invalid_argument -> ValueError, std::out_of_range -> IndexError, std::overflow_error ->
// OverflowError, a bad array -> TypeError) and hands the work to the header.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <string>

#include "pystream/sink_ring.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using pystream::SinkRing;

namespace {

std::string python_type_name(nb::handle h) { return nb::type_name(h.type()).c_str(); }

// An int64 array that C++ may write into: 1-D, contiguous, on the CPU, writable, of exactly `length` elements
// (length < 0: any). Anything else is a TypeError naming `what` and the problem; nothing is ever converted, so a
// write can never land in a silent copy.
int64_t *int64_out(nb::handle obj, const char *what, int64_t length) {
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
    if (length >= 0 && static_cast<int64_t>(arr.shape(0)) != length)
        throw nb::value_error((std::string(what) + " must have " + std::to_string(length) + " elements, got " +
                               std::to_string(arr.shape(0)))
                                  .c_str());
    return static_cast<int64_t *>(arr.data());
}

int64_t *optional_out(nb::handle obj, const char *what, int64_t length) {
    return obj.is_none() ? nullptr : int64_out(obj, what, length);
}

// Owns the Python arrays bound as step() outputs so that they outlive the raw pointers the ring keeps.
struct PySinkRing : SinkRing {
    using SinkRing::SinkRing;
    nb::object bound[6];

    void bind_outputs(nb::handle slot, nb::handle evicted, nb::handle position, nb::handle sink_shift,
                      nb::handle pending_shift, nb::handle occupied) {
        const int64_t n = num_streams();
        StepOutputs out;
        out.slot = optional_out(slot, "slot", n);
        out.evicted = optional_out(evicted, "evicted", n);
        out.position = optional_out(position, "position", n);
        out.sink_shift = optional_out(sink_shift, "sink_shift", n);
        out.pending_shift = optional_out(pending_shift, "pending_shift", n);
        out.occupied = optional_out(occupied, "occupied", n);
        nb::handle objs[6] = {slot, evicted, position, sink_shift, pending_shift, occupied};
        for (int i = 0; i < 6; ++i) bound[i] = nb::borrow(objs[i]);
        bind(out);
    }
};

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

    nb::class_<PySinkRing>(m, "SinkRing", R"doc(
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
        .def("slot_of_token", &SinkRing::slot_of_token, "stream"_a, "token"_a, "Slot of the token, -1 if not held.")
        .def("position_of_slot", &SinkRing::position_of_slot, "stream"_a, "slot"_a,
             "In-cache (paper) position of the slot, -1 if empty.")
        .def(
            "positions",
            [](const PySinkRing &r, int64_t stream, nb::handle out) {
                r.stream(stream);  // validates the index before the array
                int64_t *p = int64_out(out, "out", r.capacity());
                for (int64_t s = 0; s < r.capacity(); ++s) p[s] = r.position_of_slot(stream, s);
            },
            "stream"_a, "out"_a, "Fill `out[capacity]` with the in-cache position of every slot (-1 if empty).")
        .def(
            "tokens",
            [](const PySinkRing &r, int64_t stream, nb::handle out) {
                r.stream(stream);
                int64_t *p = int64_out(out, "out", r.capacity());
                for (int64_t s = 0; s < r.capacity(); ++s) p[s] = r.token_in_slot(stream, s);
            },
            "stream"_a, "out"_a, "Fill `out[capacity]` with the token index held by every slot (-1 if empty).")
        .def(
            "append",
            [](PySinkRing &r, int64_t stream, int64_t n, nb::handle slots, nb::handle evicted) {
                r.stream(stream);
                if (n < 0)
                    throw std::invalid_argument("cannot append a negative number of tokens: " + std::to_string(n));
                int64_t *s = optional_out(slots, "slots", n);
                int64_t *e = optional_out(evicted, "evicted", n);
                r.append(stream, n, s, e);
            },
            "stream"_a, "n"_a, "slots"_a = nb::none(), "evicted"_a = nb::none(),
            "Append `n` tokens to one stream; fill `slots[n]` and `evicted[n]` (-1: nothing evicted) if given.")
        .def("step", &PySinkRing::step,
             "Append one token to every stream and fill the bound outputs (see `bind_outputs`). Returns the slot "
             "when all streams wrote to the same one, else -1. The per-token hot call: it takes no arguments.")
        .def("bind_outputs", &PySinkRing::bind_outputs, "slot"_a = nb::none(), "evicted"_a = nb::none(),
             "position"_a = nb::none(), "sink_shift"_a = nb::none(), "pending_shift"_a = nb::none(),
             "occupied"_a = nb::none(),
             "Bind int64 arrays of `num_streams` elements that `step` fills in place; None leaves one unbound.")
        .def("unbind_outputs",
             [](PySinkRing &r) {
                 r.unbind();
                 for (auto &o : r.bound) o = nb::object();
             })
        .def("take_pending_shift", &SinkRing::take_pending_shift, "stream"_a)
        .def(
            "plan",
            [](PySinkRing &r, int64_t stream, int64_t n, nb::handle out) {
                r.stream(stream);
                if (n < 1) throw std::invalid_argument("plan needs n >= 1 tokens, got " + std::to_string(n));
                int64_t *p = optional_out(out, "out", n);
                return r.plan(stream, n, p);
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
             [](const PySinkRing &r) {
                 auto bytes = r.snapshot();
                 return nb::bytes(reinterpret_cast<const char *>(bytes.data()), bytes.size());
             })
        .def(
            "restore",
            [](PySinkRing &r, nb::bytes data) {
                r.restore(reinterpret_cast<const uint8_t *>(data.c_str()), data.size());
            },
            "data"_a, "Restore a `snapshot()` of a ring with the same geometry; nothing changes on error.");
}
