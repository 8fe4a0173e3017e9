#include <moe/experts/ffn.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <span>
#include <type_traits>
#include <vector>

namespace {
// Runs ffn_forward on one row through the Map interface the layer uses.
template <class X>
moe::matrix<double> run(const X& expert, const moe::ffn_weights<moe::storages::scalar<double>>& w, const moe::matrix<double>& x) {
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
    moe::ffn_weights<moe::storages::scalar<double>> w;
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
    moe::ffn_weights<moe::storages::scalar<double>> w;
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

namespace {
// ffn_forward of bf16_weights<X> against double, step by step (each step from the implementation's own
// previous one, so that an activation on the edge between two bf16 values cannot round differently
// here): the products of the stored weights with the inputs rounded by Eigen's float -> bf16
// conversion. `act` is X's activation in double.
template <class X, class Act>
void check_bf16_expert(const X& expert, Act act) {
    const moe::experts::bf16_weights<X> bf16_expert{expert};
    const moe::index d = 70, ff = 45, n = 5, in = moe::ffn_in_rows<X>(ff);  // partial steps of 32 in both projections
    moe::ffn_weights<moe::storages::bfloat16> w;
    w.in = moe::matrix<float>::Random(in, d).cast<moe::bf16>();
    w.out = moe::matrix<float>::Random(d, ff).cast<moe::bf16>();
    const moe::matrix<float> x = moe::matrix<float>::Random(n, d);
    moe::matrix<float> h(n, in), a(n, ff), out(n, d);
    std::vector<moe::bf16> rounded(static_cast<std::size_t>(n * std::max(d, ff)));
    Eigen::Map<const moe::matrix<float>> xm(x.data(), n, d);
    Eigen::Map<moe::matrix<float>> hm(h.data(), n, in), am(a.data(), n, ff), om(out.data(), n, d);
    moe::ffn_forward(bf16_expert, w, xm, hm, am, om, std::span<moe::bf16>(rounded));
    const auto round = [](double v) { return static_cast<double>(static_cast<float>(moe::bf16(static_cast<float>(v)))); };
    const moe::matrix<double> win = w.in.cast<float>().cast<double>(), wout = w.out.cast<float>().cast<double>();
    for (moe::index r = 0; r < n; ++r) {
        const Eigen::VectorXd xr = x.row(r).cast<double>().transpose().unaryExpr(round);
        const Eigen::VectorXd hr = win * xr;
        CHECK((h.row(r).cast<double>().transpose() - hr).cwiseAbs().maxCoeff() <= 1e-5 * (1 + hr.cwiseAbs().maxCoeff()));
        const Eigen::VectorXd g = h.row(r).head(ff).cast<double>().transpose().unaryExpr(act);
        const Eigen::VectorXd activated = X::gated ? Eigen::VectorXd(g.cwiseProduct(h.row(r).tail(ff).cast<double>().transpose())) : g;
        CHECK((a.row(r).cast<double>().transpose() - activated).cwiseAbs().maxCoeff() <= 1e-5 * (1 + a.row(r).cwiseAbs().maxCoeff()));
        const Eigen::VectorXd want = wout * a.row(r).cast<double>().transpose().unaryExpr(round);
        CHECK((out.row(r).cast<double>().transpose() - want).cwiseAbs().maxCoeff() <= 1e-5 * (1 + want.cwiseAbs().maxCoeff()));
        // Not the float computation: without the rounding of the activation the output differs by far more.
        const Eigen::VectorXd unrounded = wout * a.row(r).cast<double>().transpose();
        CHECK((unrounded - want).cwiseAbs().maxCoeff() > 1e-4 * want.cwiseAbs().maxCoeff());
    }
    std::vector<moe::bf16> short_buffer(static_cast<std::size_t>(n * d - 1));
    CHECK_THROWS_AS(moe::ffn_forward(bf16_expert, w, xm, hm, am, om, std::span<moe::bf16>(short_buffer)), moe::shape_error);
}
}  // namespace

TEST_CASE("bf16-weight experts round each projection's input to bf16 and sum the exact products", "[experts][bf16]") {
    using X = moe::experts::bf16_weights<moe::experts::swiglu>;
    STATIC_REQUIRE(std::is_same_v<moe::storage_t<X, float>, moe::storages::bfloat16>);
    STATIC_REQUIRE(std::is_same_v<moe::storage_t<moe::experts::swiglu, float>, moe::storages::scalar<float>>);
    STATIC_REQUIRE(X::gated);
    SECTION("SwiGLU") { check_bf16_expert(moe::experts::swiglu{}, [](double v) { return v / (1 + std::exp(-v)); }); }
    SECTION("GeGLU") {
        check_bf16_expert(moe::experts::geglu{}, [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); });
    }
    SECTION("MLP, relu") {
        check_bf16_expert(moe::experts::mlp{moe::activation::relu}, [](double v) { return v > 0 ? v : 0.0; });
    }
}

namespace {
// x quantized to q8_0 and back (the library's quantizer, checked against ggml's formulas by
// test_kernels_quantized.cpp), in double.
Eigen::VectorXd q8_0_roundtrip(const Eigen::VectorXf& x) {
    std::vector<moe::q8_0_block> blocks(static_cast<std::size_t>(x.size() / moe::quant_block));
    moe::kernels::quantize(x.data(), x.size(), blocks.data());
    Eigen::VectorXf back(x.size());
    moe::kernels::dequantize(blocks.data(), x.size(), back.data());
    return back.cast<double>();
}

// ffn_forward of stored_as<X, S> (S quantized) against double, step by step as check_bf16_expert: each
// projection is the exact product of the dequantized weights and the input quantized to q8_0.
template <class S, class X, class Act>
void check_quantized_expert(const X& expert, Act act) {
    const moe::experts::stored_as<X, S> quantized_expert{expert};
    const moe::index d = 96, ff = 64, n = 5, in = moe::ffn_in_rows<X>(ff);
    moe::ffn_weights<S> w{typename S::matrix(in, d), typename S::matrix(d, ff)};
    const moe::matrix<float> w_in = moe::matrix<float>::Random(in, d), w_out = moe::matrix<float>::Random(d, ff);
    S::assign(w.in, 0, w_in.data(), in);
    S::assign(w.out, 0, w_out.data(), d);
    const moe::matrix<float> x = moe::matrix<float>::Random(n, d);
    moe::matrix<float> h(n, in), a(n, ff), out(n, d);
    std::vector<moe::q8_0_input> converted(static_cast<std::size_t>(n * std::max(d, ff) / moe::quant_block));
    Eigen::Map<const moe::matrix<float>> xm(x.data(), n, d);
    Eigen::Map<moe::matrix<float>> hm(h.data(), n, in), am(a.data(), n, ff), om(out.data(), n, d);
    moe::ffn_forward(quantized_expert, w, xm, hm, am, om, std::span<moe::q8_0_input>(converted));
    const moe::matrix<double> win = w.in.dequantized().template cast<double>(), wout = w.out.dequantized().template cast<double>();
    CHECK((win - w_in.cast<double>()).cwiseAbs().maxCoeff() > 1e-3);  // the weights are quantized
    for (moe::index r = 0; r < n; ++r) {
        const Eigen::VectorXd hr = win * q8_0_roundtrip(x.row(r).transpose());
        CHECK((h.row(r).cast<double>().transpose() - hr).cwiseAbs().maxCoeff() <= 1e-5 * (1 + hr.cwiseAbs().maxCoeff()));
        const Eigen::VectorXd g = h.row(r).head(ff).cast<double>().transpose().unaryExpr(act);
        const Eigen::VectorXd activated = X::gated ? Eigen::VectorXd(g.cwiseProduct(h.row(r).tail(ff).cast<double>().transpose())) : g;
        CHECK((a.row(r).cast<double>().transpose() - activated).cwiseAbs().maxCoeff() <= 1e-5 * (1 + a.row(r).cwiseAbs().maxCoeff()));
        const Eigen::VectorXd want = wout * q8_0_roundtrip(a.row(r).transpose());
        CHECK((out.row(r).cast<double>().transpose() - want).cwiseAbs().maxCoeff() <= 1e-5 * (1 + want.cwiseAbs().maxCoeff()));
        // Not the float computation: without quantizing the activation the output differs by far more.
        const Eigen::VectorXd unquantized = wout * a.row(r).cast<double>().transpose();
        CHECK((unquantized - want).cwiseAbs().maxCoeff() > 1e-4 * want.cwiseAbs().maxCoeff());
    }
    std::vector<moe::q8_0_input> short_buffer(static_cast<std::size_t>(n * d / moe::quant_block - 1));
    CHECK_THROWS_AS(moe::ffn_forward(quantized_expert, w, xm, hm, am, om, std::span<moe::q8_0_input>(short_buffer)),
                    moe::shape_error);
}

template <class S>
void check_quantized_experts() {
    check_quantized_expert<S>(moe::experts::swiglu{}, [](double v) { return v / (1 + std::exp(-v)); });
    check_quantized_expert<S>(moe::experts::mlp{moe::activation::relu}, [](double v) { return v > 0 ? v : 0.0; });
}
}  // namespace

TEST_CASE("quantized experts quantize each projection's input to q8_0 and sum the exact block products",
          "[experts][quantized]") {
    STATIC_REQUIRE(std::is_same_v<moe::storage_t<moe::experts::q8_0_weights<moe::experts::geglu>, float>, moe::storages::q8_0>);
    STATIC_REQUIRE_FALSE(moe::storages::q4_0::trainable);
    SECTION("q8_0") { check_quantized_experts<moe::storages::q8_0>(); }
    SECTION("q4_0") { check_quantized_experts<moe::storages::q4_0>(); }
    SECTION("rows of other lengths cannot be held") {
        CHECK_THROWS_WITH(moe::storages::q4_0::matrix(4, 40), Catch::Contains("a row of 40 values"));
        moe::storages::q8_0::matrix m(2, 32);
        const std::vector<float> values(64, 1.0f);
        CHECK_THROWS_AS(m.assign(1, values.data(), 2), moe::shape_error);  // rows [1, 3) of 2
    }
}
