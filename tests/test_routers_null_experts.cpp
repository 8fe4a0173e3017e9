#include "golden.hpp"

#include <moe/routers/null_experts.hpp>
#include <moe/testing/conformance.hpp>

using moe::routers::null_experts;

TEMPLATE_TEST_CASE("null experts match the PyTorch reference", "[routers][null_experts]", float, double) {
    for (const char* name : {"null_experts", "null_experts_raw"}) {
        const golden::layer_case c(name);
        moe::adamoe_layer<TestType> layer(c.shape(), c.router_as<moe::routers::null_experts>());
        REQUIRE(layer.router_weight().rows() == c.shape().n_experts + c.integer("null_experts"));
        c.load(layer);
        c.check(layer);
        const auto s = layer.statistics();
        CHECK(s.null_slots > 0);
        // Null slots never run an expert: the expert rows are exactly the real slots.
        CHECK(layer.last_routing().rows() == layer.last_routing().slots() - s.null_slots);
    }
}

TEST_CASE("null experts: a token with only null slots gets no routed output", "[routers][null_experts]") {
    moe::adamoe_layer<double> layer({.d_model = 4, .d_ff = 8, .n_experts = 3}, {.k = 2, .nulls = 2});
    layer.randomize(2);
    layer.router_weight().bottomRows(2).setConstant(5.0);  // null experts win for positive inputs
    moe::matrix<double> x = moe::matrix<double>::Constant(2, 4, 1.0), y(2, 4);
    x.row(1) *= -1.0;  // ... and lose for negative ones
    layer.forward(x, y);
    CHECK(y.row(0).isZero(0));
    CHECK_FALSE(y.row(1).isZero(0));
    CHECK(layer.statistics().experts_per_token[0] == 1);
    const moe::matrix<double> logits = moe::matrix<double>::Random(100, 8) * 3.0;
    CHECK(moe::testing::check_router(null_experts{.k = 3, .nulls = 2}, logits, 6, {.weight_sum = 1.0}).ok());
    CHECK_THROWS_WITH((null_experts{.nulls = 0}.validate(4)), Catch::Contains("nulls = 0"));
}
