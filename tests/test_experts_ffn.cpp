#include <moe/experts/ffn.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

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

TEST_CASE("bf16-weight experts round each projection's input to bf16 and sum the exact products", "[experts][bf16]") {
    using X = moe::experts::bf16_weights<moe::experts::swiglu>;
    STATIC_REQUIRE(std::is_same_v<moe::weight_type_t<X, float>, moe::bf16>);
    STATIC_REQUIRE(std::is_same_v<moe::weight_type_t<moe::experts::swiglu, float>, float>);
    STATIC_REQUIRE(X::gated);
    const moe::index d = 70, ff = 45, n = 5;  // partial steps of 32 in both projections
    moe::ffn_weights<moe::bf16> w;
    w.in = moe::matrix<float>::Random(2 * ff, d).cast<moe::bf16>();
    w.out = moe::matrix<float>::Random(d, ff).cast<moe::bf16>();
    const moe::matrix<float> x = moe::matrix<float>::Random(n, d);
    moe::matrix<float> h(n, 2 * ff), a(n, ff), out(n, d);
    std::vector<moe::bf16> rounded(static_cast<std::size_t>(n * std::max(d, ff)));
    Eigen::Map<const moe::matrix<float>> xm(x.data(), n, d);
    Eigen::Map<moe::matrix<float>> hm(h.data(), n, 2 * ff), am(a.data(), n, ff), om(out.data(), n, d);
    moe::ffn_forward(X{}, w, xm, hm, am, om, rounded.data());
    // Reference in double: inputs rounded by Eigen's float -> bf16 conversion, products of the stored values.
    const auto round = [](double v) { return static_cast<double>(static_cast<float>(moe::bf16(static_cast<float>(v)))); };
    const moe::matrix<double> win = w.in.cast<float>().cast<double>(), wout = w.out.cast<float>().cast<double>();
    for (moe::index r = 0; r < n; ++r) {
        const Eigen::VectorXd xr = x.row(r).cast<double>().transpose().unaryExpr(round);
        const Eigen::VectorXd g = win.topRows(ff) * xr, u = win.bottomRows(ff) * xr;
        const Eigen::VectorXd act = g.unaryExpr([](double v) { return v / (1 + std::exp(-v)); }).cwiseProduct(u).unaryExpr(round);
        const Eigen::VectorXd want = wout * act;
        CHECK((out.row(r).cast<double>().transpose() - want).cwiseAbs().maxCoeff() <= 2e-5 * want.cwiseAbs().maxCoeff());
        // Not the float computation: without the rounding the output differs by far more.
        const Eigen::VectorXd unrounded =
            wout * (win.topRows(ff) * x.row(r).cast<double>().transpose())
                       .unaryExpr([](double v) { return v / (1 + std::exp(-v)); })
                       .cwiseProduct(win.bottomRows(ff) * x.row(r).cast<double>().transpose());
        CHECK((unrounded - want).cwiseAbs().maxCoeff() > 2e-4 * want.cwiseAbs().maxCoeff());
    }
}
