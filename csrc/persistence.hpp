// What saving and loading a buffer needs from the core: its state as plain
// values, its arrays as raw bytes, and a fast checksum. The file format
// itself lives in dqn_fast/replay.py; the checks that make a loaded state
// safe to use live with the invariants they protect (EpisodeIndex::check,
// ReplayBuffer::restore).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "episode_index.hpp"

namespace dqn_fast {

// Everything a buffer holds besides its config and its arrays.
struct BufferState {
    int64_t next_seq = 0;  // frames ever written
    int64_t head = 0;      // stored transitions are the ids [tail, head)
    int64_t tail = 0;
    uint64_t rng[4] = {0, 0, 0, 0};
    std::vector<EnvStream> streams;  // one per env
    double max_priority = 1.0;       // prioritized buffers: the largest priority set so far
    int64_t arena_tail = 0;          // compressed buffers: the oldest frame the arena holds
    uint64_t arena_head = 0;         // ... and the virtual offset its next frame goes to
};

// One of the buffer's arrays, cut to the rows that were ever written.
struct RawArray {
    const char* name;
    uint8_t* data;
    uint64_t nbytes;
};

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of the
// saved arrays. zlib's CRC-32 runs at about the speed of the disk, which
// would halve save/load throughput; the SSE4.2 instruction computes CRC-32C
// several times faster. Other CPUs use the bytewise table (same result).
namespace crc32c_detail {

struct Table {
    uint32_t t[256];
    Table() {
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int b = 0; b < 8; ++b) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
            t[i] = c;
        }
    }
};

inline uint32_t portable(uint32_t crc, const uint8_t* p, size_t n) {
    static const Table table;
    for (size_t i = 0; i < n; ++i) crc = table.t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2"))) inline uint32_t hardware(uint32_t crc, const uint8_t* p, size_t n) {
    uint64_t c = crc;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t word;
        __builtin_memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
    }
    uint32_t c32 = uint32_t(c);
    for (; n > 0; ++p, --n) c32 = __builtin_ia32_crc32qi(c32, *p);
    return c32;
}
#endif

}  // namespace crc32c_detail

// Continues a checksum: crc32c(b, crc32c(a)) == crc32c(a + b); start with 0.
inline uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0) {
    const auto* p = static_cast<const uint8_t*>(data);
    crc = ~crc;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    static const bool has_sse42 = __builtin_cpu_supports("sse4.2");
    if (has_sse42) return ~crc32c_detail::hardware(crc, p, n);
#endif
    return ~crc32c_detail::portable(crc, p, n);
}

}  // namespace dqn_fast
