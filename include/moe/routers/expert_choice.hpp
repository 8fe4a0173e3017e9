#pragma once
/// \file
/// R7: expert choice routing ("Mixture-of-Experts with Expert Choice Routing", Zhou et al. 2022).

#include "moe/concepts.hpp"
#include "moe/error.hpp"
#include "moe/kernels/select.hpp"
#include "moe/routers/gates.hpp"
#include "moe/routers/settings.hpp"
#include "moe/routing.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <span>
#include <string>
#include <vector>

namespace moe::routers {

/// p = softmax(z); each expert takes its C = min(T, ceil(capacity_factor * T / E)) tokens of highest
/// p[:, e] (ties: lower token index), with w_te = p_te. A token gets 0 to E experts, its slots ordered
/// by expert index. Every expert's bucket holds exactly C tokens. The choice depends on the whole
/// batch (not causal): not for autoregressive decoding.
struct expert_choice {
    double capacity_factor = 1.0;

    static constexpr bool batch_dependent = true;

    // Its entry in the router registry (routers/registry.hpp).
    static constexpr std::string_view name = "expert_choice";
    static constexpr std::array settings{setting{.key = "capacity_factor", .flag = "capacity-factor",
                                          .help = "expert choice: ceil(X T / E) tokens per expert (default 1)",
                                          .min = 0, .open_min = true, .example = "2"}};
    static expert_choice from(const setting_values::reader& v) {
        expert_choice r;
        v.read("capacity_factor", r.capacity_factor);
        return r;
    }

    template <class Scalar>
    struct state {
        explicit state(index) {}
        std::vector<index> order;              // token indices, sorted per expert
        std::vector<char> chosen;              // T x E: whether expert e took token t
    };

    void validate(index) const {
        if (!(capacity_factor > 0) || !std::isfinite(capacity_factor))
            throw value_error("expert_choice: capacity_factor = " + std::to_string(capacity_factor) +
                              " must be a finite number > 0");
    }

    /// C for `tokens` tokens and `experts` experts.
    [[nodiscard]] index bucket_size(index tokens, index experts) const {
        return moe::bucket_size(capacity_factor, tokens, experts);
    }

    template <class Scalar>
    void route(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const {
        const index t = logits.rows(), e = logits.cols(), c = bucket_size(t, e);
        out.scores.resize(t, e);
        for (index i = 0; i < t; ++i) kernels::softmax(logits.row(i).data(), out.scores.row(i).data(), e);
        st.chosen.assign(static_cast<std::size_t>(t * e), char{0});
        st.order.resize(static_cast<std::size_t>(t));
        for (index x = 0; x < e; ++x) {
            for (index i = 0; i < t; ++i) st.order[static_cast<std::size_t>(i)] = i;
            const auto& p = out.scores;
            std::partial_sort(st.order.begin(), st.order.begin() + c, st.order.end(), [&](index a, index b) {
                const Scalar pa = sort_key(p(a, x)), pb = sort_key(p(b, x));
                return pa > pb || (pa == pb && a < b);
            });
            for (index j = 0; j < c; ++j) st.chosen[static_cast<std::size_t>(st.order[static_cast<std::size_t>(j)] * e + x)] = 1;
        }
        out.begin_tokens(e);
        for (index i = 0; i < t; ++i) {
            for (index x = 0; x < e; ++x)
                if (st.chosen[static_cast<std::size_t>(i * e + x)]) out.add_slot(static_cast<std::int32_t>(x), out.scores(i, x));
            out.end_token();
        }
    }

    /// w_te = p_te: the gradient flows through the softmax of each chosen token.
    template <class Scalar>
    void backward(const matrix<Scalar>&, const routing<Scalar>& r, state<Scalar>&, std::span<const Scalar> grad_weights,
                  matrix<Scalar>& grad_logits) const {
        logits_backward(r, grad_weights, false, Scalar(0), Scalar(1), grad_logits);
    }
};

static_assert(differentiable_router<expert_choice, float> && differentiable_router<expert_choice, double>);

}  // namespace moe::routers
