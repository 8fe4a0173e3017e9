#pragma once
/// \file
/// SIMD activation kernels (xsimd) for the expert FFNs: relu, gelu (erf form), silu, and the fused
/// gated product `act(g) * u` of SwiGLU and GeGLU, in one pass over a row; and their backward passes.

#include "moe/types.hpp"

#include <xsimd/xsimd.hpp>

#include <cmath>
#include <string_view>
#include <type_traits>

namespace moe {

/// Activation function of an expert FFN.
enum class activation { relu, gelu, silu };

/// The activation's name as used in configs ("relu", "gelu", "silu").
constexpr std::string_view activation_name(activation a) {
    switch (a) {
        case activation::relu: return "relu";
        case activation::gelu: return "gelu";
        case activation::silu: return "silu";
    }
    return "?";
}

namespace kernels {

/// act(v) for a SIMD batch or a scalar (the same formula, so tails round like the body).
template <activation A, class V>
inline V apply_activation(const V& v) {
    using std::erf;
    using std::exp;
    using std::max;
    using xsimd::erf;
    using xsimd::exp;
    using xsimd::max;
    if constexpr (A == activation::relu) {
        return max(v, V(0));
    } else if constexpr (A == activation::gelu) {
        // erf form, as PyTorch's default nn.GELU / F.gelu.
        return V(0.5) * v * (V(1) + erf(v * V(0.70710678118654752440)));
    } else {
        return v / (V(1) + exp(-v));
    }
}

/// act'(v), the derivative of `apply_activation<A>`: relu' = [v > 0] (0 at 0, as PyTorch),
/// gelu' = Phi(v) + v phi(v), silu' = sigma(v) (1 + v (1 - sigma(v))).
template <activation A, class V>
inline V activation_derivative(const V& v) {
    using std::erf;
    using std::exp;
    using xsimd::erf;
    using xsimd::exp;
    if constexpr (A == activation::relu) {
        if constexpr (std::is_floating_point_v<V>)
            return v > V(0) ? V(1) : V(0);
        else
            return xsimd::select(v > V(0), V(1), V(0));
    } else if constexpr (A == activation::gelu) {
        const V cdf = V(0.5) * (V(1) + erf(v * V(0.70710678118654752440)));
        return cdf + v * V(0.39894228040143267794) * exp(V(-0.5) * v * v);
    } else {
        const V s = V(1) / (V(1) + exp(-v));
        return s * (V(1) + v * (V(1) - s));
    }
}

/// out[i] = act(in[i]) for i < n.
template <activation A, class Scalar>
void activate(const Scalar* in, Scalar* out, index n) {
    using batch = xsimd::batch<Scalar>;
    constexpr index w = static_cast<index>(batch::size);
    index i = 0;
    for (; i + w <= n; i += w)
        apply_activation<A>(batch::load_unaligned(in + i)).store_unaligned(out + i);
    for (; i < n; ++i) out[i] = apply_activation<A>(in[i]);
}

/// out[i] = act(gate[i]) * up[i] for i < n: the gated product of SwiGLU / GeGLU.
template <activation A, class Scalar>
void gated_activate(const Scalar* gate, const Scalar* up, Scalar* out, index n) {
    using batch = xsimd::batch<Scalar>;
    constexpr index w = static_cast<index>(batch::size);
    index i = 0;
    for (; i + w <= n; i += w)
        (apply_activation<A>(batch::load_unaligned(gate + i)) * batch::load_unaligned(up + i))
            .store_unaligned(out + i);
    for (; i < n; ++i) out[i] = apply_activation<A>(gate[i]) * up[i];
}

/// Backward of `activate`: a[i] = act(h[i]) (the forward's value, recomputed) and
/// dh[i] = da[i] * act'(h[i]). `dh` may alias `h`.
template <activation A, class Scalar>
void activate_backward(const Scalar* h, const Scalar* da, Scalar* a, Scalar* dh, index n) {
    using batch = xsimd::batch<Scalar>;
    constexpr index w = static_cast<index>(batch::size);
    index i = 0;
    for (; i + w <= n; i += w) {
        const batch v = batch::load_unaligned(h + i);
        apply_activation<A>(v).store_unaligned(a + i);
        (batch::load_unaligned(da + i) * activation_derivative<A>(v)).store_unaligned(dh + i);
    }
    for (; i < n; ++i) {
        const Scalar v = h[i];
        a[i] = apply_activation<A>(v);
        dh[i] = da[i] * activation_derivative<A>(v);
    }
}

/// Backward of `gated_activate`: a[i] = act(gate[i]) * up[i] (recomputed),
/// dgate[i] = da[i] * up[i] * act'(gate[i]) and dup[i] = da[i] * act(gate[i]). `dgate` may alias
/// `gate` and `dup` may alias `up`.
template <activation A, class Scalar>
void gated_activate_backward(const Scalar* gate, const Scalar* up, const Scalar* da, Scalar* a, Scalar* dgate,
                             Scalar* dup, index n) {
    using batch = xsimd::batch<Scalar>;
    constexpr index w = static_cast<index>(batch::size);
    index i = 0;
    for (; i + w <= n; i += w) {
        const batch g = batch::load_unaligned(gate + i), u = batch::load_unaligned(up + i);
        const batch d = batch::load_unaligned(da + i), act = apply_activation<A>(g);
        (act * u).store_unaligned(a + i);
        (d * u * activation_derivative<A>(g)).store_unaligned(dgate + i);
        (d * act).store_unaligned(dup + i);
    }
    for (; i < n; ++i) {
        const Scalar g = gate[i], u = up[i], d = da[i], act = apply_activation<A>(g);
        a[i] = act * u;
        dgate[i] = d * u * activation_derivative<A>(g);
        dup[i] = d * act;
    }
}

/// Runs `f.template operator()<A>()` with the activation as a compile-time constant.
template <class F>
decltype(auto) with_activation(activation a, F&& f) {
    switch (a) {
        case activation::relu: return f.template operator()<activation::relu>();
        case activation::gelu: return f.template operator()<activation::gelu>();
        case activation::silu: break;
    }
    return f.template operator()<activation::silu>();
}

}  // namespace kernels
}  // namespace moe
