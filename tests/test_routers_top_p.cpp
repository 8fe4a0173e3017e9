#include "golden.hpp"

#include <moe/routers/top_p.hpp>
#include <moe/testing/conformance.hpp>

using moe::routers::top_p;

TEMPLATE_TEST_CASE("top_p matches the PyTorch reference", "[routers][top_p]", float, double) {
    for (const char* name : {"top_p_09", "top_p_normalize"}) {
        const golden::layer_case c(name);
        moe::layer<TestType, top_p, moe::experts::swiglu> layer(c.shape(), c.router_as<top_p>());
        c.load(layer);
        c.check(layer);
    }
}

TEST_CASE("top_p reaches the threshold unless max_k stops it, and conforms", "[routers][top_p]") {
    const moe::matrix<double> logits = moe::matrix<double>::Random(200, 8) * 3.0;
    const top_p router{.threshold = 0.7, .max_k = 3};
    top_p::state<double> st(8);
    moe::routing<double> r;
    router.route(logits, st, r);
    moe::index stopped = 0, reached = 0;
    for (moe::index t = 0; t < r.tokens; ++t) {
        double mass = 0, before_last = 0;
        const moe::index n = r.slot_count(t);
        REQUIRE(n >= 1);
        REQUIRE(n <= 3);
        for (moe::index s = r.first_slot(t); s < r.end_slot(t); ++s) {
            before_last = mass;
            mass += r.weights[static_cast<std::size_t>(s)];
        }
        if (n == 3 && mass < 0.7) ++stopped;
        else {
            CHECK(mass >= 0.7 - 1e-12);
            CHECK((n == 1 || before_last < 0.7));  // the shortest such prefix
            ++reached;
        }
    }
    CHECK(stopped > 0);
    CHECK(reached > 0);
    CHECK(moe::testing::check_router(router, logits, 8).ok());
    CHECK(moe::testing::check_router(top_p{.threshold = 0.5, .max_k = 4, .normalize = true}, logits, 8, {.weight_sum = 1.0}).ok());
    CHECK_THROWS_WITH((top_p{.threshold = 1.5}.validate(8)), Catch::Contains("threshold = 1.5"));
    CHECK_THROWS_WITH((top_p{.max_k = 9}.validate(8)), Catch::Contains("max_k = 9"));
}
