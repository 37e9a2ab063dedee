// Where frame j sits inside one stacked observation.
//
// Frame-first stacks (k, H, W) keep each frame contiguous, so reads and writes
// are plain memcpy. Channel-last stacks (H, W, k), as Stable-Baselines3's
// VecFrameStack makes them, interleave the frames element by element; those
// go through the strided loops below. Frames inside the store are always
// contiguous.
#pragma once

#include <cstdint>
#include <cstring>

namespace dqn_fast {

struct FrameLayout {
    uint64_t frame_bytes = 0;  // bytes of one frame
    uint64_t elem_size = 1;    // bytes of one element (dtype itemsize)
    bool stack_last = false;   // stack axis is the last axis

    // Copies frame j of an observation holding n frames into contiguous dst.
    void read(const uint8_t* obs, int j, int n, uint8_t* dst) const {
        if (!stack_last || n == 1) {
            std::memcpy(dst, obs + uint64_t(j) * frame_bytes, frame_bytes);
            return;
        }
        strided(dst, elem_size, obs + uint64_t(j) * elem_size, uint64_t(n) * elem_size);
    }

    // Writes contiguous src as frame j of an observation holding n frames.
    void write(uint8_t* obs, int j, int n, const uint8_t* src) const {
        if (!stack_last || n == 1) {
            std::memcpy(obs + uint64_t(j) * frame_bytes, src, frame_bytes);
            return;
        }
        strided(obs + uint64_t(j) * elem_size, uint64_t(n) * elem_size, src, elem_size);
    }

    // Zeros frame j of an observation holding n frames.
    void zero(uint8_t* obs, int j, int n) const {
        if (!stack_last || n == 1) {
            std::memset(obs + uint64_t(j) * frame_bytes, 0, frame_bytes);
            return;
        }
        const uint64_t count = frame_bytes / elem_size, step = uint64_t(n) * elem_size;
        uint8_t* p = obs + uint64_t(j) * elem_size;
        for (uint64_t i = 0; i < count; ++i) std::memset(p + i * step, 0, elem_size);
    }

    // Frame j of an observation, if it is contiguous there; nullptr otherwise.
    const uint8_t* contiguous(const uint8_t* obs, int j, int n) const {
        return (!stack_last || n == 1) ? obs + uint64_t(j) * frame_bytes : nullptr;
    }

private:
    void strided(uint8_t* dst, uint64_t dst_step, const uint8_t* src, uint64_t src_step) const {
        const uint64_t count = frame_bytes / elem_size;
        switch (elem_size) {
            case 1: return copy_elems<1>(dst, dst_step, src, src_step, count);
            case 2: return copy_elems<2>(dst, dst_step, src, src_step, count);
            case 4: return copy_elems<4>(dst, dst_step, src, src_step, count);
            case 8: return copy_elems<8>(dst, dst_step, src, src_step, count);
            default:
                for (uint64_t i = 0; i < count; ++i)
                    std::memcpy(dst + i * dst_step, src + i * src_step, elem_size);
        }
    }
    template <int S>
    static void copy_elems(uint8_t* dst, uint64_t dst_step, const uint8_t* src, uint64_t src_step,
                           uint64_t count) {
        for (uint64_t i = 0; i < count; ++i) std::memcpy(dst + i * dst_step, src + i * src_step, S);
    }
};

}  // namespace dqn_fast
