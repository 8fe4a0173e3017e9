#pragma once
/// \file
/// A numerical gradient check: compares an analytic gradient with central finite differences, for
/// checking the backward of a router, expert or loss (the library's or a user's) in double precision.

#include "moe/concepts.hpp"
#include "moe/error.hpp"
#include "moe/types.hpp"
#include "moe/testing/conformance.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <random>
#include <string>
#include <vector>

namespace moe::testing {

/// Checks `gradient` (same shape as `x`) against the central differences (f(x + h e_i) - f(x - h e_i)) / 2h
/// of the scalar function `f` at `x`, for every element i. An element fails when
/// |analytic - numeric| > tolerance * max(1, |analytic|, |numeric|). `x` is restored afterwards.
/// `f` must be smooth around `x`: for routers, hold the selection fixed or keep x away from ties.
template <class F>
report gradient_check(F&& f, matrix<double>& x, const matrix<double>& gradient, double step = 1e-6,
                      double tolerance = 1e-5) {
    report rep;
    if (gradient.rows() != x.rows() || gradient.cols() != x.cols()) {
        detail::fail(rep, "gradient is [", gradient.rows(), ", ", gradient.cols(), "], x is [", x.rows(), ", ", x.cols(), "]");
        return rep;
    }
    for (index i = 0; i < x.size(); ++i) {
        const double saved = x.data()[i];
        x.data()[i] = saved + step;
        const double up = f(static_cast<const matrix<double>&>(x));
        x.data()[i] = saved - step;
        const double down = f(static_cast<const matrix<double>&>(x));
        x.data()[i] = saved;
        const double numeric = (up - down) / (2 * step), analytic = gradient.data()[i];
        const double scale = std::max({1.0, std::abs(analytic), std::abs(numeric)});
        if (!(std::abs(analytic - numeric) <= tolerance * scale))
            detail::fail(rep, "element ", i, " (row ", i / x.cols(), ", column ", i % x.cols(), "): analytic ", analytic,
                         ", numeric ", numeric);
    }
    return rep;
}

/// Checks a loss term's `gradient` (double precision) against finite differences of its `value`, on
/// the routing `r` gives `logits` (T x `logit_rows(r, experts)`), routed again at every perturbed point
/// so that the scores follow the logits. The selection must not change under the perturbation.
template <class R, class L>
report loss_gradient_check(const R& r, const L& loss, const matrix<double>& logits, index experts, double step = 1e-6,
                           double tolerance = 1e-6) {
    r.validate(experts);
    auto state = make_router_state<double>(r, experts);
    routing<double> base;
    route(r, logits, state, base);
    base.build_dispatch();
    matrix<double> grad = matrix<double>::Zero(logits.rows(), logits.cols());
    loss.gradient(base, logits, grad);
    routing<double> moved;
    const auto value = [&](const matrix<double>& z) {
        route(r, z, state, moved);
        if (moved.expert_ids != base.expert_ids) return std::numeric_limits<double>::quiet_NaN();  // selection changed
        moved.build_dispatch();
        return static_cast<double>(loss.value(moved, z));
    };
    matrix<double> z = logits;
    return gradient_check(value, z, grad, step, tolerance);
}

/// Checks a router's backward (double precision) against finite differences: with L = sum_s g_s w_s
/// over the slots of the routing of `logits` (T x `logit_rows(r, experts)`) for random g drawn from
/// `seed`, the `grad_logits` of `r.backward` must match dL/dz. The selection must not change under the
/// perturbation (random logits keep it). Routers whose backward holds quantities of the forward
/// constant (Sinkhorn's scalings with plan gates) differ from finite differences by design.
template <class R>
report router_gradient_check(const R& r, const matrix<double>& logits, index experts, std::uint64_t seed = 1,
                             double step = 1e-6, double tolerance = 1e-6) {
    r.validate(experts);
    if (logits.cols() != logit_rows(r, experts))
        throw shape_error("router_gradient_check: logits have " + std::to_string(logits.cols()) + " columns, the router " +
                          std::to_string(logit_rows(r, experts)) + " for " + std::to_string(experts) + " experts");
    auto state = make_router_state<double>(r, experts);
    routing<double> base;
    route(r, logits, state, base);
    std::vector<double> g(static_cast<std::size_t>(base.slots()));
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    for (auto& v : g) v = normal(rng);
    matrix<double> grad(logits.rows(), logits.cols());
    route_backward(r, logits, base, state, std::span<const double>(g), grad);

    routing<double> moved;
    const auto loss = [&](const matrix<double>& z) {
        route(r, z, state, moved);
        if (moved.expert_ids != base.expert_ids) return std::numeric_limits<double>::quiet_NaN();  // selection changed
        double l = 0;
        for (std::size_t s = 0; s < g.size(); ++s) l += g[s] * moved.weights[s];
        return l;
    };
    matrix<double> z = logits;
    return gradient_check(loss, z, grad, step, tolerance);
}

/// Checks a whole layer's backward (double precision) against finite differences: with L =
/// sum(y * g) + the layer's loss terms for a random g drawn from `seed`, the gradient `backward` gives
/// for the input and for every parameter (`layer.parameters()`) is compared by `gradient_check`.
/// Perturbing one value must not change the routing decisions: keep `x` and the weights away from
/// ties (random values are, with overwhelming probability). Failures name the tensor.
template <class Layer>
report layer_gradient_check(Layer& layer, const matrix<double>& x, std::uint64_t seed = 1, double step = 1e-6,
                            double tolerance = 1e-5) {
    static_assert(std::is_same_v<typename Layer::scalar_type, double>, "layer_gradient_check needs a double layer");
    const index t = x.rows(), d = x.cols();
    matrix<double> g(t, d);
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    for (index i = 0; i < g.size(); ++i) g.data()[i] = normal(rng);
    layer.set_training(true);
    const auto loss = [&](const matrix<double>& input) {
        matrix<double> y(t, d);
        layer.forward(input, y);
        double value = (y.array() * g.array()).sum();
        for (const double l : layer.loss_values()) value += l;
        return value;
    };
    loss(x);
    matrix<double> grad_x(t, d);
    layer.backward(x, g, grad_x);
    auto params = layer.parameters();
    std::vector<matrix<double>> grads;
    for (const auto& p : params) grads.emplace_back(p.grad);

    report rep;
    const auto merge = [&](const std::string& what, const report& r) {
        for (const auto& f : r.failures) rep.failures.push_back(what + ": " + f);
    };
    matrix<double> input = x;
    merge("input", gradient_check(loss, input, grad_x, step, tolerance));
    for (std::size_t i = 0; i < params.size(); ++i) {
        matrix<double> value = params[i].value;
        const auto at = [&](const matrix<double>& v) {
            params[i].value = v;
            return loss(x);
        };
        merge(params[i].name, gradient_check(at, value, grads[i], step, tolerance));
        params[i].value = value;
    }
    return rep;
}

}  // namespace moe::testing
