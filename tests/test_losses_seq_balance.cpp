// moe/losses/seq_balance.hpp (L3): this loss alone (every loss against PyTorch,
// and a batch routed in parts: test_losses.cpp).
#include <catch2/catch.hpp>

#include <moe/losses/seq_balance.hpp>
#include <moe/routers/sigmoid_topk.hpp>
#include <moe/routers/softmax_topk.hpp>
#include <moe/testing/gradient_check.hpp>

TEST_CASE("sequence-wise balance rejects a batch that is not whole sequences", "[losses][errors]") {
    moe::routing<double> r;
    r.reset_fixed_k(5, 4, 1);
    r.scores = moe::matrix<double>::Constant(5, 4, 0.25);
    r.build_dispatch();
    const moe::matrix<double> z = moe::matrix<double>::Zero(5, 4);
    CHECK_THROWS_WITH(moe::losses::seq_balance{.seq_len = 2}.value(r, z),
                      Catch::Contains("5 tokens") && Catch::Contains("seq_len = 2"));
    CHECK(moe::losses::seq_balance{.alpha = 1.0, .seq_len = 5}.value(r, z) == Approx(1.0));  // all on expert 0: f_0 = 4
}

TEST_CASE("sequence-wise balance's gradient is the derivative of its value, softmax and sigmoid scores",
          "[losses][backward]") {
    const moe::losses::seq_balance loss{.alpha = 0.5, .seq_len = 3};
    {
        INFO("softmax scores");
        const moe::matrix<double> z = moe::matrix<double>::Random(9, 5) * 2.0;
        const auto rep = moe::testing::loss_gradient_check(moe::routers::softmax_topk{.k = 2},
                                                           loss, z, 5);
        INFO(rep.str());
        CHECK(rep.ok());
    }
    {
        INFO("sigmoid scores");
        const moe::matrix<double> z = moe::matrix<double>::Random(9, 6) * 2.0;
        const auto rep = moe::testing::loss_gradient_check(moe::routers::sigmoid_topk{.k = 2},
                                                           loss, z, 6);
        INFO(rep.str());
        CHECK(rep.ok());
    }
}
