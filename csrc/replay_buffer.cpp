#include "replay_buffer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include <sched.h>
#include <unistd.h>

namespace dqn_fast {

namespace {

// Gathers below this many bytes run on the calling thread alone: waking a
// worker costs more than it saves.
constexpr uint64_t kParallelGatherBytes = 256 * 1024;

BufferConfig clamped(BufferConfig c) {
    c.capacity = std::min(c.capacity, uint64_t(1) << 33);
    return c;
}

// CPUs this process may run on (affinity masks, taskset, CPU sets), not the machine's.
int usable_cpus() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, int(std::thread::hardware_concurrency()));
}

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace

uint64_t ReplayBuffer::frame_capacity_for(const BufferConfig& c) {
    // A proportional reserve for the extra frames of episode starts, plus
    // room for the largest single add (every env starting a segment whose
    // next_obs is not a shift: 2k frames each) on top of the k frames each
    // open stream still needs, so that continuing streams always survive.
    const uint64_t k = uint64_t(c.frame_stack);
    const auto proportional = uint64_t(std::ceil(c.frame_reserve * double(c.capacity)));
    return c.capacity + proportional + 2 * k * (k + 1) * uint64_t(c.num_envs);
}

uint64_t ReplayBuffer::default_frame_memory(const BufferConfig& c) {
    // An eighth of a frame, but room for small frames (which barely code) raw.
    const uint64_t fb = c.layout.frame_bytes;
    const uint64_t per_frame = std::max(fb / 8, std::min<uint64_t>(fb, 64)) + 1;
    return std::max(checked_mul(frame_capacity_for(c), per_frame, "the frame arena"),
                    FrameArena::min_arena_bytes(c.layout.frame_bytes, c.num_envs, c.frame_stack));
}

uint64_t ReplayBuffer::env_bytes(int frame_stack) {
    constexpr uint64_t kMallocOverhead = 16;  // glibc's per-allocation header
    return sizeof(EnvStream) + uint64_t(frame_stack) * sizeof(int64_t) + kMallocOverhead + sizeof(EnvPlan);
}

ReplayBuffer::ReplayBuffer(const BufferConfig& config) : config_(config), k_(config.frame_stack) {
    const auto& c = config_;
    if (k_ == 1) config_.layout.stack_last = false;  // one frame: nothing to interleave
    require(c.capacity >= 1, "capacity must be at least 1, got " + std::to_string(c.capacity));
    require(c.num_envs >= 1 && c.num_envs <= kMaxNumEnvs, "num_envs must be between 1 and " +
                                                               std::to_string(kMaxNumEnvs) + ", got " +
                                                               std::to_string(c.num_envs));
    require(c.frame_stack >= 1 && c.frame_stack <= kMaxFrameStack,
            "frame_stack must be between 1 and " + std::to_string(kMaxFrameStack) + ", got " +
                std::to_string(c.frame_stack));
    require(c.sample_threads >= 0 && c.sample_threads <= kMaxSampleThreads,
            "sample_threads must be between 0 and " + std::to_string(kMaxSampleThreads) + ", got " +
                std::to_string(c.sample_threads));
    require(c.layout.frame_bytes >= 1 && c.layout.elem_size >= 1 &&
                c.layout.frame_bytes % c.layout.elem_size == 0,
            "a frame must hold at least one element");
    require(c.capacity >= uint64_t(c.num_envs),
            "capacity=" + std::to_string(c.capacity) + " is smaller than one add needs: num_envs=" +
                std::to_string(c.num_envs) + " transitions");
    require(std::isfinite(c.frame_reserve) && c.frame_reserve >= 0.0 && c.frame_reserve <= 64.0,
            "frame_reserve must be a fraction between 0 and 64, got " + std::to_string(c.frame_reserve));
    require(c.n_step >= 1 && c.n_step <= kMaxNStep,
            "n_step must be between 1 and " + std::to_string(kMaxNStep) + ", got " + std::to_string(c.n_step));
    require(std::isfinite(c.gamma) && c.gamma >= 0.0 && c.gamma <= 1.0,
            "gamma must be between 0 and 1, got " + std::to_string(c.gamma));
    require(std::isfinite(c.alpha) && c.alpha >= 0.0, "alpha must be finite and >= 0, got " + std::to_string(c.alpha));
    require(std::isfinite(c.priority_eps) && c.priority_eps >= 0.0,
            "priority_eps must be finite and >= 0, got " + std::to_string(c.priority_eps));
    require(!c.prioritized || mass(1.0) <= kMaxMass,
            "(1 + priority_eps)^alpha is too large for the priority tree");
    // Capacities past 2^32 cannot be stored (32-bit frame slots); clamp the
    // estimate so the error below can still say how many bytes that would be.
    const uint64_t frames = frame_capacity_for(c.capacity < (uint64_t(1) << 33) ? c : clamped(c));
    if (c.capacity >= (uint64_t(1) << 32) || frames >= (uint64_t(1) << 32)) {
        const long double per_frame = (long double)c.layout.frame_bytes + 2.0L * k_ * 4;
        const long double wanted = per_frame * frames * ((long double)c.capacity / (long double)clamped(c).capacity);
        throw AllocationError("cannot allocate " + std::to_string(uint64_t(std::min(wanted, 1.8e19L))) +
                              " bytes or more for capacity=" + std::to_string(c.capacity) +
                              ": a buffer holds at most 2^32 frames");
    }
    obs_bytes_ = checked_mul(uint64_t(k_), c.layout.frame_bytes, "one observation");

    // Check the whole footprint before touching anything, so the error says
    // what was asked for instead of failing halfway or at first touch. Every
    // product is overflow-checked: a wrapped size would pass the check and
    // allocate too little.
    const char* what = "the replay buffer";
    const uint64_t per_transition = checked_add(2 * uint64_t(k_) * 4 + 8 + 4 + 1, c.action_bytes, what);
    if (compressed()) {
        require(c.layout.frame_bytes < (uint64_t(1) << 31),
                "compression needs frames under 2 GiB, got " + std::to_string(c.layout.frame_bytes) + " bytes");
        const uint64_t least = FrameArena::min_arena_bytes(c.layout.frame_bytes, c.num_envs, k_);
        if (c.frame_memory == 0) config_.frame_memory = default_frame_memory(c);
        require(c.frame_memory >= least, "frame_memory=" + std::to_string(c.frame_memory) +
                                             " bytes is less than one add of " + std::to_string(c.num_envs) +
                                             " envs can need: at least " + std::to_string(least) + " bytes");
    }
    uint64_t total = compressed() ? checked_add(c.frame_memory, FrameArena::overhead_bytes(frames, c.layout.frame_bytes, c.num_envs, k_), what)
                                  : checked_mul(frames, c.layout.frame_bytes, "the frame store");
    total = checked_add(total, checked_mul(c.capacity, per_transition, "the transition index"), what);
    total = checked_add(total, uint64_t(c.num_envs) * env_bytes(k_), what);
    total = checked_add(total, 2 * c.layout.frame_bytes, what);  // channel-last scratch
    if (c.prioritized) total = checked_add(total, SumTree::bytes_for(c.capacity), what);
    check_can_allocate(total, what);

    if (compressed()) {
        arena_ = FrameArena(frames, c.layout.frame_bytes, c.frame_memory, c.compression, c.num_envs, k_);
        arena_refs_.assign(size_t(c.num_envs), -1);
        force_key_.assign(size_t(c.num_envs), false);
    } else {
        store_ = FrameStore(frames, c.layout.frame_bytes);
    }
    add_seqs_.resize(size_t(c.num_envs) * 2 * size_t(k_));
    index_ = EpisodeIndex(c.capacity, c.num_envs, k_, frames);
    actions_ = Column<uint8_t>(checked_mul(c.capacity, c.action_bytes, "the actions"));
    rewards_ = Column<float>(c.capacity);
    flags_ = Column<uint8_t>(c.capacity);
    rng_.reseed(c.seed);
    plan_.resize(c.num_envs);
    if (c.layout.stack_last && k_ > 1) scratch_.resize(2 * c.layout.frame_bytes);
    if (c.prioritized) tree_ = SumTree(c.capacity);
}

void ReplayBuffer::publish_counters() {
    size_.store(index_.size());
    total_adds_.store(index_.head());
    frames_written_.store(compressed() ? arena_.next_seq() : store_.next_seq());
    frame_memory_used_.store(compressed() ? arena_.used_bytes() : 0);
}

uint64_t ReplayBuffer::nbytes() const {
    return store_.nbytes() + arena_.nbytes() + index_.nbytes() + actions_.nbytes() + rewards_.nbytes() + flags_.nbytes() +
           scratch_.size() + uint64_t(config_.num_envs) * env_bytes(k_) + tree_.nbytes();
}

// Frame j of a caller observation as a contiguous pointer (copied into
// `scratch` for channel-last stacks).
const uint8_t* ReplayBuffer::frame_of(const uint8_t* obs, int j, uint8_t* scratch) const {
    if (const uint8_t* p = config_.layout.contiguous(obs, j, k_)) return p;
    config_.layout.read(obs, j, k_, scratch);
    return scratch;
}

uint64_t ReplayBuffer::runs_of(const uint8_t* obs, int& new_frames) {
    const uint64_t fb = config_.layout.frame_bytes;
    uint64_t runs = 0;
    new_frames = 1;
    for (int j = 1; j < k_; ++j) {
        const uint8_t* prev = frame_of(obs, j - 1, scratch_.data());
        const uint8_t* cur = frame_of(obs, j, scratch_.data() + (scratch_.empty() ? 0 : fb));
        if (std::memcmp(prev, cur, fb) == 0) {
            runs |= uint64_t(1) << j;
        } else {
            ++new_frames;
        }
    }
    return runs;
}

bool ReplayBuffer::equals_stream(const uint8_t* obs, int env) {
    const EnvStream& stream = index_.stream(env);
    if (!stream.open) return false;
    const uint64_t fb = config_.layout.frame_bytes;
    if (compressed()) {
        const int64_t live = arena_.oldest_live_seq();
        for (int j = 0; j < k_; ++j)
            if (!arena_.decodable(stream.seqs[j], live)) return false;
        const uint8_t* raw = arena_.stream_raw(env);
        for (int j = k_ - 1; j >= 0; --j)
            if (std::memcmp(frame_of(obs, j, scratch_.data()), raw + uint64_t(j) * fb, fb) != 0) return false;
        return true;
    }
    if (stream.seqs[0] < store_.oldest_live_seq()) return false;
    for (int j = k_ - 1; j >= 0; --j) {  // newest first: that is where streams differ
        if (std::memcmp(frame_of(obs, j, scratch_.data()), store_.frame(stream.seqs[j]), fb) != 0)
            return false;
    }
    return true;
}

bool ReplayBuffer::is_shift(const uint8_t* obs, const uint8_t* next_obs) {
    const uint64_t fb = config_.layout.frame_bytes;
    if (!config_.layout.stack_last || k_ == 1) {
        return k_ == 1 || std::memcmp(obs + fb, next_obs, (k_ - 1) * fb) == 0;
    }
    for (int j = 0; j + 1 < k_; ++j) {
        const uint8_t* a = frame_of(obs, j + 1, scratch_.data());
        const uint8_t* b = frame_of(next_obs, j, scratch_.data() + fb);
        if (std::memcmp(a, b, fb) != 0) return false;
    }
    return true;
}

int64_t ReplayBuffer::push_frame(int env, const uint8_t* frame) {
    return compressed() ? arena_.stage(env, frame) : store_.push(frame);
}

void ReplayBuffer::push_frames(int env, const uint8_t* obs, uint64_t runs, int64_t* seqs) {
    for (int j = 0; j < k_; ++j) {
        seqs[j] = (runs >> j & 1) ? seqs[j - 1] : push_frame(env, frame_of(obs, j, scratch_.data()));
    }
}

// The frames of env e's transition in this add: its stream's or new ones.
void ReplayBuffer::stage_env(int e, const AddArgs& a, int64_t* seqs) {
    const EnvPlan& p = plan_[e];
    const EnvStream& stream = index_.stream(e);
    const uint8_t* obs = a.obs + e * obs_bytes_;
    const uint8_t* next = a.next_obs + e * obs_bytes_;
    if (p.continues) {
        std::copy(stream.seqs.begin(), stream.seqs.end(), seqs);
    } else {
        push_frames(e, obs, p.obs_runs, seqs);
    }
    if (p.shift) {
        std::copy(seqs + 1, seqs + k_, seqs + k_);
        seqs[2 * k_ - 1] = push_frame(e, frame_of(next, k_ - 1, scratch_.data()));
    } else {
        push_frames(e, next, p.next_runs, seqs + k_);
    }
}

void ReplayBuffer::append_env(int e, const AddArgs& a, const int64_t* seqs, int64_t oldest, double new_mass) {
    const EnvPlan& p = plan_[e];
    EnvStream& stream = index_.stream(e);
    const uint64_t slot = index_.append(seqs, oldest);
    const uint64_t ab = config_.action_bytes;
    std::memcpy(actions_.data() + slot * ab, a.action + e * ab, ab);
    rewards_[slot] = a.reward[e];
    const bool term = a.terminated[e] != 0, trunc = a.truncated[e] != 0;
    flags_[slot] = uint8_t((term ? kTerminated : 0) | (trunc ? kTruncated : 0) | (p.shift ? kShift : 0) |
                           (p.follows ? kFollows : 0));
    if (config_.prioritized) tree_.set(slot, new_mass);
    std::copy(seqs + k_, seqs + 2 * k_, stream.seqs.begin());
    stream.open = !(term || trunc);
}

// Transition eviction before an add writes: room for num_envs transitions,
// and none may name a frame older than `limit`.
void ReplayBuffer::evict_before(int64_t limit, int64_t old_tail, int64_t head) {
    const int ne = config_.num_envs;
    index_.evict_for(uint64_t(ne));
    index_.evict_frames_before(limit);
    if (config_.prioritized) {
        // Evicted leaves go to 0, except the slots this add writes (ids below
        // `reused` share their slot with one of the new transitions: set by append_env).
        const int64_t reused = head + ne - int64_t(config_.capacity);
        for (int64_t id = std::max(old_tail, reused); id < index_.tail(); ++id) tree_.set(index_.slot_of(id), 0.0);
    }
}

// The oldest frame a transition needs: the smallest seq, or (compressed)
// the oldest key its frames decode from.
int64_t ReplayBuffer::oldest_of(const int64_t* seqs) const {
    int64_t lo = INT64_MAX;
    for (int j = 0; j < 2 * k_; ++j) lo = std::min(lo, compressed() ? arena_.key_of(seqs[j]) : seqs[j]);
    return lo;
}

void ReplayBuffer::add(const AddArgs& a) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int ne = config_.num_envs;

    // 1. Plan: which envs continue their stream, and how many frames get written.
    int64_t n_new = 0;
    for (int e = 0; e < ne; ++e) {
        const uint8_t* obs = a.obs + e * obs_bytes_;
        const uint8_t* next = a.next_obs + e * obs_bytes_;
        EnvPlan& p = plan_[e];
        int frames = 0;
        p.follows = equals_stream(obs, e);
        p.continues = p.follows;
        p.obs_runs = p.continues ? 0 : runs_of(obs, frames);
        n_new += frames;
        p.shift = is_shift(obs, next);
        p.next_runs = p.shift ? 0 : runs_of(next, frames);
        n_new += p.shift ? 1 : frames;
    }
    if (compressed()) return add_compressed(a);

    // A continuing stream must not be overwritten by this very add; if it
    // would be (only possible with a tiny reserve), store its frames anew.
    const int64_t frame_cap = int64_t(store_.capacity());
    for (bool changed = true; changed;) {
        changed = false;
        for (int e = 0; e < ne; ++e) {
            if (plan_[e].continues && index_.stream(e).seqs[0] < store_.next_seq() + n_new - frame_cap) {
                int frames = 0;
                plan_[e].continues = false;
                plan_[e].obs_runs = runs_of(a.obs + e * obs_bytes_, frames);
                n_new += frames;
                changed = true;
            }
        }
    }

    // 2. Evict: room for ne transitions, and no stored transition may name a
    // frame this add overwrites.
    evict_before(store_.next_seq() + n_new - frame_cap, index_.tail(), index_.head());
    const double new_mass = config_.prioritized ? mass(max_priority_) : 0.0;

    // 3. Write frames, then the transitions that name them.
    int64_t* seqs = add_seqs_.data();  // 2k <= 128
    for (int e = 0; e < ne; ++e) {
        stage_env(e, a, seqs);
        append_env(e, a, seqs, oldest_of(seqs), new_mass);
    }
    publish_counters();
}

// add, compressed: code every new frame first (staged), find which frames
// the add's bytes push out of the arena, and re-plan until nothing this add
// needs is among them: a continuing stream whose key would go is stored
// anew, and a patch of a chain whose key would go is coded as a key. Each
// round flips at least one env for good, so this ends. Then evict, write.
void ReplayBuffer::add_compressed(const AddArgs& a) {
    const int ne = config_.num_envs, two_k = 2 * k_;
    int64_t limit = 0;
    for (;;) {
        arena_.begin(arena_refs_, force_key_);
        for (int e = 0; e < ne; ++e) stage_env(e, a, add_seqs_.data() + size_t(e) * two_k);
        limit = arena_.limit();
        bool changed = false;
        for (int e = 0; e < ne; ++e) {
            EnvPlan& p = plan_[e];
            if (p.continues) {
                const auto& seqs = index_.stream(e).seqs;
                int64_t key = INT64_MAX;
                for (int j = 0; j < k_; ++j) key = std::min(key, arena_.key_of(seqs[size_t(j)]));
                if (key < limit) {
                    int frames = 0;
                    p.continues = false;
                    p.obs_runs = runs_of(a.obs + e * obs_bytes_, frames);
                    changed = true;
                }
            }
            if (!force_key_[size_t(e)] && arena_.old_chain_key(e) < limit) {
                force_key_[size_t(e)] = true;
                changed = true;
            }
        }
        if (!changed) break;
    }
    evict_before(limit, index_.tail(), index_.head());
    const double new_mass = config_.prioritized ? mass(max_priority_) : 0.0;
    arena_.commit();
    const uint64_t fb = config_.layout.frame_bytes;
    for (int e = 0; e < ne; ++e) {
        const int64_t* seqs = add_seqs_.data() + size_t(e) * two_k;
        append_env(e, a, seqs, oldest_of(seqs), new_mass);
        const uint8_t* next = a.next_obs + e * obs_bytes_;
        uint8_t* raw = arena_.stream_raw(e);
        for (int j = 0; j < k_; ++j) std::memcpy(raw + uint64_t(j) * fb, frame_of(next, j, scratch_.data()), fb);
        arena_refs_[size_t(e)] = seqs[two_k - 1];
        force_key_[size_t(e)] = false;
    }
    publish_counters();
}

// Threads and scratch for a batch, before anything is drawn: whatever can
// fail here (threads, allocation) leaves the buffer as it was. Returns
// whether the gather may run on the pool.
bool ReplayBuffer::prepare(int64_t batch_size, const SampleOut& out) {
    if (batch_size < 1) throw std::invalid_argument("batch_size must be at least 1, got " + std::to_string(batch_size));
    if (index_.size() == 0)
        throw std::invalid_argument("cannot sample from an empty replay buffer: add transitions first");
    const uint64_t frames_per_item = out.frames ? uint64_t(k_ + config_.n_step) : 2 * uint64_t(k_);
    const uint64_t bytes = uint64_t(batch_size) * frames_per_item * config_.layout.frame_bytes;
    const bool parallel = bytes >= kParallelGatherBytes && config_.sample_threads != 1;
    if (pool_ && pool_pid_ != long(getpid())) {
        // A forked child has none of the parent's threads: the pool can be
        // neither used nor joined. Leak it and start a new one.
        (void)pool_.release();
    }
    if (parallel && !pool_) {
        int threads = config_.sample_threads;
        if (threads <= 0) threads = std::min(4, usable_cpus());
        pool_ = std::make_unique<WorkerPool>(threads - 1);  // may start fewer (see WorkerPool)
        pool_pid_ = long(getpid());
    }
    if (config_.n_step > 1 && windows_.size() < uint64_t(batch_size)) windows_.resize(uint64_t(batch_size));
    if (config_.prioritized && draws_.size() < uint64_t(batch_size)) {
        draws_.resize(uint64_t(batch_size));
        leaves_.resize(uint64_t(batch_size));
    }
    return parallel;
}

void ReplayBuffer::sample(int64_t batch_size, double beta, const SampleOut& out) {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool parallel = prepare(batch_size, out);
    const Rng saved = rng_;
    const uint64_t n = index_.size();
    if (!config_.prioritized) {
        for (int64_t i = 0; i < batch_size; ++i) out.ids[i] = index_.tail() + int64_t(rng_.below(n));
    } else {
        // Stratified: one draw in each of B equal segments of the total mass.
        const double total = tree_.total(), below_total = std::nextafter(total, 0.0);
        for (int64_t i = 0; i < batch_size; ++i) {
            const double u01 = double(rng_.next() >> 11) * 0x1.0p-53;
            // total * (fraction): total * (i + u) could overflow for masses near kMaxMass
            draws_[i] = std::min(total * ((double(i) + u01) / double(batch_size)), below_total);
        }
        tree_.find_many(draws_.data(), leaves_.data(), batch_size);
        for (int64_t i = 0; i < batch_size; ++i) out.ids[i] = id_of_slot_for(leaves_[i], index_.tail());
    }
    fill(batch_size, beta, out, parallel, saved);
}

void ReplayBuffer::check_ids(const int64_t* ids, int64_t count) const {
    const int64_t tail = index_.tail(), head = index_.head();
    for (int64_t i = 0; i < count; ++i) {
        if (ids[i] < tail || ids[i] >= head) {
            throw std::invalid_argument("transition id " + std::to_string(ids[i]) + " is not stored (ids[" +
                                        std::to_string(i) + "]; the stored ids are [" + std::to_string(tail) + ", " +
                                        std::to_string(head) + "))");
        }
    }
}

void ReplayBuffer::get(int64_t batch_size, const int64_t* ids, double beta, const SampleOut& out) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (batch_size >= 1 && index_.size() == 0)
        throw std::invalid_argument("transition id " + std::to_string(ids[0]) + " is not stored: the buffer is empty");
    const bool parallel = prepare(batch_size, out);
    // Copied first, then checked: the caller's array is not ours to trust twice.
    std::copy(ids, ids + batch_size, out.ids);
    check_ids(out.ids, batch_size);
    fill(batch_size, beta, out, parallel, rng_);
}

// The id in [tail, tail + capacity) that lives in `slot`.
int64_t ReplayBuffer::id_of_slot_for(uint64_t slot, int64_t tail) const {
    const uint64_t cap = config_.capacity, t = uint64_t(tail);
    return int64_t(t + (slot + cap - t % cap) % cap);
}

// Transition id's n-step window length m (see the top of the header).
int ReplayBuffer::window_of(int64_t id) const {
    const int64_t ne = config_.num_envs, head = index_.head();
    int m = 1;
    for (; m < config_.n_step; ++m, id += ne) {
        if (flags_[index_.slot_of(id)] & (kTerminated | kTruncated)) break;
        if (id + ne >= head || !(flags_[index_.slot_of(id + ne)] & kFollows)) break;
    }
    return m;
}

// Everything after the draws: windows, checks, weights, then the gather.
void ReplayBuffer::fill(int64_t batch_size, double beta, const SampleOut& out, bool parallel, const Rng& saved) {
    const int n = config_.n_step;
    const int64_t ne = config_.num_envs;
    if (n > 1) {
        for (int64_t i = 0; i < batch_size; ++i) windows_[i] = uint8_t(window_of(out.ids[i]));
    }
    if (out.frames && k_ > 1) {
        // A window row holds one new frame per transition: each must be a shift.
        for (int64_t i = 0; i < batch_size; ++i) {
            const int m = n > 1 ? windows_[i] : 1;
            for (int w = 0; w < m; ++w) {
                const int64_t id = out.ids[i] + w * ne;
                if (flags_[index_.slot_of(id)] & kShift) continue;
                rng_ = saved;  // a rejected call leaves the buffer as it was
                throw std::invalid_argument(
                    "window output cannot hold transition id " + std::to_string(out.ids[i]) + ": the next_obs of " +
                    (w ? "transition " + std::to_string(id) + " in its n-step window" : std::string("it")) +
                    " is not its obs shifted by one frame; sample with window=False");
            }
        }
    }
    if (out.weights) {
        if (config_.prioritized) {
            // (N P(i))^-beta / max_j (N P(j))^-beta = (m_i / m_min)^-beta.
            const double lowest = tree_.min();
            for (int64_t i = 0; i < batch_size; ++i)
                out.weights[i] = float(std::pow(tree_.get(index_.slot_of(out.ids[i])) / lowest, -beta));
        } else {
            std::fill(out.weights, out.weights + batch_size, 1.0f);
        }
    }
    if (out.next_start) {
        for (int64_t i = 0; i < batch_size; ++i) out.next_start[i] = n > 1 ? windows_[i] : 1;
    }

    const WorkerPool::Job job = [&](int64_t begin, int64_t end) { gather(begin, end, out); };
    if (!parallel || pool_->threads() == 1) return job(0, batch_size);
    // About four chunks per thread, and at least 64 KB each: small enough
    // that a late worker leaves little for the caller to wait on, large
    // enough that claiming costs nothing and each thread's prefetch of its
    // next item is for an item it will copy itself.
    const uint64_t item_bytes = (out.frames ? uint64_t(k_ + n) : 2 * uint64_t(k_)) * config_.layout.frame_bytes;
    const uint64_t bytes = uint64_t(batch_size) * item_bytes;
    const int64_t per_thread = (batch_size + 4 * pool_->threads() - 1) / (4 * pool_->threads());
    const int64_t chunk = std::max<int64_t>(per_thread, int64_t((64 << 10) / std::max<uint64_t>(1, item_bytes)));
    if (config_.sample_threads > 1) return pool_->parallel_for(batch_size, chunk, job);
    // Default threads: pool or caller alone, whichever measures faster now.
    const bool use_pool = tuner_.use_pool(bytes);
    const auto start = std::chrono::steady_clock::now();
    use_pool ? pool_->parallel_for(batch_size, chunk, job) : job(0, batch_size);
    tuner_.record(bytes, use_pool, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
}

// Asks for item i's frames while the one before is copied: frames sit at
// random places in the store, so the hardware prefetcher cannot guess them.
void ReplayBuffer::prefetch_item(int64_t i, const SampleOut& out) const {
    const uint64_t fb = config_.layout.frame_bytes;
    const auto fetch = [&](uint32_t slot) {
        const uint8_t* p = store_.slot(slot);
        for (uint64_t off = 0; off < fb; off += 64) __builtin_prefetch(p + off);
    };
    const int m = config_.n_step > 1 ? windows_[i] : 1;
    const uint32_t* f = index_.frames_of(index_.slot_of(out.ids[i]));
    for (int j = 0; j < k_; ++j) fetch(f[j]);
    if (out.frames) {  // a window row reads obs frames + each window transition's newest
        for (int w = 0; w < m; ++w) fetch(index_.frames_of(index_.slot_of(out.ids[i] + w * config_.num_envs))[2 * k_ - 1]);
    } else {
        const uint32_t* last = index_.frames_of(index_.slot_of(out.ids[i] + (m - 1) * config_.num_envs));
        for (int j = k_; j < 2 * k_; ++j) fetch(last[j]);
    }
}

// Item i's frames from a compressed arena, decoded straight into the output
// (frame-first stacks) or through a per-thread scratch frame per position
// (channel-last). Frames already decoded for this item start the chains of
// the rest: a stack's next frame costs one copy and one patch.
void ReplayBuffer::decode_item(int64_t i, int m, const SampleOut& out, FrameArena::Decoding& recent) const {
    const FrameLayout& layout = config_.layout;
    const uint64_t fb = layout.frame_bytes;
    const int k = k_, row = k + config_.n_step;
    const int64_t id = out.ids[i], ne = config_.num_envs;
    std::vector<uint8_t>& scratch = recent.scratch;
    if (layout.stack_last && scratch.size() < uint64_t(2 * k + config_.n_step) * fb)
        scratch.resize(uint64_t(2 * k + config_.n_step) * fb);
    recent.clear();
    int pos = 0;
    const auto put = [&](uint8_t* obs, int j, int count, uint32_t slot) {
        if (uint8_t* dst = const_cast<uint8_t*>(layout.contiguous(obs, j, count))) {
            arena_.decode(slot, dst, recent);
        } else {
            uint8_t* tmp = scratch.data() + uint64_t(pos) * fb;
            arena_.decode(slot, tmp, recent);
            layout.write(obs, j, count, tmp);
        }
        ++pos;
    };
    const uint32_t* f = index_.frames_of(index_.slot_of(id));
    if (out.frames) {
        uint8_t* dst = out.frames + uint64_t(i) * row * fb;
        for (int j = 0; j < k; ++j) put(dst, j, row, f[j]);
        for (int w = 0; w < m; ++w) put(dst, k + w, row, index_.frames_of(index_.slot_of(id + w * ne))[2 * k - 1]);
        for (int j = k + m; j < row; ++j) layout.zero(dst, j, row);
    } else {
        uint8_t* obs = out.obs + uint64_t(i) * k * fb;
        uint8_t* next = out.next_obs + uint64_t(i) * k * fb;
        const uint32_t* g = index_.frames_of(index_.slot_of(id + (m - 1) * ne));
        for (int j = 0; j < k; ++j) put(obs, j, k, f[j]);
        for (int j = 0; j < k; ++j) put(next, j, k, g[k + j]);
    }
}

// Items [begin, end) of a batch; prefetches the item after each.
void ReplayBuffer::gather(int64_t begin, int64_t end, const SampleOut& out) const {
    const FrameLayout& layout = config_.layout;
    const uint64_t fb = layout.frame_bytes, ab = config_.action_bytes;
    const int k = k_, n = config_.n_step, row = k + n;
    const int64_t ne = config_.num_envs;
    const double gamma = config_.gamma;
    std::unique_ptr<FrameArena::Decoding> decoding;  // compressed: this call's decoding state
    if (compressed()) decoding = std::make_unique<FrameArena::Decoding>();
    for (int64_t i = begin; i < end; ++i) {
        const int64_t id = out.ids[i];
        const int m = n > 1 ? windows_[i] : 1;
        const uint64_t slot = index_.slot_of(id), last = index_.slot_of(id + (m - 1) * ne);
        const uint32_t* f = index_.frames_of(slot);
        if (compressed()) {
            // Rows two items ahead, bytes one item ahead (its rows arrived meanwhile).
            if (i + 2 < end) arena_.prefetch_rows(index_.frames_of(index_.slot_of(out.ids[i + 2]))[0]);
            if (i + 1 < end) arena_.prefetch_bytes(index_.frames_of(index_.slot_of(out.ids[i + 1]))[0]);
            decode_item(i, m, out, *decoding);
        } else if (i + 1 < end) {
            prefetch_item(i + 1, out);
        }
        if (compressed()) {
        } else if (out.frames) {
            uint8_t* dst = out.frames + uint64_t(i) * row * fb;
            for (int j = 0; j < k; ++j) layout.write(dst, j, row, store_.slot(f[j]));
            for (int w = 0; w < m; ++w)
                layout.write(dst, k + w, row, store_.slot(index_.frames_of(index_.slot_of(id + w * ne))[2 * k - 1]));
            for (int j = k + m; j < row; ++j) layout.zero(dst, j, row);
        } else {
            uint8_t* obs = out.obs + uint64_t(i) * k * fb;
            uint8_t* next = out.next_obs + uint64_t(i) * k * fb;
            const uint32_t* g = index_.frames_of(last);
            for (int j = 0; j < k; ++j) layout.write(obs, j, k, store_.slot(f[j]));
            for (int j = 0; j < k; ++j) layout.write(next, j, k, store_.slot(g[k + j]));
        }
        std::memcpy(out.action + uint64_t(i) * ab, actions_.data() + slot * ab, ab);
        // The n-step return, summed in double: r_t + g r_{t+1} + ... (g *= gamma).
        double ret = 0.0, discount = 1.0;
        for (int w = 0; w < m; ++w) {
            ret += discount * double(rewards_[index_.slot_of(id + w * ne)]);
            discount *= gamma;
        }
        out.reward[i] = float(ret);
        if (out.discount) out.discount[i] = float(discount);
        out.terminated[i] = flags_[last] & kTerminated ? 1 : 0;
        out.truncated[i] = flags_[last] & kTruncated ? 1 : 0;
    }
}

void ReplayBuffer::update_priorities(const int64_t* ids, const double* p, int64_t count) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!config_.prioritized) throw std::invalid_argument("update_priorities: this buffer is not prioritized (construct it with prioritized=True)");
    // Check every value before changing anything.
    for (int64_t i = 0; i < count; ++i) {
        if (!(mass(p[i]) <= kMaxMass))
            throw std::invalid_argument("priorities[" + std::to_string(i) + "]=" + std::to_string(p[i]) +
                                        " is too large: (p + priority_eps)^alpha overflows the priority tree");
    }
    const int64_t tail = index_.tail(), head = index_.head();
    for (int64_t i = 0; i < count; ++i) {
        if (ids[i] < tail || ids[i] >= head) continue;  // evicted since the sample: its slot is someone else's
        tree_.set(index_.slot_of(ids[i]), mass(p[i]));
        max_priority_ = std::max(max_priority_, p[i]);
    }
}

void ReplayBuffer::probabilities(const int64_t* ids, int64_t count, double* out) const {
    std::lock_guard<std::mutex> lock(mutex_);
    check_ids(ids, count);
    const double total = tree_.total(), uniform = 1.0 / double(index_.size());
    for (int64_t i = 0; i < count; ++i)
        out[i] = config_.prioritized ? tree_.get(index_.slot_of(ids[i])) / total : uniform;
}

double ReplayBuffer::max_priority() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return max_priority_;
}

BufferState ReplayBuffer::state() const {
    BufferState s;
    s.next_seq = compressed() ? arena_.next_seq() : store_.next_seq();
    s.arena_tail = arena_.tail();
    s.arena_head = arena_.head_offset();
    s.head = index_.head();
    s.tail = index_.tail();
    std::copy(rng_.state(), rng_.state() + 4, s.rng);
    s.streams = index_.streams();
    s.max_priority = max_priority_;
    return s;
}

std::vector<RawArray> ReplayBuffer::arrays(int64_t next_seq, int64_t head, uint64_t arena_head) {
    const uint64_t frames = uint64_t(std::clamp<int64_t>(next_seq, 0, int64_t(frame_capacity())));
    const uint64_t rows = uint64_t(std::clamp<int64_t>(head, 0, int64_t(config_.capacity)));
    if (compressed()) {
        // The arena's bytes ever written, and the table rows of the frames.
        const uint64_t bytes = std::min(arena_head, arena_.arena_bytes());
        std::vector<RawArray> out = {
            {"arena", arena_.arena_data(), bytes},
            {"frame_offsets", reinterpret_cast<uint8_t*>(arena_.offset_data()), frames * sizeof(uint64_t)},
            {"frame_sizes", reinterpret_cast<uint8_t*>(arena_.size_data()), frames * sizeof(uint32_t)},
            {"frame_ref_back", reinterpret_cast<uint8_t*>(arena_.ref_back_data()), frames * sizeof(uint32_t)},
            {"frame_key_back", reinterpret_cast<uint8_t*>(arena_.key_back_data()), frames * sizeof(uint32_t)},
        };
        for (auto& a : index_arrays(rows)) out.push_back(a);
        return out;
    }
    std::vector<RawArray> out = {{"frames", store_.data(), frames * store_.frame_bytes()}};
    for (auto& a : index_arrays(rows)) out.push_back(a);
    return out;
}

std::vector<RawArray> ReplayBuffer::index_arrays(uint64_t rows) {
    std::vector<RawArray> out = {
        {"slots", reinterpret_cast<uint8_t*>(index_.slots_data()), rows * 2 * k_ * sizeof(uint32_t)},
        {"oldest", reinterpret_cast<uint8_t*>(index_.oldest_data()), rows * sizeof(int64_t)},
        {"actions", actions_.data(), rows * config_.action_bytes},
        {"rewards", reinterpret_cast<uint8_t*>(rewards_.data()), rows * sizeof(float)},
        {"flags", flags_.data(), rows},
    };
    // Prioritized: each slot's leaf mass, (p + eps)^alpha (0 for an empty slot).
    if (config_.prioritized) out.push_back({"priorities", reinterpret_cast<uint8_t*>(tree_.leaf_data()), rows * sizeof(double)});
    return out;
}

// Whether two lists of k frame slots hold the same frames: the same slots, or
// equal bytes (a stream the frame reserve made the buffer store anew).
// A stored frame's bytes: in place, or (compressed) decoded into scratch.
const uint8_t* ReplayBuffer::stored_frame(uint32_t slot, uint8_t* scratch) const {
    if (!compressed()) return store_.slot(slot);
    FrameArena::Decoding recent;
    arena_.decode(slot, scratch, recent);
    return scratch;
}

bool ReplayBuffer::same_frames(const uint32_t* a, const uint32_t* b) const {
    const uint64_t fb = config_.layout.frame_bytes;
    std::vector<uint8_t> scratch(compressed() ? 2 * fb : 0);
    for (int j = 0; j < k_; ++j)
        if (a[j] != b[j] && std::memcmp(stored_frame(a[j], scratch.data()), stored_frame(b[j], scratch.data() + fb * compressed()), fb) != 0)
            return false;
    return true;
}

void ReplayBuffer::restore(const BufferState& s) {
    std::lock_guard<std::mutex> lock(mutex_);
    require(index_.head() == 0 && store_.next_seq() == 0 && arena_.next_seq() == 0,
            "restore needs a buffer that has never been added to");
    if (compressed()) {
        // The arena first: index checks look keys up in its table.
        arena_.check(s.next_seq, s.arena_tail, s.arena_head);
        const uint32_t* key_back = arena_.key_back_data();
        const uint64_t fcap = arena_.capacity();
        const int64_t live = std::max(s.next_seq - int64_t(fcap), s.arena_tail);
        index_.check(s.head, s.tail, s.streams, s.next_seq, live,
                     [&](int64_t seq) { return seq - int64_t(key_back[uint64_t(seq) % fcap]); });
        // Decoding below (same_frames) needs the counters in place; nothing
        // else reads the arena before the checks end.
        arena_.adopt(s.next_seq, s.arena_tail, s.arena_head, std::vector<int64_t>(size_t(config_.num_envs), -1));
    } else {
        index_.check(s.head, s.tail, s.streams, s.next_seq, 0, [](int64_t seq) { return seq; });
    }
    // Any failed check below must leave the buffer never added to.
    struct Undo {
        FrameArena* arena;
        bool armed = true;
        ~Undo() {
            if (armed) arena->adopt(0, 0, 0, std::vector<int64_t>());
        }
    } undo{&arena_};
    for (int64_t id = s.tail; id < s.head; ++id) {
        const uint64_t slot = index_.slot_of(id);
        const uint8_t flags = flags_[slot];
        require(flags < 16, "transition " + std::to_string(id) + " has unknown flags");
        // kFollows: the previous transition of its env left the stream open,
        // and this obs is its next_obs (n-step windows join the two).
        const int64_t prev = id - config_.num_envs;
        const uint32_t* f = index_.frames_of(slot);
        if ((flags & kFollows) && prev >= s.tail) {
            const uint64_t prev_slot = index_.slot_of(prev);
            require(!(flags_[prev_slot] & (kTerminated | kTruncated)),
                    "transition " + std::to_string(id) + " continues an episode that ended at transition " +
                        std::to_string(prev));
            require(same_frames(f, index_.frames_of(prev_slot) + k_),
                    "transition " + std::to_string(id) + " is marked as following transition " + std::to_string(prev) +
                        " but its obs is not that transition's next_obs");
        }
        // A shift transition's next_obs reuses obs frames 1..k-1 (window mode relies on it).
        if (flags & kShift) {
            require(std::equal(f + 1, f + k_, f + k_),
                    "transition " + std::to_string(id) + " is marked as a shift but its frames are not");
        }
    }
    // An open stream is its env's newest transition's next_obs, and that
    // transition did not end the episode: the next add may continue it (kFollows).
    const uint64_t fcap = frame_capacity();
    for (int e = 0; e < config_.num_envs; ++e) {
        const int64_t newest = s.head - config_.num_envs + e;
        const EnvStream& stream = s.streams[size_t(e)];
        if (!stream.open || newest < s.tail) continue;
        const uint64_t slot = index_.slot_of(newest);
        require(!(flags_[slot] & (kTerminated | kTruncated)),
                "env " + std::to_string(e) + "'s stream is open but its newest transition " + std::to_string(newest) +
                    " ended the episode");
        const uint32_t* next = index_.frames_of(slot) + k_;
        for (int j = 0; j < k_; ++j)
            require(uint64_t(stream.seqs[size_t(j)]) % fcap == next[j],
                    "env " + std::to_string(e) + "'s open stream is not its newest transition " +
                        std::to_string(newest) + "'s next_obs");
    }
    // xoshiro's all-zero state is a fixed point: sampling would never return.
    require(s.rng[0] | s.rng[1] | s.rng[2] | s.rng[3], "the PRNG state is all zeros");
    if (config_.prioritized) {
        require(std::isfinite(s.max_priority) && s.max_priority >= 1.0 && mass(s.max_priority) <= kMaxMass,
                "max_priority=" + std::to_string(s.max_priority) + " is not a priority this buffer can set");
        // Positive, bounded leaves exactly for the stored transitions' slots.
        const double* leaf = tree_.leaf_data();
        const uint64_t cap = config_.capacity;
        for (uint64_t slot = 0; slot < cap; ++slot) {
            const int64_t id = id_of_slot_for(slot, s.tail);
            const bool stored = id < s.head;
            require(stored ? (leaf[slot] >= kMinMass && leaf[slot] <= kMaxMass) : leaf[slot] == 0.0,
                    "priority slot " + std::to_string(slot) + " holds " + std::to_string(leaf[slot]) + ", expected " +
                        (stored ? "a mass in [DBL_MIN, 1e298]" : std::string("0 (no transition)")));
        }
        tree_.rebuild();
        max_priority_ = s.max_priority;
    }
    index_.adopt(s.head, s.tail, s.streams);
    if (compressed()) {
        // Each env's stream frames (the next add compares its obs with them,
        // and patches its next frame against the newest), where decodable.
        std::vector<int64_t> refs(size_t(config_.num_envs), -1);
        const int64_t live = std::max(s.next_seq - int64_t(arena_.capacity()), s.arena_tail);
        for (int e = 0; e < config_.num_envs; ++e) {
            const auto& seqs = s.streams[size_t(e)].seqs;
            bool ok = true;
            for (int j = 0; j < k_; ++j) ok = ok && arena_.decodable(seqs[size_t(j)], live);
            if (!ok) continue;
            FrameArena::Decoding recent;
            for (int j = 0; j < k_; ++j)
                arena_.decode(arena_.slot_of(seqs[size_t(j)]), arena_.stream_raw(e) + uint64_t(j) * config_.layout.frame_bytes, recent);
            refs[size_t(e)] = seqs[size_t(k_ - 1)];
        }
        arena_.adopt(s.next_seq, s.arena_tail, s.arena_head, refs);
        arena_refs_ = refs;
    } else {
        store_.set_next_seq(s.next_seq);
    }
    undo.armed = false;
    rng_.set_state(s.rng);
    publish_counters();
}

}  // namespace dqn_fast
