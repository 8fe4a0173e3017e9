#include <moe/concepts.hpp>
#include <moe/layer.hpp>

#include <catch2/catch.hpp>

namespace {
// A router written by a user: every token goes to expert t % E with weight 1.
struct round_robin {
    static constexpr bool batch_dependent = false;
    void validate(moe::index) const {}
    template <class Scalar>
    void route(const moe::matrix<Scalar>& logits, moe::routing<Scalar>& out) const {
        out.reset_fixed_k(logits.rows(), logits.cols(), 1);
        out.scores = logits;
        for (moe::index t = 0; t < logits.rows(); ++t) {
            out.expert_ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t % logits.cols());
            out.weights[static_cast<std::size_t>(t)] = 1;
        }
    }
};
struct missing_route {
    static constexpr bool batch_dependent = false;
    void validate(moe::index) const {}
};
}  // namespace

TEST_CASE("a user's router satisfies the concept and runs in a layer", "[concepts]") {
    STATIC_REQUIRE(moe::router<round_robin, float>);
    STATIC_REQUIRE_FALSE(moe::router<missing_route, float>);
    STATIC_REQUIRE(std::is_same_v<moe::router_state_t<round_robin, float>, moe::no_router_state>);
    moe::layer<float, round_robin, moe::experts::swiglu> layer({.d_model = 4, .d_ff = 8, .n_experts = 3});
    layer.randomize(3);
    const moe::matrix<float> x = moe::matrix<float>::Random(7, 4);
    moe::matrix<float> y(7, 4);
    layer.forward(x, y);
    CHECK(layer.statistics().load == std::vector<moe::index>{3, 2, 2});
}
