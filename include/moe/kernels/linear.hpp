#pragma once
/// \file
/// Products z = x W^T computed one (row, output) dot product at a time, with a summation order
/// that depends only on d. A GEMM would be faster for wide routers, but its summation order depends on
/// a column's position in the register tile, so identical router rows could give different logits
/// and a token's logits could change with the batch around it; with this kernel equal inputs give
/// bitwise equal logits, ties are real ties, and routing of a token never depends on its neighbours.
/// The expert FFNs use the same kernel for blocks of a few rows (decoding), where a GEMM would spend
/// its time packing weights it then uses once.

#include "moe/types.hpp"

#include <xsimd/xsimd.hpp>

namespace moe::kernels {

/// sum_i a[i] * b[i] in a fixed order: one SIMD accumulator over the body, a horizontal sum, then the
/// scalar tail. `linear_rows` computes exactly this for every output, so equal inputs give equal bits.
template <class Scalar>
Scalar dot(const Scalar* a, const Scalar* b, index n) {
    using batch = xsimd::batch<Scalar>;
    constexpr index w = static_cast<index>(batch::size);
    batch acc(Scalar(0));
    index i = 0;
    for (; i + w <= n; i += w) acc = xsimd::fma(batch::load_unaligned(a + i), batch::load_unaligned(b + i), acc);
    Scalar sum = xsimd::hadd(acc);
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

/// z = x W^T: z (T x E), x (T x d), w (E x d), all row-major. Four rows of W are read together for
/// all T rows of x (which stay in cache), so for a few rows this streams W at memory speed with no
/// packing, and the four independent accumulators hide the FMA latency. Every output equals
/// `dot(x_t, w_e)` bit for bit.
template <class Scalar>
void linear_rows(const Scalar* x, const Scalar* w, Scalar* z, index tokens, index experts, index d) {
    using batch = xsimd::batch<Scalar>;
    constexpr index width = static_cast<index>(batch::size);
    const index body = d / width * width;
    index e = 0;
    for (; e + 4 <= experts; e += 4) {
        const Scalar* w0 = w + e * d;
        const Scalar *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
        for (index t = 0; t < tokens; ++t) {
            const Scalar* xt = x + t * d;
            batch a0(Scalar(0)), a1(Scalar(0)), a2(Scalar(0)), a3(Scalar(0));
            for (index i = 0; i < body; i += width) {
                const batch v = batch::load_unaligned(xt + i);
                a0 = xsimd::fma(v, batch::load_unaligned(w0 + i), a0);
                a1 = xsimd::fma(v, batch::load_unaligned(w1 + i), a1);
                a2 = xsimd::fma(v, batch::load_unaligned(w2 + i), a2);
                a3 = xsimd::fma(v, batch::load_unaligned(w3 + i), a3);
            }
            Scalar s0 = xsimd::hadd(a0), s1 = xsimd::hadd(a1), s2 = xsimd::hadd(a2), s3 = xsimd::hadd(a3);
            for (index i = body; i < d; ++i) {
                s0 += xt[i] * w0[i];
                s1 += xt[i] * w1[i];
                s2 += xt[i] * w2[i];
                s3 += xt[i] * w3[i];
            }
            Scalar* zt = z + t * experts + e;
            zt[0] = s0;
            zt[1] = s1;
            zt[2] = s2;
            zt[3] = s3;
        }
    }
    for (; e < experts; ++e)
        for (index t = 0; t < tokens; ++t) z[t * experts + e] = dot(x + t * d, w + e * d, d);
}

}  // namespace moe::kernels
