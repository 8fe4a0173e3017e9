#pragma once
// moe-run's layer (moe_run.hpp): loads it, runs it on the inputs (forward, backward, timings,
// statistics; under MPI on every rank) and hands its results to write_outputs. Each
// moe_run_<weights>.cpp builds it for one type of expert weights.
#include "moe_run.hpp"

#include <moe/moe.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace moe_run {

/// Median of `n` timed calls of `f`, in milliseconds.
template <class F>
double median_ms(moe::index n, F&& f) {
    std::vector<double> ms;
    for (moe::index i = 0; i < n; ++i) {
        const auto start = std::chrono::steady_clock::now();
        f();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::nth_element(ms.begin(), ms.begin() + static_cast<std::ptrdiff_t>(ms.size() / 2), ms.end());
    return ms[ms.size() / 2];
}

/// Loads layer a.layer of `model` into `layer`, runs it on `in` as the arguments ask and writes its outputs.
template <class Layer>
void load_and_run(const arguments& a, const model_source& model, Layer& layer, const job& j, const inputs& in) {
    model.load_layer(a.layer, layer);
    layer.set_threads(a.threads);
    if constexpr (Layer::trainable) layer.set_training(a.backward);
    const moe::index d = layer.shape().d_model;
    results r{.y = moe::matrix<float>(in.x.rows(), d)};
    if (a.backward) r.grad_x.resize(in.x.rows(), d);
    if (a.repeat > 0) {
        const double forward = median_ms(a.repeat, [&] { layer.forward(in.x, r.y); });
        if (j.root()) std::printf("forward_ms_median=%.4f\n", forward);
        if (j.root()) std::printf("kernels=%s\n", std::string(moe::kernels::isa_name(moe::kernels::active_isa())).c_str());
        if (j.root()) std::printf("expert_weights_mb=%.3f\n", static_cast<double>(layer.expert_weight_bytes()) * 1e-6);
        if constexpr (Layer::trainable) {
            if (a.backward) {
                // Each backward consumes its forward: time the pair and the forward alone, report the difference.
                const double pair = median_ms(a.repeat, [&] {
                    layer.forward(in.x, r.y);
                    layer.backward(in.x, in.grad_output, r.grad_x);
                });
                const double again = median_ms(a.repeat, [&] { layer.forward(in.x, r.y); });
                if (j.root()) std::printf("backward_ms_median=%.4f\n", std::max(0.0, pair - again));
            }
        }
    }
    layer.forward(in.x, r.y);
    if constexpr (Layer::trainable) {
        if (a.backward) {
            layer.backward(in.x, in.grad_output, r.grad_x);
            r.params = moe::io::checkpoint_parameters(layer, model.config().kind, a.layer);
            r.losses = layer.loss_values();
        }
    }
    if (a.stats) {
        const std::string routing = layer.statistics().to_json();
        if (j.root()) std::printf("%s\n", routing.c_str());
        if (j.comm) {
            const std::string load = layer.parallel_load().to_json();
            if (j.root()) std::printf("%s\n", load.c_str());
        }
    }
    r.logits = layer.logits();
    r.owners = layer.exchange();
    write_outputs(a, j, model, in, r);
}

template <class Expert>
void run_layer(const arguments& a, const model_source& model, const moe::routers::any_router& router, const job& j,
               const inputs& in) {
    using moe::routers::any_router;
    namespace se = moe::shared_experts;
    using lb = moe::losses::load_balance;
    using zl = moe::losses::z_loss;
    const moe::io::model_config& c = model.config();
    const moe::layer_shape shape = moe::io::shape_of(c);
    const std::tuple<lb, zl> losses{{.alpha = a.load_balance_coef.value_or(0.0)}, {.beta = a.z_loss_coef.value_or(0.0)}};
    moe::parallel::placement where{.comm = j.comm};
    where.rebalance.enabled = a.rebalance;
    if (a.rebalance_cap_mb) where.rebalance.cap_bytes = static_cast<std::size_t>(*a.rebalance_cap_mb) * 1000000;
    if (a.rebalance_min_rows) where.rebalance.min_rows = *a.rebalance_min_rows;
    if (c.shared_size == 0) {
        moe::layer<float, any_router, Expert, se::none, lb, zl> layer(shape, where, router, {}, {}, losses);
        load_and_run(a, model, layer, j, in);
    } else if (c.shared_gated()) {
        moe::layer<float, any_router, Expert, se::sigmoid_gated<>, lb, zl> layer(shape, where, router, {}, {}, losses);
        load_and_run(a, model, layer, j, in);
    } else {
        moe::layer<float, any_router, Expert, se::ungated<>, lb, zl> layer(shape, where, router, {}, {}, losses);
        load_and_run(a, model, layer, j, in);
    }
}

}  // namespace moe_run

/// The definition of `run_layer<Expert>` a moe_run_<weights>.cpp builds.
#define MOE_RUN_LAYER(Expert)                                                                                   \
    template void moe_run::run_layer<Expert>(const moe_run::arguments&, const moe_run::model_source&,         \
                                             const moe::routers::any_router&, const moe_run::job&,              \
                                             const moe_run::inputs&);
