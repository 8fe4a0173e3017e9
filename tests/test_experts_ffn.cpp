#include <moe/experts/ffn.hpp>

#include <catch2/catch.hpp>

#include <cmath>

namespace {
// Runs ffn_forward on one row through the Map interface the layer uses.
template <class X>
moe::matrix<double> run(const X& expert, const moe::ffn_weights<double>& w, const moe::matrix<double>& x) {
    const moe::index ff = w.out.cols();
    moe::matrix<double> h(x.rows(), w.in.rows()), a(x.rows(), ff), out(x.rows(), w.out.rows());
    Eigen::Map<const moe::matrix<double>> xm(x.data(), x.rows(), x.cols());
    Eigen::Map<moe::matrix<double>> hm(h.data(), h.rows(), h.cols()), am(a.data(), a.rows(), a.cols()),
        om(out.data(), out.rows(), out.cols());
    moe::ffn_forward(expert, w, xm, hm, am, om);
    return out;
}
}  // namespace

TEST_CASE("gated experts compute W_down (act(W_gate x) * W_up x) with fused gate/up rows", "[experts]") {
    moe::ffn_weights<double> w;
    w.in = moe::matrix<double>::Random(2 * 3, 2);  // gate rows 0..2, up rows 3..5
    w.out = moe::matrix<double>::Random(2, 3);
    const moe::matrix<double> x = moe::matrix<double>::Random(4, 2);
    const auto silu = [](double v) { return v / (1 + std::exp(-v)); };
    const auto gelu = [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); };
    for (moe::index r = 0; r < x.rows(); ++r) {
        const Eigen::VectorXd g = w.in.topRows(3) * x.row(r).transpose(), u = w.in.bottomRows(3) * x.row(r).transpose();
        const Eigen::VectorXd sw = w.out * g.unaryExpr(silu).cwiseProduct(u);
        const Eigen::VectorXd ge = w.out * g.unaryExpr(gelu).cwiseProduct(u);
        CHECK((run(moe::experts::swiglu{}, w, x).row(r).transpose() - sw).norm() < 1e-12);
        CHECK((run(moe::experts::geglu{}, w, x).row(r).transpose() - ge).norm() < 1e-12);
    }
    STATIC_REQUIRE(moe::ffn_in_rows<moe::experts::swiglu>(5) == 10);
    STATIC_REQUIRE(moe::ffn_in_rows<moe::experts::mlp>(5) == 5);
}

TEST_CASE("MLP experts apply their activation", "[experts]") {
    moe::ffn_weights<double> w;
    w.in = moe::matrix<double>::Identity(3, 3);
    w.out = moe::matrix<double>::Identity(3, 3);
    moe::matrix<double> x(1, 3);
    x << -1.0, 0.5, 2.0;
    const auto relu = run(moe::experts::mlp{moe::activation::relu}, w, x);
    CHECK(relu(0, 0) == 0.0);
    CHECK(relu(0, 2) == 2.0);
    const auto silu = run(moe::experts::mlp{moe::activation::silu}, w, x);
    CHECK(silu(0, 0) == Approx(-1.0 / (1 + std::exp(1.0))));
    STATIC_REQUIRE_FALSE(moe::expert_ffn<int>);
}
