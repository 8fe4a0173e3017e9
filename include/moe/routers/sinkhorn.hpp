#pragma once
/// \file
/// R6: Sinkhorn balanced routing (S-BASE as in Megatron-LM, Clark et al. 2022 "Unified Scaling Laws
/// for Routed Language Models"; gates from the plan as in "Selective Sinkhorn Routing").

#include "moe/concepts.hpp"
#include "moe/error.hpp"
#include "moe/kernels/select.hpp"
#include "moe/routers/gates.hpp"
#include "moe/routers/settings.hpp"
#include "moe/routing.hpp"
#include "moe/statistics.hpp"

#include <array>
#include <cmath>
#include <span>
#include <string>
#include <vector>

namespace moe::routers {

/// Where Sinkhorn routing takes its combine weights from.
enum class sinkhorn_gates {
    softmax,  ///< w = p of the chosen experts (optionally normalised), as S-BASE
    plan,     ///< w = P_t of the chosen experts divided by their sum, as Selective Sinkhorn
};

/// K = exp(z - max z); d1 = 1; repeated `iterations` times (or until mean|d1_new - d1| < `tolerance`
/// when it is > 0): d0 = 1 / (T (K d1 + 1e-8)), d1 = 1 / (E (d0^T K + 1e-8)). The plan
/// P = diag(d0) K diag(d1) balances the experts; each token takes the k largest P_t (ties: lower
/// index) with gates from `gates`. With `inference_topk` it is plain softmax top-k instead (Megatron
/// applies Sinkhorn only in training). The scalings are constants for backward.
struct sinkhorn {
    index k = 2;
    index iterations = 8;
    double tolerance = 0;
    sinkhorn_gates gates = sinkhorn_gates::softmax;
    bool normalize = true;
    bool inference_topk = false;

    static constexpr bool batch_dependent = true;

    // Its entry in the router registry (routers/registry.hpp).
    static constexpr std::string_view name = "sinkhorn";
    static constexpr std::array settings{
        model_setting::k,
        setting{.key = "iterations", .flag = "sinkhorn-iters", .help = "Sinkhorn iterations (default 8)",
                .type = setting_type::integer, .min = 1, .example = "5"},
        setting{.key = "tolerance", .flag = "sinkhorn-tolerance", .help = "stop early below it (default 0: run all iterations)",
                .min = 0, .example = "0"},
        setting{.key = "gates", .flag = "sinkhorn-gates", .help = "Sinkhorn's gates (default softmax)",
                .type = setting_type::choice, .choices = "softmax|plan", .example = "plan"},
        model_setting::normalize,
        setting{.key = "inference_topk", .help = "plain softmax top-k instead (default false)",
                .type = setting_type::boolean, .example = "false"}};
    static sinkhorn from(const setting_values::reader& v) {
        sinkhorn r;
        v.read("k", r.k);
        v.read("iterations", r.iterations);
        v.read("tolerance", r.tolerance);
        if (v.has("gates")) r.gates = v.text("gates") == "plan" ? sinkhorn_gates::plan : sinkhorn_gates::softmax;
        v.read("normalize", r.normalize);
        v.read("inference_topk", r.inference_topk);
        return r;
    }

    template <class Scalar>
    struct state {
        explicit state(index) {}
        void add_statistics(routing_statistics& s) const {
            s.sinkhorn_iterations = iterations_run;
            s.sinkhorn_marginal_error = marginal_error;
        }
        matrix<Scalar> plan;              // K, then P
        std::vector<Scalar> d0, d1, d1_new;
        index iterations_run = 0;         ///< iterations of the last call
        /// Largest relative deviation of the last plan's marginals from the balanced ones:
        /// max(max_e |T sum_t P_te - T/E| / (T/E), max_t |T sum_e P_te - 1|). After the last column
        /// update the expert side is exact up to eps, so the token side carries the remaining error.
        double marginal_error = 0;
    };

    void validate(index experts) const {
        if (k < 1 || k > experts)
            throw value_error("sinkhorn: k = " + std::to_string(k) + " must be in [1, " + std::to_string(experts) +
                              "] (the number of experts)");
        if (iterations < 1) throw value_error("sinkhorn: iterations = " + std::to_string(iterations) + " must be >= 1");
        if (!(tolerance >= 0) || !std::isfinite(tolerance))
            throw value_error("sinkhorn: tolerance = " + std::to_string(tolerance) + " must be a finite number >= 0");
    }

    template <class Scalar>
    void route(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const {
        const index t = logits.rows(), e = logits.cols();
        out.reset_fixed_k(t, e, k);
        out.scores.resize(t, e);
        for (index i = 0; i < t; ++i) kernels::softmax(logits.row(i).data(), out.scores.row(i).data(), e);
        st.iterations_run = 0;
        st.marginal_error = 0;
        if (inference_topk || t == 0) {
            for (index i = 0; i < t; ++i) choose(out, i, out.scores.row(i).data(), out.scores.row(i).data(), normalize);
            return;
        }
        balance(logits, st);
        for (index i = 0; i < t; ++i) {
            const bool from_plan = gates == sinkhorn_gates::plan;
            choose(out, i, st.plan.row(i).data(), from_plan ? st.plan.row(i).data() : out.scores.row(i).data(),
                   from_plan || normalize);
        }
    }

    /// With softmax gates, as R1. With plan gates, w_t = softmax over the chosen e of (z_te + log d1_e)
    /// with the scalings d0, d1 of the forward held constant, so dP_te/dz_te = P_te.
    template <class Scalar>
    void backward(const matrix<Scalar>&, const routing<Scalar>& r, state<Scalar>& st, std::span<const Scalar> grad_weights,
                  matrix<Scalar>& grad_logits) const {
        if (inference_topk || gates == sinkhorn_gates::softmax || r.tokens == 0) {
            logits_backward(r, grad_weights, normalize, Scalar(0), Scalar(1), grad_logits);
            return;
        }
        grad_logits.setZero();
        for (index t = 0; t < r.tokens; ++t) {
            Scalar* g = grad_logits.row(t).data();
            const Scalar* plan = st.plan.row(t).data();
            const index b = r.first_slot(t);
            kernels::gate_backward(plan, r.expert_ids.data() + b, grad_weights.data() + b, r.end_slot(t) - b, r.experts, true,
                                   Scalar(0), Scalar(1), g);
            for (index x = 0; x < r.experts; ++x) g[x] *= plan[x];
        }
    }

private:
    template <class Scalar>
    void balance(const matrix<Scalar>& logits, state<Scalar>& st) const {
        const index t = logits.rows(), e = logits.cols();
        const auto ne = static_cast<std::size_t>(e), nt = static_cast<std::size_t>(t);
        const Scalar eps = Scalar(1e-8);
        st.plan = (logits.array() - logits.maxCoeff()).exp().matrix();
        st.d0.assign(nt, Scalar(1));
        st.d1.assign(ne, Scalar(1));
        st.d1_new.resize(ne);
        for (index it = 0; it < iterations; ++it) {
            for (index i = 0; i < t; ++i) {
                Scalar s = 0;
                for (index x = 0; x < e; ++x) s += st.plan(i, x) * st.d1[static_cast<std::size_t>(x)];
                st.d0[static_cast<std::size_t>(i)] = Scalar(1) / (static_cast<Scalar>(t) * (s + eps));
            }
            std::fill(st.d1_new.begin(), st.d1_new.end(), Scalar(0));
            for (index i = 0; i < t; ++i)
                for (index x = 0; x < e; ++x) st.d1_new[static_cast<std::size_t>(x)] += st.d0[static_cast<std::size_t>(i)] * st.plan(i, x);
            Scalar change = 0;
            for (std::size_t x = 0; x < ne; ++x) {
                st.d1_new[x] = Scalar(1) / (static_cast<Scalar>(e) * (st.d1_new[x] + eps));
                change += std::abs(st.d1_new[x] - st.d1[x]);
            }
            std::swap(st.d1, st.d1_new);
            st.iterations_run = it + 1;
            if (tolerance > 0 && static_cast<double>(change) / static_cast<double>(e) < tolerance) break;
        }
        for (index i = 0; i < t; ++i)
            for (index x = 0; x < e; ++x)
                st.plan(i, x) *= st.d0[static_cast<std::size_t>(i)] * st.d1[static_cast<std::size_t>(x)];
        const double target = static_cast<double>(t) / static_cast<double>(e), td = static_cast<double>(t);
        double worst = 0;
        for (index x = 0; x < e; ++x)
            worst = std::max(worst, std::abs(td * static_cast<double>(st.plan.col(x).sum()) - target) / target);
        for (index i = 0; i < t; ++i)
            worst = std::max(worst, std::abs(td * static_cast<double>(st.plan.row(i).sum()) - 1.0));
        st.marginal_error = worst;
    }

    // Slots of token i: the k largest `select`, weighted by `gate` (divided by their sum if `norm`).
    // With extreme logits the balanced plan can pick experts whose gates underflowed to 0; those
    // weights stay 0 rather than becoming 0/0.
    template <class Scalar>
    void choose(routing<Scalar>& out, index i, const Scalar* select, const Scalar* gate, bool norm) const {
        std::int32_t* ids = out.expert_ids.data() + i * k;
        Scalar* w = out.weights.data() + i * k;
        kernels::top_k(select, out.experts, k, ids);
        Scalar sum = 0;
        for (index j = 0; j < k; ++j) sum += w[j] = gate[ids[j]];
        if (norm && sum > 0)
            for (index j = 0; j < k; ++j) w[j] /= sum;
    }
};

static_assert(differentiable_router<sinkhorn, float> && differentiable_router<sinkhorn, double>);

}  // namespace moe::routers
