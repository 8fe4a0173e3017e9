// moe/losses/load_balance.hpp (L1): this loss alone (every loss against PyTorch,
// and a batch routed in parts: test_losses.cpp).
#include <catch2/catch.hpp>

#include <moe/losses/load_balance.hpp>
#include <moe/routers/softmax_topk.hpp>
#include <moe/testing/gradient_check.hpp>

TEST_CASE("load balance equals alpha at perfect balance, alpha*k per token", "[losses]") {
    moe::routing<double> r;
    r.reset_fixed_k(4, 4, 2);
    r.expert_ids = {0, 1, 2, 3, 0, 1, 2, 3};
    r.build_dispatch();
    const moe::matrix<double> z = moe::matrix<double>::Zero(4, 4);  // uniform probabilities
    CHECK(moe::losses::load_balance{.alpha = 0.5}.value(r, z) == Approx(0.5));
    CHECK(moe::losses::load_balance{.alpha = 0.5, .per_token = true}.value(r, z) == Approx(1.0));
}

TEST_CASE("load balance's gradient is the derivative of its value", "[losses][backward]") {
    for (const bool per_token : {false, true}) {
        INFO("per_token " << per_token);
        const moe::losses::load_balance loss{.alpha = 0.7, .per_token = per_token};
        const moe::matrix<double> z = moe::matrix<double>::Random(9, 5) * 2.0;
        const auto rep = moe::testing::loss_gradient_check(moe::routers::softmax_topk{.k = 2}, loss, z, 5);
        INFO(rep.str());
        CHECK(rep.ok());
    }
}
