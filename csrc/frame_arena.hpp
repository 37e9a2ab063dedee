// Compressed frame storage: frames coded on add (frame_codec.hpp) into one
// byte ring, the arena, whose size is the user's budget.
//
// Invariants
//  * Frames get sequence numbers as in FrameStore: frame `seq` is described
//    by table row `seq % capacity()` until frame `seq + capacity()` is
//    written. Row: virtual byte offset, coded size, and two distances back
//    in seq: to the frame it is a patch of (`ref_back`, 0 for a key or raw
//    frame) and to the key its chain starts from (`key_back`).
//  * Coded frames lie in the arena in seq order at increasing virtual
//    offsets; frame `seq` occupies arena bytes [offset % A, offset % A +
//    size), never across the end (a frame that would be is placed at the
//    next multiple of A; the gap is slack). The arena holds exactly the
//    frames [tail, next_seq): writing a frame drops, oldest first, every
//    frame whose bytes it would overwrite.
//  * A patch refers to an earlier frame of its env's stream, at most
//    kMaxChain - 1 patches from a key: decoding any frame decodes one key
//    and at most kMaxChain - 1 patches. A frame is decodable iff it and its
//    key are live (>= oldest_live_seq()); its whole chain then is.
//  * Adds are staged: every frame of one add is coded first, so the add
//    knows how many bytes it writes, and so which frames it drops, before it
//    drops anything (ReplayBuffer::add evicts the transitions that name them
//    first, then commits).
//  * Reads (decode) are const and thread-safe; everything else runs under
//    the buffer's mutex.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "frame_codec.hpp"
#include "frame_store.hpp"

namespace dqn_fast {

// Frames per chain (a key and its patches); bounds the decode of one frame.
constexpr int kMaxChain = 16;

class FrameArena {
public:
    FrameArena() = default;
    FrameArena(uint64_t capacity, uint64_t frame_bytes, uint64_t arena_bytes, Codec codec, int num_envs, int frame_stack)
        : capacity_(capacity),
          frame_bytes_(frame_bytes),
          arena_bytes_(arena_bytes),
          codec_(codec),
          k_(frame_stack),
          arena_(arena_bytes),
          offset_(capacity),
          size_(capacity),
          ref_back_(capacity),
          key_back_(capacity),
          depth_(num_envs, -1),
          stream_raw_(checked_mul(uint64_t(num_envs), checked_mul(uint64_t(frame_stack), frame_bytes, "a stream"), "the streams")) {
        static const bool initialised = (blosc2_init(), true);
        (void)initialised;
        cctx_ = codec_detail::compressor(codec);
    }

    // The smallest arena that holds one add of num_envs envs (2k frames each,
    // coded no larger than raw, plus slack at the wrap) twice over.
    static uint64_t min_arena_bytes(uint64_t frame_bytes, int num_envs, int frame_stack) {
        const uint64_t add = checked_mul(checked_mul(uint64_t(num_envs), 2 * uint64_t(frame_stack), "an add"),
                                         max_coded_bytes(frame_bytes), "an add");
        return checked_add(checked_mul(add, 2, "the arena"), max_coded_bytes(frame_bytes), "the arena");
    }
    // Bytes besides the arena: the table, the streams' raw frames, the stage.
    static uint64_t overhead_bytes(uint64_t capacity, uint64_t frame_bytes, int num_envs, int frame_stack) {
        const uint64_t add_frames = uint64_t(num_envs) * 2 * uint64_t(frame_stack);
        uint64_t b = checked_mul(capacity, kRowBytes, "the frame table");
        b = checked_add(b, checked_mul(uint64_t(num_envs) * uint64_t(frame_stack), frame_bytes, "the streams"), "the arena");
        return checked_add(b, checked_mul(add_frames, 2 * frame_bytes + 1 + 24, "the stage"), "the arena");
    }

    uint64_t capacity() const { return capacity_; }
    uint64_t frame_bytes() const { return frame_bytes_; }
    uint64_t arena_bytes() const { return arena_bytes_; }
    Codec codec() const { return codec_; }
    int64_t next_seq() const { return next_seq_; }
    int64_t tail() const { return tail_; }
    uint64_t head_offset() const { return head_; }
    int64_t oldest_live_seq() const { return std::max(next_seq_ - int64_t(capacity_), tail_); }
    uint32_t slot_of(int64_t seq) const { return uint32_t(uint64_t(seq) % capacity_); }
    uint64_t nbytes() const {
        return arena_.nbytes() + offset_.nbytes() + size_.nbytes() + ref_back_.nbytes() + key_back_.nbytes() +
               stream_raw_.nbytes() + depth_.size() * sizeof(int);
    }
    // Arena bytes between the oldest live frame and the head (payload + slack).
    uint64_t used_bytes() const {
        const int64_t live = oldest_live_seq();
        return live >= next_seq_ ? 0 : head_ - offset_[slot_of(live)];
    }

    // The key frame of a live seq (committed or staged this add).
    int64_t key_of(int64_t seq) const {
        if (seq >= next_seq_) return stage_key_[size_t(seq - next_seq_)];
        return seq - int64_t(key_back_[slot_of(seq)]);
    }
    bool decodable(int64_t seq, int64_t live) const { return seq >= live && seq < next_seq_ && key_of(seq) >= live; }

    // The raw frames of env e's stream (its latest next_obs), kept to compare
    // the next add's obs with, and as the reference of its next patch.
    uint8_t* stream_raw(int e) { return stream_raw_.data() + uint64_t(e) * k_ * frame_bytes_; }
    const uint8_t* stream_raw(int e) const { return stream_raw_.data() + uint64_t(e) * k_ * frame_bytes_; }

    // ---- staging one add
    // `refs[e]`: seq of env e's newest stored frame (its stream's newest),
    // whose raw bytes are stream_raw(e)'s last frame; -1 for none.
    void begin(const std::vector<int64_t>& refs, const std::vector<bool>& force_key) {
        stage_coded_.clear();
        stage_raw_.clear();
        stage_rows_.clear();
        stage_key_.clear();
        refs_ = &refs;
        force_key_ = &force_key;
        pending_.assign(depth_.size(), Pending{});
    }

    // Codes frame `src` of env e; returns its seq.
    int64_t stage(int e, const uint8_t* src) {
        const uint64_t fb = frame_bytes_;
        const int64_t seq = next_seq_ + int64_t(stage_rows_.size());
        Pending& p = pending_[size_t(e)];
        const uint8_t* ref = nullptr;
        int64_t ref_seq = -1, key = seq;
        int depth = 0;
        int64_t old_key = p.staged ? p.old_key : INT64_MAX;
        if (p.staged) {  // the env's previous frame in this add
            ref = stage_raw_.data() + p.raw_at;
            ref_seq = p.seq;
            depth = p.depth + 1;
            key = stage_key_[size_t(p.seq - next_seq_)];
        } else if (!(*force_key_)[size_t(e)] && (*refs_)[size_t(e)] >= 0 && depth_[size_t(e)] >= 0) {
            ref_seq = (*refs_)[size_t(e)];
            ref = stream_raw(e) + uint64_t(k_ - 1) * fb;
            depth = depth_[size_t(e)] + 1;
            key = key_of(ref_seq);
            old_key = key;
        }
        const size_t at = stage_coded_.size();
        stage_coded_.resize(at + max_coded_bytes(fb));
        uint64_t size = 0;
        if (ref && depth < kMaxChain) size = encode_patch(ref, src, fb, stage_coded_.data() + at, fb / 4);
        if (size == 0) {
            size = encode_key(src, fb, cctx_.get(), stage_coded_.data() + at);
            ref_seq = seq;
            key = seq;
            depth = 0;
        }
        stage_coded_.resize(at + size);
        const size_t raw_at = stage_raw_.size();
        stage_raw_.insert(stage_raw_.end(), src, src + fb);
        stage_rows_.push_back({at, size, uint32_t(seq - ref_seq), uint32_t(seq - key)});
        stage_key_.push_back(key);
        if (key == seq && !p.staged) old_key = INT64_MAX;  // a key: nothing old to keep
        p = Pending{true, seq, depth, raw_at, old_key};
        return seq;
    }
    int64_t staged() const { return int64_t(stage_rows_.size()); }
    // The key of the chain that env e's first staged frame continues, if it
    // was committed before this add (INT64_MAX otherwise): that key must stay
    // live, or the env's first frame must be coded as a key (force_key).
    int64_t old_chain_key(int e) const { return pending_[size_t(e)].old_key; }

    // The oldest seq that stays live once the staged frames are written:
    // everything older is dropped (by the ring or by the arena's bytes).
    int64_t limit() const {
        int64_t lim = std::max<int64_t>(next_seq_ + staged() - int64_t(capacity_), tail_);
        uint64_t v = head_;
        for (const auto& r : stage_rows_) v = place(v, r.size) + r.size;
        // Frame s survives iff offset(s) + A >= v (its bytes are not reused).
        int64_t s = std::max(lim, oldest_live_seq());
        while (s < next_seq_ && offset_[slot_of(s)] + arena_bytes_ < v) ++s;
        return std::max(lim, s);
    }

    void commit() {
        const int64_t lim = limit();  // before the rows of overwritten frames change
        uint64_t v = head_;
        for (size_t i = 0; i < stage_rows_.size(); ++i) {
            const StageRow& r = stage_rows_[i];
            v = place(v, r.size);
            std::memcpy(arena_.data() + v % arena_bytes_, stage_coded_.data() + r.at, r.size);
            const uint32_t slot = slot_of(next_seq_ + int64_t(i));
            offset_[slot] = v;
            size_[slot] = uint32_t(r.size);
            ref_back_[slot] = r.ref_back;
            key_back_[slot] = r.key_back;
            v += r.size;
        }
        next_seq_ += staged();
        head_ = v;
        set_lap();
        tail_ = std::min(std::max(tail_, lim), next_seq_);
        for (size_t e = 0; e < pending_.size(); ++e)
            if (pending_[e].staged) depth_[e] = pending_[e].depth;
    }

    // ---- decoding (const, any thread)
    // One thread's decoding state: its Blosc2 context, and the frames it has
    // decoded for the current item (slot, where), which serve as the start
    // of the next chains; clear() between items.
    struct Decoding {
        codec_detail::Context ctx = codec_detail::decompressor();
        std::vector<uint8_t> scratch;  // channel-last stacks: one frame per position of an item
        uint32_t slot[256];
        const uint8_t* at[256];
        int n = 0;
        void clear() { n = 0; }
        const uint8_t* find(uint32_t s) const {
            for (int i = n - 1; i >= 0; --i)
                if (slot[i] == s) return at[i];
            return nullptr;
        }
        void add(uint32_t s, const uint8_t* p) {
            if (n == 256) n = 0;
            slot[n] = s;
            at[n++] = p;
        }
    };
    // The frame at table row `slot` into dst.
    void decode(uint32_t slot, uint8_t* dst, Decoding& recent) const {
        const uint64_t fb = frame_bytes_;
        uint32_t chain[kMaxChain];
        int n = 0;
        uint32_t s = slot;
        const uint8_t* base = nullptr;
        for (;;) {
            if ((base = recent.find(s))) break;
            if (ref_back_[s] == 0) break;
            chain[n++] = s;
            const uint32_t back = ref_back_[s];  // < capacity: no division on this path
            s = s >= back ? s - back : uint32_t(uint64_t(s) + capacity_ - back);
        }
        if (base) {
            if (base != dst) std::memcpy(dst, base, fb);
        } else {
            decode_key(coded(s), size_[s], dst, fb, recent.ctx.get());
        }
        while (n > 0) {
            const uint32_t c = chain[--n];
            const uint8_t* p = coded(c);
            apply_patch(p + 1, p + size_[c], dst);
        }
        recent.add(slot, dst);
    }

    // Prefetching for a gather (frames are at random places, so the hardware
    // cannot guess them): first the table rows of a frame and of the chain
    // before it (rows of one env's consecutive frames are adjacent), then,
    // once those are in cache, the bytes from the chain's key to the frame.
    void prefetch_rows(uint32_t slot) const {
        const uint32_t back = slot >= kMaxChain ? slot - kMaxChain : slot;  // the chain's rows, roughly
        for (uint32_t s : {slot, back}) {
            __builtin_prefetch(ref_back_.data() + s);
            __builtin_prefetch(offset_.data() + s);
            __builtin_prefetch(size_.data() + s);
        }
    }
    void prefetch_bytes(uint32_t slot) const {
        uint32_t s = slot;
        for (int i = 0; i < kMaxChain && ref_back_[s] != 0; ++i) {
            const uint32_t back = ref_back_[s];
            s = s >= back ? s - back : uint32_t(uint64_t(s) + capacity_ - back);
        }
        const uint8_t* lo = coded(s);
        const uint8_t* hi = coded(slot) + size_[slot];
        if (hi < lo || hi - lo > 16384) hi = lo + size_[s];  // not one run of bytes: the key only
        for (const uint8_t* p = lo; p < hi; p += 64) __builtin_prefetch(p);
    }

    // ---- persistence
    uint8_t* arena_data() { return arena_.data(); }
    uint64_t* offset_data() { return offset_.data(); }
    uint32_t* size_data() { return size_.data(); }
    uint32_t* ref_back_data() { return ref_back_.data(); }
    uint32_t* key_back_data() { return key_back_.data(); }
    // Arena bytes ever written (the whole arena once it wrapped).
    uint64_t written_bytes(uint64_t head) const { return std::min(head, arena_bytes_); }

    // Throws std::invalid_argument naming the first broken invariant of a
    // loaded table (rows already in place) with counters (next_seq, tail,
    // head); changes nothing.
    void check(int64_t next_seq, int64_t tail, uint64_t head) const {
        const auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
        const auto str = [](uint64_t v) { return std::to_string(v); };
        const int64_t live = std::max(next_seq - int64_t(capacity_), tail);
        if (!(tail >= 0 && tail <= next_seq)) fail("the arena's frames [tail, next_seq) are out of order");
        if (head >= (uint64_t(1) << 62)) fail("the arena's head offset is out of range");
        std::vector<uint8_t> scratch(frame_bytes_);
        const codec_detail::Context dctx = codec_detail::decompressor();
        std::vector<int8_t> depth(size_t(std::max<int64_t>(0, next_seq - live)));
        uint64_t prev_end = 0;
        for (int64_t seq = std::max<int64_t>(live, 0); seq < next_seq; ++seq) {
            const uint32_t slot = slot_of(seq);
            const uint64_t off = offset_[slot], size = size_[slot];
            const std::string name = "frame " + str(uint64_t(seq));
            if (size < 1 || size > max_coded_bytes(frame_bytes_) || off % arena_bytes_ + size > arena_bytes_)
                fail(name + " does not fit the arena");
            if (off < prev_end || off + size > head || off + arena_bytes_ < head)
                fail(name + " overlaps another frame or lies outside the arena's live bytes");
            prev_end = off + size;
            const uint8_t* c = arena_.data() + off % arena_bytes_;
            const std::string why = check_coded(c, size, frame_bytes_, scratch.data(), dctx.get());
            if (!why.empty()) fail(name + " " + why);
            const uint32_t rb = ref_back_[slot], kb = key_back_[slot];
            int d = 0;
            if (c[0] == kPatch) {
                // A patch of a frame no longer stored is dead (its key is
                // gone too): it must say so, and no transition may name it.
                const int64_t ref = seq - int64_t(rb);
                if (rb == 0) fail(name + " is a patch without a reference");
                if (ref < live) {
                    if (int64_t(kb) < int64_t(rb)) fail(name + " has a broken chain to its key frame");
                } else {
                    d = depth[size_t(ref - live)] + 1;
                    if (d >= kMaxChain || uint64_t(kb) != uint64_t(rb) + key_back_[slot_of(ref)])
                        fail(name + " has a broken chain to its key frame");
                }
            } else if (rb != 0 || kb != 0) {
                fail(name + " is a key frame but names a reference");
            }
            depth[size_t(seq - live)] = int8_t(d);
        }
    }
    // Takes a checked state; `refs[e]` as in begin (-1 for none).
    void adopt(int64_t next_seq, int64_t tail, uint64_t head, const std::vector<int64_t>& refs) {
        next_seq_ = next_seq;
        tail_ = tail;
        head_ = head;
        set_lap();
        const int64_t live = oldest_live_seq();
        for (size_t e = 0; e < depth_.size(); ++e) {
            depth_[e] = -1;
            if (e >= refs.size() || refs[e] < 0 || !decodable(refs[e], live)) continue;
            int d = 0;
            for (int64_t s = refs[e]; ref_back_[slot_of(s)] != 0; s -= ref_back_[slot_of(s)]) ++d;
            depth_[e] = d;
        }
    }

private:
    static constexpr uint64_t kRowBytes = 8 + 4 + 4 + 4;
    struct StageRow {
        size_t at;
        uint64_t size;
        uint32_t ref_back, key_back;
    };
    struct Pending {
        bool staged = false;
        int64_t seq = -1;
        int depth = 0;
        size_t raw_at = 0;
        int64_t old_key = INT64_MAX;
    };

    uint64_t place(uint64_t v, uint64_t size) const {
        return (v % arena_bytes_) + size > arena_bytes_ ? (v / arena_bytes_ + 1) * arena_bytes_ : v;
    }
    // A live frame's bytes. Live offsets lie in [head - A, head), so within
    // one arena length of lap_ (the last multiple of A below head): one
    // comparison instead of a 64-bit division per frame decoded.
    const uint8_t* coded(uint32_t slot) const {
        const uint64_t v = offset_[slot];
        return arena_.data() + (v >= lap_ ? v - lap_ : v + arena_bytes_ - lap_);
    }
    void set_lap() { lap_ = head_ == 0 ? 0 : (head_ - 1) / arena_bytes_ * arena_bytes_; }

    uint64_t capacity_ = 1;
    uint64_t frame_bytes_ = 0;
    uint64_t arena_bytes_ = 1;
    Codec codec_ = Codec::kLz4;
    codec_detail::Context cctx_;  // this buffer's own (see codec_detail::compressor)
    int k_ = 1;
    Column<uint8_t> arena_;
    Column<uint64_t> offset_;
    Column<uint32_t> size_, ref_back_, key_back_;
    std::vector<int> depth_;  // per env: chain depth of its newest frame (-1: start a key)
    Column<uint8_t> stream_raw_;
    int64_t next_seq_ = 0;
    int64_t tail_ = 0;
    uint64_t head_ = 0;  // virtual offset where the next frame goes
    uint64_t lap_ = 0;   // see coded()
    // The stage of the add in progress.
    std::vector<uint8_t> stage_coded_, stage_raw_;
    std::vector<StageRow> stage_rows_;
    std::vector<int64_t> stage_key_;
    std::vector<Pending> pending_;
    const std::vector<int64_t>* refs_ = nullptr;
    const std::vector<bool>* force_key_ = nullptr;
};

}  // namespace dqn_fast
