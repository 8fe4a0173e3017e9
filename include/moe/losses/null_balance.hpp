#pragma once
/// \file
/// L4, the null-aware load-balancing loss of null-expert routers (docs/semantics.md, "Balancing losses").

#include "moe/losses/load_balance.hpp"

#include <string_view>

namespace moe::losses {

/// L4 null-aware load balance (AdaMoE): L1 over all E + N experts of a null-expert router,
/// `alpha * (E+N) * sum_e (c'_e / (T*k)) * P_e` with `P_e = mean_t softmax(z_t)_e` over all E + N logits,
/// c'_e the slots choosing expert e for real experts and, for each null expert, the mean of the null
/// experts' counts, so the null experts are balanced as one group. Without null experts it is L1.
struct null_balance {
    double alpha = 0.01;
    static constexpr std::string_view name = "null_balance";

    template <class Scalar>
    Scalar value(const routing<Scalar>& r, const matrix<Scalar>& z) const {
        if (r.tokens == 0) return 0;
        return static_cast<Scalar>(detail::weighted_softmax_value(coefficients(r, z.cols()), z.cols(), z));
    }
    template <class Scalar>
    void gradient(const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& grad) const {
        if (r.tokens == 0) return;
        detail::weighted_softmax_gradient(coefficients(r, z.cols()), z.cols(), z, grad);
    }

private:
    // a(e) = alpha * all * c'_e / (slots * T) over the `all` = E + N logits.
    template <class Scalar>
    auto coefficients(const routing<Scalar>& r, index all) const {
        double null_mean = 0;
        for (index e = r.experts; e < all; ++e) null_mean += static_cast<double>(r.chosen_count(e));
        if (all > r.experts) null_mean /= static_cast<double>(all - r.experts);
        const double scale = alpha * static_cast<double>(all) /
                             (static_cast<double>(r.batch_slots()) * static_cast<double>(r.batch_tokens()));
        return [&r, scale, null_mean](index e) {
            return scale * (e < r.experts ? static_cast<double>(r.chosen_count(e)) : null_mean);
        };
    }
};

static_assert(loss_term<null_balance, float> && loss_term<null_balance, double>);

}  // namespace moe::losses
