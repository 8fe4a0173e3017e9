#include "golden.hpp"

#include <moe/losses/losses.hpp>

TEST_CASE("load-balance and z-loss match the PyTorch reference", "[losses]") {
    for (const char* name : {"swiglu_topk2", "capacity_position", "k_eq_e"}) {
        const golden::layer_case c(name);
        INFO(name);
        using router = moe::routers::capacity<moe::routers::softmax_topk>;
        // Cases without a capacity factor get one too large to drop anything.
        router r = c.option("capacity_factor").empty() ? router{.inner = c.softmax_router(), .capacity_factor = 1e6}
                                                       : c.with_capacity(c.softmax_router());
        moe::layer<float, router, moe::experts::swiglu, moe::shared_experts::none, moe::losses::load_balance,
                   moe::losses::z_loss>
            layer(c.shape(), r, {}, {}, {{.alpha = 1.0}, {.beta = 1.0}});
        c.load(layer);
        const auto x = golden::read_matrix(c.file, "x");
        moe::matrix<float> y(x.rows(), x.cols());
        layer.forward(x, y);
        CHECK(layer.loss_values()[0] == Approx(golden::read_matrix(c.file, "expected.load_balance")(0, 0)).epsilon(2e-5));
        CHECK(layer.loss_values()[1] == Approx(golden::read_matrix(c.file, "expected.z_loss")(0, 0)).epsilon(2e-5));
    }
}

TEST_CASE("load balance equals alpha at perfect balance, alpha*k per token", "[losses]") {
    moe::routing<double> r;
    r.reset_fixed_k(4, 4, 2);
    r.expert_ids = {0, 1, 2, 3, 0, 1, 2, 3};
    r.build_dispatch();
    const moe::matrix<double> z = moe::matrix<double>::Zero(4, 4);  // uniform probabilities
    CHECK(moe::losses::load_balance{.alpha = 0.5}.value(r, z) == Approx(0.5));
    CHECK(moe::losses::load_balance{.alpha = 0.5, .per_token = true}.value(r, z) == Approx(1.0));
    CHECK(moe::losses::z_loss{.beta = 1.0}.value(r, z) == Approx(std::log(4.0) * std::log(4.0)));
}
