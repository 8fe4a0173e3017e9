#pragma once
/// \file
/// R3: expert capacity with token dropping (Switch, GShard, DeepSpeed, Megatron), applied after any
/// token-choice router.

#include "moe/concepts.hpp"
#include "moe/error.hpp"
#include "moe/routers/settings.hpp"
#include "moe/routers/softmax_topk.hpp"
#include "moe/routing.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <span>
#include <string>
#include <vector>

namespace moe::routers {

/// Which assignments an over-full expert keeps.
enum class drop_policy {
    position,  ///< the lowest token indices (Switch, GShard)
    probs,     ///< the largest combine weights; ties to the lower token index (DeepSpeed, Megatron)
};

/// Routes with `inner`, then caps every expert at C = ceil(capacity_factor * T * k / E) assignments
/// (k = slots per token, T * k = all slots). Dropped slots get id `dropped_slot` and weight 0 and
/// contribute nothing; kept weights are not renormalised. `routing::undropped_ids` and
/// `routing::chosen_count` keep the choices before the drops (what the load-balancing loss counts).
template <class Inner>
struct capacity {
    Inner inner{};
    double capacity_factor = 1.0;
    drop_policy policy = drop_policy::position;

    static constexpr bool batch_dependent = true;

    // Its settings in the router registry (routers/registry.hpp): a router that `takes_capacity` is
    // wrapped in capacity when capacity_factor is given.
    static constexpr std::array settings{
        setting{.key = "capacity_factor", .flag = "capacity-factor",
                .help = "top-k routers: capacity and dropping, ceil(X T k / E) assignments per expert",
                .min = 0, .open_min = true, .example = "0.8"},
        setting{.key = "drop_policy", .flag = "drop-policy", .help = "which assignments a full expert keeps (default position)",
                .type = setting_type::choice, .choices = "position|probs", .example = "probs", .needs = "capacity_factor"}};
    static capacity from(Inner inner, const setting_values::reader& v) {
        capacity r{.inner = std::move(inner)};
        v.read("capacity_factor", r.capacity_factor);
        if (v.has("drop_policy")) r.policy = v.text("drop_policy") == "probs" ? drop_policy::probs : drop_policy::position;
        return r;
    }

    template <class Scalar>
    struct state {
        explicit state(index experts) : inner(experts) {}
        vector<Scalar>* correction_bias() { return moe::correction_bias<Scalar>(inner); }
        router_state_t<Inner, Scalar> inner;
        std::vector<index> count;   // assignments per expert so far
        std::vector<index> order;   // slots of one expert, sorted for the probs policy
        routing<Scalar> undropped;         // backward: the routing with the dropped ids restored
        std::vector<Scalar> grad_kept;     // backward: dL/dw with the dropped slots' zeroed
    };

    void validate(index experts) const {
        inner.validate(experts);
        if (!(capacity_factor > 0) || !std::isfinite(capacity_factor))
            throw value_error("capacity: capacity_factor = " + std::to_string(capacity_factor) +
                              " must be a finite number > 0");
    }

    /// C for `slots` assignments over `experts` experts (see `bucket_size`).
    [[nodiscard]] index expert_capacity(index slots, index experts) const {
        return bucket_size(capacity_factor, slots, experts);
    }

    template <class Scalar>
    void route(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const {
        moe::route(inner, logits, st.inner, out);
        out.undropped_ids.assign(out.expert_ids.begin(), out.expert_ids.end());
        const index e = out.experts;
        const index cap = expert_capacity(out.slots(), e);
        if (policy == drop_policy::position) {
            // Slots are in token order, so the first `cap` seen per expert are the lowest tokens.
            st.count.assign(static_cast<std::size_t>(e), 0);
            for (std::size_t s = 0; s < out.expert_ids.size(); ++s) {
                const auto id = out.expert_ids[s];
                if (id < 0 || id >= e) continue;
                if (st.count[static_cast<std::size_t>(id)]++ >= cap) drop(out, s);
            }
            return;
        }
        out.build_dispatch();
        for (index x = 0; x < e; ++x) {
            const index b = out.expert_offsets[static_cast<std::size_t>(x)];
            const index n = out.expert_offsets[static_cast<std::size_t>(x) + 1] - b;
            if (n <= cap) continue;
            st.order.assign(out.row_slots.begin() + b, out.row_slots.begin() + b + n);
            // Slot order is token order, so ties on the weight go to the lower slot (std::sort, unlike
            // std::stable_sort, needs no buffer). NaN weights rank last.
            std::sort(st.order.begin(), st.order.end(), [&](index a, index c) {
                const Scalar wa = sort_key(out.weights[static_cast<std::size_t>(a)]);
                const Scalar wc = sort_key(out.weights[static_cast<std::size_t>(c)]);
                return wa > wc || (wa == wc && a < c);
            });
            for (index j = cap; j < n; ++j) drop(out, static_cast<std::size_t>(st.order[static_cast<std::size_t>(j)]));
        }
    }

    /// The inner router's backward on the assignments as it chose them: a dropped slot has no
    /// gradient of its own, but with `normalize` its score is in the kept weights' denominator.
    template <class Scalar>
    void backward(const matrix<Scalar>& logits, const routing<Scalar>& r, state<Scalar>& st,
                  std::span<const Scalar> grad_weights, matrix<Scalar>& grad_logits) const
        requires differentiable_router<Inner, Scalar>
    {
        st.undropped = r;
        // (empty when nothing recorded the choice, e.g. a capacity nested in another)
        const auto& chosen = r.undropped_ids.empty() ? r.expert_ids : r.undropped_ids;
        st.undropped.expert_ids.assign(chosen.begin(), chosen.end());
        st.undropped.undropped_ids.clear();
        // A dropped slot's weight is the constant 0: whatever gradient it was given goes nowhere.
        st.grad_kept.assign(grad_weights.begin(), grad_weights.end());
        for (std::size_t s = 0; s < r.expert_ids.size(); ++s)
            if (r.expert_ids[s] == dropped_slot) st.grad_kept[s] = 0;
        moe::route_backward(inner, logits, st.undropped, st.inner, std::span<const Scalar>(st.grad_kept), grad_logits);
    }

private:
    template <class Scalar>
    static void drop(routing<Scalar>& out, std::size_t slot) {
        out.expert_ids[slot] = dropped_slot;
        out.weights[slot] = 0;
    }
};

static_assert(differentiable_router<capacity<softmax_topk>, float> && differentiable_router<capacity<softmax_topk>, double>);

}  // namespace moe::routers
