#include <moe/configurations.hpp>

#include <catch2/catch.hpp>

TEST_CASE("configuration aliases name the right policies", "[configurations]") {
    STATIC_REQUIRE(std::is_same_v<moe::mixtral_layer<float>::router_type, moe::routers::softmax_topk>);
    STATIC_REQUIRE(std::is_same_v<moe::deepseek_v3_layer<float>::router_type, moe::routers::sigmoid_topk>);
    STATIC_REQUIRE(moe::qwen2_moe_layer<float>::shared_type::gated);
    STATIC_REQUIRE_FALSE(moe::deepseek_v3_layer<float>::shared_type::gated);
    STATIC_REQUIRE(moe::switch_layer<float>::router_type::batch_dependent);
    STATIC_REQUIRE(std::is_same_v<moe::olmoe_layer<double>, moe::qwen3_moe_layer<double>>);
}

TEST_CASE("a Switch layer drops over-capacity tokens", "[configurations]") {
    moe::switch_layer<float> layer({.d_model = 8, .d_ff = 16, .n_experts = 4},
                                   {.inner = {.k = 1}, .capacity_factor = 0.5});
    layer.randomize(5);
    const moe::matrix<float> x = moe::matrix<float>::Random(64, 8);
    moe::matrix<float> y(64, 8);
    layer.forward(x, y);
    const auto s = layer.statistics();
    CHECK(s.dropped + s.assignments == 64);
    for (auto c : s.load) CHECK(c <= 8);  // ceil(0.5 * 64 / 4)
}
