// moe/losses/bias_update.hpp (U1), the auxiliary-loss-free bias update.
#include <catch2/catch.hpp>

#include <moe/losses/bias_update.hpp>

TEST_CASE("bias update moves the bias of over- and under-loaded experts by gamma", "[losses]") {
    moe::routing<double> r;
    r.reset_fixed_k(3, 4, 2);
    r.expert_ids = {0, 1, 0, 2, 0, 1};  // counts 3, 2, 1, 0 (mean 1.5)
    r.build_dispatch();
    moe::losses::bias_update u(0.25);
    u.observe(r);
    u.observe(r);  // a step of two micro-batches: counts 6, 4, 2, 0 (mean 3)
    CHECK(u.counts() == std::vector<moe::index>{6, 4, 2, 0});
    moe::vector<double> bias = moe::vector<double>::Constant(4, 1.0);
    u.apply(bias);
    CHECK(bias[0] == 0.75);
    CHECK(bias[1] == 0.75);
    CHECK(bias[2] == 1.25);
    CHECK(bias[3] == 1.25);
    CHECK(u.counts().empty());
    moe::vector<double> wrong(3);
    u.observe(r);
    CHECK_THROWS_AS(u.apply(wrong), moe::shape_error);
}
