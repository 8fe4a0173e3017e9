#pragma once
/// \file
/// Router logits z = x W^T computed one (token, expert) dot product at a time, with a summation order
/// that depends only on d. A GEMM would be faster for wide routers, but its summation order depends on
/// a column's position in the register tile, so identical router rows could give different logits
/// and a token's logits could change with the batch around it; with this kernel equal inputs give
/// bitwise equal logits, ties are real ties, and routing of a token never depends on its neighbours.

#include "moe/types.hpp"

#include <xsimd/xsimd.hpp>

namespace moe::kernels {

/// sum_i a[i] * b[i] in a fixed order: four SIMD accumulators over the body, then the scalar tail.
template <class Scalar>
Scalar dot(const Scalar* a, const Scalar* b, index n) {
    using batch = xsimd::batch<Scalar>;
    constexpr index w = static_cast<index>(batch::size);
    batch acc0(Scalar(0)), acc1(Scalar(0)), acc2(Scalar(0)), acc3(Scalar(0));
    index i = 0;
    for (; i + 4 * w <= n; i += 4 * w) {
        acc0 = xsimd::fma(batch::load_unaligned(a + i), batch::load_unaligned(b + i), acc0);
        acc1 = xsimd::fma(batch::load_unaligned(a + i + w), batch::load_unaligned(b + i + w), acc1);
        acc2 = xsimd::fma(batch::load_unaligned(a + i + 2 * w), batch::load_unaligned(b + i + 2 * w), acc2);
        acc3 = xsimd::fma(batch::load_unaligned(a + i + 3 * w), batch::load_unaligned(b + i + 3 * w), acc3);
    }
    for (; i + w <= n; i += w) acc0 = xsimd::fma(batch::load_unaligned(a + i), batch::load_unaligned(b + i), acc0);
    Scalar sum = xsimd::hadd((acc0 + acc1) + (acc2 + acc3));
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

/// z = x W^T: z (T x E), x (T x d), w (E x d), all row-major.
template <class Scalar>
void linear_rows(const Scalar* x, const Scalar* w, Scalar* z, index tokens, index experts, index d) {
    for (index t = 0; t < tokens; ++t)
        for (index e = 0; e < experts; ++e) z[t * experts + e] = dot(x + t * d, w + e * d, d);
}

}  // namespace moe::kernels
