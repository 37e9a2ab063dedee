// Priorities for proportional prioritized replay: a sum tree and a min tree
// over a fixed number of leaves, one leaf per transition slot.
//
// Invariants
//  * Leaf i holds a mass m_i >= 0, finite (the buffer stores (p + eps)^alpha
//    there; 0 for a slot that holds no transition).
//  * Layout: n leaves at nodes [n, 2n), node i's children are 2i and 2i + 1,
//    the root is node 1 (the usual array tree; n need not be a power of two,
//    so memory is 2n doubles a tree, not up to 4n). Leaves are then not in
//    index order under the root, which does not matter: a draw only needs
//    every leaf to own a slice of [0, total) as long as its mass.
//  * Every internal node is recomputed from its two children on every update
//    (sum: left + right; min: the smaller), never adjusted by a difference,
//    so the root is always the same pairwise sum of the current leaves,
//    whatever the history: no drift over millions of updates.
//  * The min tree holds +inf for a leaf of mass 0: the minimum is over the
//    leaves a draw can return.
//  * find(u) never returns a leaf of mass 0: it descends right only into a
//    child of positive mass (a node of positive sum has one).
// float64 throughout: float32 sums lose the small masses of a 10M-leaf tree.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "frame_store.hpp"

namespace dqn_fast {

class SumTree {
public:
    SumTree() = default;
    explicit SumTree(uint64_t leaves)
        : n_(leaves),
          sum_(checked_mul(2, leaves, "the priority sum tree")),
          min_(checked_mul(2, leaves, "the priority min tree")) {
        std::fill(sum_.data(), sum_.data() + 2 * n_, 0.0);
        std::fill(min_.data(), min_.data() + 2 * n_, kEmpty);
    }

    static uint64_t bytes_for(uint64_t leaves) { return checked_mul(4 * sizeof(double), leaves, "the priority trees"); }

    uint64_t leaves() const { return n_; }
    uint64_t nbytes() const { return sum_.nbytes() + min_.nbytes(); }
    double total() const { return n_ ? sum_[1] : 0.0; }
    double min() const { return n_ ? min_[1] : kEmpty; }  // +inf when every leaf is 0
    double get(uint64_t i) const { return sum_[n_ + i]; }

    // Leaf i := m (>= 0, finite), and its ancestors recomputed. O(log n).
    void set(uint64_t i, double m) {
        uint64_t node = n_ + i;
        sum_[node] = m;
        min_[node] = m > 0 ? m : kEmpty;
        for (node >>= 1; node >= 1; node >>= 1) {
            sum_[node] = sum_[2 * node] + sum_[2 * node + 1];
            min_[node] = std::min(min_[2 * node], min_[2 * node + 1]);
        }
    }

    // The leaf whose slice of [0, total) holds u (0 <= u < total, total > 0).
    uint64_t find(double u) const {
        uint64_t node = 1;
        while (node < n_) {
            const uint64_t left = 2 * node;
            if (u < sum_[left] || !(sum_[left + 1] > 0)) {
                node = left;
            } else {
                u -= sum_[left];
                node = left + 1;
            }
        }
        return node - n_;
    }

    // find() for many u at once, level by level: the descents are
    // independent, so their cache misses overlap instead of queueing one
    // behind another (a 1M-leaf tree is 32 MB, far from the caches). Same
    // arithmetic per u as find(): the same leaves. u is used as scratch.
    void find_many(double* u, uint64_t* leaf, int64_t count) const {
        for (int64_t i = 0; i < count; ++i) leaf[i] = 1;
        for (bool deeper = n_ > 1; deeper;) {
            deeper = false;
            for (int64_t i = 0; i < count; ++i) {
                uint64_t node = leaf[i];
                if (node >= n_) continue;
                const uint64_t left = 2 * node;
                if (u[i] < sum_[left] || !(sum_[left + 1] > 0)) {
                    node = left;
                } else {
                    u[i] -= sum_[left];
                    node = left + 1;
                }
                leaf[i] = node;
                deeper |= node < n_;
            }
        }
        for (int64_t i = 0; i < count; ++i) leaf[i] -= n_;
    }

    // Raw leaves (persistence) and a rebuild of every internal node from them.
    double* leaf_data() { return sum_.data() + n_; }
    void rebuild() {
        for (uint64_t i = n_; i < 2 * n_; ++i) min_[i] = sum_[i] > 0 ? sum_[i] : kEmpty;
        for (uint64_t node = n_ ? n_ - 1 : 0; node >= 1; --node) {
            sum_[node] = sum_[2 * node] + sum_[2 * node + 1];
            min_[node] = std::min(min_[2 * node], min_[2 * node + 1]);
        }
    }

private:
    static constexpr double kEmpty = std::numeric_limits<double>::infinity();
    uint64_t n_ = 0;
    Column<double> sum_, min_;
};

}  // namespace dqn_fast
