// How one frame is coded in a compressed frame store (frame_arena.hpp).
//
// A coded frame is a tag byte followed by its payload:
//  * kRaw:   the frame's bytes, as they are (frames that do not compress:
//            at most 1 byte more than the frame).
//  * kKey:   a C-Blosc2 chunk of the frame (LZ4 or zstd), decoded alone.
//  * kPatch: the byte runs in which the frame differs from its reference
//            frame (the previous frame of its env's stream): a list of
//            (skip, length, bytes) with LEB128 varints, positions strictly
//            increasing, every run inside the frame. Decoding copies the
//            reference, then writes each run: cost ~ the patch's size, not
//            the frame's. Consecutive Atari frames differ in a few hundred
//            bytes out of 7,056.
// Invariants
//  * encode_* never write more than max_coded_bytes(frame_bytes).
//  * check_coded accepts exactly the payloads decode can apply without
//    reading or writing outside the payload and the frame: a loaded file is
//    checked with it once, so decoding at sample time cannot go out of bounds.
//  * Every decoding thread uses its own Blosc2 decompression context (one
//    per gather call): sampler threads decode at once without a lock.
//    Compression contexts are per buffer (see compressor()).
#pragma once

#include <blosc2.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

namespace dqn_fast {

enum class Codec : uint8_t { kNone = 0, kLz4 = 1, kZstd = 2 };
enum CodedTag : uint8_t { kRaw = 0, kKey = 1, kPatch = 2 };

// Gaps of equal bytes shorter than this are folded into the surrounding run:
// a new run costs at least two header bytes.
constexpr uint64_t kPatchGap = 3;

inline uint64_t max_coded_bytes(uint64_t frame_bytes) { return frame_bytes + 1; }

namespace codec_detail {

inline uint8_t* put_varint(uint8_t* p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = uint8_t(v | 0x80);
        v >>= 7;
    }
    *p++ = uint8_t(v);
    return p;
}

// Reads a varint from [p, end); false if it runs past end or past 64 bits.
inline bool get_varint(const uint8_t*& p, const uint8_t* end, uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
        const uint8_t b = *p++;
        v |= uint64_t(b & 0x7f) << shift;
        if (!(b & 0x80)) return shift < 63 || (b >> 1) == 0;
    }
    return false;
}

// Copies n >= 1 bytes. Most patch runs are a few bytes, where a call to
// memcpy costs more than the copy: fixed-size (overlapping) moves instead.
inline void copy_run(uint8_t* d, const uint8_t* s, uint64_t n) {
    if (n >= 16) {
        for (uint64_t i = 0; i + 16 <= n; i += 16) std::memcpy(d + i, s + i, 16);
        std::memcpy(d + n - 16, s + n - 16, 16);
    } else if (n >= 8) {
        std::memcpy(d, s, 8);
        std::memcpy(d + n - 8, s + n - 8, 8);
    } else if (n >= 4) {
        std::memcpy(d, s, 4);
        std::memcpy(d + n - 4, s + n - 4, 4);
    } else {
        d[0] = s[0];
        d[n / 2] = s[n / 2];
        d[n - 1] = s[n - 1];
    }
}

// "lz4" keys are compressed by LZ4's high-compression encoder (same format,
// same decoder): on Atari key frames, level 4 takes MsPacman's from 2,239 to
// 1,453 bytes and decodes faster (fewer, longer matches); coding a key costs
// ~28 us instead of ~12, once per chain (bench: `dqn-fast bench`, codec rows).
inline int blosc_codec(Codec c) { return c == Codec::kZstd ? BLOSC_ZSTD : BLOSC_LZ4HC; }

struct ContextDeleter {
    void operator()(blosc2_context* c) const { blosc2_free_ctx(c); }
};
using Context = std::unique_ptr<blosc2_context, ContextDeleter>;

// A compression context. Each buffer owns one (adds run under its mutex):
// a Blosc2 context keeps state from the sizes it compressed before, so a
// context shared between buffers of different frame sizes would make a
// buffer's coded sizes depend on what else ran in the process.
inline Context compressor(Codec c) {
    blosc2_cparams p = BLOSC2_CPARAMS_DEFAULTS;
    p.compcode = uint8_t(blosc_codec(c));
    p.clevel = c == Codec::kZstd ? 1 : 4;  // zstd 1 and LZ4HC 4: smaller keys stop paying beyond
    p.typesize = 1;
    p.nthreads = 1;
    for (auto& f : p.filters) f = BLOSC_NOFILTER;  // uint8 frames: shuffle would do nothing
    Context ctx(blosc2_create_cctx(p));
    if (!ctx) throw std::runtime_error("cannot create a Blosc2 compression context");
    return ctx;
}

// A decompression context (no state carried between calls). Made per
// gather call, not thread_local: TLS destructors of Python threads race
// with glibc's TLS reuse as ThreadSanitizer sees it, and a context costs
// one small allocation.
inline Context decompressor() {
    blosc2_dparams p = BLOSC2_DPARAMS_DEFAULTS;
    p.nthreads = 1;
    Context ctx(blosc2_create_dctx(p));
    if (!ctx) throw std::runtime_error("cannot create a Blosc2 decompression context");
    return ctx;
}

}  // namespace codec_detail

// Writes `cur` as runs against `ref` into out (tag included); returns the
// coded size, or 0 if the patch would reach `limit` bytes (then code a key).
inline uint64_t encode_patch(const uint8_t* ref, const uint8_t* cur, uint64_t n, uint8_t* out, uint64_t limit) {
    using codec_detail::put_varint;
    uint8_t* p = out;
    *p++ = kPatch;
    uint64_t pos = 0, i = 0;
    while (i < n) {
        // Skip equal bytes, 8 at a time.
        while (i + 8 <= n) {
            uint64_t a, b;
            std::memcpy(&a, ref + i, 8);
            std::memcpy(&b, cur + i, 8);
            if (a != b) break;
            i += 8;
        }
        while (i < n && ref[i] == cur[i]) ++i;
        if (i == n) break;
        // A run: differing bytes, with equal gaps shorter than kPatchGap folded in.
        const uint64_t start = i;
        uint64_t end = i + 1;
        for (uint64_t j = end; j < n && j < end + kPatchGap; ++j)  // end moves as runs join
            if (ref[j] != cur[j]) end = j + 1;
        const uint64_t len = end - start;
        if (uint64_t(p - out) + 20 + len >= limit) return 0;
        p = put_varint(p, start - pos);
        p = put_varint(p, len);
        std::memcpy(p, cur + start, len);
        p += len;
        pos = i = end;
    }
    return uint64_t(p - out);
}

// Writes `cur` as a key (Blosc2) or raw into out (tag included); returns the coded size.
inline uint64_t encode_key(const uint8_t* cur, uint64_t n, blosc2_context* ctx, uint8_t* out) {
    if (n + BLOSC2_MAX_OVERHEAD < uint64_t(BLOSC2_MAX_BUFFERSIZE)) {
        const int c = blosc2_compress_ctx(ctx, cur, int32_t(n), out + 1, int32_t(n));
        if (c > 0 && uint64_t(c) < n) {
            out[0] = kKey;
            return uint64_t(c) + 1;
        }
    }
    out[0] = kRaw;
    std::memcpy(out + 1, cur, n);
    return n + 1;
}

// Applies a patch payload (after the tag) to dst, which holds its reference frame.
inline void apply_patch(const uint8_t* p, const uint8_t* end, uint8_t* dst) {
    uint64_t pos = 0, skip, len;
    while (p < end) {
        codec_detail::get_varint(p, end, skip);
        codec_detail::get_varint(p, end, len);
        pos += skip;
        codec_detail::copy_run(dst + pos, p, len);
        p += len;
        pos += len;
    }
}

// Decodes a key or raw frame into dst (n bytes). Throws on a corrupt chunk
// (never expected: loaded payloads were checked).
inline void decode_key(const uint8_t* coded, uint64_t size, uint8_t* dst, uint64_t n, blosc2_context* ctx) {
    if (coded[0] == kRaw) {
        std::memcpy(dst, coded + 1, n);
        return;
    }
    const int d = blosc2_decompress_ctx(ctx, coded + 1, int32_t(size - 1), dst, int32_t(n));
    if (d != int(n)) throw std::runtime_error("a compressed frame failed to decode (Blosc2 error " + std::to_string(d) + ")");
}

// Whether `coded` (size bytes) is a frame of n bytes that decodes without
// leaving its bounds; `scratch` (n bytes) receives a decoded key. The empty
// string means valid; otherwise the reason.
inline std::string check_coded(const uint8_t* coded, uint64_t size, uint64_t n, uint8_t* scratch, blosc2_context* ctx) {
    if (size < 1) return "is empty";
    const uint8_t* p = coded + 1;
    const uint8_t* end = coded + size;
    switch (coded[0]) {
        case kRaw:
            return size == n + 1 ? "" : "is a raw frame of the wrong size";
        case kKey: {
            int32_t nbytes = 0, cbytes = 0, blocksize = 0;
            if (size - 1 > uint64_t(BLOSC2_MAX_BUFFERSIZE) ||
                blosc2_cbuffer_sizes(p, &nbytes, &cbytes, &blocksize) < 0 || uint64_t(nbytes) != n ||
                uint64_t(cbytes) != size - 1)
                return "is not a Blosc2 chunk of one frame";
            const int d = blosc2_decompress_ctx(ctx, p, int32_t(size - 1), scratch, int32_t(n));
            return d == int(n) ? "" : "does not decode (Blosc2 error " + std::to_string(d) + ")";
        }
        case kPatch: {
            uint64_t pos = 0, skip, len;
            bool first = true;
            while (p < end) {
                if (!codec_detail::get_varint(p, end, skip) || !codec_detail::get_varint(p, end, len))
                    return "has a truncated run header";
                if (len == 0 || (!first && skip == 0) || skip > n - pos || len > n - pos - skip ||
                    len > uint64_t(end - p))
                    return "has a run outside the frame or the payload";
                pos += skip + len;
                p += len;
                first = false;
            }
            return "";
        }
        default:
            return "has an unknown tag";
    }
}

}  // namespace dqn_fast
