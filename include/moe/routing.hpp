#pragma once
/// \file
/// `routing`: the one contract between a router and the rest of the layer.
///
/// A router fills the *token side*: for each token, its slots (chosen expert and combine weight),
/// plus the per-token routing scores. `build_dispatch` then derives the *expert side*: for each expert
/// the contiguous, token-ordered list of slots it must process (a counting sort, O(T*k)). Experts,
/// combine and losses read only this value, so every router works with every expert and loss.

#include "moe/types.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

namespace moe {

/// Expert id of a slot whose assignment was dropped (capacity): it computes and adds nothing.
inline constexpr std::int32_t dropped_slot = -1;

/// ceil(factor * items / experts), at most `items`: the bucket size of capacity routing and expert
/// choice. A factor is meant as the decimal it was written as: 1.1 * 100 / 10 is 11, not the 12 its
/// binary rounding would give, so a relative slack of 1e-9 is allowed before rounding up.
inline index bucket_size(double factor, index items, index experts) {
    const double exact = factor * static_cast<double>(items) / static_cast<double>(experts);
    if (!(exact < static_cast<double>(items))) return items;  // also a NaN or huge factor
    const double up = std::ceil(exact - 1e-9 * exact);
    return up < 0 ? 0 : static_cast<index>(up);
}

/// The function a router's scores come from (what losses differentiate through).
enum class score_function { softmax, sigmoid };

/// A sort key that ranks NaN below every number, so comparisons stay a strict weak order.
template <class Scalar>
Scalar sort_key(Scalar v) {
    return std::isnan(v) ? -std::numeric_limits<Scalar>::infinity() : v;
}

template <class Scalar>
struct routing {
    index tokens = 0;   ///< T
    index experts = 0;  ///< E (routed experts that compute; ids >= E are null experts)

    /// Routing scores per token and expert (T x E'): softmax `p` or sigmoid `s`, as the router defines.
    /// Losses and statistics read them; E' may exceed E for routers with null experts.
    matrix<Scalar> scores;
    /// Whether `scores` is softmax (of all E' logits of a token) or sigmoid of the logits. The reset
    /// functions set softmax; a sigmoid router sets it after them.
    score_function score = score_function::softmax;

    /// Token side (CSR). Slots of token t are [token_offsets[t], token_offsets[t+1]), in selection order.
    std::vector<index> token_offsets;
    std::vector<std::int32_t> expert_ids;  ///< per slot: expert, or `dropped_slot`, or >= E (null)
    std::vector<Scalar> weights;           ///< per slot: combine weight
    /// Per slot, the expert the router chose before capacity dropped any; empty when no capacity was
    /// applied (`expert_ids` then holds the same). Sequence-wise losses count these.
    std::vector<std::int32_t> undropped_ids;

    /// Expert side, derived by `build_dispatch`. Rows of expert e are
    /// [expert_offsets[e], expert_offsets[e+1]) of `row_slots`, ordered by token.
    std::vector<index> expert_offsets;
    std::vector<index> row_slots;  ///< row -> slot
    std::vector<index> slot_rows;  ///< slot -> row, or -1 when the slot runs no expert
    std::vector<index> slot_tokens;  ///< slot -> token

    /// When this routing is one part of a batch (expert parallelism: every rank's routing of its own
    /// tokens), the whole batch's totals, by which the losses normalise. Empty `chosen` means
    /// the routing is the whole batch. Set after `build_dispatch`; the reset functions clear it.
    struct batch_totals {
        index tokens = 0;
        index slots = 0;
        std::vector<index> chosen;  ///< choices per expert id before capacity drops, null experts included
    } batch;

    /// Total number of slots.
    [[nodiscard]] index slots() const { return static_cast<index>(expert_ids.size()); }
    /// Tokens and slots of the whole batch (see `batch`).
    [[nodiscard]] index batch_tokens() const { return batch.chosen.empty() ? tokens : batch.tokens; }
    [[nodiscard]] index batch_slots() const { return batch.chosen.empty() ? slots() : batch.slots; }
    /// Choices of expert id `id` before capacity drops (null experts counted by their ids >= E; 0 for an
    /// id no slot chose): of this routing with `whole_batch = false`, else of the whole batch (see
    /// `batch`). Counted by `build_dispatch`.
    [[nodiscard]] index chosen_count(index id, bool whole_batch = true) const {
        const std::vector<index>& c = whole_batch && !batch.chosen.empty() ? batch.chosen : chosen_;
        return id >= 0 && id < static_cast<index>(c.size()) ? c[static_cast<std::size_t>(id)] : 0;
    }
    /// Number of rows that run an expert (sum of the expert blocks).
    [[nodiscard]] index rows() const { return expert_offsets.empty() ? 0 : expert_offsets.back(); }
    /// The expert slot s chose before capacity drops (see `undropped_ids`).
    [[nodiscard]] std::int32_t chosen_expert(index s) const {
        const auto i = static_cast<std::size_t>(s);
        return undropped_ids.empty() ? expert_ids[i] : undropped_ids[i];
    }
    /// The slots of token t are the indices [first_slot(t), end_slot(t)), slot_count(t) of them.
    [[nodiscard]] index first_slot(index t) const { return token_offsets[static_cast<std::size_t>(t)]; }
    [[nodiscard]] index end_slot(index t) const { return token_offsets[static_cast<std::size_t>(t + 1)]; }
    [[nodiscard]] index slot_count(index t) const { return end_slot(t) - first_slot(t); }

    /// Prepares the token side for `t` tokens with exactly `k` slots each (the common case).
    void reset_fixed_k(index t, index e, index k) {
        tokens = t;
        experts = e;
        score = score_function::softmax;
        token_offsets.resize(static_cast<std::size_t>(t + 1));
        for (index i = 0; i <= t; ++i) token_offsets[static_cast<std::size_t>(i)] = i * k;
        expert_ids.resize(static_cast<std::size_t>(t * k));
        weights.resize(static_cast<std::size_t>(t * k));
        undropped_ids.clear();
        batch.tokens = batch.slots = 0;
        batch.chosen.clear();
        chosen_.clear();
    }

    /// Starts a token side with a variable number of slots per token: call `add_slot` for the slots
    /// of token 0, then `end_token`, and so on for every token. Buffers keep their capacity.
    void begin_tokens(index e) {
        tokens = 0;
        experts = e;
        score = score_function::softmax;
        token_offsets.assign(1, 0);
        expert_ids.clear();
        weights.clear();
        undropped_ids.clear();
        batch.tokens = batch.slots = 0;
        batch.chosen.clear();
        chosen_.clear();
    }
    void add_slot(std::int32_t expert, Scalar weight) {
        expert_ids.push_back(expert);
        weights.push_back(weight);
    }
    void end_token() {
        token_offsets.push_back(static_cast<index>(expert_ids.size()));
        ++tokens;
    }

    /// Derives the expert side from the token side by a stable counting sort over expert ids, and
    /// counts the choices before drops (`chosen_count`).
    void build_dispatch() {
        // Ids in [0, E'): the routed experts and, for null-expert routers, the null ones (a score column each).
        const index ids = std::max(experts, scores.cols());
        chosen_.assign(static_cast<std::size_t>(ids), 0);
        for (index s = 0; s < slots(); ++s)
            if (const auto id = chosen_expert(s); id >= 0 && id < ids) ++chosen_[static_cast<std::size_t>(id)];
        const auto ne = static_cast<std::size_t>(experts);
        expert_offsets.assign(ne + 1, 0);
        slot_tokens.resize(expert_ids.size());
        for (index t = 0; t < tokens; ++t)
            for (index s = first_slot(t); s < end_slot(t); ++s) slot_tokens[static_cast<std::size_t>(s)] = t;
        for (auto id : expert_ids)
            if (id >= 0 && id < experts) ++expert_offsets[static_cast<std::size_t>(id) + 1];
        for (std::size_t e = 0; e < ne; ++e) expert_offsets[e + 1] += expert_offsets[e];
        row_slots.resize(static_cast<std::size_t>(expert_offsets[ne]));
        slot_rows.resize(expert_ids.size());
        // Slots are visited in token order, so each expert's block is ordered by token.
        std::vector<index>& next = cursor_;
        next.assign(expert_offsets.begin(), expert_offsets.end() - 1);
        for (std::size_t s = 0; s < expert_ids.size(); ++s) {
            const auto id = expert_ids[s];
            if (id >= 0 && id < experts) {
                const index row = next[static_cast<std::size_t>(id)]++;
                row_slots[static_cast<std::size_t>(row)] = static_cast<index>(s);
                slot_rows[s] = row;
            } else {
                slot_rows[s] = -1;
            }
        }
    }

private:
    std::vector<index> chosen_;  // choices per expert id before drops (`chosen_count`)
    std::vector<index> cursor_;  // scratch of build_dispatch, kept to avoid reallocation
};

}  // namespace moe
