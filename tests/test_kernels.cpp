#include <moe/kernels/activations.hpp>
#include <moe/kernels/linear.hpp>
#include <moe/kernels/select.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

TEST_CASE("SIMD activations equal the scalar formulas over bodies and tails", "[kernels]") {
    std::vector<float> in(37), out(37), up(37), gated(37);
    for (std::size_t i = 0; i < in.size(); ++i) {
        in[i] = -6.0f + 0.33f * static_cast<float>(i);
        up[i] = 0.1f * static_cast<float>(i) - 1.0f;
    }
    moe::kernels::activate<moe::activation::gelu>(in.data(), out.data(), 37);
    moe::kernels::gated_activate<moe::activation::silu>(in.data(), up.data(), gated.data(), 37);
    for (std::size_t i = 0; i < in.size(); ++i) {
        const double v = in[i];
        CHECK(out[i] == Approx(0.5 * v * (1 + std::erf(v / std::sqrt(2.0)))).margin(1e-6));
        CHECK(gated[i] == Approx(v / (1 + std::exp(-v)) * up[i]).margin(1e-6));
    }
    CHECK(moe::activation_name(moe::activation::relu) == "relu");
}

TEST_CASE("softmax is stable for huge logits and top_k prefers lower indices on ties", "[kernels]") {
    const double z[3] = {1000.0, 1000.0, -1000.0};
    double p[3];
    moe::kernels::softmax(z, p, 3);
    CHECK(p[0] == Approx(0.5));
    CHECK(p[2] == 0.0);
    const float score[6] = {1, 3, 3, 2, 3, 0};
    std::int32_t ids[4];
    CHECK(moe::kernels::top_k(score, 6, 4, ids) == 4);
    CHECK(std::vector<std::int32_t>(ids, ids + 4) == std::vector<std::int32_t>{1, 2, 4, 3});
    CHECK(moe::kernels::top_k(score, 6, 2, ids, [](moe::index i) { return i % 2 == 0; }) == 2);
    CHECK(std::vector<std::int32_t>(ids, ids + 2) == std::vector<std::int32_t>{2, 4});
}

TEST_CASE("dot sums in an order fixed by the length only", "[kernels]") {
    std::vector<float> a(203), b(203), shifted(204);
    for (std::size_t i = 0; i < a.size(); ++i) {
        a[i] = std::sin(static_cast<float>(i));
        b[i] = std::cos(0.5f * static_cast<float>(i));
        shifted[i + 1] = a[i];
    }
    double want = 0;
    for (std::size_t i = 0; i < a.size(); ++i) want += static_cast<double>(a[i]) * b[i];
    const float got = moe::kernels::dot(a.data(), b.data(), 203);
    CHECK(got == Approx(want).margin(1e-4));
    // The same values at another address give the same bits (no alignment peeling).
    CHECK(moe::kernels::dot(shifted.data() + 1, b.data(), 203) == got);
    moe::matrix<float> x = moe::matrix<float>::Random(3, 203), w(2, 203), z(3, 2);
    w.row(0) = x.row(1);
    w.row(1) = x.row(1);
    moe::kernels::linear_rows(x.data(), w.data(), z.data(), 3, 2, 203);
    CHECK((z.col(0).array() == z.col(1).array()).all());  // identical router rows tie exactly
}
