// Routing time of every router next to softmax top-k, and the layer time with each router, at the
// mixtral and fine shapes. The router's share of the layer is route time / layer time of one run.
#include <moe/moe.hpp>

#include <benchmark/benchmark.h>

#include <functional>
#include <string>

namespace {

namespace r = moe::routers;

struct shape {
    const char* name;
    moe::index tokens, d, ff, experts, k;
};
constexpr shape shapes[] = {{"mixtral", 256, 1024, 2816, 8, 2}, {"fine", 512, 1024, 512, 64, 8}};

struct named_router {
    const char* name;
    std::function<r::any_router(const shape&)> make;
};

const named_router routers[] = {
    {"softmax_topk", [](const shape& s) { return r::any_router(r::softmax_topk{.k = s.k, .normalize = true}); }},
    {"capacity", [](const shape& s) {
         return r::any_router(r::capacity<r::softmax_topk>{.inner = {.k = s.k, .normalize = true}, .capacity_factor = 1.25});
     }},
    {"sigmoid_topk", [](const shape& s) {
         return r::any_router(r::sigmoid_topk{.k = s.k, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2});
     }},
    {"top_p", [](const shape& s) { return r::any_router(r::top_p{.threshold = 0.5, .max_k = s.k}); }},
    {"null_experts", [](const shape& s) { return r::any_router(r::null_experts{.k = s.k, .nulls = s.k}); }},
    {"sinkhorn", [](const shape& s) { return r::any_router(r::sinkhorn{.k = s.k, .iterations = 8}); }},
    {"expert_choice", [](const shape& s) { return r::any_router(r::expert_choice{.capacity_factor = static_cast<double>(s.k)}); }},
};

void route_only(benchmark::State& state, const named_router& nr, const shape& s) {
    const r::any_router router = nr.make(s);
    const moe::index rows = router.logit_rows(s.experts);
    const moe::matrix<float> logits = moe::matrix<float>::Random(s.tokens, rows) * 2.0f;
    auto st = moe::make_router_state<float>(router, s.experts);
    moe::routing<float> out;
    for (auto _ : state) {
        router.route(logits, st, out);
        out.build_dispatch();
        benchmark::DoNotOptimize(out.expert_ids.data());
    }
}

void layer_with(benchmark::State& state, const named_router& nr, const shape& s) {
    moe::layer<float, r::any_router, moe::experts::swiglu> layer({s.d, s.ff, s.experts}, nr.make(s));
    layer.randomize(1);
    const moe::matrix<float> x = moe::matrix<float>::Random(s.tokens, s.d);
    moe::matrix<float> y(s.tokens, s.d);
    layer.forward(x, y);
    for (auto _ : state) {
        layer.forward(x, y);
        benchmark::DoNotOptimize(y.data());
    }
    state.counters["GFLOP/s"] = benchmark::Counter(layer.active_flops() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["rows"] = static_cast<double>(layer.last_routing().rows());
}

const bool registered = [] {
    for (const shape& s : shapes)
        for (const named_router& nr : routers) {
            const std::string suffix = std::string(nr.name) + "/" + s.name;
            benchmark::RegisterBenchmark(("route/" + suffix).c_str(), route_only, nr, s)->Unit(benchmark::kMicrosecond);
            benchmark::RegisterBenchmark(("layer_with_router/" + suffix).c_str(), layer_with, nr, s)
                ->Unit(benchmark::kMillisecond)->UseRealTime();
        }
    return true;
}();

}  // namespace
