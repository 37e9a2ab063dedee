// Index draws and the threads that gather a batch.
//
//  * Rng: xoshiro256** seeded through splitmix64, with Lemire's unbiased
//    bounded draw. Same seed, same calls -> same numbers on every platform
//    (std:: distributions are implementation-defined, so they are not used).
//  * WorkerPool: a few persistent threads that share one loop with the
//    calling thread. Only used for large gathers, where copying dominates
//    and a second core roughly halves the time.
//  * GatherTuner: measures whether the pool is faster than the caller alone
//    right now, so a loaded machine never makes the gather slower than one
//    thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dqn_fast {

class Rng {
public:
    explicit Rng(uint64_t seed = 0) { reseed(seed); }

    void reseed(uint64_t seed) {
        for (auto& word : s_) {  // splitmix64
            seed += 0x9e3779b97f4a7c15ULL;
            uint64_t z = seed;
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
            word = z ^ (z >> 31);
        }
    }

    uint64_t next() {  // xoshiro256**
        const uint64_t result = rotl(s_[1] * 5, 7) * 9;
        const uint64_t t = s_[1] << 17;
        s_[2] ^= s_[0];
        s_[3] ^= s_[1];
        s_[1] ^= s_[2];
        s_[0] ^= s_[3];
        s_[2] ^= t;
        s_[3] = rotl(s_[3], 45);
        return result;
    }

    // Uniform in [0, n), n > 0, without modulo bias.
    uint64_t below(uint64_t n) {
        __uint128_t m = __uint128_t(next()) * n;
        uint64_t low = uint64_t(m);
        if (low < n) {
            const uint64_t threshold = -n % n;
            while (low < threshold) {
                m = __uint128_t(next()) * n;
                low = uint64_t(m);
            }
        }
        return uint64_t(m >> 64);
    }

    const uint64_t* state() const { return s_; }
    void set_state(const uint64_t* s) {
        for (int i = 0; i < 4; ++i) s_[i] = s[i];
    }

private:
    static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    uint64_t s_[4];
};

// Threads that gather a batch with the caller.
//
// Invariants
//  * Work is handed out in chunks claimed from a shared counter, and the
//    caller claims too. A worker that is asleep or descheduled when a job is
//    posted claims nothing, and the caller does not wait for it: a job waits
//    only for chunks that a worker has started (one chunk at most each).
//  * A worker touches a job only between `active_++` and `active_--`, and
//    only after seeing it open; the caller closes the job, then waits for
//    `active_ == 0` before returning (seq_cst on both sides), so no worker
//    can read a finished job's state or write into the caller's memory
//    after parallel_for returns.
//  * A job that throws ends early and its first exception reaches the
//    caller, after the same wait: no thread is left inside it.
//  * Construction never leaves a half-built pool: if the OS refuses a thread
//    (thread limit, address space), the pool keeps the threads that started,
//    possibly none, and parallel_for still runs the whole job.
class WorkerPool {
public:
    using Job = std::function<void(int64_t begin, int64_t end)>;

    explicit WorkerPool(int extra_threads) {
        threads_.reserve(size_t(std::max(0, extra_threads)));  // throws (no thread yet) or never reallocates
        for (int i = 0; i < extra_threads; ++i) {
            try {
                threads_.emplace_back([this] { work(); });
            } catch (...) {  // std::system_error (EAGAIN) or bad_alloc: keep what started
                break;
            }
        }
    }
    ~WorkerPool() {
        {
            std::lock_guard<std::mutex> lock(m_);
            stop_.store(true);
        }
        wake_.notify_all();
        for (auto& t : threads_) t.join();
    }
    WorkerPool(const WorkerPool&) = delete;
    WorkerPool& operator=(const WorkerPool&) = delete;

    int threads() const { return int(threads_.size()) + 1; }  // the caller included

    // Runs job over [0, n) in chunks of `chunk`, on the caller and whichever
    // workers join; returns when every chunk is done. One call at a time.
    // A job that throws (on any thread) stops handing out chunks; the first
    // exception is rethrown here once no worker is inside the job.
    void parallel_for(int64_t n, int64_t chunk, const Job& job) {
        if (threads_.empty()) return job(0, n);
        {
            std::lock_guard<std::mutex> lock(m_);
            job_ = &job;
            n_ = n;
            chunk_ = std::max<int64_t>(1, chunk);
            error_ = nullptr;
            next_.store(0, std::memory_order_relaxed);
            open_.store(true);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        run_chunks();
        open_.store(false);
        // Only workers inside a chunk they claimed are waited for (short).
        for (int spins = 0; active_.load() != 0; ++spins) {
            if (spins < 4096) {
                pause();
            } else {
                std::this_thread::yield();
            }
        }
        if (error_) std::rethrow_exception(error_);
    }

private:
    void run_chunks() {
        try {
            for (;;) {
                const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
                if (begin >= n_) return;
                (*job_)(begin, std::min(begin + chunk_, n_));
            }
        } catch (...) {
            next_.store(n_);  // nobody claims more
            std::lock_guard<std::mutex> lock(m_);
            if (!error_) error_ = std::current_exception();
        }
    }

    static void pause() {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }

    // Waking a parked thread costs tens of microseconds, as much as a whole
    // batch-32 gather; so after each job a worker stays awake briefly for the
    // next one (back-to-back sampling, as a prefetcher does), then parks.
    void work() {
        using clock = std::chrono::steady_clock;
        uint64_t seen = 0;
        for (;;) {
            const auto until = clock::now() + std::chrono::microseconds(200);
            for (int i = 0; generation_.load(std::memory_order_acquire) == seen && !stop_.load(); ++i) {
                pause();
                if ((i & 255) == 255 && clock::now() > until) {
                    std::unique_lock<std::mutex> lock(m_);
                    wake_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
                    break;
                }
            }
            if (stop_.load()) return;
            seen = generation_.load(std::memory_order_acquire);
            active_.fetch_add(1);
            if (open_.load()) run_chunks();  // else: that job is already over
            active_.fetch_sub(1);
        }
    }

    std::vector<std::thread> threads_;
    std::mutex m_;
    std::condition_variable wake_;
    const Job* job_ = nullptr;  // job_, n_, chunk_: written before open_ is set
    int64_t n_ = 0;
    int64_t chunk_ = 1;
    std::exception_ptr error_;  // the job's first exception, under m_
    std::atomic<int64_t> next_{0};
    std::atomic<bool> open_{false};
    std::atomic<int> active_{0};
    std::atomic<uint64_t> generation_{0};
    std::atomic<bool> stop_{false};
};

// Chooses, by measuring, whether a large gather runs on the pool or on the
// caller alone. On a quiet machine the pool is about twice as fast; with the
// cores taken by other work (the learner's torch threads, env threads) a
// worker wakes late or spins on a core the caller needs, and one thread is
// faster. Per size class (power of two of the bytes gathered) it times a few
// gathers each way, in two blocks, keeps the faster mode (median ns per byte)
// for a run of gathers, longer each time the choice stands, and measures
// again at the end of a run, or early when the chosen mode gets 1.5x slower
// than it measured (the load changed).
class GatherTuner {
public:
    bool use_pool(uint64_t bytes) { return cls(bytes).use_pool(); }
    void record(uint64_t bytes, bool pooled, double seconds) { cls(bytes).record(pooled, seconds / double(bytes)); }

private:
    struct SizeClass {
        static constexpr int kTrials = 5;                  // kept per mode and exploration
        static constexpr int kMinRun = 64, kMaxRun = 512;  // gathers between explorations
        double trials[2][kTrials] = {};
        int step = 0;        // gathers into the current exploration
        int left = 0;        // gathers left in the current run
        int run = kMinRun;   // length of the next run
        bool pooled = true;  // the current choice
        bool exploring = true;
        double expected = 0, recent = 0;  // the choice's measured and recent (EWMA) ns per byte

        // Exploration: kTrials + 1 pooled gathers, then kTrials + 1 on the
        // caller alone. The first of each block is dropped: it pays for the
        // switch (waking parked workers; workers still spinning from the
        // pool's block and taking a core from the caller), which steady use
        // of either mode does not.
        static constexpr int kBlock = kTrials + 1;
        bool use_pool() const { return exploring ? step < kBlock : pooled; }
        void record(bool was_pooled, double per_byte) {
            if (!exploring) {
                recent += (per_byte - recent) / 8;
                if (--left <= 0 || recent > 1.5 * expected) exploring = true, step = 0;
                return;
            }
            const int i = step % kBlock;
            if (i > 0) trials[was_pooled][i - 1] = per_byte;
            if (++step < 2 * kBlock) return;
            const double serial = median(trials[0]), pool = median(trials[1]);
            const bool choice = pool < serial;
            run = choice == pooled ? std::min(2 * run, kMaxRun) : kMinRun;
            pooled = choice;
            expected = recent = choice ? pool : serial;
            left = run;
            exploring = false;
        }
        static double median(const double* v) {
            double s[kTrials];
            std::copy(v, v + kTrials, s);
            std::nth_element(s, s + kTrials / 2, s + kTrials);
            return s[kTrials / 2];
        }
    };
    SizeClass& cls(uint64_t bytes) { return classes_[63 - __builtin_clzll(bytes | 1)]; }
    SizeClass classes_[64];
};

}  // namespace dqn_fast
