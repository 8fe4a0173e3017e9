#pragma once
/// \file
/// Expert FFN types (SwiGLU, GeGLU, MLP), their weight layout, and the kernels that run one expert
/// over a block of rows and columns: the (fused gate and up) input projection with the activation and
/// product, the output projection (both `kernels::linear`), and the backward of the same
/// (`kernels::multiply`). The layer cuts each FFN's work into such blocks for its threads
/// (detail/expert_pass.hpp); `ffn_forward` runs all of one FFN at once.

#include "moe/error.hpp"
#include "moe/experts/storage.hpp"
#include "moe/kernels/activations.hpp"
#include "moe/kernels/linear.hpp"
#include "moe/kernels/multiply.hpp"
#include "moe/types.hpp"

#include <concepts>
#include <span>
#include <string>

namespace moe {

/// Weights of one FFN, stored [out_features, in_features] as checkpoints store them, as weight storage
/// `Storage` says (experts/storage.hpp: the layer's scalar type, bf16 or quantized blocks).
template <class Storage>
struct ffn_weights {
    using storage = Storage;
    /// Input projection, (gated ? 2*ff : ff) x d. Gated experts keep the gate rows first, then the up rows,
    /// so both projections are one GEMM.
    typename Storage::matrix in;
    /// Output (down) projection, d x ff.
    typename Storage::matrix out;
};

/// An expert FFN policy: what one routed (or shared) expert computes. It must provide:
///
/// - `static constexpr bool gated`: the output is `W_out (act(W_gate x) * (W_up x))` when true (GLU
///   experts: the input projection `in` has 2 * ff rows, the gate's first), `W_out act(W_in x)` when
///   false (`in` has ff rows).
/// - `activation act() const`: one of `moe::activation` (kernels/activations.hpp holds each one's
///   forward and derivative; a new activation is added there, to both).
/// - Optionally `using storage = S`: the `weight_storage` of its weights (`experts::stored_as`); without
///   it, the layer's scalar type (`storages::scalar<Scalar>`, the one storage a layer trains on).
///
/// And guarantee: it holds no weights (the layer keeps them in `ffn_weights` of this layout, one per
/// expert, and runs every expert of the layer with one policy object), and `act()` is the same on
/// every call. What the layer computes with it, forward and backward: docs/semantics.md, "Expert FFNs".
template <class X>
concept expert_ffn = std::copy_constructible<X> && requires(const X& x) {
    { X::gated } -> std::convertible_to<bool>;
    { x.act() } -> std::same_as<activation>;
};

namespace experts {

/// SwiGLU: `W_down (silu(W_gate x) * (W_up x))` (Mixtral, Qwen-MoE, OLMoE, DeepSeek).
struct swiglu {
    static constexpr bool gated = true;
    [[nodiscard]] constexpr activation act() const { return activation::silu; }
};

/// GeGLU: `W_down (gelu(W_gate x) * (W_up x))`, erf gelu (Switch gated-gelu, T5 style).
struct geglu {
    static constexpr bool gated = true;
    [[nodiscard]] constexpr activation act() const { return activation::gelu; }
};

/// MLP: `W_down act(W_up x)` (Switch, GShard, ViT-MoE).
struct mlp {
    activation function = activation::relu;
    static constexpr bool gated = false;
    [[nodiscard]] constexpr activation act() const { return function; }
};

/// X with the layer's expert weights (routed and shared) held in weight storage S (experts/storage.hpp).
/// A layer whose storage cannot train has no training mode, backward or `parameters`.
template <expert_ffn X, class S>
struct stored_as : X {
    using storage = S;
};

/// X with bf16 weights (`storages::bfloat16`).
template <expert_ffn X>
using bf16_weights = stored_as<X, storages::bfloat16>;
/// X with q8_0 weights (`storages::q8_0`).
template <expert_ffn X>
using q8_0_weights = stored_as<X, storages::q8_0>;
/// X with q4_0 weights (`storages::q4_0`).
template <expert_ffn X>
using q4_0_weights = stored_as<X, storages::q4_0>;

static_assert(expert_ffn<swiglu> && expert_ffn<geglu> && expert_ffn<mlp> && expert_ffn<bf16_weights<swiglu>>);

}  // namespace experts

namespace detail {
template <class X, class Scalar>
struct storage_of {
    using type = storages::scalar<Scalar>;
};
template <class X, class Scalar>
    requires requires { typename X::storage; }
struct storage_of<X, Scalar> {
    using type = typename X::storage;
};
}  // namespace detail

/// The weight storage a layer of `Scalar` holds the weights of expert `X` in: `X::storage` where X names
/// one (`experts::stored_as`), else `storages::scalar<Scalar>`.
template <expert_ffn X, class Scalar>
using storage_t = typename detail::storage_of<X, Scalar>::type;

/// Rows of the input projection of an expert of width `ff`.
template <expert_ffn X>
constexpr index ffn_in_rows(index ff) {
    return X::gated ? 2 * ff : ff;
}

/// Columns [c0, c1) of an FFN's hidden layer for the n rows of x, the projection's inputs (`S::input`,
/// rows ldx input elements apart): the input projection's rows of those columns (gated: the gate rows
/// c0.. and the up rows ff + c0..) as h = x W_in^T, then a = act(h) (gated: act(h_gate) * h_up). `h`
/// points at the block's first gate value, its up values `up_offset` further, rows `ldh` apart; `a` at
/// its first value, rows `lda` apart. Each value is its storage's dot product of its two rows
/// (`S::project`), so it does not depend on the block it is computed in.
template <expert_ffn X, class S, class Scalar>
void ffn_hidden_columns(const X& expert, const ffn_weights<S>& w, const typename S::input* x, index ldx, index n, index c0,
                        index c1, Scalar* h, index ldh, [[maybe_unused]] index up_offset, Scalar* a, index lda) {
    const index ff = w.out.cols(), cols = c1 - c0;
    S::project(x, ldx, w.in, c0, cols, h, ldh, n);
    if constexpr (X::gated) S::project(x, ldx, w.in, ff + c0, cols, h + up_offset, ldh, n);
    kernels::with_activation(expert.act(), [&]<activation A>() {
        for (index r = 0; r < n; ++r) {
            const Scalar* hr = h + r * ldh;
            if constexpr (X::gated)
                kernels::gated_activate<A>(hr, hr + up_offset, a + r * lda, cols);
            else
                kernels::activate<A>(hr, a + r * lda, cols);
        }
    });
}

/// Columns [c0, c1) of an FFN's output for n rows of activations a, as the projection's inputs (rows lda
/// input elements apart): out = a W_out^T for those columns, at `out` (the block's first value, rows
/// ldo apart).
template <class S, class Scalar>
void ffn_output_columns(const ffn_weights<S>& w, const typename S::input* a, index lda, index n, index c0, index c1,
                        Scalar* out, index ldo) {
    S::project(a, lda, w.out, c0, c1 - c0, out, ldo, n);
}

/// Backward of `ffn_hidden_columns` for columns [c0, c1) of n rows: da = dout W_out[:, c0:c1] (dout's
/// rows ldd apart; da is n x (c1 - c0) scratch), then a (recomputed, as the forward had it) and dL/dh in
/// place of h (same pointers and strides as the forward's).
template <expert_ffn X, class Scalar>
void ffn_hidden_columns_backward(const X& expert, const ffn_weights<storages::scalar<Scalar>>& w, const Scalar* dout, index ldd, index n,
                                 index c0, index c1, Scalar* h, index ldh, [[maybe_unused]] index up_offset, Scalar* a,
                                 index lda, Scalar* da) {
    const index ff = w.out.cols(), d = w.out.rows(), cols = c1 - c0;
    kernels::multiply(kernels::strided<Scalar>{dout, ldd, 1}, w.out.data() + c0, ff, da, cols, n, cols, d, false);
    kernels::with_activation(expert.act(), [&]<activation A>() {
        for (index r = 0; r < n; ++r) {
            Scalar* hr = h + r * ldh;
            if constexpr (X::gated)
                kernels::gated_activate_backward<A>(hr, hr + up_offset, da + r * cols, a + r * lda, hr, hr + up_offset, cols);
            else
                kernels::activate_backward<A>(hr, da + r * cols, a + r * lda, hr, cols);
        }
    });
}

/// Rows [r0, r1) x columns [c0, c1) of a weight gradient, g = left^T right over n rows (rows of left
/// ldl apart, of right ldr apart; g's rows ldg apart): dW_out = dout^T a, dW_in = dh^T x. Each value is
/// summed over the rows in order (`kernels::multiply`), whatever the block; with `accumulate` the sum
/// continues from the value g holds.
template <class Scalar>
void ffn_weight_gradient(const Scalar* left, index ldl, const Scalar* right, index ldr, index n, index r0, index r1,
                         index c0, index c1, Scalar* g, index ldg, bool accumulate = false) {
    kernels::multiply(kernels::strided<Scalar>{left + r0, 1, ldl}, right + c0, ldr, g + r0 * ldg + c0, ldg, r1 - r0,
                      c1 - c0, n, accumulate);
}

/// Columns [c0, c1) of dL/dx = dh W_in for n rows of dh (rows ldh apart), at `dx` (the block's first
/// value, rows lddx apart).
template <class Scalar>
void ffn_input_gradient(const ffn_weights<storages::scalar<Scalar>>& w, const Scalar* dh, index ldh, index n, index c0, index c1, Scalar* dx,
                        index lddx) {
    const index d = w.in.cols();
    kernels::multiply(kernels::strided<Scalar>{dh, ldh, 1}, w.in.data() + c0, d, dx, lddx, n, c1 - c0, w.in.rows(), false);
}

/// out = FFN(x) for the n rows of `x` (n x d), all columns at once. `h` (n x in-rows) and `a` (n x ff)
/// are scratch; so is `converted` (n x max(d, ff) / S::unit inputs, else `shape_error`) where the
/// storage converts a projection's inputs (bf16, quantized), unused otherwise.
template <expert_ffn X, class Scalar, class S>
void ffn_forward(const X& expert, const ffn_weights<S>& w, const Eigen::Map<const matrix<Scalar>>& x,
                 Eigen::Map<matrix<Scalar>>& h, Eigen::Map<matrix<Scalar>>& a, Eigen::Map<matrix<Scalar>>& out,
                 [[maybe_unused]] std::span<typename S::input> converted = {}) {
    const index n = x.rows(), d = x.cols(), ff = w.out.cols();
    const auto input = [&](const Scalar* v, index cols) -> const typename S::input* {
        if constexpr (std::is_same_v<typename S::input, Scalar>) {
            return v;
        } else {
            if (static_cast<index>(converted.size()) < n * cols / S::unit)
                throw shape_error("ffn_forward: " + std::string(S::name) + " weights need " +
                                  std::to_string(n * cols / S::unit) + " inputs to convert the rows to, got " +
                                  std::to_string(converted.size()));
            S::convert(v, converted.data(), n * cols);
            return converted.data();
        }
    };
    ffn_hidden_columns(expert, w, input(x.data(), d), d / S::unit, n, 0, ff, h.data(), h.cols(), ff, a.data(), ff);
    ffn_output_columns(w, input(a.data(), ff), ff / S::unit, n, 0, d, out.data(), d);
}

}  // namespace moe
