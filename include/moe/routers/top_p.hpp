#pragma once
/// \file
/// R4: top-p dynamic routing ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
/// Huang et al. 2024).

#include "moe/concepts.hpp"
#include "moe/error.hpp"
#include "moe/kernels/select.hpp"
#include "moe/routers/gates.hpp"
#include "moe/routers/settings.hpp"
#include "moe/routing.hpp"

#include <array>
#include <cmath>
#include <span>
#include <string>
#include <vector>

namespace moe::routers {

/// p = softmax(z); the experts are taken in descending p (ties: lower index) until their cumulative
/// probability reaches `threshold`, at least 1 and at most `max_k`; w = p of the chosen, divided by
/// their sum when `normalize`. Each token therefore uses 1 to `max_k` experts.
struct top_p {
    double threshold = 0.9;
    index max_k = 4;
    bool normalize = false;

    static constexpr bool batch_dependent = false;

    // Its entry in the router registry (routers/registry.hpp). max_k defaults to k where k is given.
    static constexpr std::string_view name = "top_p";
    static constexpr std::array settings{
        setting{.key = "threshold", .flag = "top-p", .help = "top-p's threshold (default 0.9)", .min = 0, .max = 1,
                .open_min = true, .example = "0.6"},
        setting{.key = "max_k", .flag = "max-k", .help = "top-p's most experts per token (default the config's k)",
                .type = setting_type::integer, .min = 1, .example = "4"},
        model_setting::k, model_setting::normalize};
    static top_p from(const setting_values::reader& v) {
        top_p r;
        v.read("threshold", r.threshold);
        v.read("k", r.max_k);
        v.read("max_k", r.max_k);
        v.read("normalize", r.normalize);
        return r;
    }

    template <class Scalar>
    struct state {
        explicit state(index) {}
        std::vector<std::int32_t> order;  // the max_k best experts of one token
    };

    void validate(index experts) const {
        if (!(threshold > 0 && threshold <= 1))
            throw value_error("top_p: threshold = " + std::to_string(threshold) + " must be in (0, 1]");
        if (max_k < 1 || max_k > experts)
            throw value_error("top_p: max_k = " + std::to_string(max_k) + " must be in [1, " + std::to_string(experts) +
                              "] (the number of experts)");
    }

    template <class Scalar>
    void route(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const {
        const index t = logits.rows(), e = logits.cols();
        out.begin_tokens(e);
        out.scores.resize(t, e);
        st.order.resize(static_cast<std::size_t>(max_k));
        for (index i = 0; i < t; ++i) {
            const Scalar* p = out.scores.row(i).data();
            kernels::softmax(logits.row(i).data(), out.scores.row(i).data(), e);
            kernels::top_k(p, e, max_k, st.order.data());
            index n = 0;
            Scalar mass = 0;
            while (n < max_k && (n == 0 || mass < static_cast<Scalar>(threshold))) mass += p[st.order[static_cast<std::size_t>(n++)]];
            const Scalar f = normalize ? Scalar(1) / mass : Scalar(1);
            for (index j = 0; j < n; ++j) {
                const auto id = st.order[static_cast<std::size_t>(j)];
                out.add_slot(id, p[id] * f);
            }
            out.end_token();
        }
    }

    template <class Scalar>
    void backward(const matrix<Scalar>&, const routing<Scalar>& r, state<Scalar>&, std::span<const Scalar> grad_weights,
                  matrix<Scalar>& grad_logits) const {
        logits_backward(r, grad_weights, normalize, Scalar(0), Scalar(1), grad_logits);
    }
};

static_assert(differentiable_router<top_p, float> && differentiable_router<top_p, double>);

}  // namespace moe::routers
