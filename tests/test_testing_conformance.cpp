#include <moe/layer.hpp>
#include <moe/routers/softmax_topk.hpp>
#include <moe/testing/conformance.hpp>

#include <catch2/catch.hpp>

namespace {
// Routers that break one rule each, to show the checks catch them.
struct duplicate_ids {
    static constexpr bool batch_dependent = false;
    void validate(moe::index) const {}
    template <class Scalar>
    void route(const moe::matrix<Scalar>& logits, moe::routing<Scalar>& out) const {
        out.reset_fixed_k(logits.rows(), logits.cols(), 2);
        out.scores = logits;
        std::fill(out.expert_ids.begin(), out.expert_ids.end(), 0);
        std::fill(out.weights.begin(), out.weights.end(), Scalar(0.5));
    }
};
struct peeks_at_batch {  // claims batch independence but uses the batch size
    static constexpr bool batch_dependent = false;
    void validate(moe::index) const {}
    template <class Scalar>
    void route(const moe::matrix<Scalar>& logits, moe::routing<Scalar>& out) const {
        out.reset_fixed_k(logits.rows(), logits.cols(), 1);
        out.scores = logits;
        for (moe::index t = 0; t < logits.rows(); ++t) {
            out.expert_ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(logits.rows() % logits.cols());
            out.weights[static_cast<std::size_t>(t)] = 1;
        }
    }
};
}  // namespace

TEST_CASE("check_router accepts a conforming router and reports each broken rule", "[testing]") {
    const moe::matrix<float> logits = moe::matrix<float>::Random(10, 4);
    CHECK(moe::testing::check_router(moe::routers::softmax_topk{.k = 2, .normalize = true}, logits, 4,
                                     {.weight_sum = 1.0, .slots_per_token = 2})
              .ok());
    const auto unnormalised = moe::testing::check_router(moe::routers::softmax_topk{.k = 2}, logits, 4, {.weight_sum = 1.0});
    CHECK_FALSE(unnormalised.ok());
    CHECK_THAT(unnormalised.str(), Catch::Contains("weights sum to"));
    CHECK_THAT(moe::testing::check_router(duplicate_ids{}, logits, 4).str(), Catch::Contains("chosen twice"));
    CHECK_THAT(moe::testing::check_router(peeks_at_batch{}, logits, 4).str(), Catch::Contains("routed differently alone"));
    CHECK_THAT(moe::testing::check_router(moe::routers::softmax_topk{.k = 9}, logits, 4).str(), Catch::Contains("validate"));
    CHECK_THAT(moe::testing::check_router(moe::routers::softmax_topk{.k = 2}, logits, 4, {.rows_per_expert = 5}).str(),
               Catch::Contains("rows, expected 5"));
}

TEST_CASE("check_thread_invariance compares 1 and 2 threads", "[testing]") {
    moe::layer<float, moe::routers::softmax_topk, moe::experts::swiglu> layer({.d_model = 16, .d_ff = 8, .n_experts = 4});
    layer.randomize(9);
    const moe::matrix<float> x = moe::matrix<float>::Random(200, 16);
    CHECK(moe::testing::check_thread_invariance(layer, x).ok());
    CHECK(layer.threads() == 1);
}
