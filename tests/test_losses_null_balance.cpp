// moe/losses/null_balance.hpp (L4): this loss alone (every loss against PyTorch,
// and a batch routed in parts: test_losses.cpp).
#include <catch2/catch.hpp>

#include <moe/losses/null_balance.hpp>
#include <moe/routers/null_experts.hpp>
#include <moe/routers/softmax_topk.hpp>
#include <moe/testing/gradient_check.hpp>

TEST_CASE("null-aware balance without null experts is the load balance", "[losses]") {
    const moe::matrix<double> z = moe::matrix<double>::Random(7, 4);
    moe::routing<double> r;
    moe::routers::softmax_topk{.k = 2}.route(z, r);
    r.build_dispatch();
    CHECK(moe::losses::null_balance{.alpha = 0.4}.value(r, z) ==
          Approx(moe::losses::load_balance{.alpha = 0.4}.value(r, z)).epsilon(1e-12));
}

TEST_CASE("null-aware balance's gradient is the derivative of its value", "[losses][backward]") {
    const moe::matrix<double> z = moe::matrix<double>::Random(9, 8) * 2.0;
    const auto rep = moe::testing::loss_gradient_check(moe::routers::null_experts{.k = 2, .nulls = 3},
                                                       moe::losses::null_balance{.alpha = 0.6}, z, 5);
    INFO(rep.str());
    CHECK(rep.ok());
}
