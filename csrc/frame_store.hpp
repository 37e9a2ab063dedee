// Frame storage: one flat ring of fixed-size frames, allocated once.
//
// Invariants
//  * Every frame ever written gets a sequence number `seq` (0, 1, 2, ...).
//    It lives in slot `seq % capacity()` until frame `seq + capacity()` is
//    written over it. A frame is *live* iff `seq >= next_seq() - capacity()`.
//  * Frames are opaque bytes (`frame_bytes` each); dtype and shape are the
//    caller's business. Nothing here knows about episodes or transitions.
//  * Memory is reserved up front (untouched pages) after checking that the
//    machine can back it, so a too-large buffer is an AllocationError at
//    construction, not an OOM kill at first touch. Every size is computed
//    with overflow checks (checked_mul/checked_add): a product that wraps
//    is an AllocationError stating the operands, never a short allocation.
#pragma once

#include <cstdint>
#include <cstring>
#include <cstdio>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <unistd.h>

namespace dqn_fast {

// Raised when a buffer cannot be backed by memory; bound to MemoryError.
struct AllocationError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Bytes the OS says it can still give us without swapping (Linux MemAvailable,
// falling back to physical pages); 0 when unknown.
inline uint64_t available_memory_bytes() {
    // stdio, not iostreams: iostreams depend on libstdc++'s locale state,
    // which breaks where a build links its own copy of libstdc++.
    if (FILE* f = std::fopen("/proc/meminfo", "r")) {
        char line[256];
        unsigned long long kib = 0;
        bool found = false;
        while (!found && std::fgets(line, sizeof line, f)) {
            found = std::sscanf(line, "MemAvailable: %llu kB", &kib) == 1;
        }
        std::fclose(f);
        if (found) return uint64_t(kib) * 1024;
    }
    long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return (pages > 0 && page > 0) ? uint64_t(pages) * uint64_t(page) : 0;
}

[[noreturn]] inline void throw_size_overflow(uint64_t a, const char* op, uint64_t b, const char* what) {
    throw AllocationError(std::string("cannot allocate ") + what + ": " + std::to_string(a) + op +
                          std::to_string(b) + " bytes is more than 2^64 bytes");
}

// a * b and a + b, or AllocationError naming `what` when the result does not
// fit in 64 bits: every size the core allocates goes through these.
inline uint64_t checked_mul(uint64_t a, uint64_t b, const char* what) {
    uint64_t out;
    if (__builtin_mul_overflow(a, b, &out)) throw_size_overflow(a, " x ", b, what);
    return out;
}

inline uint64_t checked_add(uint64_t a, uint64_t b, const char* what) {
    uint64_t out;
    if (__builtin_add_overflow(a, b, &out)) throw_size_overflow(a, " + ", b, what);
    return out;
}

inline void check_can_allocate(uint64_t bytes, const char* what) {
    uint64_t avail = available_memory_bytes();
    if (avail != 0 && bytes > avail) {
        throw AllocationError(std::string("cannot allocate ") + std::to_string(bytes) + " bytes for " +
                              what + ": only " + std::to_string(avail) +
                              " bytes of memory are available on this machine");
    }
}

// A fixed-size, uninitialised array of trivially copyable T.
template <class T>
class Column {
public:
    Column() = default;
    explicit Column(uint64_t n) : n_(n) {
        if (n == 0) return;
        const uint64_t bytes = checked_mul(n, sizeof(T), "an array");
        data_.reset(new (std::nothrow) T[n]);
        if (!data_) throw AllocationError("cannot allocate " + std::to_string(bytes) + " bytes");
    }
    T* data() { return data_.get(); }
    const T* data() const { return data_.get(); }
    T& operator[](uint64_t i) { return data_[i]; }
    const T& operator[](uint64_t i) const { return data_[i]; }
    uint64_t size() const { return n_; }
    uint64_t nbytes() const { return n_ * sizeof(T); }

private:
    std::unique_ptr<T[]> data_;
    uint64_t n_ = 0;
};

class FrameStore {
public:
    FrameStore() = default;
    FrameStore(uint64_t capacity, uint64_t frame_bytes)
        : capacity_(capacity),
          frame_bytes_(frame_bytes),
          bytes_(checked_mul(capacity, frame_bytes, "the frame store")) {}

    uint64_t capacity() const { return capacity_; }
    uint64_t frame_bytes() const { return frame_bytes_; }
    uint64_t nbytes() const { return bytes_.nbytes(); }
    int64_t next_seq() const { return next_seq_; }
    // Oldest sequence number still stored (may be negative before the first wrap).
    int64_t oldest_live_seq() const { return next_seq_ - int64_t(capacity_); }
    bool is_live(int64_t seq) const { return seq >= oldest_live_seq() && seq < next_seq_; }

    uint8_t* data() { return bytes_.data(); }
    uint8_t* slot(uint64_t s) { return bytes_.data() + s * frame_bytes_; }
    const uint8_t* slot(uint64_t s) const { return bytes_.data() + s * frame_bytes_; }
    uint32_t slot_of(int64_t seq) const { return uint32_t(uint64_t(seq) % capacity_); }
    const uint8_t* frame(int64_t seq) const { return slot(slot_of(seq)); }

    // Appends one contiguous frame; returns its sequence number. The caller has
    // already evicted whatever referenced the frame being overwritten.
    int64_t push(const uint8_t* src) {
        std::memcpy(slot(slot_of(next_seq_)), src, frame_bytes_);
        return next_seq_++;
    }

    // A loaded store: its bytes were written in place; the caller has checked
    // the counter against everything that names a frame.
    void set_next_seq(int64_t seq) { next_seq_ = seq; }

private:
    uint64_t capacity_ = 0;
    uint64_t frame_bytes_ = 0;
    Column<uint8_t> bytes_;
    int64_t next_seq_ = 0;
};

}  // namespace dqn_fast
