#pragma once
/// \file
/// L2, the router z-loss (docs/semantics.md, "Balancing losses").

#include "moe/losses/loss_term.hpp"

#include <cmath>
#include <string_view>

namespace moe::losses {

/// L2 router z-loss (ST-MoE): `beta * mean_t (logsumexp_e z_te)^2`.
struct z_loss {
    double beta = 0.001;
    static constexpr std::string_view name = "z_loss";

    template <class Scalar>
    Scalar value(const routing<Scalar>& r, const matrix<Scalar>& z) const {
        if (z.rows() == 0 || beta == 0) return 0;
        double sum = 0;
        for (index t = 0; t < z.rows(); ++t) {
            const double lse = logsumexp(z, t);
            sum += lse * lse;
        }
        return static_cast<Scalar>(beta * sum / tokens(r, z));
    }

    /// dL/dz_te = beta * 2 lse_t softmax(z_t)_e / T.
    template <class Scalar>
    void gradient(const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& grad) const {
        if (z.rows() == 0 || beta == 0) return;
        const double f = 2 * beta / tokens(r, z);
        for (index t = 0; t < z.rows(); ++t) {
            const double lse = logsumexp(z, t);
            for (index e = 0; e < z.cols(); ++e)
                grad(t, e) += static_cast<Scalar>(f * lse * std::exp(static_cast<double>(z(t, e)) - lse));
        }
    }

private:
    // T of the whole batch (of z alone when the routing is the whole batch).
    template <class Scalar>
    static double tokens(const routing<Scalar>& r, const matrix<Scalar>& z) {
        return static_cast<double>(r.batch.chosen.empty() ? z.rows() : r.batch_tokens());
    }

    template <class Scalar>
    static double logsumexp(const matrix<Scalar>& z, index t) {
        const double m = static_cast<double>(z.row(t).maxCoeff());
        double s = 0;
        for (index e = 0; e < z.cols(); ++e) s += std::exp(static_cast<double>(z(t, e)) - m);
        return m + std::log(s);
    }
};

static_assert(loss_term<z_loss, float> && loss_term<z_loss, double>);

}  // namespace moe::losses
