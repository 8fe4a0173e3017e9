#include "golden.hpp"

#include <moe/routers/sigmoid_topk.hpp>

using moe::routers::sigmoid_topk;

TEMPLATE_TEST_CASE("sigmoid_topk matches the PyTorch reference", "[routers][sigmoid_topk]", float, double) {
    for (const char* name : {"sigmoid_groups", "sigmoid_nogroup"}) {
        const golden::layer_case c(name);
        moe::layer<TestType, sigmoid_topk, moe::experts::swiglu> layer(c.shape(), c.router_as<sigmoid_topk>());
        c.load(layer);
        c.check(layer);
    }
}

TEST_CASE("sigmoid_topk chooses only from the best groups and weights by the unbiased score", "[routers][sigmoid_topk]") {
    // 4 experts in 2 groups; the bias lifts expert 3 but its group {2, 3} scores lower overall.
    const sigmoid_topk router{.k = 2, .normalize = false, .scale = 1.0, .n_group = 2, .topk_group = 1};
    sigmoid_topk::state<double> st(4);
    st.bias << 0, 0, 0, 0.3;
    moe::matrix<double> logits(1, 4);
    logits << 2.0, 1.5, -3.0, 0.5;  // c = s + b: 0.881, 0.818, 0.047, 0.922; groups: 1.699 vs 0.969
    moe::routing<double> r;
    router.route(logits, st, r);
    CHECK(r.expert_ids == std::vector<std::int32_t>{0, 1});
    CHECK(r.weights[0] == Approx(1 / (1 + std::exp(-2.0))));
    // Without the group limit, the biased expert 3 wins the first slot.
    const sigmoid_topk flat{.k = 2, .normalize = true, .scale = 2.5};
    flat.route(logits, st, r);
    CHECK(r.expert_ids == std::vector<std::int32_t>{3, 0});
    const double s3 = 1 / (1 + std::exp(-0.5)), s0 = 1 / (1 + std::exp(-2.0));
    CHECK(r.weights[0] == Approx(2.5 * s3 / (s3 + s0)));
}

TEST_CASE("sigmoid_topk validates its groups", "[routers][sigmoid_topk]") {
    CHECK_THROWS_WITH((sigmoid_topk{.k = 2, .n_group = 3, .topk_group = 1}.validate(8)), Catch::Contains("n_group = 3"));
    CHECK_THROWS_WITH((sigmoid_topk{.k = 2, .n_group = 4, .topk_group = 5}.validate(8)), Catch::Contains("topk_group = 5"));
    CHECK_THROWS_WITH((sigmoid_topk{.k = 5, .n_group = 4, .topk_group = 2}.validate(8)), Catch::Contains("k = 5"));
    CHECK_NOTHROW(sigmoid_topk{.k = 4, .n_group = 4, .topk_group = 2}.validate(8));
}
