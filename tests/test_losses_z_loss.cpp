// moe/losses/z_loss.hpp (L2): this loss alone (every loss against PyTorch,
// and a batch routed in parts: test_losses.cpp).
#include <catch2/catch.hpp>

#include <moe/losses/z_loss.hpp>
#include <moe/routers/softmax_topk.hpp>
#include <moe/testing/gradient_check.hpp>

#include <cmath>

TEST_CASE("z-loss of uniform logits is beta log(E)^2", "[losses]") {
    moe::routing<double> r;
    r.reset_fixed_k(4, 4, 2);
    r.expert_ids = {0, 1, 2, 3, 0, 1, 2, 3};
    r.build_dispatch();
    const moe::matrix<double> z = moe::matrix<double>::Zero(4, 4);  // logsumexp = log 4 for every token
    CHECK(moe::losses::z_loss{.beta = 1.0}.value(r, z) == Approx(std::log(4.0) * std::log(4.0)));
}

TEST_CASE("z-loss's gradient is the derivative of its value", "[losses][backward]") {
    const moe::matrix<double> z = moe::matrix<double>::Random(9, 6) * 2.0;
    const auto rep = moe::testing::loss_gradient_check(moe::routers::softmax_topk{.k = 2},
                                                       moe::losses::z_loss{.beta = 0.3}, z, 6);
    INFO(rep.str());
    CHECK(rep.ok());
}
