#include "golden.hpp"

#include <moe/routers/capacity.hpp>

using moe::routers::capacity;
using moe::routers::drop_policy;
using moe::routers::sigmoid_topk;
using moe::routers::softmax_topk;

TEMPLATE_TEST_CASE("capacity drops match the PyTorch reference", "[routers][capacity]", float, double) {
    for (const char* name : {"capacity_position", "capacity_probs"}) {
        const golden::layer_case c(name);
        moe::layer<TestType, capacity<softmax_topk>, moe::experts::swiglu> layer(c.shape(), c.router_as<capacity<softmax_topk>>());
        c.load(layer);
        c.check(layer);
        CHECK(layer.statistics().dropped > 0);
    }
    const golden::layer_case c("capacity_sigmoid_probs");
    moe::layer<TestType, capacity<sigmoid_topk>, moe::experts::swiglu> layer(c.shape(), c.router_as<capacity<sigmoid_topk>>());
    c.load(layer);
    c.check(layer);
    CHECK(layer.statistics().dropped > 0);
}

TEST_CASE("capacity caps every expert at C and keeps the rest", "[routers][capacity]") {
    const moe::matrix<double> logits = moe::matrix<double>::Random(40, 4) * 3.0;
    for (auto policy : {drop_policy::position, drop_policy::probs}) {
        const capacity<softmax_topk> router{.inner = {.k = 2}, .capacity_factor = 0.5, .policy = policy};
        capacity<softmax_topk>::state<double> st(4);
        moe::routing<double> r, unlimited;
        router.route(logits, st, r);
        router.inner.route(logits, unlimited);
        const moe::index cap = router.expert_capacity(80, 4);
        CHECK(cap == 10);
        r.build_dispatch();
        for (moe::index e = 0; e < 4; ++e) CHECK(r.expert_offsets[e + 1] - r.expert_offsets[e] <= cap);
        for (std::size_t s = 0; s < r.expert_ids.size(); ++s) {
            if (r.expert_ids[s] == moe::dropped_slot) {
                CHECK(r.weights[s] == 0);
            } else {  // kept slots are untouched (no renormalisation)
                CHECK(r.expert_ids[s] == unlimited.expert_ids[s]);
                CHECK(r.weights[s] == unlimited.weights[s]);
            }
        }
    }
    CHECK(capacity<softmax_topk>::batch_dependent);
}

TEST_CASE("capacity keeps the pre-drop counts and survives NaN weights", "[routers][capacity]") {
    moe::matrix<double> logits = moe::matrix<double>::Random(20, 4);
    logits.col(0).array() += 5.0;
    const capacity<softmax_topk> router{.inner = {.k = 1}, .capacity_factor = 1.0, .policy = drop_policy::probs};
    capacity<softmax_topk>::state<double> st(4);
    moe::routing<double> r;
    router.route(logits, st, r);
    r.build_dispatch();
    CHECK(r.chosen_count(0) == 20);  // every token chose expert 0 ...
    CHECK(r.expert_offsets[1] == 5);  // ... which keeps C = 5
    logits(3, 0) = std::numeric_limits<double>::quiet_NaN();
    router.route(logits, st, r);
    r.build_dispatch();
    CHECK(r.rows() <= 20);
}

TEST_CASE("capacity rejects a factor that is not positive and finite", "[routers][capacity]") {
    CHECK_THROWS_WITH((capacity<softmax_topk>{.capacity_factor = 0}.validate(4)), Catch::Contains("capacity_factor"));
    CHECK_THROWS_AS((capacity<softmax_topk>{.capacity_factor = -1}.validate(4)), moe::value_error);
    CHECK_THROWS_AS((capacity<softmax_topk>{.inner = {.k = 9}}.validate(4)), moe::value_error);
}
