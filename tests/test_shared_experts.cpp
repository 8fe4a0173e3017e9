#include "golden.hpp"

#include <moe/shared_experts.hpp>

TEMPLATE_TEST_CASE("shared experts match the PyTorch reference", "[shared_experts]", float, double) {
    {
        const golden::layer_case c("shared_ungated");
        moe::layer<TestType, moe::routers::softmax_topk, moe::experts::swiglu, moe::shared_experts::ungated<>> layer(
            c.shape(), c.router_as<moe::routers::softmax_topk>());
        c.load(layer);
        c.check(layer);
    }
    {
        const golden::layer_case c("shared_gated");
        moe::qwen2_moe_layer<TestType> layer(c.shape(), c.router_as<moe::routers::softmax_topk>());
        c.load(layer);
        c.check(layer);
    }
}

TEST_CASE("shared-expert policies satisfy their concept", "[shared_experts]") {
    STATIC_REQUIRE(moe::shared_expert<moe::shared_experts::none>);
    STATIC_REQUIRE(moe::shared_expert<moe::shared_experts::ungated<moe::experts::geglu>>);
    STATIC_REQUIRE(moe::shared_experts::sigmoid_gated<>::gated);
    STATIC_REQUIRE_FALSE(moe::shared_experts::ungated<>::gated);
    STATIC_REQUIRE_FALSE(moe::shared_expert<int>);
}
