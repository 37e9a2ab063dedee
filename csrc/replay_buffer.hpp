// The replay buffer: frame store + episode index + sampler (+ priorities),
// behind one mutex.
//
// Storage rule: each environment frame is stored once. An add that starts an
// episode segment stores obs's k frames (runs of equal consecutive frames,
// such as reset or zero padding, once); every add stores next_obs's newest
// frame, or all of next_obs when it is not obs shifted by one frame.
// Observations are rebuilt from frame slots at sample time, so what was added
// comes back bit-exact.
//
// n-step windows: transition t's window is t, t + num_envs, ... (its env's
// next transitions), at most n_step of them, ending early (inclusive) at the
// first terminated or truncated one, before a stream break (a transition
// whose obs did not continue its env's open stream: no kFollows flag), or at
// the env's newest stored transition. Sampling sums the window's discounted
// rewards and takes next_obs and the flags from its last transition; it is
// computed at sample time from the stored one-step transitions, so nothing
// is stored twice and n changes nothing in memory.
//
// Priorities (prioritized=true): leaf `slot` of `tree_` holds
// (p + eps)^alpha for the transition stored there, 0 for an empty slot.
// Every add gives its new transitions the largest p set so far and zeroes
// the leaves of the transitions it evicts, so the tree's leaves are positive
// exactly for the stored ids; an update for an id outside [tail, head) is
// ignored (the id was evicted and its slot may hold a newer transition).
//
// Compression (compression != kNone): frames live coded in a FrameArena
// (frame_arena.hpp) instead of the FrameStore. A transition's `oldest` is
// then the oldest *key* frame its frames' chains start from, so evicting
// by it drops exactly the transitions whose frames could no longer be
// decoded. Each add codes its frames first (staged), learns which frames
// its bytes push out of the arena, evicts the transitions naming them, and
// only then writes: the arena never holds a frame a stored transition needs
// that cannot be decoded. Everything above holds unchanged.
//
// Locking: add, sample, get and update_priorities each hold `mutex_` for
// their whole native part (the bindings release the GIL first). A sample therefore never sees a
// half-written add, and no frame it gathers can be overwritten under it.
// Saving holds it (lock()) while the arrays are written out, so the file is
// one consistent snapshot. Nothing else in the core locks: size() and the
// counters read copies published at the end of each add, so they never wait
// behind a save (which runs Python while it holds the mutex).
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "episode_index.hpp"
#include "frame_arena.hpp"
#include "frame_layout.hpp"
#include "frame_store.hpp"
#include "persistence.hpp"
#include "sampler.hpp"
#include "sum_tree.hpp"

namespace dqn_fast {

// The largest configurations the core accepts (the README's bounds).
constexpr int kMaxNumEnvs = 1 << 20;
constexpr int kMaxSampleThreads = 256;
constexpr int kMaxFrameStack = 64;
constexpr int kMaxNStep = 64;
// Leaf masses stay in [kMinMass, kMaxMass], so a sum over 2^33 leaves is finite.
constexpr double kMinMass = 2.2250738585072014e-308;  // DBL_MIN
constexpr double kMaxMass = 1.0e298;

struct BufferConfig {
    uint64_t capacity = 0;  // transitions
    int num_envs = 1;
    int frame_stack = 1;  // k
    FrameLayout layout;   // one frame's bytes and how frames sit in an observation
    uint64_t action_bytes = 8;
    double frame_reserve = 0.044;  // extra frames for episode starts, as a fraction of capacity
    uint64_t seed = 0;
    int sample_threads = 0;  // threads that gather a large batch; 0 = one per core (up to 4), tuned
    int n_step = 1;          // transitions summed into one sampled return
    double gamma = 0.99;     // discount of the n-step return
    bool prioritized = false;
    double alpha = 0.6;          // P(i) ~ (p_i + priority_eps)^alpha
    double priority_eps = 1e-6;
    Codec compression = Codec::kNone;  // kNone: raw FrameStore; else a FrameArena
    uint64_t frame_memory = 0;         // the arena's bytes (compressed only; 0: default_frame_memory)
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
// k+n frames of each transition go there (obs's k frames, then the newest
// frame of each transition of its window, then zeros) and obs/next_obs are
// not written; next_obs starts at frame next_start[i] (the window's length).
struct SampleOut {
    uint8_t* obs = nullptr;
    uint8_t* next_obs = nullptr;
    uint8_t* frames = nullptr;
    uint8_t* action = nullptr;
    float* reward = nullptr;
    uint8_t* terminated = nullptr;
    uint8_t* truncated = nullptr;
    int64_t* ids = nullptr;        // drawn by sample; given to get
    float* weights = nullptr;      // importance weights (1 unless prioritized)
    float* discount = nullptr;     // gamma^m, m the window's length
    int64_t* next_start = nullptr;  // window mode: where next_obs starts (m)
};

class ReplayBuffer {
public:
    explicit ReplayBuffer(const BufferConfig& config);

    void add(const AddArgs& args);
    // A batch drawn uniformly (or stratified by priority), into `out`.
    void sample(int64_t batch_size, double beta, const SampleOut& out);
    // The stored transitions ids[0..batch_size) (copied to out.ids), into
    // `out`; throws std::invalid_argument naming the first id not stored.
    void get(int64_t batch_size, const int64_t* ids, double beta, const SampleOut& out);
    // p[i] for ids[i] (finite, >= 0: checked by the caller); ids no longer
    // stored are skipped; a repeated id keeps its last priority. Throws
    // std::invalid_argument (and changes nothing) if a (p + eps)^alpha is
    // too large for the sum tree.
    void update_priorities(const int64_t* ids, const double* p, int64_t count);
    // P(i) for stored ids (throws std::invalid_argument otherwise).
    void probabilities(const int64_t* ids, int64_t count, double* out) const;
    double max_priority() const;

    // Frames the store holds for a given config (capacity + reserve).
    static uint64_t frame_capacity_for(const BufferConfig& config);
    // The arena a compressed buffer gets when frame_memory is 0: room for
    // frames coded to an eighth of their size (frames under 64 bytes: raw),
    // and at least the minimum.
    static uint64_t default_frame_memory(const BufferConfig& config);
    // Bytes of per-env state (stream + add plan, with allocator overhead).
    static uint64_t env_bytes(int frame_stack);

    uint64_t size() const { return size_.load(); }
    int64_t total_adds() const { return total_adds_.load(); }          // transitions ever added (next id)
    int64_t frames_written() const { return frames_written_.load(); }  // frames ever stored
    uint64_t capacity() const { return config_.capacity; }
    uint64_t frame_capacity() const { return compressed() ? arena_.capacity() : store_.capacity(); }
    bool compressed() const { return config_.compression != Codec::kNone; }
    uint64_t frame_memory() const { return compressed() ? arena_.arena_bytes() : 0; }
    // Arena bytes the stored frames take now (payload and slack); 0 uncompressed.
    uint64_t frame_memory_used() const { return frame_memory_used_.load(); }
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
    std::vector<RawArray> arrays(int64_t next_seq, int64_t head, uint64_t arena_head);
    // Throws std::invalid_argument (and changes nothing) unless the state is
    // consistent with the arrays; requires a buffer that has never been added to.
    void restore(const BufferState& state);

private:
    // kFollows: the add's obs equalled its env's open stream (the previous
    // transition of this env continues into this one: n-step windows cross it).
    enum Flag : uint8_t { kTerminated = 1, kTruncated = 2, kShift = 4, kFollows = 8 };

    struct EnvPlan {
        bool follows;        // obs equals the env's open stream
        bool continues;      // ... and its frames are reused (not stored anew)
        bool shift;          // next_obs is obs shifted by one frame plus a new one
        uint64_t obs_runs;   // bit j: obs frame j equals frame j-1 (stored once)
        uint64_t next_runs;  // same for next_obs
    };

    const uint8_t* frame_of(const uint8_t* obs, int j, uint8_t* scratch) const;
    uint64_t runs_of(const uint8_t* obs, int& new_frames);
    bool equals_stream(const uint8_t* obs, int env);
    bool is_shift(const uint8_t* obs, const uint8_t* next_obs);
    void push_frames(int env, const uint8_t* obs, uint64_t runs, int64_t* seqs);
    int64_t push_frame(int env, const uint8_t* frame);
    void stage_env(int env, const AddArgs& a, int64_t* seqs);
    void append_env(int env, const AddArgs& a, const int64_t* seqs, int64_t oldest, double new_mass);
    void evict_before(int64_t limit, int64_t old_tail, int64_t head);
    void add_compressed(const AddArgs& a);
    int64_t oldest_of(const int64_t* seqs) const;
    void decode_item(int64_t i, int m, const SampleOut& out, FrameArena::Decoding& recent) const;
    std::vector<RawArray> index_arrays(uint64_t rows);
    const uint8_t* stored_frame(uint32_t slot, uint8_t* scratch) const;
    bool prepare(int64_t batch_size, const SampleOut& out);
    void prefetch_item(int64_t i, const SampleOut& out) const;
    void gather(int64_t begin, int64_t end, const SampleOut& out) const;
    void fill(int64_t batch_size, double beta, const SampleOut& out, bool parallel, const Rng& saved);
    void check_ids(const int64_t* ids, int64_t count) const;
    int window_of(int64_t id) const;
    // A leaf's mass: (p + eps)^alpha, at least the smallest normal double
    // (so a stored transition can always be drawn).
    double mass(double p) const { return std::max(std::pow(p + config_.priority_eps, config_.alpha), kMinMass); }
    int64_t id_of_slot_for(uint64_t slot, int64_t tail) const;
    bool same_frames(const uint32_t* a, const uint32_t* b) const;
    void publish_counters();

    BufferConfig config_;
    int k_;
    uint64_t obs_bytes_;
    FrameStore store_;   // uncompressed
    FrameArena arena_;   // compressed
    std::vector<int64_t> arena_refs_;  // per env: its stream's newest frame (patch reference)
    std::vector<bool> force_key_;      // per env: its next frame must be a key (see add_compressed)
    std::vector<int64_t> add_seqs_;    // per env: the 2k frame seqs of the add in progress
    EpisodeIndex index_;
    Column<uint8_t> actions_;
    Column<float> rewards_;
    Column<uint8_t> flags_;
    Rng rng_;
    std::vector<EnvPlan> plan_;
    std::vector<uint8_t> scratch_;  // two frames, for channel-last stacks
    SumTree tree_;                  // prioritized only
    double max_priority_ = 1.0;     // the largest p ever set (new transitions get it)
    std::vector<uint8_t> windows_;  // per item of the batch being sampled: its window length
    std::vector<double> draws_;     // prioritized: per item, its point in [0, total mass)
    std::vector<uint64_t> leaves_;  // ... and the leaf it falls in
    std::unique_ptr<WorkerPool> pool_;
    long pool_pid_ = 0;  // the process that started pool_ (a forked child must not use it)
    GatherTuner tuner_;
    mutable std::mutex mutex_;
    std::atomic<uint64_t> size_{0};
    std::atomic<int64_t> total_adds_{0}, frames_written_{0};
    std::atomic<uint64_t> frame_memory_used_{0};
};

}  // namespace dqn_fast
