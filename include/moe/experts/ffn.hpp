#pragma once
/// \file
/// Expert FFN types (SwiGLU, GeGLU, MLP), their weight layout, and the kernels that run one expert
/// over a block of rows: a GEMM for the (fused gate and up) input projection, one SIMD pass for the
/// activation and product, a GEMM for the output projection (both `kernels::linear`); and the backward
/// of the same (`kernels::multiply`).

#include "moe/error.hpp"
#include "moe/kernels/activations.hpp"
#include "moe/kernels/linear.hpp"
#include "moe/kernels/multiply.hpp"
#include "moe/types.hpp"

#include <concepts>
#include <span>
#include <string>

namespace moe {

/// Weights of one FFN, stored [out_features, in_features] as checkpoints store them, as `Scalar` (the
/// layer's, or bf16: see `experts::bf16_weights`).
template <class Scalar>
struct ffn_weights {
    /// Input projection, (gated ? 2*ff : ff) x d. Gated experts keep the gate rows first, then the up rows,
    /// so both projections are one GEMM.
    matrix<Scalar> in;
    /// Output (down) projection, d x ff.
    matrix<Scalar> out;
};

/// An expert FFN policy: `static constexpr bool gated` (output `W_out (act(W_gate x) * (W_up x))` when
/// true, `W_out act(W_in x)` when false) and `activation act() const`. It holds no weights; the layer
/// stores them in `ffn_weights` of the policy's layout.
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

/// X with the layer's expert weights (routed and shared) stored as bf16, as checkpoints store them:
/// half the memory and the bytes a decode step streams. The layer's inputs, outputs and sums stay
/// float32: each projection rounds its input rows to bf16 and sums the exact products in float32
/// (`kernels::linear`, AVX-512 BF16 where the CPU has it). For inference: such a layer has no
/// backward.
template <expert_ffn X>
struct bf16_weights : X {
    using weight_type = bf16;
};

static_assert(expert_ffn<swiglu> && expert_ffn<geglu> && expert_ffn<mlp> && expert_ffn<bf16_weights<swiglu>>);

}  // namespace experts

namespace detail {
template <class X, class Scalar>
struct weight_type_of {
    using type = Scalar;
};
template <class X, class Scalar>
    requires requires { typename X::weight_type; }
struct weight_type_of<X, Scalar> {
    using type = typename X::weight_type;
};
}  // namespace detail

/// The element type a layer of `Scalar` stores the weights of expert `X` in: `X::weight_type` where X
/// names one (`experts::bf16_weights`), else Scalar.
template <expert_ffn X, class Scalar>
using weight_type_t = typename detail::weight_type_of<X, Scalar>::type;

/// Rows of the input projection of an expert of width `ff`.
template <expert_ffn X>
constexpr index ffn_in_rows(index ff) {
    return X::gated ? 2 * ff : ff;
}

/// out = x W^T for a row-major block x (n x d) and a row-major W (m x d) (`kernels::linear`). With
/// bf16 W, x is first rounded to bf16 into `rounded` (at least n x d values, else `shape_error`).
template <class Scalar, class Weight>
void project(const Eigen::Map<const matrix<Scalar>>& x, const matrix<Weight>& w, Eigen::Map<matrix<Scalar>>& out,
             [[maybe_unused]] std::span<bf16> rounded) {
    const index n = x.rows(), d = x.cols();
    if constexpr (std::is_same_v<Weight, Scalar>) {
        kernels::linear(x.data(), d, w.data(), w.cols(), out.data(), out.cols(), n, w.rows(), d);
    } else {
        static_assert(std::is_same_v<Weight, bf16> && std::is_same_v<Scalar, float>, "bf16 weights need float rows");
        if (static_cast<index>(rounded.size()) < n * d)
            throw shape_error("project: bf16 weights need " + std::to_string(n * d) + " values to round the input to, got " +
                              std::to_string(rounded.size()));
        kernels::round_to_bf16(x.data(), rounded.data(), n * d);
        kernels::linear(rounded.data(), d, w.data(), w.cols(), out.data(), out.cols(), n, w.rows(), d);
    }
}

/// out = FFN(x) for the n rows of `x` (n x d). `h` (n x in-rows) and `a` (n x ff) are scratch; with
/// bf16 weights so is `rounded` (n x max(d, ff) values, else `shape_error`), unused otherwise.
template <expert_ffn X, class Scalar, class Weight>
void ffn_forward(const X& expert, const ffn_weights<Weight>& w, const Eigen::Map<const matrix<Scalar>>& x,
                 Eigen::Map<matrix<Scalar>>& h, Eigen::Map<matrix<Scalar>>& a, Eigen::Map<matrix<Scalar>>& out,
                 std::span<bf16> rounded = {}) {
    const index n = x.rows(), ff = w.out.cols();
    project(x, w.in, h, rounded);
    kernels::with_activation(expert.act(), [&]<activation A>() {
        for (index r = 0; r < n; ++r) {
            const Scalar* hr = h.row(r).data();
            if constexpr (X::gated)
                kernels::gated_activate<A>(hr, hr + ff, a.row(r).data(), ff);
            else
                kernels::activate<A>(hr, a.row(r).data(), ff);
        }
    });
    project(Eigen::Map<const matrix<Scalar>>(a.data(), n, ff), w.out, out, rounded);
}

/// Backward of `ffn_forward` for the n rows of `x`. `h` holds x W_in^T as the forward computed it and
/// is overwritten with its gradient; `dout` is dL/dout. Writes dL/dW_in and dL/dW_out to `grad` (adds
/// them when `accumulate`) and dL/dx to `dx`. `a` and `da` (n x ff) are scratch.
template <expert_ffn X, class Scalar>
void ffn_backward(const X& expert, const ffn_weights<Scalar>& w, const Eigen::Map<const matrix<Scalar>>& x,
                  Eigen::Map<matrix<Scalar>>& h, const Eigen::Map<const matrix<Scalar>>& dout, Eigen::Map<matrix<Scalar>>& a,
                  Eigen::Map<matrix<Scalar>>& da, ffn_weights<Scalar>& grad, bool accumulate, Eigen::Map<matrix<Scalar>>& dx) {
    using kernels::strided;
    const index n = x.rows(), ff = w.out.cols(), d = x.cols(), in = w.in.rows();
    kernels::multiply(strided<Scalar>{dout.data(), dout.outerStride(), 1}, w.out.data(), ff, da.data(), da.outerStride(), n,
                      ff, d, false);
    kernels::with_activation(expert.act(), [&]<activation A>() {
        for (index r = 0; r < n; ++r) {
            Scalar* hr = h.row(r).data();
            if constexpr (X::gated)
                kernels::gated_activate_backward<A>(hr, hr + ff, da.row(r).data(), a.row(r).data(), hr, hr + ff, ff);
            else
                kernels::activate_backward<A>(hr, da.row(r).data(), a.row(r).data(), hr, ff);
        }
    });
    // dW_out (+)= dout^T a, dW_in (+)= dh^T x, dx = dh W_in.
    kernels::multiply(strided<Scalar>{dout.data(), 1, dout.outerStride()}, a.data(), a.outerStride(), grad.out.data(), ff, d,
                      ff, n, accumulate);
    kernels::multiply(strided<Scalar>{h.data(), 1, h.outerStride()}, x.data(), x.outerStride(), grad.in.data(), d, in, d, n,
                      accumulate);
    kernels::multiply(strided<Scalar>{h.data(), h.outerStride(), 1}, w.in.data(), d, dx.data(), dx.outerStride(), n, d, in,
                      false);
}

}  // namespace moe
