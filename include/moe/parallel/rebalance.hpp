#pragma once
/// \file
/// Least-loaded re-balancing of expert parallelism: a plan, the same on every rank, that moves rows of
/// the experts of overloaded ranks, with their weights, to the least-loaded ranks ("helpers"), within a
/// per-rank cap on the bytes of other ranks' weights a rank takes in. After the exchange of the row
/// counts every rank knows every expert's rows, so every rank computes the same plan without talking.
///
/// An expert's one-process row block (its rows in rank order, then token order) is cut into
/// contiguous segments, at most one per rank: its helpers' first, in the order they were chosen, its
/// owner's last (backward passes the expert's weight-gradient sum along them in this order and the
/// owner must end with it: `expert_exchange::segment_position`). A row's
/// output depends only on the row and the weights (kernels/linear.hpp), so the outputs are the same
/// bits wherever a row is computed.
///
/// The idea, moving the excess rows of overloaded ranks and the weights they need to the least-loaded
/// ranks, is that of "Least-Loaded Expert Parallelism: Load Balancing an Imbalanced Mixture-of-Experts";
/// the rule here is this library's. The target load is ceil(rows / ranks). Overloaded ranks are taken
/// by decreasing load (ties: lower rank), their experts by decreasing rows (ties: lower id); while the
/// rank is over the target, the least-loaded rank below the target that does not help this expert yet
/// and has room under its cap takes min(the rank's excess, the helper's room below the target, the
/// expert's rows still with its owner) rows, when that is at least `min_rows`. With `min_rows` 1 and no
/// cap no rank ends above the target.

#include "moe/error.hpp"
#include "moe/types.hpp"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <vector>

namespace moe::parallel {

/// Whether and how far an expert-parallel layer re-balances its ranks' rows (`placement::rebalance`).
struct rebalancing {
    bool enabled = false;
    /// Bytes of other ranks' expert weights one rank may hold per forward (each helped expert's
    /// routed weights, as stored; in training twice that: in backward the helper also holds the
    /// expert's weight-gradient sum). The default has no cap; 0 moves nothing.
    std::size_t cap_bytes = std::numeric_limits<std::size_t>::max();
    /// The fewest rows worth moving to a helper with an expert's weights: a move of fewer is not made.
    /// A helper computes 2 x (in rows + d) x ff FLOPs per row with weights it received whole (3 x d x ff
    /// values for a gated FFN), so a few rows rarely pay for the weights outside one node.
    index min_rows = 16;
};

/// Rows [first, first + rows) of an expert's one-process row block, computed by `rank`.
struct segment {
    int rank = 0;
    index first = 0;
    index rows = 0;
};

/// Which rank computes which rows of every expert, and the loads before and after.
struct rebalance_plan {
    std::vector<std::vector<segment>> experts;  ///< per expert: helpers' segments, then the owner's (last)
    std::vector<index> rows_before;             ///< per rank: rows of the experts it owns
    std::vector<index> rows_after;              ///< per rank: rows it computes under the plan
    std::vector<index> helped;                  ///< per rank: other ranks' experts it computes rows of
    index rows_moved = 0;                       ///< rows computed by a rank other than their expert's owner

    /// The segment of expert e that `rank` computes, or null.
    [[nodiscard]] const segment* find(index e, int rank) const {
        for (const segment& s : experts[static_cast<std::size_t>(e)])
            if (s.rank == rank) return &s;
        return nullptr;
    }
};

/// max over ranks of rows / mean over ranks (1: even; 0 without rows).
[[nodiscard]] inline double imbalance(std::span<const index> rows) {
    const index total = std::accumulate(rows.begin(), rows.end(), index{0});
    if (total == 0) return 0;
    return static_cast<double>(*std::max_element(rows.begin(), rows.end())) * static_cast<double>(rows.size()) /
           static_cast<double>(total);
}

/// The plan for experts with `rows[e]` rows owned by `owners[e]` over `ranks` ranks, where helping
/// one expert costs a rank `expert_bytes` of its cap. Without `how.enabled`, every expert is one
/// segment of its owner. Throws `value_error` on lengths that differ or an owner outside the ranks.
[[nodiscard]] inline rebalance_plan plan_rebalance(std::span<const index> rows, std::span<const int> owners, int ranks,
                                                   const rebalancing& how, std::size_t expert_bytes) {
    if (rows.size() != owners.size())
        throw value_error("plan_rebalance: " + std::to_string(rows.size()) + " row counts for " +
                          std::to_string(owners.size()) + " owners");
    if (ranks < 1) throw value_error("plan_rebalance: ranks = " + std::to_string(ranks) + " must be >= 1");
    const auto p = static_cast<std::size_t>(ranks), experts = rows.size();
    rebalance_plan plan;
    plan.rows_before.assign(p, 0);
    plan.helped.assign(p, 0);
    for (std::size_t e = 0; e < experts; ++e) {
        if (owners[e] < 0 || owners[e] >= ranks)
            throw value_error("plan_rebalance: expert " + std::to_string(e) + " is owned by rank " +
                              std::to_string(owners[e]) + ", outside [0, " + std::to_string(ranks) + ")");
        if (rows[e] < 0) throw value_error("plan_rebalance: expert " + std::to_string(e) + " has " + std::to_string(rows[e]) + " rows");
        plan.rows_before[static_cast<std::size_t>(owners[e])] += rows[e];
    }
    plan.rows_after = plan.rows_before;
    std::vector<index> taken(experts, 0);  // rows of each expert's block given to helpers (its first rows)
    plan.experts.assign(experts, {});
    if (how.enabled && ranks > 1 && how.cap_bytes > 0) {
        std::vector<index>& load = plan.rows_after;
        const index total = std::accumulate(load.begin(), load.end(), index{0});
        const index target = (total + ranks - 1) / ranks;
        std::vector<std::size_t> room(p, how.cap_bytes);
        std::vector<int> by_load(p);
        std::iota(by_load.begin(), by_load.end(), 0);
        std::stable_sort(by_load.begin(), by_load.end(), [&](int a, int b) { return load[a] > load[b]; });
        for (const int q : by_load) {
            if (load[q] <= target) break;
            std::vector<std::size_t> own;
            for (std::size_t e = 0; e < experts; ++e)
                if (owners[e] == q && rows[e] > 0) own.push_back(e);
            std::stable_sort(own.begin(), own.end(), [&](std::size_t a, std::size_t b) { return rows[a] > rows[b]; });
            for (const std::size_t e : own) {
                while (load[q] > target && taken[e] < rows[e]) {
                    int h = -1;
                    for (int c = 0; c < ranks; ++c) {
                        const auto cq = static_cast<std::size_t>(c);
                        if (c == q || load[cq] >= target || room[cq] < expert_bytes || plan.find(static_cast<index>(e), c)) continue;
                        if (h < 0 || load[cq] < load[static_cast<std::size_t>(h)]) h = c;
                    }
                    if (h < 0) break;
                    const auto hq = static_cast<std::size_t>(h);
                    const index m = std::min({load[q] - target, target - load[hq], rows[e] - taken[e]});
                    if (m < how.min_rows) break;
                    plan.experts[e].push_back({h, taken[e], m});
                    taken[e] += m;
                    load[q] -= m;
                    load[hq] += m;
                    room[hq] -= expert_bytes;
                    ++plan.helped[hq];
                    plan.rows_moved += m;
                }
                if (load[q] <= target) break;
            }
        }
    }
    for (std::size_t e = 0; e < experts; ++e) plan.experts[e].push_back({owners[e], taken[e], rows[e] - taken[e]});
    return plan;
}

}  // namespace moe::parallel
