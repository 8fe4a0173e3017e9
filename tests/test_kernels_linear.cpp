#include <moe/kernels/linear.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

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
