#include "golden.hpp"

#include <moe/routers/softmax_topk.hpp>

#include <set>

using moe::routers::softmax_topk;

TEMPLATE_TEST_CASE("softmax_topk matches the PyTorch reference", "[routers][softmax_topk]", float, double) {
    for (const char* name : {"swiglu_topk2", "swiglu_topk1_scale", "k_eq_e", "ties"}) {
        const golden::layer_case c(name);
        moe::mixtral_layer<TestType> layer(c.shape(), c.router_as<moe::routers::softmax_topk>());
        c.load(layer);
        c.check(layer);
    }
}

TEST_CASE("softmax_topk routing invariants", "[routers][softmax_topk]") {
    const moe::matrix<double> logits = moe::matrix<double>::Random(50, 6) * 4.0;
    const softmax_topk router{.k = 3, .normalize = true, .scale = 2.0};
    moe::routing<double> r;
    router.route(logits, r);
    REQUIRE(r.tokens == 50);
    REQUIRE(r.slots() == 150);
    for (moe::index t = 0; t < r.tokens; ++t) {
        std::set<int> ids;
        double sum = 0;
        for (moe::index s = r.first_slot(t); s < r.end_slot(t); ++s) {
            const auto id = r.expert_ids[static_cast<std::size_t>(s)];
            REQUIRE(id >= 0);
            REQUIRE(id < 6);
            ids.insert(id);
            sum += r.weights[static_cast<std::size_t>(s)];
            if (s > r.first_slot(t))  // selection order: descending probability
                CHECK(r.scores(t, r.expert_ids[static_cast<std::size_t>(s) - 1]) >= r.scores(t, id));
        }
        CHECK(ids.size() == 3);
        CHECK(sum == Approx(2.0).epsilon(1e-12));  // normalised, then scaled
        CHECK(r.scores.row(t).sum() == Approx(1.0).epsilon(1e-12));
    }
}

TEST_CASE("softmax_topk breaks ties by the lower expert index", "[routers][softmax_topk]") {
    moe::matrix<float> logits(1, 5);
    logits << 1, 2, 2, 0, 2;
    moe::routing<float> r;
    softmax_topk{.k = 2}.route(logits, r);
    CHECK(r.expert_ids == std::vector<std::int32_t>{1, 2});
}

TEST_CASE("softmax_topk rejects k outside [1, E]", "[routers][softmax_topk]") {
    CHECK_THROWS_AS(softmax_topk{.k = 0}.validate(4), moe::value_error);
    CHECK_THROWS_WITH(softmax_topk{.k = 5}.validate(4), Catch::Contains("k = 5"));
    CHECK_NOTHROW(softmax_topk{.k = 4}.validate(4));
}
