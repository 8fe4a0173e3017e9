#include <moe/kernels/linear.hpp>

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
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
    INFO("instruction set: " << moe::kernels::isa_name(moe::kernels::active_isa()));
    SECTION("float") {
        check_linear<float>(1, 37, 203, 0);    // one row: 1 x 16 tiles and the edges after them
        check_linear<float>(2, 5, 64, 3);
        check_linear<float>(3, 19, 17, 1);
        check_linear<float>(11, 23, 203, 5);   // 4 x 4 tiles, a 3-row edge, partial groups of W
        check_linear<float>(70, 40, 1000, 0);  // more rows than one block of x (256 KiB / 4 kB)
        check_linear<float>(35, 29, 300, 2);   // 32 rows or more: x's tiles outside W's (where J < 4), a 3-row edge
        check_linear<float>(38, 14, 203, 0);   // the same with a 2-row edge
        check_linear<float>(5, 90, 2000, 2);   // more W rows than one block of W (128 KiB / 8 kB)
        check_linear<float>(4, 4, 0, 0);       // d = 0: zeros
        // Rows over 4 KiB, summed in chunks: by blocks chunk after chunk, and for fewer rows than a
        // tile within each tile, the same bits (dot takes the second way).
        check_linear<float>(5, 7, 1024, 0);  // 4 KiB: whole
        check_linear<float>(5, 7, 1025, 1);  // just over: chunks of 576 values
        check_linear<float>(9, 21, 4096 + 203, 3);
        check_linear<float>(2, 19, 3 * 4096 + 5, 0);
    }
    SECTION("double") {
        check_linear<double>(1, 21, 35, 0);
        check_linear<double>(9, 13, 67, 3);
        check_linear<double>(6, 7, 2048 + 67, 1);
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

TEST_CASE("round_to_bf16 rounds to nearest even as Eigen's conversion does", "[kernels][bf16]") {
    // Values at, just below and just above the halfway points between bf16 neighbours, both parities,
    // and the specials.
    std::vector<float> values;
    for (const std::uint32_t base : {0x3F80'0000u, 0x3F81'0000u, 0xC049'0000u, 0x0001'0000u, 0x7F7F'0000u})
        for (const std::uint32_t low : {0x0000u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu}) values.push_back(std::bit_cast<float>(base | low));
    for (const float v : {0.0f, -0.0f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::denorm_min(), 3.14159f, -1e-30f})
        values.push_back(v);
    for (int i = 0; i < 100; ++i) values.push_back(std::sin(0.7f * static_cast<float>(i)) * std::exp2(static_cast<float>(i % 40 - 20)));
    std::vector<moe::bf16> got(values.size());
    moe::kernels::round_to_bf16(values.data(), got.data(), static_cast<moe::index>(values.size()));
    int wrong = 0;
    for (std::size_t i = 0; i < values.size(); ++i)
        wrong += Eigen::numext::bit_cast<std::uint16_t>(got[i]) != Eigen::numext::bit_cast<std::uint16_t>(moe::bf16(values[i]));
    CHECK(wrong == 0);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1); 1 + 3 * 2^-8 goes up to 1 + 2^-6.
    const float halfway[2] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f};
    moe::bf16 rounded[2];
    moe::kernels::round_to_bf16(halfway, rounded, 2);
    CHECK(static_cast<float>(rounded[0]) == 1.0f);
    CHECK(static_cast<float>(rounded[1]) == 1.0f + 0x1p-6f);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    moe::bf16 rounded_nan;
    moe::kernels::round_to_bf16(&nan, &rounded_nan, 1);
    CHECK(std::isnan(static_cast<float>(rounded_nan)));
}

// z = x W^T on bf16 by the active family (AVX-512 BF16 dot products on `avx512_bf16`, float tiles that
// widen each value elsewhere): within float32 rounding of the float64 sum of the exact products, and
// every output bitwise equal to the same output of its row computed alone.
void check_linear_bf16(moe::index n, moe::index m, moe::index d, moe::index pad) {
    using moe::index;
    n = opaque(n), m = opaque(m), d = opaque(d), pad = opaque(pad);
    std::vector<moe::bf16> x(static_cast<std::size_t>(n * (d + pad))), w(static_cast<std::size_t>(m * (d + pad)));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = moe::bf16(std::sin(0.37f * static_cast<float>(i)));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = moe::bf16(std::cos(0.11f * static_cast<float>(i)));
    std::vector<float> z(static_cast<std::size_t>(n * (m + pad)), -12345.0f);
    moe::kernels::linear(x.data(), d + pad, w.data(), d + pad, z.data(), m + pad, n, m, d);
    int wrong_bits = 0, wrong_value = 0, touched_padding = 0;
    for (index r = 0; r < n; ++r) {
        // The row alone (1 x 16 tiles and 1-row edges) against the row in the block (4 x 4 tiles, edges).
        std::vector<float> alone(static_cast<std::size_t>(m));
        moe::kernels::linear(x.data() + r * (d + pad), d + pad, w.data(), d + pad, alone.data(), m, 1, m, d);
        for (index j = 0; j < m; ++j) {
            const moe::bf16* xr = x.data() + r * (d + pad);
            const moe::bf16* wj = w.data() + j * (d + pad);
            const float got = z[static_cast<std::size_t>(r * (m + pad) + j)];
            double want = 0, magnitude = 0;
            for (index i = 0; i < d; ++i) {
                const double product = static_cast<double>(static_cast<float>(xr[i])) * static_cast<float>(wj[i]);
                want += product;
                magnitude += std::abs(product);
            }
            wrong_bits += got != alone[static_cast<std::size_t>(j)];
            wrong_value += std::abs(got - want) > 1e-6 * (1 + magnitude);
        }
        for (index j = m; j < m + pad; ++j) touched_padding += z[static_cast<std::size_t>(r * (m + pad) + j)] != -12345.0f;
    }
    CHECK(wrong_bits == 0);
    CHECK(wrong_value == 0);
    CHECK(touched_padding == 0);
}

TEST_CASE("linear on bf16 sums exact products in float32", "[kernels][bf16]") {
    INFO("instruction set: " << moe::kernels::isa_name(moe::kernels::active_isa()));
    check_linear_bf16(1, 37, 203, 0);   // one row: 1 x 16 tiles, a partial last step of 32
    check_linear_bf16(2, 5, 64, 3);
    check_linear_bf16(3, 19, 17, 1);    // d shorter than one step
    check_linear_bf16(11, 23, 203, 5);  // 4 x 4 tiles, a 3-row edge, partial groups of W
    check_linear_bf16(70, 40, 2000, 0); // more rows than one block of x (256 KiB / 4 kB)
    check_linear_bf16(34, 26, 300, 2);  // 32 rows or more: x's tiles outside W's (where J < 4), a 2-row edge
    check_linear_bf16(5, 90, 4000, 2);  // more W rows than one block of W (128 KiB / 8 kB)
    check_linear_bf16(4, 4, 0, 0);      // d = 0: zeros
    check_linear_bf16(9, 21, 8192 + 203, 3);  // rows over 16 KiB: in chunks
    // Many rows, where a family widens bf16 in its tiles (16 on avx2, 4 on the portable family):
    // widened ahead, the same bits as the row alone (widened in the tiles). Rows of 6000 are one chunk of bf16 but would be six of float;
    // 300 rows of 8395 (chunks of 2816) pass in several groups of rows.
    check_linear_bf16(16, 7, 203, 0);
    check_linear_bf16(50, 30, 6000, 1);
    check_linear_bf16(300, 20, 8192 + 203, 1);
}
