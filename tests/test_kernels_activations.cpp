#include <moe/kernels/activations.hpp>

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
