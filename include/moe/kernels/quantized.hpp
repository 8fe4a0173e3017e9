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
/// `linear` on quantized weights (held by `quantized_matrix`, which interleaves 16 rows' blocks for
/// the kernels) takes its input rows quantized to q8_0 the same way (`q8_0_input`: the values, the
/// fp16 scale's value, the values' sum) and computes each output in this order on every
/// instruction-set family: acc = 0; for each block b in turn, acc = fma(float(s_b), d_x d_w, acc),
/// where s_b is the exact integer sum of the block's 32 products and d_x d_w the float product of the
/// two scales. So an output's bits depend only on its two rows: not on the tile, the thread count or
/// the family (AVX2's `maddubs`, AVX-512 VNNI's `vpdpbusd`, NEON's `sdot` and the portable scalar code
/// form the same exact integer sums).
///
/// The integer sums are exact: |q_x| <= 127 for rows this header quantizes and |q_w| <= 128, so even
/// the 16-bit pair sums of AVX2 (`maddubs` of |q_w| and q_x with q_w's sign) stay below 2^15.

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
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

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

/// A block of 32 values of a projection's input quantized as q8_0 (`kernels::quantize_input`), in the
/// form the kernels take: the values, the value of the fp16 scale (as float), and the sum of the values
/// (with it, products with weights stored as unsigned bytes become signed ones). The kernels trust it:
/// values in [-127, 127] and `sum` their sum, as `quantize_input` makes them (else the families differ).
struct q8_0_input {
    std::int8_t values[32];
    float scale;
    std::int32_t sum;
};

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

/// `quantize` to q8_0 for the inputs of a projection, where no error can be raised: the same values and
/// scales for finite values (the scale as float, the values' sum beside); a block holding a NaN or an
/// infinity gets a NaN scale and zero values, so the outputs it feeds are NaN (where float arithmetic
/// would give NaN or infinity), and a block whose scale exceeds fp16 (values beyond about 8.3e6) an
/// infinite one. n must be a multiple of 32.
inline void quantize_input(const float* v, index n, q8_0_input* out) {
    assert(n % quant_block == 0);
    constexpr std::uint32_t exponent = 0x7F80'0000;  // all ones: infinite or NaN (bits, whatever -ffast-math says)
    for (index b = 0; b < n / quant_block; ++b) {
        const float* block = v + b * quant_block;
        std::uint32_t not_finite = 0;
        for (index i = 0; i < quant_block; ++i) not_finite |= (std::bit_cast<std::uint32_t>(block[i]) & exponent) == exponent;
        if (not_finite != 0) {
            out[b].scale = std::numeric_limits<float>::quiet_NaN();
            std::fill_n(out[b].values, quant_block, std::int8_t{0});
            out[b].sum = 0;
            continue;
        }
        const float d = detail::block_amax(block) / 127.0f;
        out[b].scale = fp16_to_float(float_to_fp16(d));
        detail::q8_0_values(block, detail::quant_inverse(d), out[b].values);
        std::int32_t sum = 0;
        for (index i = 0; i < quant_block; ++i) sum += out[b].values[i];
        out[b].sum = sum;
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

/// How `quantized_matrix` lays out a block format (see there): the value bytes of a block of 16 rows
/// (`Block::values` of each row) in 64-byte lines, line k holding bytes 4k to 4k + 3 of each row in
/// turn; q8_0's bytes plus 128 (unsigned: what `vpdpbusd` multiplies), q4_0's as they are (byte j:
/// values j and j + 16 in its nibbles).
template <quantized_block Block>
struct packing {
    static constexpr index row_bytes = sizeof(Block::values);
    static constexpr index lines = row_bytes / 4;
    static constexpr index tile_bytes = lines * 64;  // a block of the group's 16 rows
    static constexpr std::uint8_t offset = std::is_same_v<Block, q8_0_block> ? 0x80 : 0x00;
    static constexpr std::uint8_t zero = std::is_same_v<Block, q8_0_block> ? 0x80 : 0x88;  // stored bytes of value 0
    /// Where byte j of row `lane`'s values lies in its block's tile.
    static constexpr index at(index lane, index j) { return j / 4 * 64 + lane * 4 + j % 4; }
};

}  // namespace detail
}  // namespace kernels

/// A matrix of rows x cols values held as quantized blocks (cols a multiple of 32), in the layout the
/// kernels read: rows in groups of 16 (the last one filled up with zero rows); a group holds, block by
/// block, its 16 rows' value bytes interleaved 4 at a time (`kernels::detail::packing`: each 64-byte line holds
/// 4 consecutive values of each of the 16 rows, so one vector of a 16-row tile is one line), then the
/// 16 rows' fp16 scales of each block. Filled from float (quantized by ggml's reference quantizers) or
/// from ggml's own blocks (a GGUF tensor's rows); `block(r, b)` gives ggml's block back.
template <quantized_block Block>
class quantized_matrix {
    using packing = kernels::detail::packing<Block>;

public:
    using block_type = Block;
    /// Rows per group.
    static constexpr index group_rows = 16;

    quantized_matrix() = default;
    /// rows x cols zeros; shape_error when cols is not a multiple of 32.
    quantized_matrix(index rows, index cols) : rows_(rows), cols_(cols) {
        kernels::detail::check_quant_length(cols, "quantized_matrix");
        const index blocks = blocks_per_row(), scales = (blocks * group_rows * 2 + 63) / 64 * 64;
        bytes_ = aligned_rows<std::uint8_t>((rows + group_rows - 1) / group_rows, blocks * packing::tile_bytes + scales);
        for (index g = 0; g < bytes_.rows(); ++g) std::fill_n(bytes_.row(g), blocks * packing::tile_bytes, packing::zero);
    }

    [[nodiscard]] index rows() const { return rows_; }
    /// Values per row.
    [[nodiscard]] index cols() const { return cols_; }
    [[nodiscard]] index blocks_per_row() const { return cols_ / quant_block; }
    /// Bytes held (values and scales: those of the blocks, and the zero rows filling the last group).
    [[nodiscard]] std::size_t bytes() const { return bytes_.size(); }
    /// Those bytes, as one span.
    [[nodiscard]] std::span<std::byte> raw() { return std::as_writable_bytes(std::span(bytes_.data(), bytes_.size())); }

    /// Rows [row, row + n) quantized from n x cols float values (`quantize`: value_error for a value
    /// that is not finite or a scale beyond fp16); shape_error for rows outside the matrix.
    void assign(index row, const float* values, index n) {
        check_rows(row, n);
        std::vector<Block> blocks(static_cast<std::size_t>(blocks_per_row()));
        for (index r = 0; r < n; ++r) {
            kernels::quantize(values + r * cols_, cols_, blocks.data());
            put(row + r, blocks.data());
        }
    }

    /// Rows [row, row + n) from n rows of cols / 32 blocks in ggml's layout (as a GGUF tensor holds them).
    void assign(index row, const Block* blocks, index n) {
        check_rows(row, n);
        for (index r = 0; r < n; ++r) put(row + r, blocks + r * blocks_per_row());
    }

    /// Block b of row r, in ggml's layout.
    [[nodiscard]] Block block(index r, index b) const {
        assert(r >= 0 && r < rows_ && b >= 0 && b < blocks_per_row());
        const std::uint8_t* tile = bytes_.row(r / group_rows) + b * packing::tile_bytes;
        const index lane = r % group_rows;
        Block out;
        auto* raw = reinterpret_cast<std::uint8_t*>(out.values);
        for (index j = 0; j < packing::row_bytes; ++j) raw[j] = tile[packing::at(lane, j)] ^ packing::offset;
        std::memcpy(&out.scale, scale_bytes(r / group_rows) + (b * group_rows + lane) * 2, 2);
        return out;
    }

    /// The values as float (scale times value).
    [[nodiscard]] matrix<float> dequantized() const {
        matrix<float> out(rows_, cols_);
        for (index r = 0; r < rows_; ++r)
            for (index b = 0; b < blocks_per_row(); ++b) {
                const Block one = block(r, b);
                kernels::dequantize(&one, quant_block, out.data() + r * cols_ + b * quant_block);
            }
        return out;
    }

    /// Group g's bytes (what the kernels read): `blocks_per_row()` tiles of `detail::packing<Block>::
    /// tile_bytes`, then the scales, 16 per block.
    [[nodiscard]] const std::uint8_t* group(index g) const { return bytes_.row(g); }
    /// Bytes from one group to the next (a multiple of 64, as the start of each group).
    [[nodiscard]] index group_bytes() const { return bytes_.cols(); }

private:
    void check_rows(index row, index n) const {
        if (row < 0 || n < 0 || row + n > rows_)
            throw shape_error("quantized_matrix: rows [" + std::to_string(row) + ", " + std::to_string(row + n) +
                              ") of a matrix of " + std::to_string(rows_) + " rows");
    }
    [[nodiscard]] const std::uint8_t* scale_bytes(index g) const { return bytes_.row(g) + blocks_per_row() * packing::tile_bytes; }

    void put(index r, const Block* blocks) {
        std::uint8_t* group = bytes_.row(r / group_rows);
        const index lane = r % group_rows;
        for (index b = 0; b < blocks_per_row(); ++b) {
            std::uint8_t* tile = group + b * packing::tile_bytes;
            const auto* raw = reinterpret_cast<const std::uint8_t*>(blocks[b].values);
            for (index j = 0; j < packing::row_bytes; ++j) tile[packing::at(lane, j)] = raw[j] ^ packing::offset;
            std::memcpy(group + blocks_per_row() * packing::tile_bytes + (b * group_rows + lane) * 2, &blocks[b].scale, 2);
        }
    }

    index rows_ = 0, cols_ = 0;
    aligned_rows<std::uint8_t> bytes_;
};

namespace kernels::detail {

/// Where group j's scales of block 0 lie, for groups of `blocks` blocks.
template <class Block>
MOE_ALWAYS_INLINE const std::uint8_t* scales_of(const std::uint8_t* group, index blocks) {
    return group + blocks * packing<Block>::tile_bytes;
}

/// Decoding (one row of x) streams W from memory: a tile of one row asks, at each block, for the lines
/// of its J groups two blocks ahead, ahead of the hardware's stream prefetchers, which stop at each page.
template <class Block, int J>
MOE_ALWAYS_INLINE void ask_ahead(const std::uint8_t* w, index group_bytes) {
    constexpr index tile_bytes = packing<Block>::tile_bytes;
    const auto base = reinterpret_cast<std::uintptr_t>(w);  // past the group at its end: never read
    MOE_UNROLL
    for (int j = 0; j < J; ++j) {
        MOE_UNROLL
        for (index k = 0; k < tile_bytes; k += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(base + static_cast<std::uintptr_t>(j * group_bytes + 2 * tile_bytes + k)), 0, 3);
    }
}

/// 4 bytes of x's values from value i, as an integer to broadcast.
MOE_ALWAYS_INLINE std::int32_t four_values(const q8_0_input& x, index i) {
    std::int32_t v;
    std::memcpy(&v, x.values + i, 4);
    return v;
}

/// What a block's integer sum starts from, for weights stored as unsigned bytes u = q + c (c = 128 for
/// q8_0, 8 for q4_0's nibbles): sum u x - c sum x = sum q x.
template <class Block>
MOE_ALWAYS_INLINE std::int32_t sum_offset(const q8_0_input& x) {
    return -(std::is_same_v<Block, q8_0_block> ? 128 : 8) * x.sum;
}

/// The portable family: one output at a time, in scalar code.
template <class Block>
float quant_dot_portable(const q8_0_input* x, const std::uint8_t* group, index lane, index blocks) {
    using pack = packing<Block>;
    const std::uint8_t* scales = scales_of<Block>(group, blocks);
    float acc = 0;
    for (index b = 0; b < blocks; ++b) {
        const std::uint8_t* tile = group + b * pack::tile_bytes;
        std::int32_t sum = 0;
        for (index i = 0; i < quant_block; ++i) {
            int q;
            if constexpr (std::is_same_v<Block, q8_0_block>)
                q = static_cast<int>(tile[pack::at(lane, i)]) - 128;
            else {
                const int byte = tile[pack::at(lane, i % 16)];
                q = (i < 16 ? byte & 15 : byte >> 4) - 8;
            }
            sum += q * x[b].values[i];
        }
        std::uint16_t bits;
        std::memcpy(&bits, scales + (b * 16 + lane) * 2, 2);
        acc = std::fma(static_cast<float>(sum), x[b].scale * fp16_to_float(bits), acc);
    }
    return acc;
}

struct quant_portable {
    static constexpr int rows = 1, groups = 1, decode_groups = 1;
    static constexpr index w_groups = 1;
    template <int R, int J, class Block>
    static void run(const q8_0_input* x, index ldx, const std::uint8_t* w, index group_bytes, index blocks, float* z, index ldz) {
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < J; ++j)
                for (index lane = 0; lane < 16; ++lane)
                    z[r * ldz + j * 16 + lane] = quant_dot_portable<Block>(x + r * ldx, w + j * group_bytes, lane, blocks);
    }
};

#if defined(MOE_X86_DISPATCH)
MOE_TARGET_BEGIN("avx2,fma,f16c")
namespace quant_avx2 {

/// Tiles of R rows of x by J groups (2 J vectors of 8 rows) of W, block by block: the block's integer
/// sums by `maddubs` (unsigned bytes times signed ones, pairs summed in 16 bits) and `madd`; q8_0's
/// stored bytes back to signed q (|q| times x with q's sign: pair sums below 2^15), q4_0's nibbles
/// against x from sum_offset (two blocks' pair sums fit 16 bits: 15 x 127 x 4).
template <int R, int J, class Block>
void tile(const q8_0_input* x, index ldx, const std::uint8_t* w, index group_bytes, index blocks, float* z, index ldz) {
    constexpr int H = 2 * J;
    constexpr bool nibbles = std::is_same_v<Block, q4_0_block>;
    constexpr index tile_bytes = packing<Block>::tile_bytes;
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15), flip = _mm256_set1_epi8(-128);
    const std::uint8_t* scales = scales_of<Block>(w, blocks);
    __m256 acc[R][H];
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        MOE_UNROLL
        for (int h = 0; h < H; ++h) acc[r][h] = _mm256_setzero_ps();
    }
    for (index b = 0; b < blocks; ++b) {
        const std::uint8_t* wb = w + b * tile_bytes;
        if constexpr (R == 1) ask_ahead<Block, J>(wb, group_bytes);
        __m256i s[R][H];
        MOE_UNROLL
        for (int r = 0; r < R; ++r) {
            const __m256i start = nibbles ? _mm256_set1_epi32(sum_offset<Block>(x[r * ldx + b])) : _mm256_setzero_si256();
            MOE_UNROLL
            for (int h = 0; h < H; ++h) s[r][h] = start;
        }
        if constexpr (nibbles) {
            MOE_UNROLL
            for (int k = 0; k < 4; ++k) {
                __m256i lo[H], hi[H];
                MOE_UNROLL
                for (int h = 0; h < H; ++h) {
                    const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + h / 2 * group_bytes + k * 64 + h % 2 * 32));
                    lo[h] = _mm256_and_si256(v, low);
                    hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
                MOE_UNROLL
                for (int r = 0; r < R; ++r) {
                    const __m256i xl = _mm256_set1_epi32(four_values(x[r * ldx + b], 4 * k)),
                                  xh = _mm256_set1_epi32(four_values(x[r * ldx + b], 16 + 4 * k));
                    MOE_UNROLL
                    for (int h = 0; h < H; ++h) {
                        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xl), _mm256_maddubs_epi16(hi[h], xh));
                        s[r][h] = _mm256_add_epi32(s[r][h], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
        } else {
            MOE_UNROLL
            for (int k = 0; k < 8; ++k) {
                __m256i q[H], magnitude[H];
                MOE_UNROLL
                for (int h = 0; h < H; ++h) {
                    q[h] = _mm256_xor_si256(
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + h / 2 * group_bytes + k * 64 + h % 2 * 32)), flip);
                    magnitude[h] = _mm256_abs_epi8(q[h]);
                }
                MOE_UNROLL
                for (int r = 0; r < R; ++r) {
                    const __m256i xv = _mm256_set1_epi32(four_values(x[r * ldx + b], 4 * k));
                    MOE_UNROLL
                    for (int h = 0; h < H; ++h)
                        s[r][h] = _mm256_add_epi32(
                            s[r][h], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude[h], _mm256_sign_epi8(xv, q[h])), ones));
                }
            }
        }
        __m256 dw[H];
        MOE_UNROLL
        for (int h = 0; h < H; ++h)
            dw[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + h / 2 * group_bytes + b * 32 + h % 2 * 16)));
        MOE_UNROLL
        for (int r = 0; r < R; ++r) {
            const __m256 dx = _mm256_set1_ps(x[r * ldx + b].scale);
            MOE_UNROLL
            for (int h = 0; h < H; ++h) acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][h]), _mm256_mul_ps(dx, dw[h]), acc[r][h]);
        }
    }
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        MOE_UNROLL
        for (int h = 0; h < H; ++h) _mm256_storeu_ps(z + r * ldz + 8 * h, acc[r][h]);
    }
}

/// Tiles of 2 rows of x by one group (16 rows) of W, one row by 2 groups when decoding.
struct family {
    static constexpr int rows = 2, groups = 1, decode_groups = 2;
    static constexpr index w_groups = 4;
    template <int R, int J, class Block>
    static void run(const q8_0_input* x, index ldx, const std::uint8_t* w, index group_bytes, index blocks, float* z, index ldz) {
        tile<R, J, Block>(x, ldx, w, group_bytes, blocks, z, ldz);
    }
};

}  // namespace quant_avx2
MOE_TARGET_END

MOE_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")
namespace quant_vnni {

// All-true masks: the masked forms of these intrinsics compile to the same instructions, without the
// undefined pass-through that GCC 12 warns about once they are inlined (GCC bug 105593).
constexpr __mmask16 full16 = 0xFFFF;

/// Tiles of R rows of x by J groups of W (one 512-bit vector of 16 rows each), block by block: each
/// 64-byte line of the group's tile against 4 of x's values broadcast, by `vpdpbusd` (the stored
/// unsigned bytes times x's signed ones) from sum_offset; q4_0's line twice (low nibbles against values
/// 4k.., high ones against 16 + 4k..).
template <int R, int J, class Block>
void tile(const q8_0_input* x, index ldx, const std::uint8_t* w, index group_bytes, index blocks, float* z, index ldz) {
    constexpr bool nibbles = std::is_same_v<Block, q4_0_block>;
    constexpr index tile_bytes = packing<Block>::tile_bytes;
    const std::uint8_t* scales = scales_of<Block>(w, blocks);
    __m512 acc[R][J];
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        MOE_UNROLL
        for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
    }
    for (index b = 0; b < blocks; ++b) {
        const std::uint8_t* wb = w + b * tile_bytes;
        if constexpr (R == 1) ask_ahead<Block, J>(wb, group_bytes);
        __m512i s[R][J];
        MOE_UNROLL
        for (int r = 0; r < R; ++r) {
            const __m512i start = _mm512_set1_epi32(sum_offset<Block>(x[r * ldx + b]));
            MOE_UNROLL
            for (int j = 0; j < J; ++j) s[r][j] = start;
        }
        if constexpr (nibbles) {
            const __m512i low = _mm512_set1_epi8(15);
            MOE_UNROLL
            for (int k = 0; k < 4; ++k) {
                __m512i lo[J], hi[J];
                MOE_UNROLL
                for (int j = 0; j < J; ++j) {
                    const __m512i v = _mm512_load_si512(wb + j * group_bytes + k * 64);
                    lo[j] = _mm512_and_si512(v, low);
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
                MOE_UNROLL
                for (int r = 0; r < R; ++r) {
                    const __m512i xl = _mm512_set1_epi32(four_values(x[r * ldx + b], 4 * k)),
                                  xh = _mm512_set1_epi32(four_values(x[r * ldx + b], 16 + 4 * k));
                    MOE_UNROLL
                    for (int j = 0; j < J; ++j) s[r][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[r][j], lo[j], xl), hi[j], xh);
                }
            }
        } else {
            MOE_UNROLL
            for (int k = 0; k < 8; ++k) {
                __m512i v[J];
                MOE_UNROLL
                for (int j = 0; j < J; ++j) v[j] = _mm512_load_si512(wb + j * group_bytes + k * 64);
                MOE_UNROLL
                for (int r = 0; r < R; ++r) {
                    const __m512i xv = _mm512_set1_epi32(four_values(x[r * ldx + b], 4 * k));
                    MOE_UNROLL
                    for (int j = 0; j < J; ++j) s[r][j] = _mm512_dpbusd_epi32(s[r][j], v[j], xv);
                }
            }
        }
        __m512 dw[J];
        MOE_UNROLL
        for (int j = 0; j < J; ++j)
            dw[j] = _mm512_maskz_cvtph_ps(full16, _mm256_load_si256(reinterpret_cast<const __m256i*>(scales + j * group_bytes + b * 32)));
        MOE_UNROLL
        for (int r = 0; r < R; ++r) {
            const __m512 dx = _mm512_set1_ps(x[r * ldx + b].scale);
            MOE_UNROLL
            for (int j = 0; j < J; ++j)
                acc[r][j] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(full16, s[r][j]), _mm512_mul_ps(dx, dw[j]), acc[r][j]);
        }
    }
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        MOE_UNROLL
        for (int j = 0; j < J; ++j) _mm512_storeu_ps(z + r * ldz + 16 * j, acc[r][j]);
    }
}

/// Tiles of 4 rows of x by 2 groups (32 rows) of W, one row by 4 groups when decoding.
struct family {
    static constexpr int rows = 4, groups = 2, decode_groups = 4;
    static constexpr index w_groups = 4;
    template <int R, int J, class Block>
    static void run(const q8_0_input* x, index ldx, const std::uint8_t* w, index group_bytes, index blocks, float* z, index ldz) {
        tile<R, J, Block>(x, ldx, w, group_bytes, blocks, z, ldz);
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

// A build for a CPU with the dot product (-march=armv8.4-a, -mcpu=neoverse-n1, ...) has it already;
// otherwise the region is built for Armv8.2 with it (a lower or equal base: Debian's armv8-a).
#pragma GCC push_options
#if !defined(__ARM_FEATURE_DOTPROD)
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif
namespace quant_neon {

/// Tiles of R rows of x by J groups of W (4 vectors of 4 rows each), block by block: `sdot` by lane
/// (4 of x's values, from a vector of 16, against 4 bytes of each of 4 rows); q8_0's stored bytes back
/// to signed q, q4_0's nibbles (below 16: signed too) from sum_offset.
template <int R, int J, class Block>
void tile(const q8_0_input* x, index ldx, const std::uint8_t* w, index group_bytes, index blocks, float* z, index ldz) {
    constexpr int Q = 4 * J;
    constexpr bool nibbles = std::is_same_v<Block, q4_0_block>;
    constexpr index tile_bytes = packing<Block>::tile_bytes;
    const std::uint8_t* scales = scales_of<Block>(w, blocks);
    float32x4_t acc[R][Q];
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        MOE_UNROLL
        for (int q = 0; q < Q; ++q) acc[r][q] = vdupq_n_f32(0);
    }
    for (index b = 0; b < blocks; ++b) {
        const std::uint8_t* wb = w + b * tile_bytes;
        if constexpr (R == 1) ask_ahead<Block, J>(wb, group_bytes);
        int32x4_t s[R][Q];
        int8x16_t xl[R], xh[R];
        MOE_UNROLL
        for (int r = 0; r < R; ++r) {
            const q8_0_input& xr = x[r * ldx + b];
            xl[r] = vld1q_s8(xr.values);
            xh[r] = vld1q_s8(xr.values + 16);
            const int32x4_t start = vdupq_n_s32(nibbles ? sum_offset<Block>(xr) : 0);
            MOE_UNROLL
            for (int q = 0; q < Q; ++q) s[r][q] = start;
        }
        const auto line = [&]<int K>() {
            MOE_UNROLL
            for (int q = 0; q < Q; ++q) {
                const uint8x16_t v = vld1q_u8(wb + q / 4 * group_bytes + K * 64 + q % 4 * 16);
                if constexpr (nibbles) {
                    const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))), hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                    MOE_UNROLL
                    for (int r = 0; r < R; ++r) s[r][q] = vdotq_laneq_s32(vdotq_laneq_s32(s[r][q], lo, xl[r], K), hi, xh[r], K);
                } else {
                    const int8x16_t signed_q = vreinterpretq_s8_u8(veorq_u8(v, vdupq_n_u8(0x80)));
                    MOE_UNROLL
                    for (int r = 0; r < R; ++r) s[r][q] = vdotq_laneq_s32(s[r][q], signed_q, K < 4 ? xl[r] : xh[r], K % 4);
                }
            }
        };
        [&]<int... K>(std::integer_sequence<int, K...>) {
            (line.template operator()<K>(), ...);
        }(std::make_integer_sequence<int, nibbles ? 4 : 8>());
        MOE_UNROLL
        for (int q = 0; q < Q; ++q) {
            const float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const std::uint16_t*>(
                scales + q / 4 * group_bytes + b * 32 + q % 4 * 8))));
            MOE_UNROLL
            for (int r = 0; r < R; ++r)
                acc[r][q] = vfmaq_f32(acc[r][q], vcvtq_f32_s32(s[r][q]), vmulq_n_f32(dw, x[r * ldx + b].scale));
        }
    }
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        MOE_UNROLL
        for (int q = 0; q < Q; ++q) vst1q_f32(z + r * ldz + 4 * q, acc[r][q]);
    }
}

/// Tiles of 2 rows of x by one group (16 rows) of W.
struct family {
    static constexpr int rows = 2, groups = 1, decode_groups = 1;
    static constexpr index w_groups = 4;
    template <int R, int J, class Block>
    static void run(const q8_0_input* x, index ldx, const std::uint8_t* w, index group_bytes, index blocks, float* z, index ldz) {
        tile<R, J, Block>(x, ldx, w, group_bytes, blocks, z, ldz);
    }
};

}  // namespace quant_neon
#pragma GCC pop_options
#endif

/// `Family::run<R, J>` for J groups or fewer (the edge of a block of groups).
template <class Family, int R, int J, class Block>
void quant_edge(index groups, const q8_0_input* x, index ldx, const std::uint8_t* w, index group_bytes, index blocks, float* z,
                index ldz) {
    if constexpr (J > 1)
        if (groups < J) return quant_edge<Family, R, J - 1, Block>(groups, x, ldx, w, group_bytes, blocks, z, ldz);
    Family::template run<R, J, Block>(x, ldx, w, group_bytes, blocks, z, ldz);
}

/// z = x W[row, row + m)^T by a family's tiles. The groups wholly inside the rows asked for: blocks of
/// `w_groups` groups that stay in L2 while the rows of x pass, `rows` x `groups` tiles (then 2 x
/// `groups`), a single row of x (decoding) against `decode_groups` groups at a time. A group cut by the
/// range's ends (never, for the layer's tasks): one row of x at a time into a scratch tile, of which the
/// wanted outputs are kept.
template <class Family, class Block>
void quant_linear(const q8_0_input* x, index ldx, const quantized_matrix<Block>& w, index row, index m, float* z, index ldz,
                  index n) {
    constexpr index G = quantized_matrix<Block>::group_rows;
    const index blocks = w.blocks_per_row(), gb = w.group_bytes();
    const index first = (row + G - 1) / G, last = std::max(first, (row + m) / G);  // whole groups [first, last)
    for (index g = row / G; g < (row + m + G - 1) / G; ++g) {
        if (g >= first && g < last) continue;
        const index from = std::max(row, g * G), to = std::min(row + m, (g + 1) * G);
        alignas(64) float scratch[G];
        for (index r = 0; r < n; ++r) {
            Family::template run<1, 1, Block>(x + r * ldx, ldx, w.group(g), gb, blocks, scratch, G);
            std::copy(scratch + (from - g * G), scratch + (to - g * G), z + r * ldz + (from - row));
        }
    }
    for (index g0 = first; g0 < last; g0 += Family::w_groups) {
        const index g1 = std::min(last, g0 + Family::w_groups);
        index r = 0;
        const auto rows_of = [&]<int R, int J>() {
            for (; r + R <= n; r += R)
                for (index g = g0; g < g1; g += J)
                    quant_edge<Family, R, J, Block>(std::min<index>(J, g1 - g), x + r * ldx, ldx, w.group(g), gb, blocks,
                                                    z + r * ldz + (g * G - row), ldz);
        };
        rows_of.template operator()<Family::rows, Family::groups>();
        if constexpr (Family::rows > 2) rows_of.template operator()<2, Family::groups>();
        rows_of.template operator()<1, Family::decode_groups>();
    }
}

/// Which family runs the quantized products: VNNI where the AVX-512 families run and the CPU has it,
/// AVX2 where AVX2 runs, NEON `sdot` on aarch64 where the CPU has it, else the portable code.
template <class F>
decltype(auto) with_quant_family(F&& f) {
#if defined(MOE_X86_DISPATCH)
    if (active_isa() >= isa::avx512 && has_vnni()) return f(quant_vnni::family{});
    if (active_isa() >= isa::avx2) return f(quant_avx2::family{});
#endif
#if defined(MOE_NEON_DOTPROD)
    if (has_dotprod()) return f(quant_neon::family{});
#endif
    return f(quant_portable{});
}

}  // namespace kernels::detail

namespace kernels {

/// z = x W[row, row + m)^T for n rows of x quantized to q8_0 (`quantize_input`, rows `ldx` blocks apart;
/// as many blocks a row as W has) and rows [row, row + m) of quantized W; z float (n x m, row stride
/// ldz). Every output is the sum documented at the top of this header, bit for bit on every family.
/// shape_error for rows outside W.
template <quantized_block Block>
void linear(const q8_0_input* x, index ldx, const quantized_matrix<Block>& w, index row, index m, float* z, index ldz, index n) {
    if (row < 0 || m < 0 || row + m > w.rows())
        throw shape_error("linear (quantized): rows [" + std::to_string(row) + ", " + std::to_string(row + m) +
                          ") of a matrix of " + std::to_string(w.rows()) + " rows");
    if (n == 0 || m == 0) return;
    detail::with_quant_family(
        [&](auto family) { detail::quant_linear<decltype(family)>(x, ldx, w, row, m, z, ldz, n); });
}

/// The instantiations of this header a program may build once (as `MOE_LINEAR_INSTANCES`).
#define MOE_QUANTIZED_INSTANCES(EXTERN) \
    EXTERN template void linear(const q8_0_input*, index, const quantized_matrix<q8_0_block>&, index, index, float*, \
                                index, index); \
    EXTERN template void linear(const q8_0_input*, index, const quantized_matrix<q4_0_block>&, index, index, float*, \
                                index, index);
#if defined(MOE_EXTERN_TEMPLATES)
MOE_QUANTIZED_INSTANCES(extern)
#endif

}  // namespace kernels

}  // namespace moe
