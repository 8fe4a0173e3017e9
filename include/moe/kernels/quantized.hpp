#pragma once
/// \file
/// Quantized weights in ggml's block formats (what GGUF files hold), and the projection on them.
///
/// A row of d values (d a multiple of 32) is stored as d / 32 blocks of 32 consecutive values, each with
/// a scale stored as fp16:
///
/// - `q8_0_block`: scale d and 32 int8 values; value = d q. From float (ggml's reference quantizer,
///   `quantize_row_q8_0_ref`): amax = max |v|, d = amax / 127, q = roundf(v / d) (halves away from zero;
///   v times the float reciprocal of d, 0 when d is 0), d rounded to fp16 (to nearest even).
/// - `q4_0_block`: scale d and 16 bytes of 4-bit values, byte j holding value j in its low nibble and
///   value j + 16 in its high one; value = d (q - 8). From float (`quantize_row_q4_0_ref`): m = the
///   value of largest magnitude (the first of equal ones), d = m / -8, q = min(15, trunc(v / d + 8.5)).
///
/// `linear` on quantized weights takes its input rows quantized to q8_0 the same way and computes each
/// output as a sum over blocks of fp16(d_x) fp16(d_w) times the integer sum of the block's 32 products,
/// in this order on every instruction-set family: the products of values 4j to 4j + 3 form lane j of 8
/// integer lanes; each block adds float(lane j) times the float product of the two scales to float
/// lane j by a fused multiply-add; the 8 lanes are summed as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) +
/// (l3 + l7)). So an output's bits depend only on its two rows: not on the block, the thread count or
/// the family (AVX2's `maddubs`, the portable family's scalar code and AVX-512 VNNI's `vpdpbusd` form
/// the same integer lanes, which are exact).
///
/// The integer sums are exact: |q_x| <= 127 for rows this header quantizes, |q_w| <= 128, so even the
/// 16-bit pair sums of AVX2 (`maddubs` of |q_w| and q_x with q_w's sign) stay below 2^15.

#include "moe/error.hpp"
#include "moe/kernels/detail/attributes.hpp"
#include "moe/kernels/isa.hpp"
#include "moe/types.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(MOE_X86_DISPATCH)
#include <immintrin.h>
#endif
// aarch64 Linux: the dot product instructions where the CPU has them (asked of the kernel at run time).
#if defined(__aarch64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_NEON_DOTPROD 1
#include <arm_neon.h>
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace moe {

/// Values per block of the quantized formats.
inline constexpr index quant_block = 32;

/// 32 values as int8 with an fp16 scale (ggml's q8_0, 34 bytes): value = scale q.
struct q8_0_block {
    std::uint16_t scale;  ///< fp16 bits
    std::int8_t values[quant_block];
};

/// 32 values as 4-bit integers with an fp16 scale (ggml's q4_0, 18 bytes): value = scale (q - 8);
/// byte j holds value j (low nibble) and value j + 16 (high nibble).
struct q4_0_block {
    std::uint16_t scale;  ///< fp16 bits
    std::uint8_t values[quant_block / 2];
};

static_assert(sizeof(q8_0_block) == 34 && sizeof(q4_0_block) == 18, "the blocks are ggml's, byte for byte");

/// A quantized block format of this header.
template <class B>
concept quantized_block = std::is_same_v<B, q8_0_block> || std::is_same_v<B, q4_0_block>;

/// The float value of fp16 bits (exact).
inline float fp16_to_float(std::uint16_t bits) {
    return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
}

/// The fp16 nearest to `value` (ties to even), as bits.
inline std::uint16_t float_to_fp16(float value) {
    return Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(value));
}

namespace kernels {

namespace detail {

inline void check_quant_length(index n, const char* what) {
    if (n % quant_block != 0)
        throw shape_error(std::string(what) + ": a row of " + std::to_string(n) +
                          " values does not split into blocks of 32 (the quantized formats need a multiple of 32)");
}

/// The fp16 scale of a block, value_error if it is not finite (a value was not, or the scale
/// overflows fp16).
inline std::uint16_t block_scale(float scale, const float* v, index block, const char* what) {
    for (index i = 0; i < quant_block; ++i)
        if (!std::isfinite(v[i]))
            throw value_error(std::string(what) + ": value " + std::to_string(block * quant_block + i) + " is " +
                              std::to_string(v[i]) + "; only finite values can be quantized");
    const std::uint16_t bits = float_to_fp16(scale);
    if (!std::isfinite(fp16_to_float(bits)))
        throw value_error(std::string(what) + ": block " + std::to_string(block) + " needs the scale " +
                          std::to_string(scale) + ", beyond fp16's largest (65504)");
    return bits;
}

/// 1 / d, or 0 where d is 0 or so small (below about 3e-39) that its reciprocal overflows: there ggml's
/// reference multiplies by infinity and casts the result to an integer, which C leaves undefined (x86
/// gives 0, and so do these quantizers: such a block's fp16 scale is 0 anyway).
inline float quant_inverse(float d) {
    const float inverse = d != 0 ? 1.0f / d : 0.0f;
    return std::isfinite(inverse) ? inverse : 0.0f;
}

/// `value` as computed, hidden from the optimiser: a product passed through it is rounded to float
/// before the sum it feeds, never fused with it into one multiply-add (which GCC does by default in
/// GNU mode wherever the target has FMA, for float and for a sum in double converted back).
inline float rounded(float value) {
#if defined(__GNUC__) && defined(__x86_64__)
    __asm__("" : "+x"(value));
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__("" : "+w"(value));
#else
    volatile float kept = value;
    value = kept;
#endif
    return value;
}

/// A q8_0 block's values: roundf(v / d) (halves away from zero) of its 32 values times the inverse of
/// d, as ggml's reference has it. |v / d| <= 127 here, so the truncation to int is defined, and the
/// fraction v - trunc(v) is exact: the loop vectorises at the x86-64 baseline.
inline void q8_0_values(const float* block, float inverse, std::int8_t* out) {
    for (index i = 0; i < quant_block; ++i) {
        const float v = block[i] * inverse;
        const int whole = static_cast<int>(v);
        const float fraction = v - static_cast<float>(whole);
        out[i] = static_cast<std::int8_t>(whole + (fraction >= 0.5f ? 1 : 0) - (fraction <= -0.5f ? 1 : 0));
    }
}

/// max |v| of a block of 32.
inline float block_amax(const float* block) {
    float amax = 0;
    for (index i = 0; i < quant_block; ++i) amax = std::max(amax, std::fabs(block[i]));
    return amax;
}

}  // namespace detail

/// The n values of v (n a multiple of 32, else shape_error) as n / 32 q8_0 blocks, by ggml's reference
/// quantizer. value_error for a value that is not finite.
inline void quantize(const float* v, index n, q8_0_block* out) {
    detail::check_quant_length(n, "quantize (q8_0)");
    for (index b = 0; b < n / quant_block; ++b) {
        const float* block = v + b * quant_block;
        const float d = detail::block_amax(block) / 127.0f;
        out[b].scale = detail::block_scale(d, block, b, "quantize (q8_0)");
        detail::q8_0_values(block, detail::quant_inverse(d), out[b].values);
    }
}

/// `quantize` to q8_0 for the inputs of a projection, where no error can be raised: the same blocks
/// for finite values; a block holding a NaN or an infinity gets a NaN scale and zero values, so the
/// outputs it feeds are NaN (where float arithmetic would give NaN or infinity), and a block whose
/// scale exceeds fp16 (values beyond about 8.3e6) an infinite one. n must be a multiple of 32.
inline void quantize_input(const float* v, index n, q8_0_block* out) {
    assert(n % quant_block == 0);
    constexpr std::uint16_t fp16_nan = 0x7E00;
    constexpr std::uint32_t exponent = 0x7F80'0000;  // all ones: infinite or NaN (bits, whatever -ffast-math says)
    for (index b = 0; b < n / quant_block; ++b) {
        const float* block = v + b * quant_block;
        std::uint32_t not_finite = 0;
        for (index i = 0; i < quant_block; ++i) not_finite |= (std::bit_cast<std::uint32_t>(block[i]) & exponent) == exponent;
        if (not_finite != 0) {
            out[b].scale = fp16_nan;
            std::fill_n(out[b].values, quant_block, std::int8_t{0});
            continue;
        }
        const float d = detail::block_amax(block) / 127.0f;
        out[b].scale = float_to_fp16(d);
        detail::q8_0_values(block, detail::quant_inverse(d), out[b].values);
    }
}

/// The n values of v (n a multiple of 32, else shape_error) as n / 32 q4_0 blocks, by ggml's reference
/// quantizer. value_error for a value that is not finite or a scale beyond fp16's range.
inline void quantize(const float* v, index n, q4_0_block* out) {
    detail::check_quant_length(n, "quantize (q4_0)");
    for (index b = 0; b < n / quant_block; ++b) {
        const float* block = v + b * quant_block;
        float amax = 0, max = 0;
        for (index i = 0; i < quant_block; ++i)
            if (amax < std::fabs(block[i])) {
                amax = std::fabs(block[i]);
                max = block[i];
            }
        const float d = max / -8.0f, inverse = detail::quant_inverse(d);
        out[b].scale = detail::block_scale(d, block, b, "quantize (q4_0)");
        // v / d + 8.5 in float32, the product rounded first as ggml's reference has it.
        const auto q = [&](index i) {
            const float sum = detail::rounded(block[i] * inverse) + 8.5f;
            return static_cast<std::uint8_t>(std::min(15, static_cast<int>(sum)));
        };
        for (index j = 0; j < quant_block / 2; ++j)
            out[b].values[j] = static_cast<std::uint8_t>(q(j) | q(j + quant_block / 2) << 4);
    }
}

/// The n values (n a multiple of 32) that n / 32 blocks hold, as float: scale times value.
inline void dequantize(const q8_0_block* blocks, index n, float* out) {
    detail::check_quant_length(n, "dequantize (q8_0)");
    for (index b = 0; b < n / quant_block; ++b) {
        const float d = fp16_to_float(blocks[b].scale);
        for (index i = 0; i < quant_block; ++i) out[b * quant_block + i] = d * static_cast<float>(blocks[b].values[i]);
    }
}

/// \copydoc dequantize(const q8_0_block*, index, float*)
inline void dequantize(const q4_0_block* blocks, index n, float* out) {
    detail::check_quant_length(n, "dequantize (q4_0)");
    for (index b = 0; b < n / quant_block; ++b) {
        const float d = fp16_to_float(blocks[b].scale);
        for (index j = 0; j < quant_block / 2; ++j) {
            const int v = blocks[b].values[j];
            out[b * quant_block + j] = d * static_cast<float>((v & 15) - 8);
            out[b * quant_block + j + quant_block / 2] = d * static_cast<float>((v >> 4) - 8);
        }
    }
}

namespace detail {

/// The sum of the lanes in the order every family uses: even blocks' lane j plus odd blocks' lane j,
/// then ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline float quant_lane_sum(const float* even, const float* odd) {
    float l[8];
    for (int j = 0; j < 8; ++j) l[j] = even[j] + odd[j];
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/// Value i of a block as a signed integer.
inline int quant_value(const q8_0_block& b, index i) { return b.values[i]; }
inline int quant_value(const q4_0_block& b, index i) {
    const int v = b.values[i % (quant_block / 2)];
    return (i < quant_block / 2 ? v & 15 : v >> 4) - 8;
}

/// The portable family: one output at a time, the lanes in scalar code.
template <class Block>
float quant_dot_portable(const q8_0_block* x, const Block* w, index blocks) {
    float lanes[2][8] = {};
    for (index b = 0; b < blocks; ++b) {
        const float scale = fp16_to_float(x[b].scale) * fp16_to_float(w[b].scale);
        float* acc = lanes[b % 2];
        for (index j = 0; j < 8; ++j) {
            std::int32_t sum = 0;
            for (index i = 4 * j; i < 4 * j + 4; ++i) sum += quant_value(x[b], i) * quant_value(w[b], i);
            acc[j] = std::fma(static_cast<float>(sum), scale, acc[j]);
        }
    }
    return quant_lane_sum(lanes[0], lanes[1]);
}

/// Decoding (one row of x) streams W from memory: a tile of one row asks for the lines of the next J
/// rows of W (where the caller goes next) at the block it is at, one step ahead of the hardware's
/// stream prefetchers, which stop at each page.
template <int J, class Block>
MOE_ALWAYS_INLINE void ask_next_rows(const Block* w, index ldw, index b) {
    const auto base = reinterpret_cast<std::uintptr_t>(w);  // the next rows may lie past W: never read
    MOE_UNROLL
    for (int j = 0; j < J; ++j)
        __builtin_prefetch(reinterpret_cast<const char*>(base + static_cast<std::uintptr_t>(((J + j) * ldw + b) * sizeof(Block))), 0, 2);
}

#if defined(MOE_X86_DISPATCH)
MOE_TARGET_BEGIN("avx2,fma,f16c")
namespace quant_avx2 {

/// fp16 bits as float by F16C (every AVX2 CPU has it): Eigen's conversion is a dozen operations.
inline float scale(std::uint16_t bits) { return _cvtsh_ss(bits); }

/// Block b's 32 values of w: q8_0's as signed bytes, q4_0's as their unsigned nibbles q (the value is
/// q - 8).
inline __m256i weights(const q8_0_block& b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.values)); }
inline __m256i weights(const q4_0_block& b) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.values)), low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
}

/// Lane sums of 4 products of unsigned a and signed b (pair sums of 16 bits: below 2^15 here).
inline __m256i dot4(__m256i a, __m256i b) { return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)); }

/// What a row of x's block adds to every lane of its products with q4_0 nibbles: -8 times its lanes' sums.
inline __m256i nibble_offset(__m256i x) { return _mm256_sub_epi32(_mm256_setzero_si256(), dot4(_mm256_set1_epi8(8), x)); }

/// The 8 integer lanes of a block's products: x against q8_0 values w (|w| times x with w's sign), or
/// against q4_0 nibbles (q times x, plus x's `nibble_offset`). What depends on one row only (|w|, the
/// offset) is formed once per row and block.
template <class Block>
struct lanes {
    static constexpr bool nibbles = std::is_same_v<Block, q4_0_block>;
    static __m256i of_w(__m256i w) { return nibbles ? w : _mm256_abs_epi8(w); }
    static __m256i of_x(__m256i x) { return nibbles ? nibble_offset(x) : _mm256_setzero_si256(); }
    static __m256i of(__m256i x, __m256i xo, __m256i w, __m256i wo) {
        return nibbles ? _mm256_add_epi32(dot4(w, x), xo) : dot4(wo, _mm256_sign_epi8(x, w));
    }
};

inline float lane_sum(__m256 v) {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l0+l4, l1+l5, ...
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));                           // (l0+l4)+(l2+l6), ...
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

/// acc[r J + j] += block b of x_r against block b of w_j, for R rows of x (row stride ldx blocks) and J
/// rows of W (ldw).
template <int R, int J, class Block>
MOE_ALWAYS_INLINE void step(const q8_0_block* x, index ldx, const Block* w, index ldw, index b, __m256* acc) {
    using form = lanes<Block>;
    __m256i xv[R], xo[R];
    float dx[R];
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        xv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r * ldx + b].values));
        xo[r] = form::of_x(xv[r]);
        dx[r] = scale(x[r * ldx + b].scale);
    }
    MOE_UNROLL
    for (int j = 0; j < J; ++j) {
        const Block& wb = w[j * ldw + b];
        const __m256i wv = weights(wb), wo = form::of_w(wv);
        const float dw = scale(wb.scale);
        MOE_UNROLL
        for (int r = 0; r < R; ++r)
            acc[r * J + j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(form::of(xv[r], xo[r], wv, wo)), _mm256_set1_ps(dx[r] * dw),
                                             acc[r * J + j]);
    }
}

/// z[r][j] = dot(x_r, w_j) for R rows of x and J rows of W: each row's block loaded once for the tile.
template <int R, int J, class Block>
void tile(const q8_0_block* x, index ldx, const Block* w, index ldw, index blocks, float* z, index ldz) {
    __m256 even[R * J], odd[R * J];
    MOE_UNROLL
    for (int i = 0; i < R * J; ++i) even[i] = odd[i] = _mm256_setzero_ps();
    index b = 0;
    for (; b + 2 <= blocks; b += 2) {
        if constexpr (R == 1) ask_next_rows<J>(w, ldw, b);
        step<R, J>(x, ldx, w, ldw, b, even);
        step<R, J>(x, ldx, w, ldw, b + 1, odd);
    }
    if (b < blocks) step<R, J>(x, ldx, w, ldw, b, even);
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        MOE_UNROLL
        for (int j = 0; j < J; ++j) z[r * ldz + j] = lane_sum(_mm256_add_ps(even[r * J + j], odd[r * J + j]));
    }
}

/// Tiles of 2 rows of x by 2 of W (8 accumulators: even and odd blocks) over blocks of 16 rows of W.
struct family {
    static constexpr int rows = 2, columns = 2;
    static constexpr index w_block = 16;
    template <int R, int J, class Block>
    static void run(const q8_0_block* x, index ldx, const Block* w, index ldw, index blocks, float* z, index ldz) {
        tile<R, J>(x, ldx, w, ldw, blocks, z, ldz);
    }
};

}  // namespace quant_avx2
MOE_TARGET_END

MOE_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")
namespace quant_vnni {

// All-true masks: the masked forms of these intrinsics compile to the same instructions, without the
// undefined pass-through that GCC 12 warns about once they are inlined (GCC bug 105593).
constexpr __mmask8 full8 = 0xFF;
constexpr __mmask16 full16 = 0xFFFF;

/// Two blocks in a 512-bit register: block b in the low half, b + 1 in the high half (the even and
/// odd lanes of the order above).
inline __m512i weights(const q8_0_block* b) {
    return _mm512_maskz_inserti64x4(full8, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[0].values))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[1].values)), 1);
}
inline __m512i weights(const q4_0_block* b) {
    // 128-bit lanes [packed b, packed b, packed b + 1, packed b + 1] shifted right by [0, 4, 0, 4]: the
    // low nibbles of each lane are the values' q in order (unsigned; the value is q - 8).
    // (Broadcasting loads, one shuffle: the unpacking is most of a decoding step's work.)
    const __m256i first = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[0].values))),
                  second = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[1].values)));
    const __m512i packed = _mm512_maskz_inserti64x4(full8, _mm512_castsi256_si512(first), second, 1);
    const __m512i shifted = _mm512_maskz_srlv_epi64(full8, packed, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    return _mm512_and_si512(shifted, _mm512_set1_epi8(15));
}

/// The integer lanes of two blocks' products by `vpdpbusd`, which multiplies unsigned by signed bytes.
/// q8_0: the rows of x offset to x + 128 (in [1, 255]) against w, starting from -128 times the lane
/// sums of w (w's `correction`, the same for every row of x). q4_0: the nibbles q against x, starting from -8
/// times x's lane sums (x's `correction`, the same for every row of W).
template <class Block>
struct vnni_lanes {
    static constexpr bool nibbles = std::is_same_v<Block, q4_0_block>;
    /// A row of x's two blocks as this form's operand.
    static __m512i row(__m512i x) { return nibbles ? x : _mm512_add_epi8(x, _mm512_set1_epi8(-128)); }
    /// -8 (q4_0) or -128 (q8_0: the byte 0x80 read unsigned) times the lane sums of v: where a lane's
    /// `vpdpbusd` starts.
    static __m512i correction(__m512i v) {
        const __m512i zero = _mm512_setzero_si512();
        return _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(nibbles ? 8 : -128), v));
    }
    /// The lanes of row x (`row`, with its correction cx) against w (with its correction cw): one
    /// `vpdpbusd` from the correction.
    static __m512i lanes(__m512i x, __m512i cx, __m512i w, __m512i cw) {
        return nibbles ? _mm512_dpbusd_epi32(cx, w, x) : _mm512_dpbusd_epi32(cw, x, w);
    }
};

/// [s_b x 8, s_{b+1} x 8] for fp16 bits s_b and s_{b+1}.
inline __m512 scales(std::uint16_t even, std::uint16_t odd) {
    const __m256i bits = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(static_cast<short>(even))),
                                                 _mm_set1_epi16(static_cast<short>(odd)), 1);
    return _mm512_maskz_cvtph_ps(full16, bits);
}

/// z[r][j] = dot(x_r, w_j) for R rows of x (row stride ldx blocks) and J rows of W (ldw), two blocks a
/// step: the integer lanes (`vnni_lanes`), converted and scaled. Each row of x and of W is loaded (its
/// scales converted, its correction formed) once a step for the whole tile.
template <int R, int J, class Block>
void tile(const q8_0_block* x, index ldx, const Block* w, index ldw, index blocks, float* z, index ldz) {
    __m512 acc[R][J];
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        MOE_UNROLL
        for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
    }
    index b = 0;
    for (; b + 2 <= blocks; b += 2) {
        if constexpr (R == 1) ask_next_rows<J>(w, ldw, b);
        using form = vnni_lanes<Block>;
        __m512i xv[R], cx[R];
        __m512 dx[R];
        MOE_UNROLL
        for (int r = 0; r < R; ++r) {
            xv[r] = form::row(weights(x + r * ldx + b));
            cx[r] = form::nibbles ? form::correction(xv[r]) : _mm512_setzero_si512();
            dx[r] = scales(x[r * ldx + b].scale, x[r * ldx + b + 1].scale);
        }
        MOE_UNROLL
        for (int j = 0; j < J; ++j) {
            const Block* wb = w + j * ldw + b;
            const __m512i wv = weights(wb), cw = form::nibbles ? _mm512_setzero_si512() : form::correction(wv);
            const __m512 dw = scales(wb[0].scale, wb[1].scale);
            MOE_UNROLL
            for (int r = 0; r < R; ++r) {
                const __m512i lanes = form::lanes(xv[r], cx[r], wv, cw);
                acc[r][j] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(full16, lanes), _mm512_mul_ps(dx[r], dw), acc[r][j]);
            }
        }
    }
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        __m256 even[J];
        MOE_UNROLL
        for (int j = 0; j < J; ++j) even[j] = _mm512_maskz_extractf32x8_ps(full8, acc[r][j], 0);
        if (b < blocks) quant_avx2::step<1, J>(x + r * ldx, 0, w, ldw, b, even);  // the last, even block
        MOE_UNROLL
        for (int j = 0; j < J; ++j)
            z[r * ldz + j] = quant_avx2::lane_sum(_mm256_add_ps(even[j], _mm512_maskz_extractf32x8_ps(full8, acc[r][j], 1)));
    }
}

/// Tiles of 4 rows of x by 3 of W (12 accumulators, the rows of x held for the step) over blocks of 12
/// rows of W.
struct family {
    static constexpr int rows = 4, columns = 3;
    static constexpr index w_block = 12;
    template <int R, int J, class Block>
    static void run(const q8_0_block* x, index ldx, const Block* w, index ldw, index blocks, float* z, index ldz) {
        tile<R, J>(x, ldx, w, ldw, blocks, z, ldz);
    }
};

}  // namespace quant_vnni
MOE_TARGET_END

/// Whether the CPU has AVX-512 VNNI (the AVX-512 families' quantized products use it where it does).
inline bool has_vnni() {
    static const bool vnni = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512vnni") != 0;
    }();
    return vnni;
}
#endif

#if defined(MOE_NEON_DOTPROD)
/// Whether the CPU has the Armv8.2 dot product instructions (`sdot`; most aarch64 cores since 2017).
inline bool has_dotprod() {
    static const bool dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
    return dotprod;
}

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
namespace quant_neon {

/// A block's 32 values as two vectors of signed bytes (q4_0: q - 8).
MOE_ALWAYS_INLINE int8x16x2_t values(const q8_0_block& b) { return {{vld1q_s8(b.values), vld1q_s8(b.values + 16)}}; }
MOE_ALWAYS_INLINE int8x16x2_t values(const q4_0_block& b) {
    const uint8x16_t packed = vld1q_u8(b.values);
    const int8x16_t eight = vdupq_n_s8(8);
    return {{vsubq_s8(vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(15))), eight),
             vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(packed, 4)), eight)}};
}

/// One block b of z[r][j] = dot(x_r, w_j) for R rows of x and J rows of W: `sdot` forms the integer lanes
/// (lane j of a 32-bit vector sums the products of bytes 4j to 4j + 3: values 4j..4j+3 of the first
/// half, then of the second), each added to its float lane (of `acc`: the even or the odd blocks') by a
/// fused multiply-add with the product of the two scales.
template <int R, int J, class Block>
MOE_ALWAYS_INLINE void step(const q8_0_block* x, index ldx, const Block* w, index ldw, index b, float32x4_t (&acc)[R * J][2]) {
    int8x16x2_t xv[R];
    float dx[R];
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        xv[r] = values(x[r * ldx + b]);
        dx[r] = fp16_to_float(x[r * ldx + b].scale);
    }
    MOE_UNROLL
    for (int j = 0; j < J; ++j) {
        const Block& wb = w[j * ldw + b];
        const int8x16x2_t wv = values(wb);
        const float dw = fp16_to_float(wb.scale);
        MOE_UNROLL
        for (int r = 0; r < R; ++r) {
            const float32x4_t scale = vdupq_n_f32(dx[r] * dw);
            float32x4_t* a = acc[r * J + j];
            a[0] = vfmaq_f32(a[0], vcvtq_f32_s32(vdotq_s32(vdupq_n_s32(0), xv[r].val[0], wv.val[0])), scale);
            a[1] = vfmaq_f32(a[1], vcvtq_f32_s32(vdotq_s32(vdupq_n_s32(0), xv[r].val[1], wv.val[1])), scale);
        }
    }
}

template <int R, int J, class Block>
void tile(const q8_0_block* x, index ldx, const Block* w, index ldw, index blocks, float* z, index ldz) {
    float32x4_t even[R * J][2], odd[R * J][2];  // [tile entry][lanes 0-3, 4-7]
    MOE_UNROLL
    for (int i = 0; i < R * J; ++i) even[i][0] = even[i][1] = odd[i][0] = odd[i][1] = vdupq_n_f32(0);
    index b = 0;
    for (; b + 2 <= blocks; b += 2) {
        if constexpr (R == 1) ask_next_rows<J>(w, ldw, b);
        step<R, J>(x, ldx, w, ldw, b, even);
        step<R, J>(x, ldx, w, ldw, b + 1, odd);
    }
    if (b < blocks) step<R, J>(x, ldx, w, ldw, b, even);
    MOE_UNROLL
    for (int i = 0; i < R * J; ++i) {
        // [l0 + l4, l1 + l5, l2 + l6, l3 + l7] of l = even + odd, then (s0 + s2) + (s1 + s3).
        const float32x4_t s = vaddq_f32(vaddq_f32(even[i][0], odd[i][0]), vaddq_f32(even[i][1], odd[i][1]));
        z[i / J * ldz + i % J] = (vgetq_lane_f32(s, 0) + vgetq_lane_f32(s, 2)) + (vgetq_lane_f32(s, 1) + vgetq_lane_f32(s, 3));
    }
}

/// Tiles of 2 rows of x by 2 of W over blocks of 16 rows of W.
struct family {
    static constexpr int rows = 2, columns = 2;
    static constexpr index w_block = 16;
    template <int R, int J, class Block>
    static void run(const q8_0_block* x, index ldx, const Block* w, index ldw, index blocks, float* z, index ldz) {
        tile<R, J>(x, ldx, w, ldw, blocks, z, ldz);
    }
};

}  // namespace quant_neon
#pragma GCC pop_options
#endif

/// `Family::run<R, J>` for J = `columns` rows of W or fewer (the edge of a block of W).
template <class Family, int R, int J = Family::columns, class Block>
void quant_edge(index j, const q8_0_block* x, index ldx, const Block* w, index ldw, index blocks, float* z, index ldz) {
    if constexpr (J > 1)
        if (j < J) return quant_edge<Family, R, J - 1>(j, x, ldx, w, ldw, blocks, z, ldz);
    Family::template run<R, J>(x, ldx, w, ldw, blocks, z, ldz);
}

/// z = x W^T by a family's tiles: blocks of `w_block` rows of W that stay in L1/L2 while the rows of x
/// pass, `rows` x `columns` tiles (then 2 x `columns` for the rows left), a single row of x (decoding)
/// against 4 rows of W at a time.
template <class Family, class Block>
void quant_linear(const q8_0_block* x, index ldx, const Block* w, index ldw, float* z, index ldz, index n, index m,
                  index blocks) {
    for (index j0 = 0; j0 < m; j0 += Family::w_block) {
        const index j1 = std::min(m, j0 + Family::w_block);
        index r = 0;
        const auto rows_of = [&]<int R>() {
            for (; r + R <= n; r += R)
                for (index j = j0; j < j1; j += Family::columns)
                    quant_edge<Family, R>(std::min<index>(Family::columns, j1 - j), x + r * ldx, ldx, w + j * ldw, ldw,
                                          blocks, z + r * ldz + j, ldz);
        };
        rows_of.template operator()<Family::rows>();
        if constexpr (Family::rows > 2) rows_of.template operator()<2>();
        if (r < n) {
            index j = j0;
            for (; j + 4 <= j1; j += 4) Family::template run<1, 4>(x + r * ldx, ldx, w + j * ldw, ldw, blocks, z + r * ldz + j, ldz);
            for (; j < j1; ++j) Family::template run<1, 1>(x + r * ldx, ldx, w + j * ldw, ldw, blocks, z + r * ldz + j, ldz);
        }
    }
}

}  // namespace detail

/// z = x W^T for x quantized to q8_0 (n rows, `ldx` blocks apart) and quantized weights W (m rows,
/// `ldw` blocks apart), rows of d values (a multiple of 32, else shape_error); z float (n x m, row
/// stride ldz). Every output is the sum described above (`dot`), bit for bit on every family. x's
/// values must lie in [-127, 127], as `quantize` makes them (AVX2 negates them); W's may be any.
template <quantized_block Block>
void linear(const q8_0_block* x, index ldx, const Block* w, index ldw, float* z, index ldz, index n, index m, index d) {
    detail::check_quant_length(d, "linear (quantized)");
    const index blocks = d / quant_block;
#if defined(MOE_X86_DISPATCH)
    if (active_isa() >= isa::avx512 && detail::has_vnni())
        return detail::quant_linear<detail::quant_vnni::family>(x, ldx, w, ldw, z, ldz, n, m, blocks);
    if (active_isa() >= isa::avx2) return detail::quant_linear<detail::quant_avx2::family>(x, ldx, w, ldw, z, ldz, n, m, blocks);
#endif
#if defined(MOE_NEON_DOTPROD)
    if (detail::has_dotprod()) return detail::quant_linear<detail::quant_neon::family>(x, ldx, w, ldw, z, ldz, n, m, blocks);
#endif
    for (index r = 0; r < n; ++r)
        for (index j = 0; j < m; ++j) z[r * ldz + j] = detail::quant_dot_portable(x + r * ldx, w + j * ldw, blocks);
}

/// The quantized dot product of one row of x (q8_0) and one row of W, d values: what `linear` computes
/// for each output.
template <quantized_block Block>
float dot(const q8_0_block* x, const Block* w, index d) {
    float z;
    linear(x, 0, w, 0, &z, 1, 1, 1, d);
    return z;
}

}  // namespace kernels

/// A matrix of rows x cols values held as quantized blocks (cols a multiple of 32): each row is
/// cols / 32 consecutive blocks of `Block`, ggml's layout (a GGUF tensor's bytes, row by row).
template <quantized_block Block>
class quantized_matrix {
public:
    using block_type = Block;

    quantized_matrix() = default;
    /// rows x cols zeros (blocks of zero bytes); shape_error when cols is not a multiple of 32.
    quantized_matrix(index rows, index cols) : cols_(cols) {
        kernels::detail::check_quant_length(cols, "quantized_matrix");
        blocks_ = aligned_rows<Block>(rows, cols / quant_block);
    }

    [[nodiscard]] index rows() const { return blocks_.rows(); }
    /// Values per row.
    [[nodiscard]] index cols() const { return cols_; }
    [[nodiscard]] index blocks_per_row() const { return blocks_.cols(); }
    [[nodiscard]] Block* data() { return blocks_.data(); }
    [[nodiscard]] const Block* data() const { return blocks_.data(); }
    [[nodiscard]] Block* row(index r) { return blocks_.row(r); }
    [[nodiscard]] const Block* row(index r) const { return blocks_.row(r); }
    /// Bytes of the blocks.
    [[nodiscard]] std::size_t bytes() const { return blocks_.size() * sizeof(Block); }

    /// Rows [row, row + n) quantized from n x cols float values (`quantize`: value_error for a value
    /// that is not finite or a scale beyond fp16); shape_error for rows outside the matrix.
    void assign(index row, const float* values, index n) {
        if (row < 0 || n < 0 || row + n > rows())
            throw shape_error("quantized_matrix: rows [" + std::to_string(row) + ", " + std::to_string(row + n) +
                              ") of a matrix of " + std::to_string(rows()) + " rows");
        kernels::quantize(values, n * cols_, blocks_.row(row));
    }

    /// The values as float (scale times value).
    [[nodiscard]] matrix<float> dequantized() const {
        matrix<float> out(rows(), cols_);
        if (out.size() > 0) kernels::dequantize(data(), out.size(), out.data());
        return out;
    }

private:
    index cols_ = 0;
    aligned_rows<Block> blocks_;
};

}  // namespace moe
