// The one pybind11 file: argument checks, GIL release, numpy views.
// Every Python-facing error is raised here, before the core runs, so a
// rejected call never changes the buffer.
// Every binding that takes the core's mutex releases the GIL first: saving
// runs Python (file writes) while it holds the mutex, so a thread waiting
// for the mutex with the GIL held would deadlock it. (len and the counters
// take no lock.)
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "codec_probe.hpp"
#include "replay_buffer.hpp"

namespace py = pybind11;
using dqn_fast::AddArgs;
using dqn_fast::BufferConfig;
using dqn_fast::BufferState;
using dqn_fast::ReplayBuffer;
using dqn_fast::SampleOut;

namespace {

using Shape = std::vector<py::ssize_t>;

// Plain string building, no iostreams: a locale-free path that cannot trip
// over a process whose libstdc++ locale state differs from ours.
std::string shape_str(const Shape& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) {
        out += std::to_string(s[i]);
        if (s.size() == 1) out += ",";
        else if (i + 1 < s.size()) out += ", ";
    }
    return out + ")";
}

Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

Shape prepend(py::ssize_t n, const Shape& s) {
    Shape out{n};
    out.insert(out.end(), s.begin(), s.end());
    return out;
}

std::string dtype_str(const py::dtype& d) { return py::str(d).cast<std::string>(); }

// The core reads and writes native-endian values only.
bool is_native(const py::dtype& d) {
    const char order = d.byteorder();
    const uint16_t probe = 1;
    const bool little = *reinterpret_cast<const uint8_t*>(&probe) == 1;
    return order == '=' || order == '|' || order == (little ? '<' : '>');
}

std::string byte_order_str(const py::dtype& d) {
    return d.byteorder() == '>' ? "big-endian" : d.byteorder() == '<' ? "little-endian" : "native";
}

bool same_dtype(const py::dtype& a, const py::dtype& b) {
    return a.normalized_num() == b.normalized_num() && a.itemsize() == b.itemsize() && is_native(a) && is_native(b);
}

// The same kind and size, but the other byte order: worth its own message.
bool only_byte_order_differs(const py::dtype& got, const py::dtype& want) {
    return got.kind() == want.kind() && got.itemsize() == want.itemsize() && !is_native(got);
}

// float32 rounds finite magnitudes from 2^128 - 2^103 up to inf.
const double kFloat32Overflow = std::ldexp(2.0 - std::ldexp(1.0, -24), 127);

uint64_t product(const Shape& s, const char* what) {
    uint64_t n = 1;
    for (auto d : s) {
        if (d < 1) throw py::value_error(std::string(what) + " must have positive dimensions, got " + shape_str(s));
        n = dqn_fast::checked_mul(n, uint64_t(d), what);
    }
    return n;
}

bool is_aligned(const py::array& a) { return a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_; }

// `a` itself when it is C-contiguous (and aligned, where the core reads typed
// values), else numpy's copy; a copy that cannot be allocated is a MemoryError
// (py::array::ensure would return null, and the core would read through it).
py::array c_contiguous(const py::array& a, bool typed) {
    if ((a.flags() & py::array::c_style) && (!typed || is_aligned(a))) return a;
    // np.require copies unless C-contiguous, aligned and a base-class ndarray (ascontiguousarray
    // keeps a misaligned contiguous view), and raises MemoryError when it cannot
    return py::array(py::module_::import("numpy").attr("require")(a, py::none(), "CAE"));
}

class PyReplayBuffer {
public:
    PyReplayBuffer(uint64_t capacity, int num_envs, int frame_stack, const Shape& frame_shape, py::dtype obs_dtype,
                   const Shape& action_shape, py::dtype action_dtype, uint64_t seed, bool stack_last,
                   double frame_reserve, int sample_threads, int n_step, double gamma, bool prioritized,
                   double alpha, double priority_eps, const std::string& compression, uint64_t frame_memory)
        : obs_dtype_(obs_dtype), action_dtype_(action_dtype), action_shape_(action_shape) {
        obs_shape_ = frame_shape;
        if (frame_stack > 1) {
            if (stack_last) {
                obs_shape_.push_back(frame_stack);
            } else {
                obs_shape_.insert(obs_shape_.begin(), frame_stack);
            }
        }
        BufferConfig c;
        c.capacity = capacity;
        c.num_envs = num_envs;
        c.frame_stack = frame_stack;
        c.layout.elem_size = uint64_t(obs_dtype.itemsize());
        for (const py::dtype* d : {&obs_dtype, &action_dtype}) {
            const char kind = d->kind();
            if (kind != 'b' && kind != 'i' && kind != 'u' && kind != 'f')
                throw py::type_error("obs_dtype and action_dtype must be bool, integer or float dtypes, got " +
                                     dtype_str(*d));
        }
        if (!is_native(obs_dtype) || !is_native(action_dtype))
            throw py::type_error("obs_dtype and action_dtype must be in native byte order, got " +
                                 dtype_str(obs_dtype) + " and " + dtype_str(action_dtype));
        c.layout.frame_bytes = dqn_fast::checked_mul(product(frame_shape, "one frame"), c.layout.elem_size, "one frame");
        c.layout.stack_last = stack_last;
        c.action_bytes = dqn_fast::checked_mul(product(action_shape, "one action"), uint64_t(action_dtype.itemsize()),
                                               "one action");
        c.frame_reserve = frame_reserve;
        c.seed = seed;
        c.sample_threads = sample_threads;
        c.n_step = n_step;
        c.gamma = gamma;
        c.prioritized = prioritized;
        c.alpha = alpha;
        c.priority_eps = priority_eps;
        if (compression == "none") {
            c.compression = dqn_fast::Codec::kNone;
        } else if (compression == "lz4") {
            c.compression = dqn_fast::Codec::kLz4;
        } else if (compression == "zstd") {
            c.compression = dqn_fast::Codec::kZstd;
        } else {
            throw py::value_error("compression must be None, 'lz4' or 'zstd', got '" + compression + "'");
        }
        c.frame_memory = frame_memory;
        if (c.action_bytes == 0) throw py::value_error("action_shape must hold at least one element");
        core_ = std::make_unique<ReplayBuffer>(c);
    }

    void add(py::handle obs, py::handle action, py::handle reward, py::handle next_obs, py::handle terminated,
             py::handle truncated) {
        const int ne = core_->num_envs();
        py::array obs_a = observation(obs, "obs");
        py::array next_a = observation(next_obs, "next_obs");

        // One env and a Python scalar is the common single-env call: skip numpy.
        int64_t action_int;
        float reward_f;
        uint8_t term_b, trunc_b;
        py::array action_a, reward_a, term_a, trunc_a;
        const void* action_p = nullptr;
        if (ne == 1 && action_shape_.empty() && action_dtype_.kind() == 'i' && action_dtype_.itemsize() == 8 &&
            PyLong_CheckExact(action.ptr())) {
            int overflow = 0;
            action_int = PyLong_AsLongLongAndOverflow(action.ptr(), &overflow);
            if (overflow) throw py::value_error("action " + py::str(action).cast<std::string>() + " does not fit int64 (action_dtype)");
            action_p = &action_int;
        } else {
            action_a = per_env(action, action_dtype_, action_shape_, "action", "action_dtype");
            action_p = action_a.data();
        }
        // Scalars stand for one env only: the core reads num_envs values.
        const float* reward_p = ne == 1 && scalar_float(reward, reward_f) ? &reward_f : nullptr;
        if (!reward_p) {
            reward_a = per_env(reward, py::dtype::of<float>(), {}, "reward", "float32");
            reward_p = static_cast<const float*>(reward_a.data());
        }
        const uint8_t* term_p = flag(terminated, term_b, term_a, "terminated");
        const uint8_t* trunc_p = flag(truncated, trunc_b, trunc_a, "truncated");

        AddArgs args{static_cast<const uint8_t*>(obs_a.data()), static_cast<const uint8_t*>(next_a.data()),
                     static_cast<const uint8_t*>(action_p), reward_p, term_p, trunc_p};
        py::gil_scoped_release release;
        core_->add(args);
    }

    // Fills `out` with a drawn batch (ids_in is None) or with the stored
    // transitions ids_in (get). weights, discount and next_start may be None.
    void fill_into(py::handle obs, py::handle next_obs, py::handle frames, py::handle action, py::handle reward,
                   py::handle terminated, py::handle truncated, py::handle ids, py::handle weights,
                   py::handle discount, py::handle next_start, double beta, py::handle ids_in) {
        if (!std::isfinite(beta) || beta < 0)
            throw py::value_error("beta must be finite and >= 0, got " + py::str(py::float_(beta)).cast<std::string>());
        py::array ids_a = output(ids, py::dtype::of<int64_t>(), {}, "ids", -1);
        const py::ssize_t b = ids_a.shape(0);
        if (b < 1) throw py::value_error("batch_size must be at least 1, got " + std::to_string(b));
        py::array request;
        if (!ids_in.is_none()) {
            request = id_array(ids_in, "ids");
            if (request.shape(0) != b)
                throw py::value_error("ids has " + std::to_string(request.shape(0)) + " entries but out holds a batch of " +
                                      std::to_string(b));
        }
        SampleOut out;
        std::vector<py::array> keep;
        const bool window = !frames.is_none();
        const auto& config = core_->config();
        if (window) {
            const int row = config.frame_stack + config.n_step;
            Shape wshape = frame_shape();
            if (config.layout.stack_last) {
                wshape.push_back(row);
            } else {
                wshape.insert(wshape.begin(), row);
            }
            keep.push_back(output(frames, obs_dtype_, wshape, "frames", b));
            out.frames = static_cast<uint8_t*>(keep.back().mutable_data());
        } else {
            keep.push_back(output(obs, obs_dtype_, obs_shape_, "obs", b));
            out.obs = static_cast<uint8_t*>(keep.back().mutable_data());
            keep.push_back(output(next_obs, obs_dtype_, obs_shape_, "next_obs", b));
            out.next_obs = static_cast<uint8_t*>(keep.back().mutable_data());
        }
        keep.push_back(output(action, action_dtype_, action_shape_, "action", b));
        out.action = static_cast<uint8_t*>(keep.back().mutable_data());
        keep.push_back(output(reward, py::dtype::of<float>(), {}, "reward", b));
        out.reward = static_cast<float*>(keep.back().mutable_data());
        keep.push_back(output(terminated, py::dtype::of<bool>(), {}, "terminated", b));
        out.terminated = static_cast<uint8_t*>(keep.back().mutable_data());
        keep.push_back(output(truncated, py::dtype::of<bool>(), {}, "truncated", b));
        out.truncated = static_cast<uint8_t*>(keep.back().mutable_data());
        keep.push_back(ids_a);
        out.ids = static_cast<int64_t*>(ids_a.mutable_data());
        if (!weights.is_none()) {
            keep.push_back(output(weights, py::dtype::of<float>(), {}, "weights", b));
            out.weights = static_cast<float*>(keep.back().mutable_data());
        }
        if (!discount.is_none()) {
            keep.push_back(output(discount, py::dtype::of<float>(), {}, "discount", b));
            out.discount = static_cast<float*>(keep.back().mutable_data());
        }
        if (!next_start.is_none()) {
            keep.push_back(output(next_start, py::dtype::of<int64_t>(), {}, "next_start", b));
            out.next_start = static_cast<int64_t*>(keep.back().mutable_data());
        }
        check_disjoint(keep);
        // (a default py::array is an empty array, not a null handle: test ids_in)
        const int64_t* wanted = ids_in.is_none() ? nullptr : static_cast<const int64_t*>(request.data());
        py::gil_scoped_release release;
        if (wanted) {
            core_->get(b, wanted, beta, out);
        } else {
            core_->sample(b, beta, out);
        }
    }

    void update_priorities(py::handle ids, py::handle priorities) {
        py::array ids_a = id_array(ids, "ids");
        py::array p = py::array::ensure(priorities);
        if (!p) throw py::type_error("priorities must be array-like, got " + type_name(priorities));
        const char kind = p.dtype().kind();
        if (kind != 'f' && kind != 'i' && kind != 'u')
            throw py::type_error("priorities must be a float or integer array, got dtype " + dtype_str(p.dtype()));
        if (p.ndim() == 0) p = py::array(py::module_::import("numpy").attr("reshape")(p, py::make_tuple(1)));
        if (p.ndim() != 1 || p.shape(0) != ids_a.shape(0))
            throw py::value_error("priorities must have shape (" + std::to_string(ids_a.shape(0)) +
                                  ",) like ids, got " + shape_str(shape_of(p)));
        const py::ssize_t n = p.shape(0);
        std::vector<double> converted;  // float32 (what a learner hands back) is widened here, without numpy
        const bool contiguous = (p.flags() & py::array::c_style) && is_aligned(p);
        if (contiguous && same_dtype(p.dtype(), py::dtype::of<float>())) {
            const auto* f = static_cast<const float*>(p.data());
            converted.assign(f, f + n);
        } else if (!(contiguous && same_dtype(p.dtype(), py::dtype::of<double>()))) {
            p = c_contiguous(py::array(py::module_::import("numpy").attr("asarray")(p, "float64")), true);
        }
        const auto* v = converted.empty() ? static_cast<const double*>(p.data()) : converted.data();
        for (py::ssize_t i = 0; i < n; ++i) {
            if (!(std::isfinite(v[i]) && v[i] >= 0)) {
                throw py::value_error("priorities must be finite and >= 0, got " +
                                      py::str(py::float_(v[i])).cast<std::string>() + " at index " +
                                      std::to_string(i) + " (nothing was updated)");
            }
        }
        const auto* id = static_cast<const int64_t*>(ids_a.data());
        py::gil_scoped_release release;
        core_->update_priorities(id, v, n);
    }

    py::array probabilities(py::handle ids) {
        py::array ids_a = id_array(ids, "ids");
        py::array_t<double> out(ids_a.shape(0));
        const auto* id = static_cast<const int64_t*>(ids_a.data());
        double* dst = out.mutable_data();
        const int64_t n = ids_a.shape(0);
        py::gil_scoped_release release;
        if (n > 0) core_->probabilities(id, n, dst);
        return out;
    }

    Shape frame_shape() const {
        Shape s = obs_shape_;
        if (core_->config().frame_stack > 1) {
            if (core_->config().layout.stack_last) {
                s.pop_back();
            } else {
                s.erase(s.begin());
            }
        }
        return s;
    }

    // Persistence (the format is dqn_fast/replay.py's). Calls write(state,
    // arrays) holding the buffer's mutex, so no add can tear the snapshot;
    // the arrays are read-only views of the buffer's memory, valid only
    // inside write.
    py::object snapshot(py::object self, py::function write) {
        std::unique_lock<std::mutex> lock;
        {
            py::gil_scoped_release release;
            lock = core_->lock();
        }
        const BufferState s = core_->state();
        const int k = core_->config().frame_stack;
        py::array_t<uint8_t> open(py::ssize_t(s.streams.size()));
        py::array_t<int64_t> seqs({py::ssize_t(s.streams.size()), py::ssize_t(k)});
        for (size_t e = 0; e < s.streams.size(); ++e) {
            open.mutable_at(e) = s.streams[e].open;
            for (int j = 0; j < k; ++j) seqs.mutable_at(e, j) = s.streams[e].seqs[j];
        }
        py::dict state;
        state["next_seq"] = s.next_seq;
        state["head"] = s.head;
        state["tail"] = s.tail;
        state["rng"] = py::make_tuple(s.rng[0], s.rng[1], s.rng[2], s.rng[3]);
        state["stream_open"] = open;
        state["stream_seqs"] = seqs;
        state["max_priority"] = s.max_priority;
        state["arena_tail"] = s.arena_tail;
        state["arena_head"] = s.arena_head;
        return write(state, views(self, s.next_seq, s.head, s.arena_head, false));
    }

    // Writable views of a fresh buffer's arrays, cut to the rows a loaded
    // state with these counters has written; filled in place, then _restore.
    py::dict load_views(py::object self, int64_t next_seq, int64_t head, uint64_t arena_head) {
        if (core_->total_adds() != 0 || core_->frames_written() != 0)
            throw py::value_error("can only load into a buffer that has never been added to");
        return views(self, next_seq, head, arena_head, true);
    }

    void restore(int64_t next_seq, int64_t head, int64_t tail, const std::vector<uint64_t>& rng,
                 const py::array_t<uint8_t, py::array::c_style>& open,
                 const py::array_t<int64_t, py::array::c_style>& seqs, double max_priority, int64_t arena_tail,
                 uint64_t arena_head) {
        const int ne = core_->num_envs(), k = core_->config().frame_stack;
        if (rng.size() != 4) throw py::value_error("the PRNG state must be 4 integers");
        if (open.ndim() != 1 || open.shape(0) != ne || seqs.ndim() != 2 || seqs.shape(0) != ne || seqs.shape(1) != k)
            throw py::value_error("stream arrays must have shapes (num_envs,) and (num_envs, frame_stack)");
        BufferState s;
        s.next_seq = next_seq;
        s.head = head;
        s.tail = tail;
        std::copy(rng.begin(), rng.end(), s.rng);
        s.max_priority = max_priority;
        s.arena_tail = arena_tail;
        s.arena_head = arena_head;
        s.streams.resize(ne);
        for (int e = 0; e < ne; ++e) {
            if (open.at(e) > 1) throw py::value_error("stream open flags must be 0 or 1");
            s.streams[e].open = open.at(e) != 0;
            s.streams[e].seqs.assign(seqs.data(e, 0), seqs.data(e, 0) + k);
        }
        py::gil_scoped_release release;
        core_->restore(s);
    }

    ReplayBuffer& core() { return *core_; }
    const Shape& obs_shape() const { return obs_shape_; }
    const Shape& action_shape() const { return action_shape_; }
    py::dtype obs_dtype() const { return obs_dtype_; }
    py::dtype action_dtype() const { return action_dtype_; }

private:
    // Transition ids: a 1-D integer array (a scalar counts as one), as int64.
    static py::array id_array(py::handle h, const char* name) {
        if (h.is_none() || PyFloat_Check(h.ptr()) || PyUnicode_Check(h.ptr()) || PyBool_Check(h.ptr()))
            throw py::type_error(std::string(name) + " must be an integer array, got " + type_name(h));
        py::array a = py::array::ensure(h);
        if (!a) throw py::type_error(std::string(name) + " must be an integer array, got " + type_name(h));
        const char kind = a.dtype().kind();
        if (kind != 'i' && kind != 'u')
            throw py::type_error(std::string(name) + " must be an integer array, got dtype " + dtype_str(a.dtype()));
        // The common case, a batch's own int64 ids: no numpy call (each costs ~0.5 us).
        if (a.ndim() == 1 && same_dtype(a.dtype(), py::dtype::of<int64_t>()) && (a.flags() & py::array::c_style) &&
            is_aligned(a))
            return a;
        auto np = py::module_::import("numpy");
        if (a.ndim() == 0) a = py::array(np.attr("reshape")(a, py::make_tuple(1)));
        if (a.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D, got shape " + shape_str(shape_of(a)));
        if (kind == 'u' && a.dtype().itemsize() == 8 && a.size() > 0 &&
            np.attr("max")(a).cast<uint64_t>() > uint64_t(INT64_MAX))
            throw py::value_error(std::string(name) + " holds " + py::str(np.attr("max")(a)).cast<std::string>() +
                                  ", which is no transition id");
        return c_contiguous(py::array(np.attr("asarray")(a, "int64")), true);
    }

    // A C-contiguous view (or copy) of a batch of observations, shape checked.
    py::array observation(py::handle h, const char* name) const {
        py::array a = py::array::ensure(h);
        if (!a) throw py::type_error(std::string(name) + " must be an array of " + dtype_str(obs_dtype_));
        if (only_byte_order_differs(a.dtype(), obs_dtype_)) {
            throw py::type_error(std::string(name) + " must be in native byte order (dtype " + dtype_str(obs_dtype_) +
                                 "), got a " + byte_order_str(a.dtype()) + " " + dtype_str(a.dtype()) + " array");
        }
        if (!same_dtype(a.dtype(), obs_dtype_)) {
            throw py::type_error(std::string(name) + " must have dtype " + dtype_str(obs_dtype_) + " (obs_dtype), got " +
                                 dtype_str(a.dtype()));
        }
        check_batched_shape(a, obs_shape_, name);
        return c_contiguous(a, false);  // frames are copied with memcpy: any alignment will do
    }

    // num_envs items of `item_shape`, converted to `dtype` (native byte
    // order) when numpy calls that a same-kind cast (int32 -> int64,
    // float64 -> float32, '>f4' -> float32), as long as no value changes
    // beyond rounding: an integer out of the dtype's range or a finite float
    // that would become inf is a ValueError, never a wrapped value.
    py::array per_env(py::handle h, const py::dtype& dtype, const Shape& item_shape, const char* name,
                      const char* dtype_name) const {
        const bool int_target = dtype.kind() == 'i' || dtype.kind() == 'u';
        if (int_target && PyLong_Check(h.ptr()) && !PyBool_Check(h.ptr())) check_int_range(h, dtype, name);
        py::array a = py::array::ensure(h);
        if (!a) throw py::type_error(std::string(name) + " must be array-like, got " + type_name(h));
        if (same_dtype(a.dtype(), dtype)) {
            check_batched_shape(a, item_shape, name);
            return c_contiguous(a, true);
        }
        auto np = py::module_::import("numpy");
        if (!np.attr("can_cast")(a.dtype(), dtype, "same_kind").cast<bool>()) {
            throw py::type_error(std::string(name) + " must have a dtype castable to " + dtype_str(dtype) + " (" +
                                 dtype_name + "), got " + dtype_str(a.dtype()));
        }
        check_batched_shape(a, item_shape, name);
        const char from = a.dtype().kind();
        if (!np.attr("can_cast")(a.dtype(), dtype).cast<bool>()) {  // narrowing: values must fit
            if (int_target && (from == 'i' || from == 'u')) {
                check_int_range(np.attr("min")(a), dtype, name);
                check_int_range(np.attr("max")(a), dtype, name);
            }
            if (dtype.kind() == 'f') check_float_range(a, dtype, name);
        }
        return c_contiguous(py::array(np.attr("asarray")(a, dtype)), true);
    }

    // A narrowing cast to a float dtype must not turn a finite value into
    // inf: magnitudes from max + half an ulp up round to it. float64 input
    // (gymnasium's rewards) is checked here; anything else through numpy.
    static void check_float_range(const py::array& a, const py::dtype& dtype, const char* name) {
        const auto fail = [&] {
            throw py::value_error(std::string(name) + " holds a value too large for " + dtype_str(dtype));
        };
        if (a.dtype().kind() == 'f' && a.dtype().itemsize() == 8 && is_native(a.dtype()) && dtype.itemsize() <= 4) {
            const double limit = dtype.itemsize() == 4 ? kFloat32Overflow : 65520.0;  // float32, float16
            const py::array c = c_contiguous(a, true);
            const auto* v = static_cast<const double*>(c.data());
            for (py::ssize_t i = 0; i < c.size(); ++i) {
                if (std::isfinite(v[i]) && std::fabs(v[i]) >= limit) fail();
            }
            return;
        }
        auto np = py::module_::import("numpy");
        py::object top = np.attr("finfo")(dtype).attr("max");
        py::object ulp = top - np.attr("nextafter")(top, py::int_(0));  // the spacing just below max
        py::object limit = np.attr("longdouble")(top) + np.attr("longdouble")(ulp) / py::int_(2);  // exact
        py::object mag = np.attr("abs")(np.attr("asarray")(a, np.attr("longdouble")));
        if (np.attr("any")(np.attr("isfinite")(mag) & mag.attr("__ge__")(limit)).cast<bool>()) fail();
    }

    static void check_int_range(py::handle value, const py::dtype& dtype, const char* name) {
        auto info = py::module_::import("numpy").attr("iinfo")(dtype);
        py::object v = py::reinterpret_borrow<py::object>(value).attr("__int__")();
        if (v < info.attr("min") || v > info.attr("max")) {
            throw py::value_error(std::string(name) + " " + py::str(v).cast<std::string>() + " does not fit " +
                                  dtype_str(dtype) + " (range " + py::str(info.attr("min")).cast<std::string>() +
                                  " to " + py::str(info.attr("max")).cast<std::string>() + ")");
        }
    }

    static bool scalar_float(py::handle h, float& value) {
        if (!PyFloat_CheckExact(h.ptr()) && !PyLong_CheckExact(h.ptr())) return false;
        const double d = PyFloat_AsDouble(h.ptr());
        if (PyErr_Occurred()) {  // an int beyond a double's range
            PyErr_Clear();
            throw py::value_error("reward " + py::str(h).cast<std::string>().substr(0, 40) +
                                  "... is too large for float32");
        }
        if (std::isfinite(d) && std::fabs(d) >= kFloat32Overflow) {
            char text[32];
            std::snprintf(text, sizeof text, "%.6g", d);
            throw py::value_error(std::string("reward ") + text + " is too large for float32");
        }
        value = float(d);
        return true;
    }

    // Episode-end flags: bools (or 0/1 integers), one per env.
    const uint8_t* flag(py::handle h, uint8_t& value, py::array& keep, const char* name) const {
        if (core_->num_envs() == 1 && (h.ptr() == Py_True || h.ptr() == Py_False)) {
            value = h.ptr() == Py_True;
            return &value;
        }
        py::array a = py::array::ensure(h);
        if (!a) throw py::type_error(std::string(name) + " must be bool array-like, got " + type_name(h));
        const char kind = a.dtype().kind();
        if (kind != 'b' && kind != 'i' && kind != 'u') {
            throw py::type_error(std::string(name) + " must have dtype bool, got " + dtype_str(a.dtype()));
        }
        check_batched_shape(a, {}, name);
        if (kind != 'b') {
            auto np = py::module_::import("numpy");
            if (!np.attr("all")(np.attr("isin")(a, py::make_tuple(0, 1))).cast<bool>())
                throw py::value_error(std::string(name) + " must hold only 0/1 or True/False values");
            a = py::array(np.attr("asarray")(a, "bool"));
        }
        keep = c_contiguous(a, false);
        return static_cast<const uint8_t*>(keep.data());
    }

    void check_batched_shape(const py::array& a, const Shape& item, const char* name) const {
        const int ne = core_->num_envs();
        const Shape got = shape_of(a);
        if (got == prepend(ne, item) || (ne == 1 && got == item)) return;
        std::string expected = shape_str(prepend(ne, item));
        if (ne == 1) expected += " or " + shape_str(item);
        throw py::value_error(std::string(name) + " must have shape " + expected + " for num_envs=" +
                              std::to_string(ne) + ", got " + shape_str(got));
    }

    // A caller-owned output: an ndarray of exactly this dtype and (b, *item)
    // shape (b < 0: any batch), C-contiguous and writable.
    py::array output(py::handle h, const py::dtype& dtype, const Shape& item, const char* name, py::ssize_t b) const {
        if (!py::isinstance<py::array>(h)) {
            throw py::type_error(std::string("out.") + name + " must be a numpy array or CPU torch tensor, got " +
                                 type_name(h));
        }
        auto a = py::reinterpret_borrow<py::array>(h);
        if (only_byte_order_differs(a.dtype(), dtype)) {
            throw py::type_error(std::string("out.") + name + " must be in native byte order (dtype " + dtype_str(dtype) +
                                 "), got a " + byte_order_str(a.dtype()) + " " + dtype_str(a.dtype()) + " array");
        }
        if (!same_dtype(a.dtype(), dtype)) {
            throw py::type_error(std::string("out.") + name + " must have dtype " + dtype_str(dtype) + ", got " +
                                 dtype_str(a.dtype()));
        }
        const Shape got = shape_of(a);
        const bool ok = b < 0 ? (got.size() == item.size() + 1 && Shape(got.begin() + 1, got.end()) == item)
                              : got == prepend(b, item);
        if (!ok) {
            std::string want = shape_str(prepend(b < 0 ? 0 : b, item));  // "(n, ...)" or "(n,)"
            if (b < 0) want = "(batch_size" + want.substr(want.find_first_of(",)"));
            throw py::value_error(std::string("out.") + name + " must have shape " + want + ", got " + shape_str(got));
        }
        if (!(a.flags() & py::array::c_style))
            throw py::value_error(std::string("out.") + name + " must be C-contiguous");
        if (!a.writeable()) throw py::value_error(std::string("out.") + name + " must be writable, it is read-only");
        if (!is_aligned(a)) throw py::value_error(std::string("out.") + name + " must be aligned to its dtype");
        return a;
    }

    static void check_disjoint(const std::vector<py::array>& arrays) {
        for (size_t i = 0; i < arrays.size(); ++i) {
            auto lo_i = reinterpret_cast<uintptr_t>(arrays[i].data()), hi_i = lo_i + arrays[i].nbytes();
            for (size_t j = i + 1; j < arrays.size(); ++j) {
                auto lo_j = reinterpret_cast<uintptr_t>(arrays[j].data()), hi_j = lo_j + arrays[j].nbytes();
                if (lo_i < hi_j && lo_j < hi_i) throw py::value_error("out fields must not share memory");
            }
        }
    }

    static std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")); }

    // name -> 1-D uint8 view of each array, keeping `self` alive.
    py::dict views(py::object self, int64_t next_seq, int64_t head, uint64_t arena_head, bool writable) {
        py::dict out;
        for (const auto& a : core_->arrays(next_seq, head, arena_head)) {
            py::array_t<uint8_t> view({py::ssize_t(a.nbytes)}, {py::ssize_t(1)}, a.data, self);
            if (!writable) view.attr("setflags")(py::arg("write") = false);
            out[a.name] = view;
        }
        return out;
    }

    py::dtype obs_dtype_, action_dtype_;
    Shape obs_shape_, action_shape_;
    std::unique_ptr<ReplayBuffer> core_;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "Native replay core of dqn_fast (see dqn_fast.ReplayBuffer for the Python API).";
    m.attr("MAX_NUM_ENVS") = dqn_fast::kMaxNumEnvs;
    m.attr("MAX_SAMPLE_THREADS") = dqn_fast::kMaxSampleThreads;
    m.attr("MAX_FRAME_STACK") = dqn_fast::kMaxFrameStack;
    m.attr("MAX_N_STEP") = dqn_fast::kMaxNStep;
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const dqn_fast::AllocationError& e) {
            PyErr_SetString(PyExc_MemoryError, e.what());
        }
    });

    m.def(
        "crc32c",
        [](py::object data, uint32_t value) {
            Py_buffer view;
            if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
            uint32_t crc;
            {
                py::gil_scoped_release release;
                crc = dqn_fast::crc32c(view.buf, size_t(view.len), value);
            }
            PyBuffer_Release(&view);
            return crc;
        },
        py::arg("data"), py::arg("value") = 0,
        "CRC-32C of a contiguous buffer, continuing from `value`: crc32c(b, crc32c(a)) == crc32c(a + b).");

    m.def(
        "_probe_codec",
        [](const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& frames, const std::string& method,
           int repeats) {
            if (frames.ndim() < 2) throw py::value_error("frames must be (count, *frame_shape) uint8");
            const uint64_t count = uint64_t(frames.shape(0)), n = uint64_t(frames.size()) / std::max<uint64_t>(1, count);
            if (repeats < 1) throw py::value_error("repeats must be at least 1");
            dqn_fast::ProbeResult r;
            {
                py::gil_scoped_release release;
                r = dqn_fast::probe_codec(frames.data(), count, n, method, repeats);
            }
            return py::make_tuple(r.coded_bytes, r.decode_seconds);
        },
        py::arg("frames"), py::arg("method"), py::arg("repeats") = 3,
        "Benchmark only (csrc/codec_probe.hpp): (bytes, decode seconds) of frames 1.. coded against their "
        "predecessor with `method` (patch, xor-lz4, xor-zstd) or alone (lz4, zstd).");

    // The priority trees on their own, for tests (drift, min, draws); the buffer uses them natively.
    py::class_<dqn_fast::SumTree>(m, "SumTree")
        .def(py::init([](uint64_t leaves) {
                 if (leaves < 1) throw py::value_error("a SumTree needs at least one leaf");
                 return dqn_fast::SumTree(leaves);
             }),
             py::arg("leaves"))
        .def(
            "set",
            [](dqn_fast::SumTree& t, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& index,
               const py::array_t<double, py::array::c_style | py::array::forcecast>& mass) {
                if (index.ndim() != 1 || mass.ndim() != 1 || index.shape(0) != mass.shape(0))
                    throw py::value_error("index and mass must be 1-D arrays of one length");
                const int64_t* i = index.data();
                const double* v = mass.data();
                for (py::ssize_t j = 0; j < index.shape(0); ++j) {
                    if (i[j] < 0 || uint64_t(i[j]) >= t.leaves()) throw py::index_error("leaf index out of range");
                    if (!(std::isfinite(v[j]) && v[j] >= 0)) throw py::value_error("masses must be finite and >= 0");
                }
                py::gil_scoped_release release;
                for (py::ssize_t j = 0; j < index.shape(0); ++j) t.set(uint64_t(i[j]), v[j]);
            },
            py::arg("index"), py::arg("mass"), "Leaves index[j] := mass[j], in order.")
        .def("find",
             [](const dqn_fast::SumTree& t, double u) {
                 if (!(t.total() > 0 && u >= 0 && u < t.total())) throw py::value_error("u must be in [0, total)");
                 return t.find(u);
             })
        .def("find_many",
             [](const dqn_fast::SumTree& t, const py::array_t<double, py::array::c_style | py::array::forcecast>& u) {
                 if (u.ndim() != 1) throw py::value_error("u must be 1-D");
                 std::vector<double> scratch(u.data(), u.data() + u.shape(0));
                 for (double x : scratch)
                     if (!(t.total() > 0 && x >= 0 && x < t.total())) throw py::value_error("u must be in [0, total)");
                 py::array_t<uint64_t> out(u.shape(0));
                 t.find_many(scratch.data(), out.mutable_data(), int64_t(scratch.size()));
                 return out;
             })
        .def("get", [](const dqn_fast::SumTree& t, uint64_t i) {
            if (i >= t.leaves()) throw py::index_error("leaf index out of range");
            return t.get(i);
        })
        .def_property_readonly("total", &dqn_fast::SumTree::total)
        .def_property_readonly("min", &dqn_fast::SumTree::min)
        .def_property_readonly("leaves", &dqn_fast::SumTree::leaves);

    py::class_<PyReplayBuffer>(m, "ReplayBufferCore")
        .def(py::init<uint64_t, int, int, const Shape&, py::dtype, const Shape&, py::dtype, uint64_t, bool, double, int,
                      int, double, bool, double, double, const std::string&, uint64_t>(),
             py::arg("capacity"), py::arg("num_envs"), py::arg("frame_stack"), py::arg("frame_shape"),
             py::arg("obs_dtype"), py::arg("action_shape"), py::arg("action_dtype"), py::arg("seed"),
             py::arg("stack_last"), py::arg("frame_reserve"), py::arg("sample_threads"), py::arg("n_step") = 1,
             py::arg("gamma") = 0.99, py::arg("prioritized") = false, py::arg("alpha") = 0.6,
             py::arg("priority_eps") = 1e-6, py::arg("compression") = "none", py::arg("frame_memory") = 0)
        .def("add", &PyReplayBuffer::add, py::arg("obs"), py::arg("action"), py::arg("reward"), py::arg("next_obs"),
             py::arg("terminated"), py::arg("truncated"),
             "Add one transition per env. Arrays carry a leading num_envs axis (optional when num_envs == 1).")
        .def("_fill_into", &PyReplayBuffer::fill_into, py::arg("obs"), py::arg("next_obs"), py::arg("frames"),
             py::arg("action"), py::arg("reward"), py::arg("terminated"), py::arg("truncated"), py::arg("ids"),
             py::arg("weights"), py::arg("discount"), py::arg("next_start"), py::arg("beta"), py::arg("ids_in"))
        .def("_update_priorities", &PyReplayBuffer::update_priorities, py::arg("ids"), py::arg("priorities"))
        .def("_probabilities", &PyReplayBuffer::probabilities, py::arg("ids"))
        .def("_snapshot",
             [](py::object self, py::function write) { return self.cast<PyReplayBuffer&>().snapshot(self, write); },
             py::arg("write"))
        .def("_load_views",
             [](py::object self, int64_t next_seq, int64_t head, uint64_t arena_head) {
                 return self.cast<PyReplayBuffer&>().load_views(self, next_seq, head, arena_head);
             },
             py::arg("next_seq"), py::arg("head"), py::arg("arena_head") = 0)
        .def("_restore", &PyReplayBuffer::restore, py::arg("next_seq"), py::arg("head"), py::arg("tail"),
             py::arg("rng"), py::arg("stream_open"), py::arg("stream_seqs"), py::arg("max_priority"),
             py::arg("arena_tail") = 0, py::arg("arena_head") = 0)
        .def("__len__", [](PyReplayBuffer& b) { return b.core().size(); })
        .def_property_readonly("capacity", [](PyReplayBuffer& b) { return b.core().capacity(); })
        .def_property_readonly("num_envs", [](PyReplayBuffer& b) { return b.core().num_envs(); })
        .def_property_readonly("frame_stack", [](PyReplayBuffer& b) { return b.core().config().frame_stack; })
        .def_property_readonly("nbytes", [](PyReplayBuffer& b) { return b.core().nbytes(); },
                               "Bytes allocated for frames and transition metadata.")
        .def_property_readonly("frame_capacity", [](PyReplayBuffer& b) { return b.core().frame_capacity(); },
                               "Frame slots: capacity plus the reserve for episode starts.")
        .def_property_readonly("total_adds", [](PyReplayBuffer& b) { return b.core().total_adds(); },
                               "Transitions ever added; the next insertion id.")
        .def_property_readonly("frames_written", [](PyReplayBuffer& b) { return b.core().frames_written(); },
                               "Frames ever stored (one per step, plus episode starts).")
        .def_property_readonly("obs_shape", [](PyReplayBuffer& b) { return py::tuple(py::cast(b.obs_shape())); })
        .def_property_readonly("frame_shape", [](PyReplayBuffer& b) { return py::tuple(py::cast(b.frame_shape())); })
        .def_property_readonly("action_shape", [](PyReplayBuffer& b) { return py::tuple(py::cast(b.action_shape())); })
        .def_property_readonly("obs_dtype", &PyReplayBuffer::obs_dtype)
        .def_property_readonly("action_dtype", &PyReplayBuffer::action_dtype)
        .def_property_readonly("stack_last", [](PyReplayBuffer& b) { return b.core().config().layout.stack_last; })
        .def_property_readonly("n_step", [](PyReplayBuffer& b) { return b.core().config().n_step; })
        .def_property_readonly(
            "compression",
            [](PyReplayBuffer& b) -> py::object {
                switch (b.core().config().compression) {
                    case dqn_fast::Codec::kLz4: return py::str("lz4");
                    case dqn_fast::Codec::kZstd: return py::str("zstd");
                    default: return py::none();
                }
            },
            "None, 'lz4' or 'zstd': how frames are stored (see the README's compressed frame store).")
        .def_property_readonly("frame_memory", [](PyReplayBuffer& b) { return b.core().frame_memory(); },
                               "Bytes the compressed frame arena may take (0 uncompressed).")
        .def_property_readonly("frame_memory_used", [](PyReplayBuffer& b) { return b.core().frame_memory_used(); },
                               "Arena bytes the stored frames take now: payload and slack (0 uncompressed).")
        .def_property_readonly("gamma", [](PyReplayBuffer& b) { return b.core().config().gamma; })
        .def_property_readonly("prioritized", [](PyReplayBuffer& b) { return b.core().config().prioritized; })
        .def_property_readonly("alpha", [](PyReplayBuffer& b) { return b.core().config().alpha; })
        .def_property_readonly("priority_eps", [](PyReplayBuffer& b) { return b.core().config().priority_eps; })
        .def_property_readonly(
            "max_priority",
            [](PyReplayBuffer& b) {
                py::gil_scoped_release release;  // the core's mutex (a save may hold it while running Python)
                return b.core().max_priority();
            },
            "The largest priority set so far (1.0 before any update): what new transitions get.");
}
