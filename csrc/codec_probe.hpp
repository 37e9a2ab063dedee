// The benchmark's comparison of frame codings on the same frames (not used
// by the buffer): bytes per frame and decode time per frame, in C++, for
//   "patch"     this project's byte-run patch against the previous frame
//               (frame_codec.hpp), decoded as the sampler does: copy the
//               previous frame, apply the patch;
//   "xor-lz4",  a Blosc2 chunk of the XOR with the previous frame, decoded
//   "xor-zstd"  by decompressing it and XOR-ing it into the previous frame;
//   "lz4",      a Blosc2 chunk of the frame alone (what key frames cost).
//   "zstd"
// Every decoded frame is compared with the original (a mismatch throws).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "frame_codec.hpp"

namespace dqn_fast {

struct ProbeResult {
    uint64_t coded_bytes = 0;  // all frames but the first
    double decode_seconds = 0;  // all frames but the first, best of `repeats`
};

inline ProbeResult probe_codec(const uint8_t* frames, uint64_t count, uint64_t n, const std::string& method,
                               int repeats) {
    if (count < 2) throw std::invalid_argument("probe_codec needs at least 2 frames");
    const bool patch = method == "patch", xored = method.rfind("xor-", 0) == 0;
    const std::string codec_name = xored ? method.substr(4) : method;
    if (!patch && codec_name != "lz4" && codec_name != "zstd")
        throw std::invalid_argument("method must be patch, xor-lz4, xor-zstd, lz4 or zstd, got " + method);
    const Codec codec = codec_name == "zstd" ? Codec::kZstd : Codec::kLz4;
    codec_detail::Context ctx;
    if (!patch) ctx = codec_detail::compressor(codec);

    // Code every frame against its predecessor (patch, xor-*) or alone.
    std::vector<std::vector<uint8_t>> coded(count);
    std::vector<uint8_t> x(n), buf(max_coded_bytes(n) + BLOSC2_MAX_OVERHEAD);
    ProbeResult r;
    for (uint64_t i = 1; i < count; ++i) {
        const uint8_t* prev = frames + (i - 1) * n;
        const uint8_t* cur = frames + i * n;
        uint64_t size;
        if (patch) {
            size = encode_patch(prev, cur, n, buf.data(), uint64_t(-1));
        } else {
            const uint8_t* src = cur;
            if (xored) {
                for (uint64_t j = 0; j < n; ++j) x[j] = prev[j] ^ cur[j];
                src = x.data();
            }
            const int c = blosc2_compress_ctx(ctx.get(), src, int32_t(n), buf.data(), int32_t(buf.size()));
            if (c <= 0) throw std::runtime_error("Blosc2 could not compress a frame");
            size = uint64_t(c);
        }
        coded[i].assign(buf.begin(), buf.begin() + int64_t(size));
        r.coded_bytes += size;
    }

    // Decode them all, each from the original previous frame, as a sampler
    // decodes one step of a chain; the best of `repeats` passes.
    std::vector<uint8_t> dst(n);
    const codec_detail::Context dctx = codec_detail::decompressor();
    blosc2_context* d = dctx.get();
    for (int rep = 0; rep < repeats; ++rep) {
        const auto start = std::chrono::steady_clock::now();
        for (uint64_t i = 1; i < count; ++i) {
            const uint8_t* prev = frames + (i - 1) * n;
            const std::vector<uint8_t>& c = coded[i];
            if (patch) {
                std::memcpy(dst.data(), prev, n);
                apply_patch(c.data() + 1, c.data() + c.size(), dst.data());
            } else if (xored) {
                if (blosc2_decompress_ctx(d, c.data(), int32_t(c.size()), x.data(), int32_t(n)) != int(n))
                    throw std::runtime_error("Blosc2 could not decompress a frame");
                for (uint64_t j = 0; j < n; ++j) dst[j] = prev[j] ^ x[j];
            } else if (blosc2_decompress_ctx(d, c.data(), int32_t(c.size()), dst.data(), int32_t(n)) != int(n)) {
                throw std::runtime_error("Blosc2 could not decompress a frame");
            }
            if (rep == 0 && std::memcmp(dst.data(), frames + i * n, n) != 0)
                throw std::runtime_error("frame " + std::to_string(i) + " decoded wrong with " + method);
        }
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (rep == 0 || s < r.decode_seconds) r.decode_seconds = s;
    }
    return r;
}

}  // namespace dqn_fast
