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
