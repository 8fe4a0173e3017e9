#pragma once
/// \file
/// R2: sigmoid top-k with correction bias and group limit (DeepSeek-V3, "noaux_tc").

#include "moe/concepts.hpp"
#include "moe/error.hpp"
#include "moe/kernels/select.hpp"
#include "moe/routers/gates.hpp"
#include "moe/routers/settings.hpp"
#include "moe/routing.hpp"

#include <array>
#include <span>
#include <string>
#include <vector>

namespace moe::routers {

/// s = sigmoid(z); selection score c = s + b with b the per-expert correction bias (state, never
/// trained by gradient). With `n_group > 1` the experts form `n_group` contiguous groups scored by
/// the sum of their two largest c; only the `topk_group` best groups are eligible. The k largest c
/// among eligible experts are chosen (ties: lower index); w = s of the chosen (unbiased), divided by
/// (sum + 1e-20) when `normalize`, then multiplied by `scale` (`routed_scaling_factor`).
struct sigmoid_topk {
    index k = 8;
    bool normalize = true;
    double scale = 1.0;
    index n_group = 1;
    index topk_group = 1;

    static constexpr bool batch_dependent = false;

    // Its entry in the router registry (routers/registry.hpp).
    static constexpr std::string_view name = "sigmoid_topk";
    static constexpr std::array settings{model_setting::k, model_setting::normalize, model_setting::scale, model_setting::n_group,
                                  model_setting::topk_group};
    static sigmoid_topk from(const setting_values::reader& v) {
        sigmoid_topk r;
        v.read("k", r.k);
        v.read("normalize", r.normalize);
        v.read("scale", r.scale);
        v.read("n_group", r.n_group);
        v.read("topk_group", r.topk_group);
        return r;
    }
    static constexpr bool takes_capacity = true;  ///< capacity<sigmoid_topk> is registered with it

    /// The correction bias `b` (`e_score_correction_bias`, zero by default) and row scratch.
    template <class Scalar>
    struct state {
        explicit state(index experts) : bias(vector<Scalar>::Zero(experts)) {}
        vector<Scalar>* correction_bias() { return &bias; }
        vector<Scalar> bias;
        std::vector<Scalar> choice;           // c of one token
        std::vector<Scalar> group_score;      // per group
        std::vector<std::int32_t> groups;     // chosen groups
        std::vector<char> eligible;           // per expert
    };

    void validate(index experts) const {
        const auto s = [](index v) { return std::to_string(v); };
        if (n_group < 1 || experts % n_group != 0)
            throw value_error("sigmoid_topk: n_group = " + s(n_group) + " must divide the number of experts (" +
                              s(experts) + ")");
        if (topk_group < 1 || topk_group > n_group)
            throw value_error("sigmoid_topk: topk_group = " + s(topk_group) + " must be in [1, n_group = " +
                              s(n_group) + "]");
        const index eligible = topk_group * (experts / n_group);
        if (k < 1 || k > eligible)
            throw value_error("sigmoid_topk: k = " + s(k) + " must be in [1, " + s(eligible) +
                              "] (experts in the topk_group eligible groups)");
    }

    template <class Scalar>
    void route(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const {
        const index t = logits.rows(), e = logits.cols();
        const index group_size = e / n_group;
        out.reset_fixed_k(t, e, k);
        out.score = score_function::sigmoid;
        out.scores.resize(t, e);
        st.choice.resize(static_cast<std::size_t>(e));
        st.group_score.resize(static_cast<std::size_t>(n_group));
        st.groups.resize(static_cast<std::size_t>(topk_group));
        st.eligible.resize(static_cast<std::size_t>(e));
        for (index i = 0; i < t; ++i) {
            Scalar* s = out.scores.row(i).data();
            kernels::sigmoid(logits.row(i).data(), s, e);
            Scalar* c = st.choice.data();
            for (index j = 0; j < e; ++j) c[j] = s[j] + st.bias[j];
            if (n_group > 1) {
                for (index g = 0; g < n_group; ++g) {
                    std::int32_t best[2];
                    const index n = kernels::top_k(c + g * group_size, group_size, 2, best);
                    Scalar sum = 0;
                    for (index j = 0; j < n; ++j) sum += c[g * group_size + best[j]];
                    st.group_score[static_cast<std::size_t>(g)] = sum;
                }
                kernels::top_k(st.group_score.data(), n_group, topk_group, st.groups.data());
                std::fill(st.eligible.begin(), st.eligible.end(), char{0});
                for (auto g : st.groups)
                    std::fill_n(st.eligible.begin() + g * group_size, group_size, char{1});
            } else {
                std::fill(st.eligible.begin(), st.eligible.end(), char{1});
            }
            std::int32_t* ids = out.expert_ids.data() + i * k;
            Scalar* w = out.weights.data() + i * k;
            kernels::top_k(c, e, k, ids, [&](index j) { return st.eligible[static_cast<std::size_t>(j)] != 0; });
            Scalar sum = 0;
            for (index j = 0; j < k; ++j) sum += w[j] = s[ids[j]];
            const Scalar denom = normalize ? sum + Scalar(1e-20) : Scalar(1);
            for (index j = 0; j < k; ++j) w[j] = w[j] / denom * static_cast<Scalar>(scale);
        }
    }

    /// Gradient through s of the chosen experts, the normalisation and the scale; none to the bias.
    template <class Scalar>
    void backward(const matrix<Scalar>&, const routing<Scalar>& r, state<Scalar>&, std::span<const Scalar> grad_weights,
                  matrix<Scalar>& grad_logits) const {
        logits_backward(r, grad_weights, normalize, Scalar(1e-20), static_cast<Scalar>(scale), grad_logits);
    }
};

static_assert(differentiable_router<sigmoid_topk, float> && differentiable_router<sigmoid_topk, double>);

}  // namespace moe::routers
