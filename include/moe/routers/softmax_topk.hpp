#pragma once
/// \file
/// R1: softmax top-k routing (Switch k=1, GShard/Mixtral k=2, Qwen, OLMoE).

#include "moe/concepts.hpp"
#include "moe/error.hpp"
#include "moe/kernels/select.hpp"
#include "moe/routers/gates.hpp"
#include "moe/routers/settings.hpp"
#include "moe/routing.hpp"

#include <array>
#include <span>

#include <string>

namespace moe::routers {

/// p = softmax(z); the k largest p are chosen (ties: lower expert index); w = p of the chosen,
/// divided by their sum when `normalize`, then multiplied by `scale`.
/// Top-k-then-softmax (Mixtral) is this router with `normalize = true`.
struct softmax_topk {
    index k = 2;             ///< experts per token
    bool normalize = false;  ///< divide the k weights by their sum
    double scale = 1.0;      ///< multiply the weights by this factor

    static constexpr bool batch_dependent = false;

    // Its entry in the router registry (routers/registry.hpp).
    static constexpr std::string_view name = "softmax_topk";
    static constexpr std::array settings{model_setting::k, model_setting::normalize, model_setting::scale};
    static softmax_topk from(const setting_values::reader& v) {
        softmax_topk r;
        v.read("k", r.k);
        v.read("normalize", r.normalize);
        v.read("scale", r.scale);
        return r;
    }
    static constexpr bool takes_capacity = true;  ///< capacity<softmax_topk> is registered with it

    void validate(index experts) const {
        if (k < 1 || k > experts)
            throw value_error("softmax_topk: k = " + std::to_string(k) + " must be in [1, " +
                              std::to_string(experts) + "] (the number of experts)");
    }

    template <class Scalar>
    void route(const matrix<Scalar>& logits, routing<Scalar>& out) const {
        const index t = logits.rows(), e = logits.cols();
        out.reset_fixed_k(t, e, k);
        out.scores.resize(t, e);
        for (index i = 0; i < t; ++i) {
            const Scalar* p = out.scores.row(i).data();
            kernels::softmax(logits.row(i).data(), out.scores.row(i).data(), e);
            std::int32_t* ids = out.expert_ids.data() + i * k;
            Scalar* w = out.weights.data() + i * k;
            kernels::top_k(p, e, k, ids);
            Scalar sum = 0;
            for (index j = 0; j < k; ++j) sum += w[j] = p[ids[j]];
            const Scalar f = static_cast<Scalar>(scale) / (normalize ? sum : Scalar(1));
            for (index j = 0; j < k; ++j) w[j] *= f;
        }
    }

    template <class Scalar>
    void backward(const matrix<Scalar>&, const routing<Scalar>& r, std::span<const Scalar> grad_weights,
                  matrix<Scalar>& grad_logits) const {
        logits_backward(r, grad_weights, normalize, Scalar(0), static_cast<Scalar>(scale), grad_logits);
    }
};

static_assert(differentiable_router<softmax_topk, float> && differentiable_router<softmax_topk, double>);

}  // namespace moe::routers
