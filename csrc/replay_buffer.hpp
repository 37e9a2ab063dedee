// The replay buffer: frame store + episode index + sampler, behind one mutex.
//
// Storage rule: each environment frame is stored once. An add that starts an
// episode segment stores obs's k frames (runs of equal consecutive frames,
// such as reset or zero padding, once); every add stores next_obs's newest
// frame, or all of next_obs when it is not obs shifted by one frame.
// Observations are rebuilt from frame slots at sample time, so what was added
// comes back bit-exact.
//
// Locking: add and sample each hold `mutex_` for their whole native part
// (the bindings release the GIL first). A sample therefore never sees a
// half-written add, and no frame it gathers can be overwritten under it.
// Saving holds it (lock()) while the arrays are written out, so the file is
// one consistent snapshot. Nothing else in the core locks: size() and the
// counters read copies published at the end of each add, so they never wait
// behind a save (which runs Python while it holds the mutex).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "episode_index.hpp"
#include "frame_layout.hpp"
#include "frame_store.hpp"
#include "persistence.hpp"
#include "sampler.hpp"

namespace dqn_fast {

// The largest configurations the core accepts (the README's bounds).
constexpr int kMaxNumEnvs = 1 << 20;
constexpr int kMaxSampleThreads = 256;
constexpr int kMaxFrameStack = 64;

struct BufferConfig {
    uint64_t capacity = 0;  // transitions
    int num_envs = 1;
    int frame_stack = 1;  // k
    FrameLayout layout;   // one frame's bytes and how frames sit in an observation
    uint64_t action_bytes = 8;
    double frame_reserve = 0.044;  // extra frames for episode starts, as a fraction of capacity
    uint64_t seed = 0;
    int sample_threads = 0;  // threads that gather a large batch; 0 = one per core (up to 4), tuned
};

// Batched inputs of one add: every pointer holds num_envs C-contiguous items.
struct AddArgs {
    const uint8_t* obs;
    const uint8_t* next_obs;
    const uint8_t* action;
    const float* reward;
    const uint8_t* terminated;  // 0/1
    const uint8_t* truncated;   // 0/1
};

// Caller-owned outputs for a batch of B. With `frames` set (window mode) the
// k+1 frames of each transition go there and obs/next_obs are not written.
struct SampleOut {
    uint8_t* obs = nullptr;
    uint8_t* next_obs = nullptr;
    uint8_t* frames = nullptr;
    uint8_t* action = nullptr;
    float* reward = nullptr;
    uint8_t* terminated = nullptr;
    uint8_t* truncated = nullptr;
    int64_t* ids = nullptr;
};

class ReplayBuffer {
public:
    explicit ReplayBuffer(const BufferConfig& config);

    void add(const AddArgs& args);
    void sample(int64_t batch_size, const SampleOut& out);

    // Frames the store holds for a given config (capacity + reserve).
    static uint64_t frame_capacity_for(const BufferConfig& config);
    // Bytes of per-env state (stream + add plan, with allocator overhead).
    static uint64_t env_bytes(int frame_stack);

    uint64_t size() const { return size_.load(); }
    int64_t total_adds() const { return total_adds_.load(); }          // transitions ever added (next id)
    int64_t frames_written() const { return frames_written_.load(); }  // frames ever stored
    uint64_t capacity() const { return config_.capacity; }
    uint64_t frame_capacity() const { return store_.capacity(); }
    int num_envs() const { return config_.num_envs; }
    uint64_t nbytes() const;
    const BufferConfig& config() const { return config_; }

    // Persistence. A saver holds lock() around state() and arrays(). A loader
    // writes a fresh buffer's arrays(next_seq, head) in place, then calls
    // restore(), which checks every invariant before taking the state.
    std::unique_lock<std::mutex> lock() const { return std::unique_lock<std::mutex>(mutex_); }
    BufferState state() const;
    // The arrays, each cut to the rows written by the time the counters reach
    // (next_seq, head): a ring's prefix until it first wraps, then all of it.
    std::vector<RawArray> arrays(int64_t next_seq, int64_t head);
    // Throws std::invalid_argument (and changes nothing) unless the state is
    // consistent with the arrays; requires a buffer that has never been added to.
    void restore(const BufferState& state);

private:
    enum Flag : uint8_t { kTerminated = 1, kTruncated = 2, kShift = 4 };

    struct EnvPlan {
        bool continues;      // obs equals the env's open stream: reuse its frames
        bool shift;          // next_obs is obs shifted by one frame plus a new one
        uint64_t obs_runs;   // bit j: obs frame j equals frame j-1 (stored once)
        uint64_t next_runs;  // same for next_obs
    };

    const uint8_t* frame_of(const uint8_t* obs, int j, uint8_t* scratch) const;
    uint64_t runs_of(const uint8_t* obs, int& new_frames);
    bool equals_stream(const uint8_t* obs, const EnvStream& stream);
    bool is_shift(const uint8_t* obs, const uint8_t* next_obs);
    void push_frames(const uint8_t* obs, uint64_t runs, int64_t* seqs);
    void prefetch_item(const uint32_t* frames, bool window) const;
    void gather(int64_t begin, int64_t end, const SampleOut& out) const;
    void publish_counters();

    BufferConfig config_;
    int k_;
    uint64_t obs_bytes_;
    FrameStore store_;
    EpisodeIndex index_;
    Column<uint8_t> actions_;
    Column<float> rewards_;
    Column<uint8_t> flags_;
    Rng rng_;
    std::vector<EnvPlan> plan_;
    std::vector<uint8_t> scratch_;  // two frames, for channel-last stacks
    std::unique_ptr<WorkerPool> pool_;
    long pool_pid_ = 0;  // the process that started pool_ (a forked child must not use it)
    GatherTuner tuner_;
    mutable std::mutex mutex_;
    std::atomic<uint64_t> size_{0};
    std::atomic<int64_t> total_adds_{0}, frames_written_{0};
};

}  // namespace dqn_fast
