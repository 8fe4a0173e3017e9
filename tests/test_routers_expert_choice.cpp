#include "golden.hpp"

#include <moe/routers/expert_choice.hpp>
#include <moe/testing/conformance.hpp>

using moe::routers::expert_choice;

TEMPLATE_TEST_CASE("expert choice matches the PyTorch reference", "[routers][expert_choice]", float, double) {
    for (const char* name : {"expert_choice", "expert_choice_t1"}) {
        const golden::layer_case c(name);
        moe::layer<TestType, expert_choice, moe::experts::swiglu> layer(c.shape(), c.router_as<expert_choice>());
        c.load(layer);
        c.check(layer);
    }
    const golden::layer_case c("expert_choice_cf2");
    moe::expert_choice_layer<TestType> layer(c.shape(), c.router_as<expert_choice>(), {moe::activation::relu});
    c.load(layer);
    c.check(layer);
}

TEST_CASE("expert choice fills every bucket with exactly C tokens", "[routers][expert_choice]") {
    const moe::matrix<double> logits = moe::matrix<double>::Random(30, 4) * 3.0;
    const expert_choice router{.capacity_factor = 1.5};
    CHECK(router.bucket_size(30, 4) == 12);
    CHECK(router.bucket_size(1, 4) == 1);
    CHECK(expert_choice{.capacity_factor = 9}.bucket_size(30, 4) == 30);  // at most T
    const auto report = moe::testing::check_router(router, logits, 4, {.rows_per_expert = 12});
    INFO(report.str());
    CHECK(report.ok());
    CHECK(expert_choice::batch_dependent);
    CHECK_THROWS_WITH((expert_choice{.capacity_factor = 0}.validate(4)), Catch::Contains("capacity_factor"));
}

TEST_CASE("a batch-dependent router lets other tokens change a token's output", "[routers][expert_choice][batch]") {
    // With top-k, token 0's output is the same whatever the other tokens are; with expert choice the
    // other tokens compete for the experts' buckets and can push token 0 out.
    moe::expert_choice_layer<float> ec({.d_model = 8, .d_ff = 16, .n_experts = 4}, {.capacity_factor = 1.0});
    moe::layer<float, moe::routers::softmax_topk, moe::experts::mlp> topk({.d_model = 8, .d_ff = 16, .n_experts = 4}, {.k = 1});
    ec.randomize(4);
    topk.randomize(4);
    moe::matrix<float> a = moe::matrix<float>::Random(8, 8), b = a;
    b.bottomRows(7) = a.row(0).replicate(7, 1) * 3.0f;  // neighbours that want the same experts, more strongly
    moe::matrix<float> ya(8, 8), yb(8, 8);
    topk.forward(a, ya);
    topk.forward(b, yb);
    CHECK((ya.row(0) - yb.row(0)).cwiseAbs().maxCoeff() <= 1e-6f * std::max(1.0f, ya.row(0).cwiseAbs().maxCoeff()));
    ec.forward(a, ya);
    ec.forward(b, yb);
    CHECK((ya.row(0) - yb.row(0)).cwiseAbs().maxCoeff() > 1e-3f);
}
