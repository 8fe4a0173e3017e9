#include "golden.hpp"

#include <moe/routers/sinkhorn.hpp>
#include <moe/testing/conformance.hpp>

using moe::routers::sinkhorn;

TEMPLATE_TEST_CASE("Sinkhorn routing matches the PyTorch reference", "[routers][sinkhorn]", float, double) {
    for (const char* name : {"sinkhorn_softmax", "sinkhorn_plan", "sinkhorn_inference"}) {
        const golden::layer_case c(name);
        moe::sbase_layer<TestType> layer(c.shape(), c.router_as<moe::routers::sinkhorn>());
        c.load(layer);
        c.check(layer);
        if (c.file.contains("expected.marginal_error")) {
            const auto s = layer.statistics();
            REQUIRE(s.sinkhorn_iterations.has_value());
            CHECK(*s.sinkhorn_iterations == c.file.read_integers("expected.iterations")[0]);
            CHECK(*s.sinkhorn_marginal_error ==
                  Approx(golden::read_matrix(c.file, "expected.marginal_error")(0, 0)).epsilon(1e-3).margin(1e-6));
        }
    }
}

TEST_CASE("Sinkhorn's expert marginals approach T/E as iterations grow", "[routers][sinkhorn]") {
    moe::matrix<double> skewed = moe::matrix<double>::Random(64, 8) * 2.0;
    skewed.col(0).array() += 2.0;  // a popular expert
    double previous = 1e9;
    for (moe::index iterations : {1, 3, 10, 30}) {
        sinkhorn::state<double> st(8);
        moe::routing<double> r;
        sinkhorn{.k = 2, .iterations = iterations}.route(skewed, st, r);
        INFO("iterations " << iterations << " error " << st.marginal_error);
        CHECK(st.marginal_error < previous);
        previous = st.marginal_error;
    }
    CHECK(previous < 1e-6);
    // The expert loads follow: balanced routing is far less imbalanced than plain top-k on the skew.
    moe::routing<double> plain;
    moe::routers::softmax_topk{.k = 2}.route(skewed, plain);
    plain.build_dispatch();
    sinkhorn::state<double> balanced_state(8);
    moe::routing<double> balanced;
    sinkhorn{.k = 2, .iterations = 30}.route(skewed, balanced_state, balanced);
    balanced.build_dispatch();
    CHECK(moe::compute_statistics(balanced).imbalance < moe::compute_statistics(plain).imbalance);
    sinkhorn::state<double> st(8);
    moe::routing<double> r;
    sinkhorn{.k = 2, .iterations = 1000, .tolerance = 1e-6}.route(skewed, st, r);
    CHECK(st.iterations_run < 1000);  // the tolerance stops it
    CHECK(moe::testing::check_router(sinkhorn{.k = 2}, skewed, 8, {.weight_sum = 1.0, .slots_per_token = 2}).ok());
    CHECK(moe::testing::check_router(sinkhorn{.k = 3, .gates = moe::routers::sinkhorn_gates::plan}, skewed, 8,
                                     {.weight_sum = 1.0}).ok());
    CHECK_THROWS_WITH((sinkhorn{.iterations = 0}.validate(8)), Catch::Contains("iterations = 0"));
    CHECK_THROWS_WITH((sinkhorn{.tolerance = -1}.validate(8)), Catch::Contains("tolerance"));
}
