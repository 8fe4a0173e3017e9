#include <moe/layer.hpp>
#include <moe/routers/any_router.hpp>
#include <moe/routers/softmax_topk.hpp>
#include <moe/testing/gradient_check.hpp>

#include <catch2/catch.hpp>

#include <cmath>

namespace {
// f(z) = sum over tokens of the combine weight of the first slot of normalised softmax top-2, with
// the selection held fixed: its gradient is d/dz of p_a / (p_a + p_b), derived by hand below.
double first_weight_sum(const moe::matrix<double>& z) {
    moe::routing<double> r;
    moe::routers::softmax_topk{.k = 2, .normalize = true}.route(z, r);
    double sum = 0;
    for (moe::index t = 0; t < z.rows(); ++t) sum += r.weights[static_cast<std::size_t>(2 * t)];
    return sum;
}

struct wrong_backward : moe::routers::softmax_topk {  // forgets the normalisation in backward
    template <class Scalar>
    void backward(const moe::matrix<Scalar>&, const moe::routing<Scalar>& r, std::span<const Scalar> g,
                  moe::matrix<Scalar>& grad) const {
        moe::routers::logits_backward(r, g, false, Scalar(0), Scalar(1), grad);
    }
};
}  // namespace

TEST_CASE("gradient_check accepts a correct gradient and names the wrong element", "[testing]") {
    moe::matrix<double> z(3, 4);
    z << 2.0, 0.5, -1.0, 0.1, 0.3, 1.7, 0.9, -0.4, -0.2, 0.0, 0.8, 2.2;  // no near ties
    // w = p_a / (p_a + p_b) = sigmoid(z_a - z_b) for the chosen a (first) and b (second).
    moe::matrix<double> grad = moe::matrix<double>::Zero(3, 4);
    const int chosen[3][2] = {{0, 1}, {1, 2}, {3, 2}};
    for (int t = 0; t < 3; ++t) {
        const double s = 1 / (1 + std::exp(-(z(t, chosen[t][0]) - z(t, chosen[t][1]))));
        grad(t, chosen[t][0]) = s * (1 - s);
        grad(t, chosen[t][1]) = -s * (1 - s);
    }
    CHECK(moe::testing::gradient_check(first_weight_sum, z, grad).ok());
    grad(1, 2) += 0.01;
    const auto wrong = moe::testing::gradient_check(first_weight_sum, z, grad);
    CHECK_FALSE(wrong.ok());
    CHECK_THAT(wrong.str(), Catch::Contains("row 1, column 2"));
    CHECK(wrong.failures.size() == 1);
    CHECK(z(1, 2) == 0.9);  // restored
    CHECK_FALSE(moe::testing::gradient_check(first_weight_sum, z, moe::matrix<double>::Zero(2, 4)).ok());
}

TEST_CASE("every built-in router's backward agrees with finite differences, alone and in a layer",
          "[testing][routers][backward]") {
    namespace r = moe::routers;
    const moe::index experts = 6;
    const std::pair<const char*, r::any_router> routers[] = {
        {"softmax_topk", r::softmax_topk{.k = 2, .normalize = true, .scale = 1.5}},
        {"softmax_topk raw", r::softmax_topk{.k = 3}},
        {"sigmoid_topk", r::sigmoid_topk{.k = 2, .normalize = true, .scale = 2.5, .n_group = 3, .topk_group = 2}},
        {"capacity position", r::capacity<r::softmax_topk>{.inner = {.k = 2, .normalize = true}, .capacity_factor = 0.7}},
        {"capacity probs sigmoid",
         r::capacity<r::sigmoid_topk>{.inner = {.k = 2, .n_group = 1}, .capacity_factor = 0.7, .policy = r::drop_policy::probs}},
        {"top_p", r::top_p{.threshold = 0.5, .max_k = 4, .normalize = true}},
        {"top_p raw", r::top_p{.threshold = 0.7, .max_k = 3}},
        {"null_experts", r::null_experts{.k = 3, .nulls = 2, .normalize = true}},
        {"sinkhorn softmax gates", r::sinkhorn{.k = 2, .iterations = 4}},
        {"sinkhorn inference", r::sinkhorn{.k = 2, .inference_topk = true}},
        {"expert_choice", r::expert_choice{.capacity_factor = 1.5}},
    };
    for (const auto& [name, router] : routers) {
        INFO(name);
        const moe::matrix<double> logits = moe::matrix<double>::Random(12, router.logit_rows(experts)) * 2.0;
        const auto alone = moe::testing::router_gradient_check(router, logits, experts, 3);
        INFO(alone.str());
        CHECK(alone.ok());
        moe::layer<double, r::any_router, moe::experts::swiglu, moe::shared_experts::none, moe::losses::load_balance,
                   moe::losses::z_loss>
            layer({.d_model = 5, .d_ff = 4, .n_experts = experts}, router, {}, {}, {{.alpha = 0.4}, {.beta = 0.3}});
        layer.randomize(11);
        const auto whole = moe::testing::layer_gradient_check(layer, moe::matrix<double>::Random(12, 5), 5);
        INFO(whole.str());
        CHECK(whole.ok());
    }
}

TEST_CASE("router_gradient_check catches a wrong backward", "[testing][backward]") {
    const moe::matrix<double> logits = moe::matrix<double>::Random(8, 5);
    CHECK(moe::testing::router_gradient_check(moe::routers::softmax_topk{.k = 2, .normalize = true}, logits, 5).ok());
    const auto rep = moe::testing::router_gradient_check(wrong_backward{{.k = 2, .normalize = true}}, logits, 5);
    CHECK(!rep.ok());
    CHECK(rep.str().find("analytic") != std::string::npos);
}
