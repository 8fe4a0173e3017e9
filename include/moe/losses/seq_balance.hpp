#pragma once
/// \file
/// L3, the sequence-wise balance loss (docs/semantics.md, "Balancing losses").

#include "moe/error.hpp"
#include "moe/losses/loss_term.hpp"

#include <string>
#include <string_view>
#include <vector>

namespace moe::losses {

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
            const index n = r.end_slot(first + len - 1) - r.first_slot(first);
            if (n == 0) continue;
            for (index s = r.first_slot(first); s < r.end_slot(first + len - 1); ++s) {
                const auto id = r.chosen_expert(s);
                if (id >= 0 && id < r.experts) c[static_cast<std::size_t>(id)] += 1;
            }
            const double scale = alpha * static_cast<double>(r.experts) / (static_cast<double>(n) * static_cast<double>(len) * sequences);
            for (double& v : c) v *= scale;
            f(first, len, c);
        }
    }
};

static_assert(loss_term<seq_balance, float> && loss_term<seq_balance, double>);

}  // namespace moe::losses
