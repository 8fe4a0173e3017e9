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
/// `grad_logits` (shaped like the logits) with the selection held constant. When the routing is one
/// part of a batch routed in parts (`routing::batch`, expert parallelism), a loss returns this part's
/// share of the whole batch's loss: it normalises by `batch_tokens()`, `batch_slots()` and
/// `chosen_counts()`, so that the parts' values sum to the loss of the whole batch.
template <class L, class Scalar>
concept loss_term = std::copy_constructible<L> &&
    requires(const L& l, const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& gz) {
        { L::name } -> std::convertible_to<std::string_view>;
        { l.value(r, z) } -> std::convertible_to<Scalar>;
        l.gradient(r, z, gz);
    };

namespace losses {

namespace detail {
// softmax of the first `cols` logits of token t, in double.
template <class Scalar>
vector<double> softmax_row(const matrix<Scalar>& z, index t, index cols) {
    const auto zt = z.row(t).head(cols).template cast<double>();
    const vector<double> p = (zt.array() - zt.maxCoeff()).exp().matrix().transpose();
    return p / p.sum();
}

// L = sum_t sum_e a_e p_te with p the softmax of the first a.size() logits, the form of L1 and L4.
template <class Scalar>
double weighted_softmax_value(const vector<double>& a, const matrix<Scalar>& z) {
    double sum = 0;
    for (index t = 0; t < z.rows(); ++t) sum += a.dot(softmax_row(z, t, a.size()));
    return sum;
}

// Adds dL/dz of `weighted_softmax_value` to `grad`: p_te (a_e - <a, p_t>).
template <class Scalar>
void weighted_softmax_gradient(const vector<double>& a, const matrix<Scalar>& z, matrix<Scalar>& grad) {
    for (index t = 0; t < z.rows(); ++t) {
        const vector<double> p = softmax_row(z, t, a.size());
        const double dot = a.dot(p);
        for (index x = 0; x < a.size(); ++x) grad(t, x) += static_cast<Scalar>(p[x] * (a[x] - dot));
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
        return static_cast<Scalar>(detail::weighted_softmax_value(coefficients(r), z));
    }
    template <class Scalar>
    void gradient(const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& grad) const {
        if (r.tokens == 0 || r.experts == 0 || alpha == 0) return;
        detail::weighted_softmax_gradient(coefficients(r), z, grad);
    }

private:
    // alpha * E * c_e / (slots * T), so that L = sum_e a_e sum_t p_te (T, slots, c of the whole batch).
    template <class Scalar>
    vector<double> coefficients(const routing<Scalar>& r) const {
        const double t = static_cast<double>(r.batch_tokens());
        const double slots = per_token ? t : static_cast<double>(r.batch_slots());
        const std::vector<index> c = r.chosen_counts(r.experts);
        vector<double> a(r.experts);
        for (index x = 0; x < r.experts; ++x)
            a[x] = alpha * static_cast<double>(r.experts) * static_cast<double>(c[static_cast<std::size_t>(x)]) / (slots * t);
        return a;
    }
};

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
        return static_cast<Scalar>(detail::weighted_softmax_value(coefficients(r, z.cols()), z));
    }
    template <class Scalar>
    void gradient(const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& grad) const {
        if (r.tokens == 0) return;
        detail::weighted_softmax_gradient(coefficients(r, z.cols()), z, grad);
    }

private:
    template <class Scalar>
    vector<double> coefficients(const routing<Scalar>& r, index all) const {
        const std::vector<index> counts = r.chosen_counts(all);
        vector<double> c(all);
        for (index x = 0; x < all; ++x) c[x] = static_cast<double>(counts[static_cast<std::size_t>(x)]);
        if (all > r.experts) c.tail(all - r.experts).setConstant(c.tail(all - r.experts).mean());
        return c * (alpha * static_cast<double>(all) /
                    (static_cast<double>(r.batch_slots()) * static_cast<double>(r.batch_tokens())));
    }
};

/// L3 sequence-wise balance (DeepSeek-V2/V3): the batch is consecutive sequences of `seq_len` tokens
/// (0: one sequence); per sequence `f_e = E * c_e / n` with c_e its assignments to expert e (before
/// capacity drops) and n its slots (E/(k S) c_e for k slots per token), `P'_e = mean_t s'_te` with
/// `s'_t = scores_t / sum(scores_t)` the per-token normalised router scores (sigmoid scores for R2, p
/// for softmax routers); `L = alpha * mean_seq sum_e f_e P'_e`. The gradient flows through the scores.
/// Throws `shape_error` when T is not a multiple of `seq_len`.
struct seq_balance {
    double alpha = 0.001;
    index seq_len = 0;
    static constexpr std::string_view name = "seq_balance";

    template <class Scalar>
    Scalar value(const routing<Scalar>& r, const matrix<Scalar>&) const {
        double sum = 0;
        each_sequence(r, [&](index first, index len, const vector<double>& f) {
            for (index t = first; t < first + len; ++t) {
                const auto s = r.scores.row(t).template cast<double>();
                if (s.sum() > 0) sum += f.dot(s.head(r.experts).transpose()) / s.sum();  // all-underflowed scores: 0
            }
        });
        return static_cast<Scalar>(sum);
    }

    template <class Scalar>
    void gradient(const routing<Scalar>& r, const matrix<Scalar>&, matrix<Scalar>& grad) const {
        const index cols = r.scores.cols();
        vector<double> ds(cols);
        each_sequence(r, [&](index first, index len, const vector<double>& f) {
            for (index t = first; t < first + len; ++t) {
                const vector<double> s = r.scores.row(t).template cast<double>().transpose();
                const double total = s.sum();
                if (!(total > 0)) continue;
                // L_t = <f, s_head> / total: dL/ds_j = (f_j - L_t) / total (f_j = 0 beyond the real experts).
                const double lt = f.dot(s.head(r.experts)) / total;
                ds.setConstant(-lt / total);
                ds.head(r.experts) += f / total;
                const double dot = ds.dot(s);
                for (index e = 0; e < cols; ++e) {
                    const double se = s[e];
                    if (r.score == score_function::sigmoid)
                        grad(t, e) += static_cast<Scalar>(ds[e] * se * (1 - se));
                    else
                        grad(t, e) += static_cast<Scalar>(se * (ds[e] - dot));
                }
            }
        });
    }

private:
    // Calls f(first token, length, alpha * f_e / (len * sequences)) for every sequence with slots.
    template <class Scalar, class F>
    void each_sequence(const routing<Scalar>& r, F&& f) const {
        if (r.tokens == 0) return;
        const index len = seq_len > 0 ? seq_len : r.batch_tokens();
        if (r.tokens % len != 0)
            throw shape_error("seq_balance: " + std::to_string(r.tokens) + " tokens are not whole sequences of seq_len = " +
                              std::to_string(seq_len) + (seq_len > 0 ? "" : " (one sequence of the whole batch's " + std::to_string(len) + " tokens)") +
                              (r.tokens == r.batch_tokens() ? "" : "; with the batch routed in parts, each part must hold whole sequences"));
        const double sequences = static_cast<double>(r.batch_tokens() / len);  // of the whole batch
        vector<double> c(r.experts);
        for (index first = 0; first < r.tokens; first += len) {
            c.setZero();
            const index n = r.end(first + len - 1) - r.begin(first);
            if (n == 0) continue;
            for (index s = r.begin(first); s < r.end(first + len - 1); ++s) {
                const auto id = r.chosen_expert(s);
                if (id >= 0 && id < r.experts) c[id] += 1;
            }
            const double scale = alpha * static_cast<double>(r.experts) / (static_cast<double>(n) * static_cast<double>(len) * sequences);
            f(first, len, vector<double>(c * scale));
        }
    }
};

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
        const std::vector<index> c = r.chosen_counts(r.experts);  // of the whole batch
        for (std::size_t e = 0; e < c.size(); ++e) counts_[e] += c[e];
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

static_assert(loss_term<load_balance, float> && loss_term<z_loss, double> && loss_term<seq_balance, float> &&
              loss_term<null_balance, double>);

}  // namespace losses
}  // namespace moe
