// Index draws and the threads that gather a batch.
//
//  * Rng: xoshiro256** seeded through splitmix64, with Lemire's unbiased
//    bounded draw. Same seed, same calls -> same numbers on every platform
//    (std:: distributions are implementation-defined, so they are not used).
//  * WorkerPool: a few persistent threads that split one loop with the
//    calling thread. Only used for large gathers, where copying dominates
//    and a second core roughly halves the time.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
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

class WorkerPool {
public:
    using Job = std::function<void(int64_t begin, int64_t end)>;

    explicit WorkerPool(int extra_threads) {
        for (int i = 0; i < extra_threads; ++i) threads_.emplace_back([this, i] { work(i + 1); });
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

    int parts() const { return int(threads_.size()) + 1; }

    // Runs job over [0, n) in parts() contiguous chunks; the caller takes the
    // first chunk and returns when all are done. One call at a time.
    void parallel_for(int64_t n, const Job& job) {
        {
            std::lock_guard<std::mutex> lock(m_);
            job_ = &job;
            n_ = n;
            pending_.store(int(threads_.size()), std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        job(0, chunk_end(0, n));
        // Chunks are equal and short (a large batch is ~1 ms): spin, then yield.
        for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
            if (spins < 4096) {
                pause();
            } else {
                std::this_thread::yield();
            }
        }
    }

private:
    int64_t chunk_end(int part, int64_t n) const { return n * (part + 1) / parts(); }

    static void pause() {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }

    // Waking a parked thread costs tens of microseconds, as much as a whole
    // batch-32 gather; so after each job a worker stays awake briefly for the
    // next one (back-to-back sampling, as a prefetcher does), then parks.
    void work(int part) {
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
            const Job* job = job_;
            const int64_t n = n_;
            (*job)(n * part / parts(), chunk_end(part, n));
            pending_.fetch_sub(1, std::memory_order_release);
        }
    }

    std::vector<std::thread> threads_;
    std::mutex m_;
    std::condition_variable wake_;
    const Job* job_ = nullptr;  // written before generation_ is released
    int64_t n_ = 0;
    std::atomic<int> pending_{0};
    std::atomic<uint64_t> generation_{0};
    std::atomic<bool> stop_{false};
};

}  // namespace dqn_fast
