#include <moe/routers/gates.hpp>
#include <moe/testing/gradient_check.hpp>

#include <catch2/catch.hpp>

#include <cmath>

namespace {
// Fixed slots: token t chose experts {t % 5, (t + 2) % 5} and a dropped slot. L = sum_s g_s w_s with
// w = scale * s[chosen] / (eps + sum of the chosen s) and s = softmax(z) or sigmoid(z), written out here.
moe::routing<double> fixed_routing(const moe::matrix<double>& z, moe::score_function f) {
    moe::routing<double> r;
    r.reset_fixed_k(z.rows(), z.cols(), 3);
    r.score = f;
    r.scores.resize(z.rows(), z.cols());
    for (moe::index t = 0; t < z.rows(); ++t) {
        if (f == moe::score_function::softmax)
            r.scores.row(t) = z.row(t).array().exp() / z.row(t).array().exp().sum();
        else
            r.scores.row(t) = 1 / (1 + (-z.row(t).array()).exp());
        const std::int32_t ids[3] = {static_cast<std::int32_t>(t % 5), static_cast<std::int32_t>((t + 2) % 5),
                                     moe::dropped_slot};
        for (int j = 0; j < 3; ++j) r.expert_ids[static_cast<std::size_t>(3 * t + j)] = ids[j];
    }
    return r;
}
}  // namespace

TEST_CASE("logits_backward matches finite differences for softmax and sigmoid scores", "[routers][backward]") {
    const moe::matrix<double> z0 = moe::matrix<double>::Random(6, 5) * 2.0;
    const std::vector<double> g = {0.3, -1.2, 5.0, 0.7, 0.1, -2.0, -0.4, 0.9, 1.0, 1.5, -0.6, 3.0, 0.2, 0.8, -1.0, 0.5, 2.0, 0.0};
    for (const auto f : {moe::score_function::softmax, moe::score_function::sigmoid})
        for (const bool normalize : {false, true}) {
            INFO("sigmoid " << (f == moe::score_function::sigmoid) << ", normalize " << normalize);
            const double eps = 1e-3, scale = 1.5;
            const auto loss = [&](const moe::matrix<double>& z) {
                const auto r = fixed_routing(z, f);
                double l = 0;
                for (moe::index t = 0; t < z.rows(); ++t) {
                    const double a = r.scores(t, t % 5), b = r.scores(t, (t + 2) % 5);
                    const double denom = normalize ? eps + a + b : 1.0;
                    l += g[static_cast<std::size_t>(3 * t)] * scale * a / denom +
                         g[static_cast<std::size_t>(3 * t + 1)] * scale * b / denom;
                }
                return l;
            };
            const auto r = fixed_routing(z0, f);
            moe::matrix<double> grad(z0.rows(), z0.cols());
            moe::routers::logits_backward(r, std::span<const double>(g), normalize, eps, scale, grad);
            moe::matrix<double> z = z0;
            const auto rep = moe::testing::gradient_check(loss, z, grad);
            INFO(rep.str());
            CHECK(rep.ok());
        }
}
