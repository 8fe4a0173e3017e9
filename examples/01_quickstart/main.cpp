// Quickstart: build a Mixtral-like and a DeepSeek-V3-like MoE layer with random weights, run 512 tokens
// through each, and print the routing statistics and the speed on active FLOPs.
#include <moe/moe.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

namespace {

template <class Layer>
void run(const char* name, Layer& layer) {
    const moe::index tokens = 512;
    layer.randomize(42);
    moe::matrix<float> x = moe::matrix<float>::Random(tokens, layer.shape().d_model);
    moe::matrix<float> y(tokens, layer.shape().d_model);
    layer.forward(x, y);  // warm-up: sizes the workspace

    std::vector<double> ms;
    for (int i = 0; i < 5; ++i) {
        const auto start = std::chrono::steady_clock::now();
        layer.forward(x, y);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(ms.begin(), ms.end());
    const double median = ms[ms.size() / 2];
    std::printf("%s: %ld tokens, median %.2f ms, %.1f GFLOP/s on active FLOPs\n", name, static_cast<long>(tokens),
                median, layer.active_flops() / (median * 1e6));
    std::printf("  routing statistics: %s\n", layer.statistics().to_json().c_str());
}

}  // namespace

int main() {
    // Mixtral-like: 8 SwiGLU experts, softmax top-2, weights normalised.
    moe::mixtral_layer<float> mixtral({.d_model = 512, .d_ff = 1024, .n_experts = 8},
                                      moe::routers::softmax_topk{.k = 2, .normalize = true});
    run("mixtral-like", mixtral);

    // DeepSeek-V3-like: 32 fine-grained experts in 4 groups (2 eligible), sigmoid top-4 with a
    // correction bias, routed weights scaled by 2.5, plus 2 shared experts stored as one FFN.
    moe::deepseek_v3_layer<float> deepseek(
        {.d_model = 512, .d_ff = 256, .n_experts = 32, .d_shared = 2 * 256},
        moe::routers::sigmoid_topk{.k = 4, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2});
    deepseek.router_state().bias.setLinSpaced(-0.05f, 0.05f);
    run("deepseek-v3-like", deepseek);
}
