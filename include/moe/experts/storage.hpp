#pragma once
/// \file
/// How a layer holds its expert weights (routed and shared), as a policy: the `weight_storage`
/// contract and the four storages of the library, `storages::scalar<Scalar>` (the layer's own type,
/// trainable), `storages::bfloat16`, `storages::q8_0` and `storages::q4_0` (inference only). An expert
/// policy names its storage (`experts::stored_as<X, S>`, e.g. `experts::q4_0_weights<swiglu>`); the
/// layer, the FFN kernels, checkpoint loading and `moe-run` ask the storage and name none of them.

#include "moe/error.hpp"
#include "moe/kernels/linear.hpp"
#include "moe/kernels/quantized.hpp"
#include "moe/types.hpp"

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <span>
#include <string_view>
#include <type_traits>

namespace moe {

/// A weight storage for a layer of `Scalar` (see the storages below for the four of the library):
///
/// - `S::matrix`: one weight matrix, [out_features, in_features] as checkpoints store them, built as
///   `matrix(rows, cols)` (zeros), with `rows()` and `cols()` counting values.
/// - `S::input`: what a projection's input rows are converted to; `S::unit`: values per input element
///   and the granularity of the matrix's columns (1, or 32 for blocks: `cols()` and every input row's
///   length are then multiples of it, and a row of n values is n / unit input elements).
/// - `S::convert(x, out, n)`: n values of x (a multiple of unit) as inputs; never throws (the layer
///   converts inside its tasks), whatever the values.
/// - `S::project(x, ldx, w, row, m, z, ldz, n)`: z = x W[row, row + m)^T for n input rows of x (ldx input
///   elements apart), z's rows ldz apart, every output's bits depending only on its two rows (so not on
///   the block of rows or columns a task computes: see kernels/linear.hpp).
/// - `S::assign(w, row, values, n)`: rows [row, row + n) of w from n x cols float values (checkpoint
///   loading, `layer::randomize`); may throw `value_error` for a value it cannot hold.
/// - `S::bytes(w)`: the bytes w holds; `S::raw(w)`: those bytes as one span, which another process
///   holding a matrix of the same shape copies into its own to have the same weights (expert
///   parallelism's re-balancing moves weights so). `S::trainable`: whether a layer can train on it (then `matrix`
///   is `aligned_matrix<Scalar>`, which the backward kernels take). `S::name`: as `moe-run --weights`
///   spells it.
template <class S, class Scalar>
concept weight_storage =
    requires {
        typename S::matrix;
        typename S::input;
        { S::unit } -> std::convertible_to<index>;
        { S::trainable } -> std::convertible_to<bool>;
        { S::name } -> std::convertible_to<std::string_view>;
    } && std::is_trivially_copyable_v<typename S::input> && std::constructible_from<typename S::matrix, index, index> &&
    requires(typename S::matrix& w, const typename S::matrix& cw, const Scalar* x, typename S::input* in,
             const typename S::input* cin, const float* values, Scalar* z, index n) {
        { cw.rows() } -> std::convertible_to<index>;
        { cw.cols() } -> std::convertible_to<index>;
        S::convert(x, in, n);
        S::project(cin, n, cw, n, n, z, n, n);
        S::assign(w, n, values, n);
        { S::bytes(cw) } -> std::convertible_to<std::size_t>;
        { S::raw(w) } -> std::same_as<std::span<std::byte>>;
    } &&
    (!S::trainable || (std::is_same_v<typename S::matrix, aligned_matrix<Scalar>> && std::is_same_v<typename S::input, Scalar>));

namespace storages {

/// Weights as the layer's own scalar type, trainable (the default of every expert policy).
template <std::floating_point Scalar>
struct scalar {
    using matrix = aligned_matrix<Scalar>;
    using input = Scalar;
    static constexpr index unit = 1;
    static constexpr bool trainable = true;
    static constexpr std::string_view name = std::is_same_v<Scalar, float> ? "f32" : "f64";

    static void convert(const Scalar* x, Scalar* out, index n) { std::copy_n(x, n, out); }
    static void project(const Scalar* x, index ldx, const matrix& w, index row, index m, Scalar* z, index ldz, index n) {
        kernels::linear(x, ldx, w.data() + row * w.cols(), w.cols(), z, ldz, n, m, w.cols());
    }
    static void assign(matrix& w, index row, const float* values, index n) {
        std::copy_n(values, n * w.cols(), w.data() + row * w.cols());
    }
    static std::size_t bytes(const matrix& w) { return static_cast<std::size_t>(w.size()) * sizeof(Scalar); }
    static std::span<std::byte> raw(matrix& w) { return std::as_writable_bytes(std::span(w.data(), static_cast<std::size_t>(w.size()))); }
};

/// Weights as bf16, as checkpoints store them: half the memory and the bytes a decode step streams. The
/// layer's inputs, outputs and sums stay float32: each projection rounds its input rows to bf16 and sums
/// the exact products in float32 (`kernels::linear`, AVX-512 BF16 where the CPU has it).
struct bfloat16 {
    using matrix = aligned_matrix<bf16>;
    using input = bf16;
    static constexpr index unit = 1;
    static constexpr bool trainable = false;
    static constexpr std::string_view name = "bf16";

    static void convert(const float* x, bf16* out, index n) { kernels::round_to_bf16(x, out, n); }
    static void project(const bf16* x, index ldx, const matrix& w, index row, index m, float* z, index ldz, index n) {
        kernels::linear(x, ldx, w.data() + row * w.cols(), w.cols(), z, ldz, n, m, w.cols());
    }
    static void assign(matrix& w, index row, const float* values, index n) {
        kernels::round_to_bf16(values, w.data() + row * w.cols(), n * w.cols());
    }
    static std::size_t bytes(const matrix& w) { return static_cast<std::size_t>(w.size()) * sizeof(bf16); }
    static std::span<std::byte> raw(matrix& w) { return std::as_writable_bytes(std::span(w.data(), static_cast<std::size_t>(w.size()))); }
};

/// Weights in one of ggml's block formats (`q8_0_block`, `q4_0_block`: kernels/quantized.hpp), quantized
/// from float by ggml's reference quantizer; each projection quantizes its input rows to q8_0 and sums
/// per block the exact integer products times the two scales. Rows of a multiple of 32 values.
template <quantized_block Block>
struct quantized {
    using matrix = quantized_matrix<Block>;
    using input = q8_0_input;
    static constexpr index unit = quant_block;
    static constexpr bool trainable = false;
    static constexpr std::string_view name = std::is_same_v<Block, q8_0_block> ? "q8_0" : "q4_0";

    static void convert(const float* x, q8_0_input* out, index n) { kernels::quantize_input(x, n, out); }
    static void project(const q8_0_input* x, index ldx, const matrix& w, index row, index m, float* z, index ldz,
                        index n) {
        kernels::linear(x, ldx, w, row, m, z, ldz, n);
    }
    static void assign(matrix& w, index row, const float* values, index n) { w.assign(row, values, n); }
    static std::size_t bytes(const matrix& w) { return w.bytes(); }
    static std::span<std::byte> raw(matrix& w) { return w.raw(); }
};

/// ggml's q8_0: 8.5 bits a weight.
using q8_0 = quantized<q8_0_block>;
/// ggml's q4_0: 4.5 bits a weight.
using q4_0 = quantized<q4_0_block>;

static_assert(weight_storage<scalar<float>, float> && weight_storage<scalar<double>, double> &&
              weight_storage<bfloat16, float> && weight_storage<q8_0, float> && weight_storage<q4_0, float>);

}  // namespace storages

namespace detail {
template <class M>
inline constexpr bool is_aligned_matrix = false;
template <class T>
inline constexpr bool is_aligned_matrix<aligned_matrix<T>> = true;

// Whether storage S's matrices are Eigen matrices of numbers (`aligned_matrix`): checkpoint loading and
// `layer::randomize` then write the values in place, converting from the file's or the draw's type
// directly, instead of through `assign`'s float rows.
template <class S>
inline constexpr bool holds_numbers = is_aligned_matrix<typename S::matrix>;
}  // namespace detail

}  // namespace moe
