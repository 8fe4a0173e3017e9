#pragma once
/// \file
/// Balancing losses computed from a forward call's routing and logits, with their gradients with
/// respect to the logits; and the auxiliary-loss-free bias update (U1).

#include "moe/error.hpp"
#include "moe/routing.hpp"
#include "moe/types.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
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
/// `chosen_count()`, so that the parts' values sum to the loss of the whole batch.
template <class L, class Scalar>
concept loss_term = std::copy_constructible<L> &&
    requires(const L& l, const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& gz) {
        { L::name } -> std::convertible_to<std::string_view>;
        { l.value(r, z) } -> std::convertible_to<Scalar>;
        l.gradient(r, z, gz);
    };

namespace losses {

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
/// A buffer a loss's const functions reuse between calls, so that a steady state allocates nothing.
/// Not part of the loss's value: a copy starts empty. One loss object is not for concurrent calls.
template <class T>
struct scratch {
    mutable std::vector<T> values;
    scratch() = default;
    scratch(const scratch&) {}
    scratch& operator=(const scratch&) { return *this; }
};
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

/// L3 sequence-wise balance (DeepSeek-V2/V3): the batch is consecutive sequences of `seq_len` tokens
/// (0: one sequence); per sequence `f_e = E * c_e / n` with c_e its assignments to expert e (before
/// capacity drops) and n its slots (E/(k S) c_e for k slots per token), `P'_e = mean_t s'_te` with
/// `s'_t = scores_t / sum(scores_t)` the per-token normalised router scores (sigmoid scores for R2, p
/// for softmax routers); `L = alpha * mean_seq sum_e f_e P'_e`. The gradient flows through the scores.
/// Throws `shape_error` when T is not a multiple of `seq_len`. Its const functions reuse `work`, so one
/// object is not for concurrent calls (a layer calls its losses from one thread).
struct seq_balance {
    double alpha = 0.001;
    index seq_len = 0;
    /// Per-sequence coefficients, reused between calls (not a setting; a copy starts empty).
    detail::scratch<double> work{};
    static constexpr std::string_view name = "seq_balance";

    template <class Scalar>
    Scalar value(const routing<Scalar>& r, const matrix<Scalar>&) const {
        double sum = 0;
        each_sequence(r, [&](index first, index len, const std::vector<double>& f) {
            for (index t = first; t < first + len; ++t) {
                double total = 0, weighted = 0;
                for (index e = 0; e < r.scores.cols(); ++e) total += static_cast<double>(r.scores(t, e));
                for (index e = 0; e < r.experts; ++e) weighted += f[static_cast<std::size_t>(e)] * static_cast<double>(r.scores(t, e));
                if (total > 0) sum += weighted / total;  // all-underflowed scores: 0
            }
        });
        return static_cast<Scalar>(sum);
    }

    template <class Scalar>
    void gradient(const routing<Scalar>& r, const matrix<Scalar>&, matrix<Scalar>& grad) const {
        const index cols = r.scores.cols();
        each_sequence(r, [&](index first, index len, const std::vector<double>& f) {
            for (index t = first; t < first + len; ++t) {
                double total = 0, weighted = 0;
                for (index e = 0; e < cols; ++e) total += static_cast<double>(r.scores(t, e));
                if (!(total > 0)) continue;
                for (index e = 0; e < r.experts; ++e) weighted += f[static_cast<std::size_t>(e)] * static_cast<double>(r.scores(t, e));
                // L_t = <f, s_head> / total: dL/ds_e = (f_e - L_t) / total (f_e = 0 beyond the real experts).
                const double lt = weighted / total;
                const auto ds = [&](index e) { return ((e < r.experts ? f[static_cast<std::size_t>(e)] : 0.0) - lt) / total; };
                double dot = 0;
                for (index e = 0; e < cols; ++e) dot += ds(e) * static_cast<double>(r.scores(t, e));
                for (index e = 0; e < cols; ++e) {
                    const double se = static_cast<double>(r.scores(t, e));
                    if (r.score == score_function::sigmoid)
                        grad(t, e) += static_cast<Scalar>(ds(e) * se * (1 - se));
                    else
                        grad(t, e) += static_cast<Scalar>(se * (ds(e) - dot));
                }
            }
        });
    }

private:
    // Calls f(first token, length, alpha * f_e / (len * sequences) per expert) for every sequence with
    // slots.
    template <class Scalar, class F>
    void each_sequence(const routing<Scalar>& r, F&& f) const {
        if (r.tokens == 0) return;
        const index len = seq_len > 0 ? seq_len : r.batch_tokens();
        if (r.tokens % len != 0)
            throw shape_error("seq_balance: " + std::to_string(r.tokens) + " tokens are not whole sequences of seq_len = " +
                              std::to_string(seq_len) + (seq_len > 0 ? "" : " (one sequence of the whole batch's " + std::to_string(len) + " tokens)") +
                              (r.tokens == r.batch_tokens() ? "" : "; with the batch routed in parts, each part must hold whole sequences"));
        const double sequences = static_cast<double>(r.batch_tokens() / len);  // of the whole batch
        std::vector<double>& c = work.values;
        for (index first = 0; first < r.tokens; first += len) {
            c.assign(static_cast<std::size_t>(r.experts), 0.0);
            const index n = r.end(first + len - 1) - r.begin(first);
            if (n == 0) continue;
            for (index s = r.begin(first); s < r.end(first + len - 1); ++s) {
                const auto id = r.chosen_expert(s);
                if (id >= 0 && id < r.experts) c[static_cast<std::size_t>(id)] += 1;
            }
            const double scale = alpha * static_cast<double>(r.experts) / (static_cast<double>(n) * static_cast<double>(len) * sequences);
            for (double& v : c) v *= scale;
            f(first, len, c);
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
        for (std::size_t e = 0; e < counts_.size(); ++e) counts_[e] += r.chosen_count(static_cast<index>(e));  // of the whole batch
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
