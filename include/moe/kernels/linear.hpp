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
/// on AVX-512 the 16 sums of a tile are reduced together by shuffles (`detail::avx512_sums`), in a
/// tree that is the same for every output (and the same for `dot`). Rows of x are taken in blocks
/// that stay in L2 while every W row passes once, so W streams from memory once per block: for a few
/// rows (decoding) this reads the weights at memory speed, for many it is a compute-bound GEMM.
///
/// With bf16 operands (weights kept as checkpoints store them, x rounded by `round_to_bf16`) the
/// products are exact and the sums float32. Where the CPU has AVX-512 BF16 (asked at run time; the
/// code is built for it whatever the flags) a tile takes `vdpbf16ps` steps of 32 values (16 pairs per
/// accumulator lane), the last step masked instead of a scalar tail; like that instruction, this path
/// treats denormal inputs and sums as zero. Elsewhere the float tiles widen each bf16 exactly to float.
/// Each path keeps the properties above; the two differ in summation order (and denormals).

#include "moe/types.hpp"

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
/// Defined where the compiler can build AVX-512 (BF16) code in functions of their own whatever the
/// flags of the rest (target attributes, `__builtin_shufflevector`) and the CPU can be asked at run
/// time whether it runs it. Translation units of one program must still share their flags: an inline
/// function built with different flags in two of them is one function to the linker.
#define MOE_AVX512_BF16_DISPATCH 1
#endif

namespace moe::kernels {

namespace detail {

/// Keeps a loaded vector (an xsimd batch or a raw vector) in a register: without it GCC 12 folds the
/// loads of a tile into its FMAs' memory operands and loads every vector four times (half the FMA rate).
/// Only when optimising: unoptimised, nothing is folded, and this function is not inlined into the
/// AVX-512 functions that call it, so a 512-bit operand would be an impossible constraint on CPUs
/// built for without AVX-512 (Debug builds).
template <class Vector>
inline void in_register([[maybe_unused]] Vector& v) {
#if defined(__GNUC__) && defined(__OPTIMIZE__) && (defined(__x86_64__) || defined(__i386__))
    if constexpr (requires { v.data; })
        asm("" : "+v"(v.data));
    else
        asm("" : "+v"(v));
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

#if defined(MOE_AVX512_BF16_DISPATCH)
// Functions on AVX-512 vectors, built for AVX-512 whatever the flags.
#define MOE_AVX512F_FUNCTION __attribute__((target("avx512f"), always_inline)) inline

// The shuffles of `avx512_sums` (those of unpacklo_ps, unpackhi_ps and shuffle_f32x4 with
// _MM_SHUFFLE(2, 0, 2, 0) and (3, 1, 3, 1)) written as vector shuffles: GCC 12's intrinsics for them
// warn of an uninitialised variable in their own header wherever they are inlined.
MOE_AVX512F_FUNCTION __m512 unpack_low(__m512 a, __m512 b) {
    return __builtin_shufflevector(a, b, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29);
}
MOE_AVX512F_FUNCTION __m512 unpack_high(__m512 a, __m512 b) {
    return __builtin_shufflevector(a, b, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
}
// Blocks 0 and 2 of a, then of b.
MOE_AVX512F_FUNCTION __m512 even_blocks(__m512 a, __m512 b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
}
// Blocks 1 and 3 of a, then of b.
MOE_AVX512F_FUNCTION __m512 odd_blocks(__m512 a, __m512 b) {
    return __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}

/// sums[i] = the sum of the 16 lanes of acc[i].data (an __m512) for i < N, formed together by
/// shuffles: per 128-bit block (x0 + x2) + (x1 + x3), then (B0 + B1) + (B2 + B3) over the blocks, a
/// tree that is the same for every i (so an output's bits do not depend on its place in a tile).
/// (xsimd 8.1's `haddp` would do this but returns the sums in permuted lanes on AVX-512.)
template <int N, class Vector>
MOE_AVX512F_FUNCTION void avx512_sums(const Vector* acc, float* sums) {
    for (int g = 0; g < N; g += 16) {
        // Inputs 4q+1 and 4q+2 swapped, so that the sums come out in order (see below).
        __m512 in[16];
        for (int i = 0; i < 16; ++i) {
            const int from = g + ((i & 3) == 1 ? i + 1 : (i & 3) == 2 ? i - 1 : i);
            in[i] = from < N ? acc[from].data : _mm512_setzero_ps();
        }
        // Per block: v_p = [a0+a2, b0+b2, a1+a3, b1+b3] of a = in[2p], b = in[2p+1] ...
        __m512 v[8];
        for (int p = 0; p < 8; ++p) v[p] = unpack_low(in[2 * p], in[2 * p + 1]) + unpack_high(in[2 * p], in[2 * p + 1]);
        // ... u_q = the block sums of in[4q], in[4q+2], in[4q+1], in[4q+3] (so, of the swapped
        // inputs, outputs 4q..4q+3 in order) ...
        __m512 u[4];
        for (int q = 0; q < 4; ++q) u[q] = unpack_low(v[2 * q], v[2 * q + 1]) + unpack_high(v[2 * q], v[2 * q + 1]);
        // ... then (B0 + B1) + (B2 + B3) across the blocks, block q of the result from u_q.
        const __m512 s01 = even_blocks(u[0], u[1]) + odd_blocks(u[0], u[1]);
        const __m512 s23 = even_blocks(u[2], u[3]) + odd_blocks(u[2], u[3]);
        const __m512 all = even_blocks(s01, s23) + odd_blocks(s01, s23);
        alignas(64) float out[16];
        _mm512_store_ps(out, all);
        for (int i = 0; i < 16 && g + i < N; ++i) sums[g + i] = out[i];
    }
}
#undef MOE_AVX512F_FUNCTION
#endif

/// sums[i] = the sum of the lanes of acc[i], in a tree that is the same for every i: `avx512_sums` for
/// AVX-512 float, `xsimd::hadd` elsewhere.
template <int N, class Batch, class Scalar>
inline void horizontal_sums(const Batch* acc, Scalar* sums) {
#if defined(__AVX512F__) && defined(MOE_AVX512_BF16_DISPATCH)
    if constexpr (std::is_same_v<Scalar, float> && Batch::size == 16) {
        avx512_sums<N>(acc, sums);
        return;
    }
#endif
    for (int i = 0; i < N; ++i) sums[i] = xsimd::hadd(acc[i]);
}

/// The type a product of two `In` is summed in: float for bf16, else `In`.
template <class In>
using sum_type = std::conditional_t<std::is_same_v<In, bf16>, float, In>;

/// A vector of `Batch` from `Batch::size` values at p, bf16 widened exactly to float (its bits shifted
/// into the upper half: a loop the compiler turns into vector zero-extends and shifts).
template <class Batch, class In>
inline Batch load(const In* p) {
    if constexpr (std::is_same_v<In, typename Batch::value_type>) {
        return Batch::load_unaligned(p);
    } else {
        alignas(Batch::arch_type::alignment()) float wide[Batch::size];
        for (std::size_t k = 0; k < Batch::size; ++k)
            wide[k] = std::bit_cast<float>(std::uint32_t{Eigen::numext::bit_cast<std::uint16_t>(p[k])} << 16);
        return Batch::load_aligned(wide);
    }
}

/// One register tile: z[r][j] = dot(x_r, w_j) for R rows of x and J rows of W.
template <int R, int J, class In, class Scalar = sum_type<In>>
void linear_tile(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index d) {
    using batch = xsimd::batch<Scalar>;
    constexpr int width = static_cast<int>(batch::size);
    const index body = d / width * width;
    batch acc[R * J];
    for (int i = 0; i < R * J; ++i) acc[i] = batch(Scalar(0));
    for (index i = 0; i < body; i += width) {
        batch wv[J];
        for (int j = 0; j < J; ++j) {
            wv[j] = load<batch>(w + j * ldw + i);
            in_register(wv[j]);
        }
        for (int r = 0; r < R; ++r) {
            batch xv = load<batch>(x + r * ldx + i);
            in_register(xv);
            for (int j = 0; j < J; ++j) acc[r * J + j] = fused_multiply_add(xv, wv[j], acc[r * J + j]);
        }
    }
    Scalar sums[R * J];
    horizontal_sums<R * J>(acc, sums);
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) {
            Scalar s = sums[r * J + j];
            for (index i = body; i < d; ++i) s += static_cast<Scalar>(x[r * ldx + i]) * static_cast<Scalar>(w[j * ldw + i]);
            z[r * ldz + j] = s;
        }
}

/// Tiles of `linear_tile`: vectors of the build's instruction set (xsimd's default architecture).
struct simd_tiles {
    template <int R, int J, class In, class Scalar>
    static void tile(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index d) {
        linear_tile<R, J>(x, ldx, w, ldw, z, ldz, d);
    }
};

#if defined(MOE_AVX512_BF16_DISPATCH)
/// Tiles of bf16 dot products by AVX-512 BF16 (`vdpbf16ps`: 16 float sums of pairs of exact products
/// per step of 32 values), built for that instruction set whatever the flags; only called when the
/// CPU has it. The last partial step loads zeros past d.
struct avx512_bf16_tiles {
    template <int R, int J>
    __attribute__((target("avx512f,avx512bw,avx512bf16"))) static void tile(const bf16* x, index ldx, const bf16* w,
                                                                            index ldw, float* z, index ldz, index d) {
        struct {
            __m512 data;
        } acc[R * J];
        for (int i = 0; i < R * J; ++i) acc[i].data = _mm512_setzero_ps();
        for (index i = 0; i < d; i += 32) {
            // acc[r J + j] += the pairwise dot products of the 32 values from i of x_r and w_j.
            const __mmask32 mask = d - i >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((std::uint64_t{1} << (d - i)) - 1);
            __m512bh wv[J];
            for (int j = 0; j < J; ++j) {
                wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * ldw + i);
                in_register(wv[j]);
            }
            for (int r = 0; r < R; ++r) {
                __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * ldx + i);
                in_register(xv);
                for (int j = 0; j < J; ++j) acc[r * J + j].data = _mm512_dpbf16_ps(acc[r * J + j].data, xv, wv[j]);
            }
        }
        float sums[R * J];
        avx512_sums<R * J>(acc, sums);
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < J; ++j) z[r * ldz + j] = sums[r * J + j];
    }
};
#endif

/// `Tiles::tile<R, J>` for J = 1 to 4 rows of W chosen at run time (the edge of a block).
template <class Tiles, int R, class In, class Scalar>
void linear_edge(index j, const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index d) {
    switch (j) {
        case 1: return Tiles::template tile<R, 1>(x, ldx, w, ldw, z, ldz, d);
        case 2: return Tiles::template tile<R, 2>(x, ldx, w, ldw, z, ldz, d);
        case 3: return Tiles::template tile<R, 3>(x, ldx, w, ldw, z, ldz, d);
        default: return Tiles::template tile<R, 4>(x, ldx, w, ldw, z, ldz, d);
    }
}

/// Rows [r0, r1) of x against rows [j0, j1) of W: 4 x 4 tiles, the W rows of a tile staying in L1 while
/// the x rows pass; leftover rows of x in tiles of 2 or 3 rows, a single one in 1 x 16 tiles (a row
/// against W streams W: more rows of W per tile hide the loads' latency).
template <class Tiles, class In, class Scalar>
void linear_block(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index r0, index r1, index j0,
                  index j1, index d) {
    const index full = r0 + (r1 - r0) / 4 * 4;
    for (index j = j0; j < j1; j += 4) {
        const index jn = std::min<index>(4, j1 - j);
        const In* wj = w + j * ldw;
        for (index r = r0; r < full; r += 4) {
            if (jn == 4)
                Tiles::template tile<4, 4>(x + r * ldx, ldx, wj, ldw, z + r * ldz + j, ldz, d);
            else
                linear_edge<Tiles, 4>(jn, x + r * ldx, ldx, wj, ldw, z + r * ldz + j, ldz, d);
        }
        if (r1 - full == 2) linear_edge<Tiles, 2>(jn, x + full * ldx, ldx, wj, ldw, z + full * ldz + j, ldz, d);
        if (r1 - full == 3) linear_edge<Tiles, 3>(jn, x + full * ldx, ldx, wj, ldw, z + full * ldz + j, ldz, d);
    }
    if (r1 - full == 1) {
        const In* xr = x + full * ldx;
        Scalar* zr = z + full * ldz;
        index j = j0;
        for (; j + 16 <= j1; j += 16) Tiles::template tile<1, 16>(xr, ldx, w + j * ldw, ldw, zr + j, ldz, d);
        for (; j < j1; j += 4) linear_edge<Tiles, 1>(std::min<index>(4, j1 - j), xr, ldx, w + j * ldw, ldw, zr + j, ldz, d);
    }
}

/// `linear` by the tiles of `Tiles`. Blocks of W rows (about 128 KiB) and of x rows (about 256 KiB)
/// stay in L2 together: W passes from memory once, each block of x once per block of W.
template <class Tiles, class In, class Scalar>
void linear_with(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index n, index m, index d) {
    const auto rows_in = [&](index bytes, index multiple) {
        return std::max(multiple, bytes / static_cast<index>(sizeof(In)) / std::max<index>(d, 1) / multiple * multiple);
    };
    const index w_block = rows_in(128 * 1024, 16), x_block = rows_in(256 * 1024, 4);
    for (index j0 = 0; j0 < m; j0 += w_block)
        for (index r0 = 0; r0 < n; r0 += x_block)
            linear_block<Tiles>(x, ldx, w, ldw, z, ldz, r0, std::min(n, r0 + x_block), j0, std::min(m, j0 + w_block), d);
}

}  // namespace detail

/// sum_i a[i] * b[i] in a fixed order: one SIMD accumulator over the body, its horizontal sum
/// (`detail::horizontal_sums`), then the scalar tail. `linear` on float or double computes exactly this
/// for every output, so equal inputs give equal bits.
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
    detail::linear_with<detail::simd_tiles>(x, ldx, w, ldw, z, ldz, n, m, d);
}

/// Whether `linear` on bf16 runs on AVX-512 BF16 dot products: the CPU has them, and the environment
/// variable MOE_NO_AVX512_BF16 is unset (set, it selects the portable tiles, e.g. to test them).
inline bool avx512_bf16_dot_products() {
#if defined(MOE_AVX512_BF16_DISPATCH)
    static const bool available = [] {
        __builtin_cpu_init();  // this may run before the constructor that would call it
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512bf16") && std::getenv("MOE_NO_AVX512_BF16") == nullptr;
    }();
    return available;
#else
    return false;
#endif
}

/// z = x W^T for bf16 x and W in float32 sums (products of bf16 are exact): by AVX-512 BF16 where
/// `avx512_bf16_dot_products()`, else by float tiles that widen each value. Within one of the two, every
/// output's bits depend only on its two rows (as for float).
inline void linear(const bf16* x, index ldx, const bf16* w, index ldw, float* z, index ldz, index n, index m, index d) {
#if defined(MOE_AVX512_BF16_DISPATCH)
    if (avx512_bf16_dot_products()) return detail::linear_with<detail::avx512_bf16_tiles>(x, ldx, w, ldw, z, ldz, n, m, d);
#endif
    detail::linear_with<detail::simd_tiles>(x, ldx, w, ldw, z, ldz, n, m, d);
}

/// out[i] = to_bf16(x[i]) for i < n: the rows `linear` takes with bf16 weights.
inline void round_to_bf16(const float* x, bf16* out, index n) {
    for (index i = 0; i < n; ++i) out[i] = to_bf16(x[i]);
}

}  // namespace moe::kernels
