#pragma once
/// \file
/// Balancing losses computed from a forward call's routing and logits (forward values; gradients
/// belong to the training path).

#include "moe/routing.hpp"
#include "moe/types.hpp"

#include <cmath>
#include <concepts>
#include <string_view>

namespace moe {

/// A loss term: `static constexpr std::string_view name` and `Scalar value(routing, logits) const`,
/// reading the routing (chosen experts, scores) and the T x E router logits of the same call.
template <class L, class Scalar>
concept loss_term = std::copy_constructible<L> && requires(const L& l, const routing<Scalar>& r, const matrix<Scalar>& z) {
    { L::name } -> std::convertible_to<std::string_view>;
    { l.value(r, z) } -> std::convertible_to<Scalar>;
};

namespace losses {

/// L1 load balance (Switch/GShard): `alpha * E * sum_e (c_e / (T*k)) * P_e`, with `c_e` the assignments
/// the router made to expert e (before capacity drops, as Switch and GShard count them), T*k all
/// slots, and `P_e = mean_t softmax(z_t)_e`.
/// Equals `alpha` at perfect balance. With `per_token` (HuggingFace Mixtral/Qwen/OLMoE) the counts are
/// divided by T instead (alpha*k at balance).
struct load_balance {
    double alpha = 0.01;
    bool per_token = false;
    static constexpr std::string_view name = "load_balance";

    template <class Scalar>
    Scalar value(const routing<Scalar>& r, const matrix<Scalar>& z) const {
        if (r.tokens == 0 || r.experts == 0) return 0;
        const index e = r.experts;
        vector<double> mean_p = vector<double>::Zero(e);
        for (index t = 0; t < r.tokens; ++t) {
            const auto zt = z.row(t).head(e).template cast<double>();
            const auto p = (zt.array() - zt.maxCoeff()).exp();
            mean_p += (p / p.sum()).matrix().transpose();
        }
        double sum = 0;
        for (index x = 0; x < e; ++x) sum += static_cast<double>(r.routed_to(x)) * mean_p[x];
        const double t = static_cast<double>(r.tokens);
        const double slots = per_token ? t : static_cast<double>(r.slots());
        return static_cast<Scalar>(alpha * static_cast<double>(e) * sum / (slots * t));
    }
};

/// L2 router z-loss (ST-MoE): `beta * mean_t (logsumexp_e z_te)^2`.
struct z_loss {
    double beta = 0.001;
    static constexpr std::string_view name = "z_loss";

    template <class Scalar>
    Scalar value(const routing<Scalar>&, const matrix<Scalar>& z) const {
        if (z.rows() == 0) return 0;
        double sum = 0;
        for (index t = 0; t < z.rows(); ++t) {
            const double m = static_cast<double>(z.row(t).maxCoeff());
            double s = 0;
            for (index e = 0; e < z.cols(); ++e) s += std::exp(static_cast<double>(z(t, e)) - m);
            const double lse = m + std::log(s);
            sum += lse * lse;
        }
        return static_cast<Scalar>(beta * sum / static_cast<double>(z.rows()));
    }
};

static_assert(loss_term<load_balance, float> && loss_term<z_loss, double>);

}  // namespace losses
}  // namespace moe
