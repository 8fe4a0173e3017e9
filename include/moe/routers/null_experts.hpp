#pragma once
/// \file
/// R5: null experts ("AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts
/// Language Models", Zeng et al. 2024).

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

/// The router has E + `nulls` rows; p = softmax over all of them and the k largest are chosen (ties:
/// lower index). Slots that choose a null expert (index >= E) compute nothing and add nothing; their
/// weight is 0. The real experts chosen get w = p, divided by their sum when `normalize` (a token
/// whose k slots are all null gets no routed output). Each token uses 0 to k real experts.
struct null_experts {
    index k = 2;
    index nulls = 1;  ///< N, the number of null experts
    bool normalize = true;

    static constexpr bool batch_dependent = false;

    // Its entry in the router registry (routers/registry.hpp).
    static constexpr std::string_view name = "null_experts";
    static constexpr std::array settings{model_setting::k,
                                  setting{.key = "null_experts", .flag = "null-experts", .help = "null experts N (the router weight has E + N rows)",
                                          .type = setting_type::integer, .min = 1, .example = "2", .required = true},
                                  model_setting::normalize};
    static null_experts from(const setting_values::reader& v) {
        null_experts r;
        v.read("k", r.k);
        v.read("null_experts", r.nulls);
        v.read("normalize", r.normalize);
        return r;
    }

    /// Rows of the router weight: the real experts, then the null experts.
    [[nodiscard]] index logit_rows(index experts) const { return experts + nulls; }

    void validate(index experts) const {
        if (nulls < 1) throw value_error("null_experts: nulls = " + std::to_string(nulls) + " must be >= 1");
        if (k < 1 || k > experts + nulls)
            throw value_error("null_experts: k = " + std::to_string(k) + " must be in [1, " +
                              std::to_string(experts + nulls) + "] (real plus null experts)");
    }

    template <class Scalar>
    void route(const matrix<Scalar>& logits, routing<Scalar>& out) const {
        const index t = logits.rows(), all = logits.cols(), e = all - nulls;
        out.reset_fixed_k(t, e, k);
        out.scores.resize(t, all);
        for (index i = 0; i < t; ++i) {
            const Scalar* p = out.scores.row(i).data();
            kernels::softmax(logits.row(i).data(), out.scores.row(i).data(), all);
            std::int32_t* ids = out.expert_ids.data() + i * k;
            Scalar* w = out.weights.data() + i * k;
            kernels::top_k(p, all, k, ids);
            Scalar real = 0;
            for (index j = 0; j < k; ++j) real += w[j] = ids[j] < e ? p[ids[j]] : Scalar(0);
            if (normalize && real > 0)
                for (index j = 0; j < k; ++j) w[j] /= real;
        }
    }

    /// Null slots carry no weight; the real experts' weights depend on all E + N logits through p.
    template <class Scalar>
    void backward(const matrix<Scalar>&, const routing<Scalar>& r, std::span<const Scalar> grad_weights,
                  matrix<Scalar>& grad_logits) const {
        logits_backward(r, grad_weights, normalize, Scalar(0), Scalar(1), grad_logits);
    }
};

static_assert(differentiable_router<null_experts, float> && differentiable_router<null_experts, double>);

}  // namespace moe::routers
