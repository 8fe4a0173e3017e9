#pragma once
/// \file
/// z = x W^T with W stored [out_features, in_features] as checkpoints store it, computed as dot
/// products along the rows of x and W: both are read contiguously, so nothing is packed and nothing is
/// allocated, and the summation order of an output depends only on the length d (one SIMD accumulator
/// over the body, a horizontal sum, then the scalar tail). Equal inputs therefore give bitwise equal
/// outputs wherever they sit in the block: identical router rows give exactly tied logits, a token's
/// logits do not change with the batch around it, and an expert's output for a row does not depend on
/// which other rows it was computed with.
///
/// The register tile is up to 4 rows of x times 4 rows of W (16 accumulators; 8 loads per 16 FMAs);
/// on AVX-512 the 16 sums of a tile are reduced together by shuffles (`detail::horizontal_sums`), in a
/// tree that is the same for every output (and the same for `dot`). Rows of x are taken in blocks that stay in L2 while every W row passes
/// once, so W streams from memory once per block: for a few rows (decoding) this reads the weights at
/// memory speed, for many it is a compute-bound GEMM.

#include "moe/types.hpp"

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <type_traits>

namespace moe::kernels {

namespace detail {

/// Keeps a loaded vector in a register: without it GCC 12 folds the loads of a tile into its FMAs'
/// memory operands and loads every vector four times (half the FMA rate).
template <class Batch>
inline void in_register([[maybe_unused]] Batch& b) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    asm("" : "+v"(b.data));
#endif
}

/// a * b + c rounded once where the target has FMA. xsimd 8.1 has no AVX-512 `fma` and computes
/// a * b + c there, which GCC fuses only at -O2 and above with contraction allowed (its gnu++ default,
/// not -std=c++20): the kernels would be half as fast and round differently with other flags. So
/// AVX-512 is fused here; xsimd's FMA3 and NEON kernels fuse the other targets.
template <class Batch>
inline Batch fused_multiply_add(const Batch& a, const Batch& b, const Batch& c) {
#if defined(__AVX512F__)
    using value = typename Batch::value_type;
    if constexpr (std::is_same_v<value, float> && Batch::size == 16)
        return _mm512_fmadd_ps(a.data, b.data, c.data);
    else if constexpr (std::is_same_v<value, double> && Batch::size == 8)
        return _mm512_fmadd_pd(a.data, b.data, c.data);
    else
#endif
        return xsimd::fma(a, b, c);
}

/// sums[i] = the sum of the lanes of acc[i], in a tree that is the same for every i (so an output's
/// bits do not depend on its place in a tile). With AVX-512 float, 16 sums are formed together by
/// shuffles: per 128-bit block (x0 + x2) + (x1 + x3), then (B0 + B1) + (B2 + B3) over the blocks.
/// (xsimd 8.1's `haddp` would do this but returns the sums in permuted lanes on AVX-512.) Elsewhere
/// each sum is `xsimd::hadd`.
template <int N, class Batch, class Scalar>
inline void horizontal_sums(const Batch* acc, Scalar* sums) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<Scalar, float> && Batch::size == 16) {
        for (int g = 0; g < N; g += 16) {
            // Inputs 4q+1 and 4q+2 swapped, so that the sums come out in order (see below).
            __m512 in[16];
            for (int i = 0; i < 16; ++i) {
                const int from = g + ((i & 3) == 1 ? i + 1 : (i & 3) == 2 ? i - 1 : i);
                in[i] = from < N ? acc[from].data : _mm512_setzero_ps();
            }
            // Per block: v_p = [a0+a2, b0+b2, a1+a3, b1+b3] of a = in[2p], b = in[2p+1] ...
            __m512 v[8];
            for (int p = 0; p < 8; ++p)
                v[p] = _mm512_add_ps(_mm512_unpacklo_ps(in[2 * p], in[2 * p + 1]), _mm512_unpackhi_ps(in[2 * p], in[2 * p + 1]));
            // ... u_q = the block sums of in[4q], in[4q+2], in[4q+1], in[4q+3] (so, of the swapped
            // inputs, outputs 4q..4q+3 in order) ...
            __m512 u[4];
            for (int q = 0; q < 4; ++q)
                u[q] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * q], v[2 * q + 1]), _mm512_unpackhi_ps(v[2 * q], v[2 * q + 1]));
            // ... then (B0 + B1) + (B2 + B3) across the blocks, block q of the result from u_q.
            const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                             _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
            const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                             _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
            const __m512 all = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                             _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
            alignas(64) float out[16];
            _mm512_store_ps(out, all);
            for (int i = 0; i < 16 && g + i < N; ++i) sums[g + i] = out[i];
        }
        return;
    }
#endif
    for (int i = 0; i < N; ++i) sums[i] = xsimd::hadd(acc[i]);
}

/// One register tile: z[r][j] = dot(x_r, w_j) for R rows of x and J rows of W.
template <int R, int J, class Scalar>
void linear_tile(const Scalar* x, index ldx, const Scalar* w, index ldw, Scalar* z, index ldz, index d) {
    using batch = xsimd::batch<Scalar>;
    constexpr int width = static_cast<int>(batch::size);
    const index body = d / width * width;
    batch acc[R * J];
    for (int i = 0; i < R * J; ++i) acc[i] = batch(Scalar(0));
    for (index i = 0; i < body; i += width) {
        batch wv[J];
        for (int j = 0; j < J; ++j) {
            wv[j] = batch::load_unaligned(w + j * ldw + i);
            in_register(wv[j]);
        }
        for (int r = 0; r < R; ++r) {
            batch xv = batch::load_unaligned(x + r * ldx + i);
            in_register(xv);
            for (int j = 0; j < J; ++j) acc[r * J + j] = fused_multiply_add(xv, wv[j], acc[r * J + j]);
        }
    }
    Scalar sums[R * J];
    horizontal_sums<R * J>(acc, sums);
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) {
            Scalar s = sums[r * J + j];
            for (index i = body; i < d; ++i) s += x[r * ldx + i] * w[j * ldw + i];
            z[r * ldz + j] = s;
        }
}

/// `linear_tile<R, J>` for J = 1 to 4 rows of W chosen at run time (the edge of a block).
template <int R, class Scalar>
void linear_edge(index j, const Scalar* x, index ldx, const Scalar* w, index ldw, Scalar* z, index ldz, index d) {
    switch (j) {
        case 1: return linear_tile<R, 1>(x, ldx, w, ldw, z, ldz, d);
        case 2: return linear_tile<R, 2>(x, ldx, w, ldw, z, ldz, d);
        case 3: return linear_tile<R, 3>(x, ldx, w, ldw, z, ldz, d);
        default: return linear_tile<R, 4>(x, ldx, w, ldw, z, ldz, d);
    }
}

/// Rows [r0, r1) of x against rows [j0, j1) of W: 4 x 4 tiles, the W rows of a tile staying in L1 while
/// the x rows pass; leftover rows of x in tiles of 2 or 3 rows, a single one in 1 x 16 tiles (a row
/// against W streams W: more rows of W per tile hide the loads' latency).
template <class Scalar>
void linear_block(const Scalar* x, index ldx, const Scalar* w, index ldw, Scalar* z, index ldz, index r0, index r1,
                  index j0, index j1, index d) {
    const index full = r0 + (r1 - r0) / 4 * 4;
    for (index j = j0; j < j1; j += 4) {
        const index jn = std::min<index>(4, j1 - j);
        const Scalar* wj = w + j * ldw;
        for (index r = r0; r < full; r += 4) {
            if (jn == 4)
                linear_tile<4, 4>(x + r * ldx, ldx, wj, ldw, z + r * ldz + j, ldz, d);
            else
                linear_edge<4>(jn, x + r * ldx, ldx, wj, ldw, z + r * ldz + j, ldz, d);
        }
        if (r1 - full == 2) linear_edge<2>(jn, x + full * ldx, ldx, wj, ldw, z + full * ldz + j, ldz, d);
        if (r1 - full == 3) linear_edge<3>(jn, x + full * ldx, ldx, wj, ldw, z + full * ldz + j, ldz, d);
    }
    if (r1 - full == 1) {
        const Scalar* xr = x + full * ldx;
        Scalar* zr = z + full * ldz;
        index j = j0;
        for (; j + 16 <= j1; j += 16) linear_tile<1, 16>(xr, ldx, w + j * ldw, ldw, zr + j, ldz, d);
        for (; j < j1; j += 4) linear_edge<1>(std::min<index>(4, j1 - j), xr, ldx, w + j * ldw, ldw, zr + j, ldz, d);
    }
}

}  // namespace detail

/// sum_i a[i] * b[i] in a fixed order: one SIMD accumulator over the body, its horizontal sum
/// (`detail::horizontal_sums`), then the scalar tail. `linear` computes exactly this for every output,
/// so equal inputs give equal bits.
template <class Scalar>
Scalar dot(const Scalar* a, const Scalar* b, index n) {
    Scalar z;
    detail::linear_tile<1, 1>(a, n, b, n, &z, 1, n);
    return z;
}

/// z = x W^T: z (n x m, row stride ldz), x (n x d, row stride ldx), w (m x d, row stride ldw). Every
/// output equals `dot(x_r, w_j)` bit for bit.
template <class Scalar>
void linear(const Scalar* x, index ldx, const Scalar* w, index ldw, Scalar* z, index ldz, index n, index m, index d) {
    // Blocks of W rows (about 128 KiB) and of x rows (about 256 KiB) that stay in L2 together: W
    // passes from memory once, each block of x once per block of W.
    const auto rows_in = [&](index bytes, index multiple) {
        return std::max(multiple, bytes / static_cast<index>(sizeof(Scalar)) / std::max<index>(d, 1) / multiple * multiple);
    };
    const index w_block = rows_in(128 * 1024, 16), x_block = rows_in(256 * 1024, 4);
    for (index j0 = 0; j0 < m; j0 += w_block)
        for (index r0 = 0; r0 < n; r0 += x_block)
            detail::linear_block(x, ldx, w, ldw, z, ldz, r0, std::min(n, r0 + x_block), j0, std::min(m, j0 + w_block), d);
}

}  // namespace moe::kernels
