#include <moe/kernels/multiply.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

// The sizes reach the kernels as run-time values: with the literal sizes of the calls below propagated
// into them, GCC 12 reports loads in loops it cannot see are empty (-Warray-bounds false positives).
moe::index opaque(moe::index v) {
    volatile moe::index copy = v;
    return copy;
}

// One term of an output's sum as the kernel forms it: fused on the AVX2 and AVX-512 families (float),
// and on the portable one where the build's own vectors have FMA.
template <class Scalar>
Scalar multiply_add(Scalar a, Scalar b, Scalar c) {
#if defined(__FMA__) || defined(__aarch64__)
    constexpr bool portable_fused = true;
#else
    constexpr bool portable_fused = false;
#endif
    if (portable_fused || (std::is_same_v<Scalar, float> && moe::kernels::active_isa() != moe::kernels::isa::portable))
        return std::fma(a, b, c);
    volatile Scalar product = a * b;  // not contracted into an FMA by the compiler
    return product + c;
}

// c = a b (or c += a b) with a taken as given or transposed from its storage, against outputs summed
// one term at a time in k order (the kernel's order, so bitwise equal) and against a float64 sum.
template <class Scalar>
void check_multiply(moe::index n, moe::index m, moe::index k, bool transposed, bool accumulate) {
    using moe::index;
    n = opaque(n), m = opaque(m), k = opaque(k);
    const index pad = 3;  // unused entries after each row of b and c
    std::vector<Scalar> a_store(static_cast<std::size_t>(n * k)), b(static_cast<std::size_t>(k * (m + pad)));
    for (std::size_t i = 0; i < a_store.size(); ++i) a_store[i] = static_cast<Scalar>(std::sin(0.37 * static_cast<double>(i)));
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<Scalar>(std::cos(0.11 * static_cast<double>(i)));
    // a (n x k) is stored row-major, or as its transpose (k x n row-major).
    const moe::kernels::strided<Scalar> a = transposed ? moe::kernels::strided<Scalar>{a_store.data(), 1, n}
                                                       : moe::kernels::strided<Scalar>{a_store.data(), k, 1};
    const Scalar sentinel = Scalar(-12345);
    std::vector<Scalar> c(static_cast<std::size_t>(n * (m + pad)), sentinel), start(c.size());
    for (index r = 0; r < n; ++r)
        for (index j = 0; j < m; ++j) c[static_cast<std::size_t>(r * (m + pad) + j)] = static_cast<Scalar>(0.01 * (r - j));
    start = c;
    moe::kernels::multiply(a, b.data(), m + pad, c.data(), m + pad, n, m, k, accumulate);
    int wrong_bits = 0, wrong_value = 0, touched_padding = 0;
    for (index r = 0; r < n; ++r) {
        for (index j = 0; j < m; ++j) {
            const std::size_t at = static_cast<std::size_t>(r * (m + pad) + j);
            Scalar sum = accumulate ? start[at] : Scalar(0);
            double want = sum;
            for (index i = 0; i < k; ++i) {
                const Scalar bij = b[static_cast<std::size_t>(i * (m + pad) + j)];
                sum = multiply_add(a(r, i), bij, sum);
                want += static_cast<double>(a(r, i)) * bij;
            }
            wrong_bits += c[at] != sum;
            wrong_value += std::abs(c[at] - want) > 1e-4 * (1 + std::abs(want));
        }
        for (index j = m; j < m + pad; ++j) touched_padding += c[static_cast<std::size_t>(r * (m + pad) + j)] != sentinel;
    }
    CHECK(wrong_bits == 0);
    CHECK(wrong_value == 0);
    CHECK(touched_padding == 0);
}

}  // namespace

TEST_CASE("multiply computes a b term by term in k order", "[kernels]") {
    for (const bool transposed : {false, true}) {
        for (const bool accumulate : {false, true}) {
            CAPTURE(transposed, accumulate);
            check_multiply<float>(8, 64, 40, transposed, accumulate);    // whole tiles and panels
            // Edge rows and columns over several k-blocks (32 KiB panels: 256 to 1024 rows by family).
            check_multiply<float>(19, 37, 2100, transposed, accumulate);
            check_multiply<float>(1, 5, 129, transposed, accumulate);    // one row, a partial panel only
            check_multiply<float>(3, 7, 0, transposed, accumulate);      // k = 0: c = 0, or c unchanged
            check_multiply<double>(11, 21, 1100, transposed, accumulate);
        }
    }
}
