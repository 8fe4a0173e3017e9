#pragma once
/// \file
/// Balancing losses computed from a forward call's routing and logits, with their gradients with
/// respect to the logits; and the auxiliary-loss-free bias update (U1).

#include "moe/error.hpp"
#include "moe/routing.hpp"
#include "moe/types.hpp"

#include <cmath>
#include <concepts>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

/// A loss term: `static constexpr std::string_view name`, `Scalar value(routing, logits) const`,
/// reading the routing (chosen experts, scores) and the T x E router logits of the same call, and
/// `void gradient(routing, logits, matrix<Scalar>& grad_logits) const`, which adds dL/dz to
/// `grad_logits` (shaped like the logits) with the selection held constant.
template <class L, class Scalar>
concept loss_term = std::copy_constructible<L> &&
    requires(const L& l, const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& gz) {
        { L::name } -> std::convertible_to<std::string_view>;
        { l.value(r, z) } -> std::convertible_to<Scalar>;
        l.gradient(r, z, gz);
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
        for (index t = 0; t < r.tokens; ++t) mean_p += softmax_row(z, t, e);
        double sum = 0;
        for (index x = 0; x < e; ++x) sum += coefficient(r, x) * mean_p[x];
        return static_cast<Scalar>(sum);
    }

    /// dL/dp_te = coefficient_e (the count term), through the softmax of the real experts' logits.
    template <class Scalar>
    void gradient(const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& grad) const {
        if (r.tokens == 0 || r.experts == 0) return;
        const index e = r.experts;
        vector<double> a(e);
        for (index x = 0; x < e; ++x) a[x] = coefficient(r, x);
        for (index t = 0; t < r.tokens; ++t) {
            const vector<double> p = softmax_row(z, t, e);
            const double dot = a.dot(p);
            for (index x = 0; x < e; ++x) grad(t, x) += static_cast<Scalar>(p[x] * (a[x] - dot));
        }
    }

private:
    // alpha * E * c_e / (slots * T): L = sum_e coefficient_e * sum_t p_te.
    template <class Scalar>
    double coefficient(const routing<Scalar>& r, index x) const {
        const double t = static_cast<double>(r.tokens);
        const double slots = per_token ? t : static_cast<double>(r.slots());
        return alpha * static_cast<double>(r.experts) * static_cast<double>(r.routed_to(x)) / (slots * t);
    }

    template <class Scalar>
    static vector<double> softmax_row(const matrix<Scalar>& z, index t, index e) {
        const auto zt = z.row(t).head(e).template cast<double>();
        const vector<double> p = (zt.array() - zt.maxCoeff()).exp().matrix().transpose();
        return p / p.sum();
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
            const double lse = logsumexp(z, t);
            sum += lse * lse;
        }
        return static_cast<Scalar>(beta * sum / static_cast<double>(z.rows()));
    }

    /// dL/dz_te = beta * 2 lse_t softmax(z_t)_e / T.
    template <class Scalar>
    void gradient(const routing<Scalar>&, const matrix<Scalar>& z, matrix<Scalar>& grad) const {
        const double f = 2 * beta / static_cast<double>(z.rows());
        for (index t = 0; t < z.rows(); ++t) {
            const double lse = logsumexp(z, t);
            for (index e = 0; e < z.cols(); ++e)
                grad(t, e) += static_cast<Scalar>(f * lse * std::exp(static_cast<double>(z(t, e)) - lse));
        }
    }

private:
    template <class Scalar>
    static double logsumexp(const matrix<Scalar>& z, index t) {
        const double m = static_cast<double>(z.row(t).maxCoeff());
        double s = 0;
        for (index e = 0; e < z.cols(); ++e) s += std::exp(static_cast<double>(z(t, e)) - m);
        return m + std::log(s);
    }
};

/// U1, the auxiliary-loss-free bias update (DeepSeek-V3): after a training step,
/// `b_e += gamma * sign(mean_j c_j - c_e)`, with c_e the assignments to expert e accumulated over the
/// step (`observe` each forward call's routing, then `apply` once). It changes the selection of a
/// router with a correction bias (R2) and never its weights.
class bias_update {
public:
    explicit bias_update(double gamma = 1e-3) : gamma(gamma) {}

    double gamma;  ///< step of the bias per update

    /// Adds the assignments of one forward call (before capacity drops, as L1 counts them).
    template <class Scalar>
    void observe(const routing<Scalar>& r) {
        if (counts_.size() != static_cast<std::size_t>(r.experts)) counts_.assign(static_cast<std::size_t>(r.experts), 0);
        for (index e = 0; e < r.experts; ++e) counts_[static_cast<std::size_t>(e)] += r.routed_to(e);
    }

    /// Updates `bias` from the counts observed since the last call, then clears them. Throws
    /// `shape_error` when the bias does not have one entry per observed expert.
    template <class Scalar>
    void apply(vector<Scalar>& bias) {
        if (counts_.empty()) return;
        if (bias.size() != static_cast<index>(counts_.size()))
            throw shape_error("bias_update: the bias has " + std::to_string(bias.size()) + " entries, the routing " +
                              std::to_string(counts_.size()) + " experts");
        double mean = 0;
        for (const index c : counts_) mean += static_cast<double>(c);
        mean /= static_cast<double>(counts_.size());
        for (std::size_t e = 0; e < counts_.size(); ++e) {
            const double c = static_cast<double>(counts_[e]);
            const double sign = c < mean ? 1.0 : (c > mean ? -1.0 : 0.0);
            bias[static_cast<index>(e)] += static_cast<Scalar>(gamma * sign);
        }
        counts_.clear();
    }

    /// Counts observed since the last `apply`.
    [[nodiscard]] const std::vector<index>& counts() const { return counts_; }

private:
    std::vector<index> counts_;
};

static_assert(loss_term<load_balance, float> && loss_term<z_loss, double>);

}  // namespace losses
}  // namespace moe
