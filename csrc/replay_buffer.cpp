#include "replay_buffer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
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
    uint64_t total = checked_mul(frames, c.layout.frame_bytes, "the frame store");
    total = checked_add(total, checked_mul(c.capacity, per_transition, "the transition index"), what);
    total = checked_add(total, uint64_t(c.num_envs) * env_bytes(k_), what);
    total = checked_add(total, 2 * c.layout.frame_bytes, what);  // channel-last scratch
    check_can_allocate(total, what);

    store_ = FrameStore(frames, c.layout.frame_bytes);
    index_ = EpisodeIndex(c.capacity, c.num_envs, k_, frames);
    actions_ = Column<uint8_t>(checked_mul(c.capacity, c.action_bytes, "the actions"));
    rewards_ = Column<float>(c.capacity);
    flags_ = Column<uint8_t>(c.capacity);
    rng_.reseed(c.seed);
    plan_.resize(c.num_envs);
    if (c.layout.stack_last && k_ > 1) scratch_.resize(2 * c.layout.frame_bytes);
}

void ReplayBuffer::publish_counters() {
    size_.store(index_.size());
    total_adds_.store(index_.head());
    frames_written_.store(store_.next_seq());
}

uint64_t ReplayBuffer::nbytes() const {
    return store_.nbytes() + index_.nbytes() + actions_.nbytes() + rewards_.nbytes() + flags_.nbytes() +
           scratch_.size() + uint64_t(config_.num_envs) * env_bytes(k_);
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

bool ReplayBuffer::equals_stream(const uint8_t* obs, const EnvStream& stream) {
    if (!stream.open || stream.seqs[0] < store_.oldest_live_seq()) return false;
    const uint64_t fb = config_.layout.frame_bytes;
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

void ReplayBuffer::push_frames(const uint8_t* obs, uint64_t runs, int64_t* seqs) {
    for (int j = 0; j < k_; ++j) {
        seqs[j] = (runs >> j & 1) ? seqs[j - 1] : store_.push(frame_of(obs, j, scratch_.data()));
    }
}

void ReplayBuffer::add(const AddArgs& a) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int ne = config_.num_envs;
    const int64_t frame_cap = int64_t(store_.capacity());

    // 1. Plan: which envs continue their stream, and how many frames get written.
    int64_t n_new = 0;
    for (int e = 0; e < ne; ++e) {
        const uint8_t* obs = a.obs + e * obs_bytes_;
        const uint8_t* next = a.next_obs + e * obs_bytes_;
        EnvPlan& p = plan_[e];
        int frames = 0;
        p.continues = equals_stream(obs, index_.stream(e));
        p.obs_runs = p.continues ? 0 : runs_of(obs, frames);
        n_new += frames;
        p.shift = is_shift(obs, next);
        p.next_runs = p.shift ? 0 : runs_of(next, frames);
        n_new += p.shift ? 1 : frames;
    }
    // A continuing stream must not be overwritten by this very add; if it
    // would be (only possible with a tiny reserve), store its frames anew.
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
    index_.evict_for(uint64_t(ne));
    index_.evict_frames_before(store_.next_seq() + n_new - frame_cap);

    // 3. Write frames, then the transitions that name them.
    const int two_k = 2 * k_;
    int64_t seqs[128];  // 2k <= 128
    for (int e = 0; e < ne; ++e) {
        const EnvPlan& p = plan_[e];
        EnvStream& stream = index_.stream(e);
        const uint8_t* obs = a.obs + e * obs_bytes_;
        const uint8_t* next = a.next_obs + e * obs_bytes_;
        if (p.continues) {
            std::copy(stream.seqs.begin(), stream.seqs.end(), seqs);
        } else {
            push_frames(obs, p.obs_runs, seqs);
        }
        if (p.shift) {
            std::copy(seqs + 1, seqs + k_, seqs + k_);
            seqs[two_k - 1] = store_.push(frame_of(next, k_ - 1, scratch_.data()));
        } else {
            push_frames(next, p.next_runs, seqs + k_);
        }
        const uint64_t slot = index_.append(seqs);
        const uint64_t ab = config_.action_bytes;
        std::memcpy(actions_.data() + slot * ab, a.action + e * ab, ab);
        rewards_[slot] = a.reward[e];
        const bool term = a.terminated[e] != 0, trunc = a.truncated[e] != 0;
        flags_[slot] = uint8_t((term ? kTerminated : 0) | (trunc ? kTruncated : 0) | (p.shift ? kShift : 0));
        std::copy(seqs + k_, seqs + two_k, stream.seqs.begin());
        stream.open = !(term || trunc);
    }
    publish_counters();
}

void ReplayBuffer::sample(int64_t batch_size, const SampleOut& out) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (batch_size < 1) throw std::invalid_argument("batch_size must be at least 1, got " + std::to_string(batch_size));
    const uint64_t n = index_.size();
    if (n == 0) throw std::invalid_argument("cannot sample from an empty replay buffer: add transitions first");

    // Everything that can fail (threads, allocation) happens before the
    // draws, so a failed call leaves the PRNG where it was.
    const uint64_t frames_per_item = out.frames ? uint64_t(k_) + 1 : 2 * uint64_t(k_);
    const uint64_t item_bytes = frames_per_item * config_.layout.frame_bytes;
    const uint64_t bytes = uint64_t(batch_size) * item_bytes;
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
    const WorkerPool::Job job = [&](int64_t begin, int64_t end) { gather(begin, end, out); };

    const Rng saved = rng_;
    for (int64_t i = 0; i < batch_size; ++i) out.ids[i] = index_.tail() + int64_t(rng_.below(n));
    if (out.frames && k_ > 1) {
        for (int64_t i = 0; i < batch_size; ++i) {
            if (!(flags_[index_.slot_of(out.ids[i])] & kShift)) {
                rng_ = saved;  // a rejected call leaves the buffer as it was
                throw std::invalid_argument(
                    "window output cannot hold transition id " + std::to_string(out.ids[i]) +
                    ": its next_obs is not its obs shifted by one frame; sample with window=False");
            }
        }
    }

    if (!parallel || pool_->threads() == 1) return job(0, batch_size);
    // About four chunks per thread, and at least 64 KB each: small enough
    // that a late worker leaves little for the caller to wait on, large
    // enough that claiming costs nothing and each thread's prefetch of its
    // next item is for an item it will copy itself.
    const int64_t per_thread = (batch_size + 4 * pool_->threads() - 1) / (4 * pool_->threads());
    const int64_t chunk = std::max<int64_t>(per_thread, int64_t((64 << 10) / std::max<uint64_t>(1, item_bytes)));
    if (config_.sample_threads > 1) return pool_->parallel_for(batch_size, chunk, job);
    // Default threads: pool or caller alone, whichever measures faster now.
    const bool use_pool = tuner_.use_pool(bytes);
    const auto start = std::chrono::steady_clock::now();
    use_pool ? pool_->parallel_for(batch_size, chunk, job) : job(0, batch_size);
    tuner_.record(bytes, use_pool, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
}

// Asks for the next item's frames while this one is copied: frames sit at
// random places in the store, so the hardware prefetcher cannot guess them.
void ReplayBuffer::prefetch_item(const uint32_t* f, bool window) const {
    const uint64_t fb = config_.layout.frame_bytes;
    const int k = k_;
    for (int j = 0; j < 2 * k; ++j) {
        if (window && j >= k && j != 2 * k - 1) continue;  // a window reads obs frames + the newest
        const uint8_t* p = store_.slot(f[j]);
        for (uint64_t off = 0; off < fb; off += 64) __builtin_prefetch(p + off);
    }
}

// Items [begin, end) of a batch of n; prefetches the item after each.
void ReplayBuffer::gather(int64_t begin, int64_t end, const SampleOut& out) const {
    const FrameLayout& layout = config_.layout;
    const uint64_t fb = layout.frame_bytes, ab = config_.action_bytes;
    const int k = k_;
    for (int64_t i = begin; i < end; ++i) {
        const uint64_t slot = index_.slot_of(out.ids[i]);
        const uint32_t* f = index_.frames_of(slot);
        if (i + 1 < end) prefetch_item(index_.frames_of(index_.slot_of(out.ids[i + 1])), out.frames != nullptr);
        if (out.frames) {
            uint8_t* dst = out.frames + uint64_t(i) * (k + 1) * fb;
            for (int j = 0; j < k; ++j) layout.write(dst, j, k + 1, store_.slot(f[j]));
            layout.write(dst, k, k + 1, store_.slot(f[2 * k - 1]));
        } else {
            uint8_t* obs = out.obs + uint64_t(i) * k * fb;
            uint8_t* next = out.next_obs + uint64_t(i) * k * fb;
            for (int j = 0; j < k; ++j) layout.write(obs, j, k, store_.slot(f[j]));
            for (int j = 0; j < k; ++j) layout.write(next, j, k, store_.slot(f[k + j]));
        }
        std::memcpy(out.action + uint64_t(i) * ab, actions_.data() + slot * ab, ab);
        out.reward[i] = rewards_[slot];
        out.terminated[i] = flags_[slot] & kTerminated ? 1 : 0;
        out.truncated[i] = flags_[slot] & kTruncated ? 1 : 0;
    }
}

BufferState ReplayBuffer::state() const {
    BufferState s;
    s.next_seq = store_.next_seq();
    s.head = index_.head();
    s.tail = index_.tail();
    std::copy(rng_.state(), rng_.state() + 4, s.rng);
    s.streams = index_.streams();
    return s;
}

std::vector<RawArray> ReplayBuffer::arrays(int64_t next_seq, int64_t head) {
    const uint64_t frames = uint64_t(std::clamp<int64_t>(next_seq, 0, int64_t(store_.capacity())));
    const uint64_t rows = uint64_t(std::clamp<int64_t>(head, 0, int64_t(config_.capacity)));
    return {
        {"frames", store_.data(), frames * store_.frame_bytes()},
        {"slots", reinterpret_cast<uint8_t*>(index_.slots_data()), rows * 2 * k_ * sizeof(uint32_t)},
        {"oldest", reinterpret_cast<uint8_t*>(index_.oldest_data()), rows * sizeof(int64_t)},
        {"actions", actions_.data(), rows * config_.action_bytes},
        {"rewards", reinterpret_cast<uint8_t*>(rewards_.data()), rows * sizeof(float)},
        {"flags", flags_.data(), rows},
    };
}

void ReplayBuffer::restore(const BufferState& s) {
    std::lock_guard<std::mutex> lock(mutex_);
    require(index_.head() == 0 && store_.next_seq() == 0, "restore needs a buffer that has never been added to");
    index_.check(s.head, s.tail, s.streams, s.next_seq);
    for (int64_t id = s.tail; id < s.head; ++id) {
        const uint64_t slot = index_.slot_of(id);
        const uint8_t flags = flags_[slot];
        require(flags < 8, "transition " + std::to_string(id) + " has unknown flags");
        // A shift transition's next_obs reuses obs frames 1..k-1 (window mode relies on it).
        const uint32_t* f = index_.frames_of(slot);
        if (flags & kShift) {
            require(std::equal(f + 1, f + k_, f + k_),
                    "transition " + std::to_string(id) + " is marked as a shift but its frames are not");
        }
    }
    // xoshiro's all-zero state is a fixed point: sampling would never return.
    require(s.rng[0] | s.rng[1] | s.rng[2] | s.rng[3], "the PRNG state is all zeros");
    index_.adopt(s.head, s.tail, s.streams);
    store_.set_next_seq(s.next_seq);
    rng_.set_state(s.rng);
    publish_counters();
}

}  // namespace dqn_fast
