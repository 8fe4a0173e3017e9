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
}

// The sizes reach the kernels as run-time values: with the literal sizes of the calls below propagated
// into them, GCC 12 reports loads in loops it cannot see are empty (-Warray-bounds false positives).
namespace {
moe::index opaque(moe::index v) {
    volatile moe::index copy = v;
    return copy;
}
}  // namespace

// z = x W^T against a float64 sum, and every output bitwise equal to `dot` of its two rows: the tile
// an output falls in (4 x 4, the 2- and 3-row and 1 x 16 edges, partial groups of W rows) and the
// blocks over rows and W rows never change its bits.
template <class Scalar>
void check_linear(moe::index n, moe::index m, moe::index d, moe::index pad) {
    using moe::index;
    n = opaque(n), m = opaque(m), d = opaque(d), pad = opaque(pad);
    // Strided operands: each row of x, W and z is followed by `pad` unused entries.
    std::vector<Scalar> x(static_cast<std::size_t>(n * (d + pad))), w(static_cast<std::size_t>(m * (d + pad)));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<Scalar>(std::sin(0.37 * static_cast<double>(i)));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<Scalar>(std::cos(0.11 * static_cast<double>(i)));
    const Scalar sentinel = Scalar(-12345);
    std::vector<Scalar> z(static_cast<std::size_t>(n * (m + pad)), sentinel);
    moe::kernels::linear(x.data(), d + pad, w.data(), d + pad, z.data(), m + pad, n, m, d);
    int wrong_bits = 0, wrong_value = 0, touched_padding = 0;
    for (index r = 0; r < n; ++r) {
        for (index j = 0; j < m; ++j) {
            const Scalar* xr = x.data() + r * (d + pad);
            const Scalar* wj = w.data() + j * (d + pad);
            const Scalar got = z[static_cast<std::size_t>(r * (m + pad) + j)];
            double want = 0;
            for (index i = 0; i < d; ++i) want += static_cast<double>(xr[i]) * wj[i];
            wrong_bits += got != moe::kernels::dot(xr, wj, d);
            wrong_value += std::abs(got - want) > 1e-4 * (1 + std::abs(want));
        }
        for (index j = m; j < m + pad; ++j) touched_padding += z[static_cast<std::size_t>(r * (m + pad) + j)] != sentinel;
    }
    CHECK(wrong_bits == 0);
    CHECK(wrong_value == 0);
    CHECK(touched_padding == 0);
}

TEST_CASE("linear computes x W^T with every output equal to dot of its rows", "[kernels]") {
    SECTION("float") {
        check_linear<float>(1, 37, 203, 0);    // one row: 1 x 16 tiles and the edges after them
        check_linear<float>(2, 5, 64, 3);
        check_linear<float>(3, 19, 17, 1);
        check_linear<float>(11, 23, 203, 5);   // 4 x 4 tiles, a 3-row edge, partial groups of W
        check_linear<float>(70, 40, 1000, 0);  // more rows than one block of x (256 KiB / 4 kB)
        check_linear<float>(5, 90, 2000, 2);   // more W rows than one block of W (128 KiB / 8 kB)
        check_linear<float>(4, 4, 0, 0);       // d = 0: zeros
    }
    SECTION("double") {
        check_linear<double>(1, 21, 35, 0);
        check_linear<double>(9, 13, 67, 3);
    }
}

TEST_CASE("equal rows give equal bits wherever they sit", "[kernels]") {
    // Router rows that are equal tie exactly, and a token's outputs do not depend on its neighbours.
    const moe::index d = 203, m = 9;
    moe::matrix<float> x = moe::matrix<float>::Random(7, d), w = moe::matrix<float>::Random(m, d), z(7, m);
    w.row(5) = w.row(0);
    x.row(6) = x.row(1);
    moe::kernels::linear(x.data(), d, w.data(), d, z.data(), m, 7, m, d);
    CHECK((z.col(0).array() == z.col(5).array()).all());
    CHECK((z.row(1).array() == z.row(6).array()).all());
    moe::matrix<float> alone(1, m);
    moe::kernels::linear(x.row(6).data(), d, w.data(), d, alone.data(), m, 1, m, d);
    CHECK((alone.row(0).array() == z.row(6).array()).all());
}
