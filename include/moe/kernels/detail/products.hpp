#pragma once
/// \file
/// The products of `linear.hpp` and `multiply.hpp`, built once per instruction-set family (`isa.hpp`).
///
/// The tiles and blocks are written once (`products_body.hpp`) over a small vector type `vec<Scalar>`
/// (zero, broadcast, load, store, fused multiply-add, horizontal sums) and included once per family,
/// each time in a namespace of its own whose `vec` is that family's:
///
/// - `portable`: xsimd's batches for the program's own flags (float and double);
/// - `avx2` and `avx512` (x86-64, float): intrinsics, the whole namespace compiled for the family by a
///   target pragma whatever the program's flags, so that a program built for the x86-64 baseline still
///   carries them; only called when the CPU runs them.
///
/// Every header the bodies use is included before the first target region: a standard-library
/// function first seen inside one would be built for that family.

#include "moe/kernels/detail/attributes.hpp"
#include "moe/kernels/isa.hpp"
#include "moe/types.hpp"

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(MOE_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace moe::kernels {

/// A matrix operand read in place: element (i, j) at `data[i * row_stride + j * col_stride]`, so a
/// row-major matrix and its transpose are both views of the same memory.
template <class Scalar>
struct strided {
    const Scalar* data;
    index row_stride;
    index col_stride;
    [[nodiscard]] const Scalar& operator()(index i, index j) const { return data[i * row_stride + j * col_stride]; }
};

namespace detail {

/// The type a product of two `In` is summed in: float for bf16, else `In`.
template <class In>
using sum_type = std::conditional_t<std::is_same_v<In, bf16>, float, In>;

/// The bits of a bf16 as a float's upper half: its exact value.
inline float widen(bf16 v) { return std::bit_cast<float>(std::uint32_t{Eigen::numext::bit_cast<std::uint16_t>(v)} << 16); }

/// Lines of the rows of W a `linear` tile will read next, asked into L2 one per step of the tile
/// before it (so that the requests overlap its multiply-adds; a burst of them stalls when the core's
/// miss buffers fill): the first tile of a W row would otherwise wait for memory at every new page,
/// where the hardware's stream prefetchers stop (a row of 1024 floats is one page).
struct ahead {
    const char* row = nullptr;  ///< the row holding the next line
    index stride = 0;           ///< bytes from a row to the next
    index per_row = 0;          ///< lines of 64 bytes a row
    index line = 0;             ///< the next line of `row`
    index left = 0;             ///< lines still to ask for
    /// Lines of 64 bytes in a row of d values of `In`.
    template <class In>
    static index lines_per_row(index d) {
        return (d * static_cast<index>(sizeof(In)) + 63) / 64;
    }
    /// Lines [begin, end) of rows of d values of `In` from w (row stride ldw, in values).
    template <class In>
    static ahead of(const In* w, index ldw, index d, index begin, index end) {
        const index per_row = lines_per_row<In>(d);
        if (begin >= end) return {};
        return {reinterpret_cast<const char*>(w + begin / per_row * ldw), ldw * static_cast<index>(sizeof(In)), per_row,
                begin % per_row, end - begin};
    }
    MOE_ALWAYS_INLINE void one() {
        if (left == 0) return;
        __builtin_prefetch(row + line * 64, 0, 2);
        --left;
        if (++line == per_row) {
            line = 0;
            row += stride;
        }
    }
    MOE_ALWAYS_INLINE void rest() {
        while (left > 0) one();
    }
};

/// The values of a row that `linear` sums at a time: all of a row of up to 4 KiB of float or double (16
/// KiB of bf16), else equal chunks of at most 4 KiB (8 KiB of bf16; multiples of 64 values, the last
/// one shorter or equal) whose sums are added in order. The chunks depend on d only, so an output's bits
/// do not depend on its place in a block or on the rows it is computed with. A float tile's 8 rows of
/// a chunk (4 of x, 4 of W) then stay in L1: x W_out^T at the mixtral shape (rows of 2816 floats, not
/// chunked before) went from 82 to 118 GFLOP/s on AVX-512 (Emerald Rapids Xeon, 256 rows, medians of
/// 5 alternating runs). bf16 tiles that widen in registers are bound by the widening, not by L2
/// (shorter chunks ran 0.93-0.97x), and keep the longer ones.
template <class In>
index linear_chunk(index d) {
    constexpr index bytes = static_cast<index>(sizeof(In)), whole = (bytes >= 4 ? 4096 : 16384) / bytes,
                    most = (bytes >= 4 ? 4096 : 8192) / bytes;
    if (d <= whole) return std::max<index>(d, 1);
    const index chunks = (d + most - 1) / most;
    return ((d + chunks - 1) / chunks + 63) / 64 * 64;
}

/// A float scratch of the calling thread, 64-byte aligned, for at least `count` values: the widened
/// bf16 operands of `linear` (products_body.hpp's `widened_rows`: a group of x rows of at most 512
/// KiB and a block of W rows of at most 512 KiB (16 rows of 8192 floats) or 128 KiB: 1 MiB at most).
/// Allocated at its full size (1088 KiB) the first time a thread needs it and kept, so a thread
/// allocates once, whatever the sizes of the products it meets later.
inline float* scratch_floats(index count) {
    constexpr std::size_t size = 1088 * 1024 / sizeof(float);
    thread_local std::vector<float> buffer;
    const auto need = std::max(size, static_cast<std::size_t>(count)) + 16;
    if (buffer.size() < need) buffer.resize(need);
    const auto at = reinterpret_cast<std::uintptr_t>(buffer.data());
    return reinterpret_cast<float*>((at + 63) & ~std::uintptr_t{63});
}

namespace portable {

/// xsimd's batch of `Scalar` for the program's own flags.
template <class Scalar>
struct vec {
    using reg = xsimd::batch<Scalar>;
    static constexpr int width = static_cast<int>(reg::size);
#if defined(__AVX512F__) || defined(__aarch64__)
    static constexpr int registers = 32;
#else
    static constexpr int registers = 16;
#endif
    /// Register tiles (products_body.hpp): 4 x tile_columns and 1 x row_tile dot products,
    /// multiply_rows x 2 vectors for `multiply`, so that accumulators and operands fit the registers.
    static constexpr int tile_columns = registers >= 32 ? 4 : 3, row_tile = registers >= 32 ? 16 : 12,
                         multiply_rows = registers >= 32 ? 8 : 6;
    static reg zero() { return reg(Scalar(0)); }
    static reg broadcast(Scalar v) { return reg(v); }
    static reg load(const Scalar* p) { return reg::load_unaligned(p); }
    static reg load_aligned(const Scalar* p) { return reg::load_aligned(p); }
    /// bf16 widened exactly to float (a loop the compiler turns into vector zero-extends and shifts).
    static constexpr int bf16_parts = 1;
    /// From this many rows of x `linear` widens bf16 ahead, not in the tiles (products_body.hpp): at
    /// the x86-64 baseline 4 rows against 5632 x 1024 weights took 4.3 ms widened ahead, 7.0 in the tiles.
    static constexpr index widen_ahead_rows = 4;
    static reg load(const bf16* p) {
        alignas(reg::arch_type::alignment()) float wide[width];
        MOE_UNROLL
        for (int k = 0; k < width; ++k) wide[k] = widen(p[k]);
        return reg::load_aligned(wide);
    }
    static void store(Scalar* p, const reg& v) { v.store_unaligned(p); }
    /// a * b + c, rounded once where the target has FMA. xsimd 8.1 has no AVX-512 `fma` and computes
    /// a * b + c there, which GCC fuses only with contraction allowed (its gnu++ default, not
    /// -std=c++20), so AVX-512 is fused here; xsimd's FMA3 and NEON kernels fuse the other targets.
    static reg fma(const reg& a, const reg& b, const reg& c) {
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<Scalar, float> && width == 16)
            return _mm512_fmadd_ps(a.data, b.data, c.data);
        else if constexpr (std::is_same_v<Scalar, double> && width == 8)
            return _mm512_fmadd_pd(a.data, b.data, c.data);
        else
#endif
            return xsimd::fma(a, b, c);
    }
    /// Keeps a loaded vector in a register: without it GCC 12 folds the loads of a tile into its FMAs'
    /// memory operands and loads every vector once per use (half the FMA rate on AVX-512).
    static void keep([[maybe_unused]] reg& v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        asm("" : "+v"(v.data));
#endif
    }
    /// sums[i] = the sum of the lanes of acc[i], by xsimd's reduction (one tree for every i).
    template <int N>
    MOE_ALWAYS_INLINE static void sums(const reg* acc, Scalar* out) {
        MOE_UNROLL
        for (int i = 0; i < N; ++i) out[i] = xsimd::hadd(acc[i]);
    }
};

#include "moe/kernels/detail/products_body.hpp"

}  // namespace portable

#if defined(MOE_X86_DISPATCH)

MOE_TARGET_BEGIN("avx2,fma")
namespace avx2 {

template <class Scalar>
struct vec;

/// 8 floats in an AVX register.
template <>
struct vec<float> {
    using reg = __m256;
    static constexpr int width = 8;
    static constexpr int tile_columns = 3, row_tile = 12, multiply_rows = 6;  // 16 registers
    static reg zero() { return _mm256_setzero_ps(); }
    static reg broadcast(float v) { return _mm256_set1_ps(v); }
    static reg load(const float* p) { return _mm256_loadu_ps(p); }
    static reg load_aligned(const float* p) { return _mm256_load_ps(p); }
    /// bf16 zero-extended to 32 bits and shifted up: one load, two operations. (Widening the halves of
    /// 32-bit lanes by shifts, as AVX-512 does, took one more shift for the high halves, as a 4 x 3
    /// tile leaves no register for a mask, and ran 5% slower on Zen 4.)
    static constexpr int bf16_parts = 1;
    /// From this many rows of x `linear` widens bf16 ahead, not in the tiles (products_body.hpp): 4
    /// rows against 5632 x 1024 weights took 0.69 ms widened in the tiles, 1.43 ahead; 16 rows 3.27
    /// and 3.18 (Zen 4).
    static constexpr index widen_ahead_rows = 16;
    static reg load(const bf16* p) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    }
    static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
    static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
    static void keep(reg& v) { asm("" : "+x"(v)); }
    /// Per sum: the two halves added lane by lane, then (l0 + l2) + (l1 + l3).
    template <int N>
    MOE_ALWAYS_INLINE static void sums(const reg* acc, float* out) {
        MOE_UNROLL
        for (int i = 0; i < N; ++i) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            out[i] = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
        }
    }
};

#include "moe/kernels/detail/products_body.hpp"

}  // namespace avx2
MOE_TARGET_END

MOE_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
namespace avx512 {

// The shuffles of `sums` (those of unpacklo_ps, unpackhi_ps and shuffle_f32x4 with _MM_SHUFFLE(2, 0,
// 2, 0) and (3, 1, 3, 1)) written as vector shuffles: GCC 12's intrinsics for them (and the unmasked
// widening and shift of `load`) warn of an uninitialised variable in their own header wherever they
// are inlined (GCC bug 105593).
MOE_ALWAYS_INLINE __m512 unpack_low(__m512 a, __m512 b) {
    return __builtin_shufflevector(a, b, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29);
}
MOE_ALWAYS_INLINE __m512 unpack_high(__m512 a, __m512 b) {
    return __builtin_shufflevector(a, b, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
}
// Blocks 0 and 2 of a, then of b.
MOE_ALWAYS_INLINE __m512 even_blocks(__m512 a, __m512 b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
}
// Blocks 1 and 3 of a, then of b.
MOE_ALWAYS_INLINE __m512 odd_blocks(__m512 a, __m512 b) {
    return __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}

/// out[i] = the sum of the 16 lanes of acc[i] for i < N, formed together by shuffles: per 128-bit
/// block (x0 + x2) + (x1 + x3), then (B0 + B1) + (B2 + B3) over the blocks, a tree that is the same for
/// every i (so an output's bits do not depend on its place in a tile).
template <int N>
MOE_ALWAYS_INLINE void sums_of(const __m512* acc, float* out) {
    MOE_UNROLL
    for (int g = 0; g < N; g += 16) {
        // Inputs 4q+1 and 4q+2 swapped, so that the sums come out in order (see below).
        __m512 in[16];
        MOE_UNROLL
        for (int i = 0; i < 16; ++i) {
            const int from = g + ((i & 3) == 1 ? i + 1 : (i & 3) == 2 ? i - 1 : i);
            in[i] = from < N ? acc[from] : _mm512_setzero_ps();
        }
        // Per block: v_p = [a0+a2, b0+b2, a1+a3, b1+b3] of a = in[2p], b = in[2p+1] ...
        __m512 v[8];
        MOE_UNROLL
        for (int p = 0; p < 8; ++p) v[p] = unpack_low(in[2 * p], in[2 * p + 1]) + unpack_high(in[2 * p], in[2 * p + 1]);
        // ... u_q = the block sums of in[4q], in[4q+2], in[4q+1], in[4q+3] (so, of the swapped
        // inputs, outputs 4q..4q+3 in order) ...
        __m512 u[4];
        MOE_UNROLL
        for (int q = 0; q < 4; ++q) u[q] = unpack_low(v[2 * q], v[2 * q + 1]) + unpack_high(v[2 * q], v[2 * q + 1]);
        // ... then (B0 + B1) + (B2 + B3) across the blocks, block q of the result from u_q.
        const __m512 s01 = even_blocks(u[0], u[1]) + odd_blocks(u[0], u[1]);
        const __m512 s23 = even_blocks(u[2], u[3]) + odd_blocks(u[2], u[3]);
        const __m512 all = even_blocks(s01, s23) + odd_blocks(s01, s23);
        alignas(64) float sum[16];
        _mm512_store_ps(sum, all);
        for (int i = 0; i < 16 && g + i < N; ++i) out[g + i] = sum[i];
    }
}

template <class Scalar>
struct vec;

/// 16 floats in an AVX-512 register.
template <>
struct vec<float> {
    using reg = __m512;
    static constexpr int width = 16;
    static constexpr int tile_columns = 4, row_tile = 16, multiply_rows = 8;  // 32 registers
    static reg zero() { return _mm512_setzero_ps(); }
    static reg broadcast(float v) { return _mm512_set1_ps(v); }
    static reg load(const float* p) { return _mm512_loadu_ps(p); }
    static reg load_aligned(const float* p) { return _mm512_load_ps(p); }
    /// Values 2k + half of the 32 bf16 from p, widened: the low halves of the 32-bit lanes shifted up,
    /// or the high halves kept by a zero-masked 16-bit move, with no shuffle (zero-extending 16 values
    /// instead costs a shuffle and a shift per vector and ran 20% slower in the layer on Zen 4).
    static constexpr int bf16_parts = 2;
    static reg load(const bf16* p, int half) {
        const __m512i v = _mm512_loadu_si512(p);
        return _mm512_castsi512_ps(half == 0 ? _mm512_maskz_slli_epi32(0xFFFF, v, 16) : _mm512_maskz_mov_epi16(0xAAAAAAAA, v));
    }
    static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
    static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
    static void keep(reg& v) { asm("" : "+v"(v)); }
    template <int N>
    MOE_ALWAYS_INLINE static void sums(const reg* acc, float* out) {
        sums_of<N>(acc, out);
    }
};

#include "moe/kernels/detail/products_body.hpp"

/// Tiles of bf16 dot products by AVX-512 BF16 (`vdpbf16ps`: 16 float sums of pairs of exact products
/// per step of 32 values), as `simd_tiles`; only called when the CPU has it. The last partial step
/// loads zeros past the end. Like that instruction, they treat denormal inputs and sums as zero.
struct bf16_dot_tiles {
    template <int R, int J>
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,avx512bf16"), noinline)) static void tile(
        const bf16* x, index ldx, const bf16* w, index ldw, float* z, index ldz, index d, bool add, ahead next) {
        __m512 acc[R * J];
        MOE_UNROLL
        for (int i = 0; i < R * J; ++i) acc[i] = _mm512_setzero_ps();
        for (index i = 0; i < d; i += 32) {
            // acc[r J + j] += the pairwise dot products of the 32 values from i of x_r and w_j.
            const __mmask32 mask = d - i >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((std::uint64_t{1} << (d - i)) - 1);
            __m512bh wv[J];
            MOE_UNROLL
            for (int j = 0; j < J; ++j) {
                wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * ldw + i);
                asm("" : "+v"(wv[j]));
            }
            next.one();
            MOE_UNROLL
            for (int r = 0; r < R; ++r) {
                __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * ldx + i);
                asm("" : "+v"(xv));
                MOE_UNROLL
                for (int j = 0; j < J; ++j) acc[r * J + j] = _mm512_dpbf16_ps(acc[r * J + j], xv, wv[j]);
            }
        }
        next.rest();
        float sum[R * J];
        sums_of<R * J>(acc, sum);
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < J; ++j) z[r * ldz + j] = add ? z[r * ldz + j] + sum[r * J + j] : sum[r * J + j];
    }
};

}  // namespace avx512
MOE_TARGET_END

#endif  // MOE_X86_DISPATCH

/// Calls `f.template operator()<Family>()` with the namespace-like struct of the active family's
/// products (`portable::products`, `avx2::products` or `avx512::products`) for float; double (and any
/// other type) always runs the portable products.
template <class Scalar, class F>
decltype(auto) with_products(F&& f) {
#if defined(MOE_X86_DISPATCH)
    if constexpr (std::is_same_v<Scalar, float>) {
        switch (active_isa()) {
            case isa::avx512_bf16:
            case isa::avx512: return f.template operator()<avx512::products>();
            case isa::avx2: return f.template operator()<avx2::products>();
            default: break;
        }
    }
#endif
    return f.template operator()<portable::products>();
}

}  // namespace detail
}  // namespace moe::kernels
