#pragma once
/// \file
/// L1, the load-balancing loss (docs/semantics.md, "Balancing losses"), and the weighted-softmax
/// sums it shares with L4.

#include "moe/losses/loss_term.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>
#include <utility>

namespace moe::losses {

namespace detail {
// The maximum of the first `cols` logits of token t and sum_e exp(z_te - max), in double: the softmax
// is p_te = exp(z_te - max) / sum.
template <class Scalar>
std::pair<double, double> softmax_norm(const matrix<Scalar>& z, index t, index cols) {
    double m = -std::numeric_limits<double>::infinity(), sum = 0;
    for (index e = 0; e < cols; ++e) m = std::max(m, static_cast<double>(z(t, e)));
    for (index e = 0; e < cols; ++e) sum += std::exp(static_cast<double>(z(t, e)) - m);
    return {m, sum};
}

// <a, p_t> for the softmax p_t of the first `cols` logits of token t (normalised by `norm`, its
// `softmax_norm`), with a(e) a callable.
template <class Scalar, class A>
double weighted_softmax(const A& a, index cols, const matrix<Scalar>& z, index t, std::pair<double, double> norm) {
    double dot = 0;
    for (index e = 0; e < cols; ++e) dot += a(e) * std::exp(static_cast<double>(z(t, e)) - norm.first);
    return dot / norm.second;
}

// L = sum_t sum_e a(e) p_te with p the softmax of the first `cols` logits, the form of L1 and L4.
template <class Scalar, class A>
double weighted_softmax_value(const A& a, index cols, const matrix<Scalar>& z) {
    double sum = 0;
    for (index t = 0; t < z.rows(); ++t) sum += weighted_softmax(a, cols, z, t, softmax_norm(z, t, cols));
    return sum;
}

// Adds dL/dz of `weighted_softmax_value` to `grad`: p_te (a(e) - <a, p_t>).
template <class Scalar, class A>
void weighted_softmax_gradient(const A& a, index cols, const matrix<Scalar>& z, matrix<Scalar>& grad) {
    for (index t = 0; t < z.rows(); ++t) {
        const auto norm = softmax_norm(z, t, cols);
        const auto [m, sum] = norm;
        const double dot = weighted_softmax(a, cols, z, t, norm);
        for (index e = 0; e < cols; ++e) {
            const double p = std::exp(static_cast<double>(z(t, e)) - m) / sum;
            grad(t, e) += static_cast<Scalar>(p * (a(e) - dot));
        }
    }
}
}  // namespace detail

/// L1 load balance (Switch/GShard): `alpha * E * sum_e (c_e / (T*k)) * P_e`, with `c_e` the assignments
/// the router made to expert e (before capacity drops, as Switch and GShard count them), T*k all
/// slots, and `P_e = mean_t softmax(z_t)_e` over the E routed experts' logits.
/// Equals `alpha` at perfect balance. With `per_token` (HuggingFace Mixtral/Qwen/OLMoE) the counts are
/// divided by T instead (alpha*k at balance). The gradient flows through P only.
struct load_balance {
    double alpha = 0.01;
    bool per_token = false;
    static constexpr std::string_view name = "load_balance";

    template <class Scalar>
    Scalar value(const routing<Scalar>& r, const matrix<Scalar>& z) const {
        if (r.tokens == 0 || r.experts == 0 || alpha == 0) return 0;
        return static_cast<Scalar>(detail::weighted_softmax_value(coefficients(r), r.experts, z));
    }
    template <class Scalar>
    void gradient(const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& grad) const {
        if (r.tokens == 0 || r.experts == 0 || alpha == 0) return;
        detail::weighted_softmax_gradient(coefficients(r), r.experts, z, grad);
    }

private:
    // a(e) = alpha * E * c_e / (slots * T), so that L = sum_e a(e) sum_t p_te (T, slots, c of the whole
    // batch).
    template <class Scalar>
    auto coefficients(const routing<Scalar>& r) const {
        const double t = static_cast<double>(r.batch_tokens());
        const double slots = per_token ? t : static_cast<double>(r.batch_slots());
        const double scale = alpha * static_cast<double>(r.experts) / (slots * t);
        return [&r, scale](index e) { return scale * static_cast<double>(r.chosen_count(e)); };
    }
};

static_assert(loss_term<load_balance, float> && loss_term<load_balance, double>);

}  // namespace moe::losses
