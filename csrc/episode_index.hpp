// Which transitions are stored, and which frames each one is made of.
//
// Invariants
//  * Transitions get consecutive ids in insertion order. The stored ones are
//    exactly the ids in [tail, head); id lives in slot `id % capacity`.
//    Eviction only ever advances `tail`, so the buffer always holds the most
//    recent `size()` transitions, whatever happened.
//  * Every add appends one transition per environment, env 0 first, so
//    transition `id` belongs to env `id % num_envs`, and `head` is a
//    multiple of num_envs (eviction finds an env's transitions by stepping
//    num_envs ids at a time).
//  * A transition is k frame seqs for obs and k for next_obs (oldest first).
//    `oldest[slot]` is the smallest of them. Within one env, `oldest` never
//    decreases with id: a continuing transition reuses the previous next_obs
//    frames, a new segment only uses frames written now.
//  * Every frame a stored transition names is live in the frame store:
//    before frames are overwritten, `evict_frames_before` drops (from the
//    tail) every transition that names them.
//  * An env's stream is the stored copy of its latest next_obs. An add may
//    reuse it for its obs only if it is open (no terminal/truncation since)
//    and the caller's obs equals it frame by frame; the buffer checks both.
//    An open stream's seqs are non-decreasing, >= 0 and < the store's
//    next_seq (the frames were written; they may since be overwritten).
//  * A loaded state (check + adopt) is held to all of the above, so a
//    hostile file cannot make add or sample read outside the arrays, read a
//    frame slot that was never written, or keep a transition sampleable
//    after its frames are overwritten. `check` tests, in order:
//      1. 0 <= tail <= head < 2^62 and head - tail <= capacity;
//      2. head % num_envs == 0;
//      3. 0 <= next_seq < 2^62;
//      4. one stream per env, each holding k frame seqs;
//      5. every frame slot a stored transition names was written
//         (slot < min(next_seq, frame_capacity));
//      6. oldest[slot] is the smallest seq the transition names (compressed:
//         the oldest key frame its frames decode from), and every frame it
//         names (and that key) is still stored;
//      7. per env, oldest never decreases with id;
//      8. an open stream's seqs are non-decreasing, not older than its env's
//         newest stored transition's oldest frame, and < next_seq.
//    ReplayBuffer::restore adds: flags hold only known bits; a transition
//    flagged as following its env's previous one follows one that did not
//    end, and its obs frames are that one's next_obs frames (same slots or
//    same bytes); an open stream is its env's newest transition's next_obs,
//    and that transition did not end; a shift-flagged transition's frames
//    are a shift; the PRNG state is not all zeros; prioritized, the
//    priority leaves are valid.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "frame_store.hpp"

namespace dqn_fast {

struct EnvStream {
    bool open = false;          // latest transition did not end the episode
    std::vector<int64_t> seqs;  // frame seqs of the latest next_obs, oldest first
};

class EpisodeIndex {
public:
    EpisodeIndex() = default;
    EpisodeIndex(uint64_t capacity, int num_envs, int frame_stack, uint64_t frame_capacity)
        : capacity_(capacity),
          frame_capacity_(frame_capacity),
          num_envs_(num_envs),
          k_(frame_stack),
          slots_(checked_mul(capacity, 2 * uint64_t(frame_stack), "the episode index")),
          oldest_(capacity),
          streams_(num_envs) {
        for (auto& s : streams_) s.seqs.assign(k_, 0);
    }

    uint64_t capacity() const { return capacity_; }
    int num_envs() const { return num_envs_; }
    int frame_stack() const { return k_; }
    int64_t head() const { return head_; }
    int64_t tail() const { return tail_; }
    uint64_t size() const { return uint64_t(head_ - tail_); }
    uint64_t nbytes() const { return slots_.nbytes() + oldest_.nbytes(); }

    uint64_t slot_of(int64_t id) const { return uint64_t(id) % capacity_; }
    // 2k frame-store slots of the transition in `slot`: obs frames, then next_obs frames.
    const uint32_t* frames_of(uint64_t slot) const { return slots_.data() + slot * 2 * k_; }

    EnvStream& stream(int env) { return streams_[env]; }
    const std::vector<EnvStream>& streams() const { return streams_; }
    uint32_t* slots_data() { return slots_.data(); }
    int64_t* oldest_data() { return oldest_.data(); }

    // Throws std::invalid_argument naming the first invariant (see the top of
    // this file) that a loaded state breaks. The slot arrays must already
    // hold the loaded rows; `next_seq` is the frame store's counter. Changes
    // nothing; `adopt` then takes the state.
    // `key_of(seq)` is the frame a seq's decoding starts from (the seq itself
    // when frames are stored raw); frames older than `min_live` are gone.
    template <class KeyOf>
    void check(int64_t head, int64_t tail, const std::vector<EnvStream>& streams, int64_t next_seq, int64_t min_live,
               const KeyOf& key_of) const {
        const auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
        const auto str = [](int64_t v) { return std::to_string(v); };
        const int64_t cap = int64_t(capacity_), fcap = int64_t(frame_capacity_);
        constexpr int64_t kMaxCount = int64_t(1) << 62;  // counters far from overflow
        if (!(0 <= tail && tail <= head && head - tail <= cap && head < kMaxCount))
            fail("transition ids [tail=" + str(tail) + ", head=" + str(head) + ") do not fit a ring of " + str(cap));
        if (head % num_envs_ != 0)
            fail("head=" + str(head) + " is not a multiple of num_envs=" + str(num_envs_) +
                 ": every add appends one transition per env");
        if (!(0 <= next_seq && next_seq < kMaxCount))
            fail("frame counter next_seq=" + str(next_seq) + " is out of range");
        if (streams.size() != size_t(num_envs_)) fail("expected " + str(num_envs_) + " env streams");
        // Live frames are the seqs [live, next_seq); slot f holds seq base+f
        // or base+f+fcap, whichever is live. Slots >= written were never written.
        const int64_t live = std::max<int64_t>(0, next_seq - fcap), base = live - live % fcap;
        const uint64_t written = uint64_t(std::min(next_seq, fcap));
        std::vector<int64_t> last_oldest(num_envs_, 0);
        for (int64_t id = tail; id < head; ++id) {
            const uint64_t slot = slot_of(id);
            const uint32_t* f = frames_of(slot);
            int64_t lo = INT64_MAX;
            for (int j = 0; j < 2 * k_; ++j) {
                if (f[j] >= written)
                    fail("transition " + str(id) + " names frame slot " + str(f[j]) + ", which holds no frame");
                const int64_t seq = base + f[j] < live ? base + f[j] + fcap : base + f[j];
                if (seq < min_live) fail("transition " + str(id) + " names frame " + str(seq) + ", which is no longer stored");
                lo = std::min(lo, key_of(seq));
            }
            if (lo < min_live) fail("transition " + str(id) + " names a frame whose key frame is no longer stored");
            if (oldest_[slot] != lo) fail("transition " + str(id) + " records the wrong oldest frame");
            const int e = int(id % num_envs_);
            if (lo < last_oldest[e]) fail("transition " + str(id) + " names frames older than its env's previous one");
            last_oldest[e] = lo;
        }
        for (int e = 0; e < num_envs_; ++e) {
            const EnvStream& s = streams[e];
            if (s.seqs.size() != size_t(k_)) fail("env " + str(e) + "'s stream must hold " + str(k_) + " frames");
            if (!s.open) continue;
            // A stream continues its env's transitions: never older frames
            // than they name (eviction relies on per-env order).
            bool ok = s.seqs[0] >= last_oldest[e] && s.seqs[k_ - 1] < next_seq;
            for (int j = 1; j < k_; ++j) ok = ok && s.seqs[j - 1] <= s.seqs[j];
            if (!ok) fail("env " + str(e) + "'s open stream names frames that were not written in order");
        }
    }

    void adopt(int64_t head, int64_t tail, std::vector<EnvStream> streams) {
        head_ = head;
        tail_ = tail;
        streams_ = std::move(streams);
    }

    // Drops the oldest transitions so that `n` more fit in the ring.
    void evict_for(uint64_t n) { tail_ = std::max(tail_, head_ + int64_t(n) - int64_t(capacity_)); }

    // Drops, oldest first, every transition that names a frame older than
    // `limit`. Per env the offenders are a prefix (oldest is monotone), so each
    // env is scanned only over the transitions that go.
    void evict_frames_before(int64_t limit) {
        int64_t new_tail = tail_;
        for (int e = 0; e < num_envs_; ++e) {
            int64_t id = first_id_of_env(e);
            const int64_t first = id;
            while (id < head_ && oldest_[slot_of(id)] < limit) id += num_envs_;
            if (id != first) new_tail = std::max(new_tail, id - num_envs_ + 1);
        }
        tail_ = std::min(new_tail, head_);
    }

    // Appends the next transition (it belongs to env head % num_envs). `frames`
    // holds its 2k frame seqs (obs, then next_obs), `oldest` the oldest frame
    // it needs (invariant 6); returns the slot written.
    uint64_t append(const int64_t* frames, int64_t oldest) {
        const uint64_t slot = slot_of(head_);
        uint32_t* dst = slots_.data() + slot * 2 * k_;
        for (int j = 0; j < 2 * k_; ++j) dst[j] = uint32_t(uint64_t(frames[j]) % frame_capacity_);
        oldest_[slot] = oldest;
        ++head_;
        return slot;
    }

private:
    int64_t first_id_of_env(int e) const {
        const int64_t r = ((int64_t(e) - tail_ % num_envs_) + num_envs_) % num_envs_;
        return tail_ + r;
    }

    uint64_t capacity_ = 0;
    uint64_t frame_capacity_ = 1;
    int num_envs_ = 1;
    int k_ = 1;
    Column<uint32_t> slots_;  // 2k per transition
    Column<int64_t> oldest_;
    std::vector<EnvStream> streams_;
    int64_t head_ = 0;
    int64_t tail_ = 0;
};

}  // namespace dqn_fast
