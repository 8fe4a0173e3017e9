#pragma once
/// \file
/// SIMD activation kernels (xsimd) for the expert FFNs: relu, gelu (erf form), silu, and the fused
/// gated product `act(g) * u` of SwiGLU and GeGLU, in one pass over a row.

#include "moe/types.hpp"

#include <xsimd/xsimd.hpp>

#include <cmath>
#include <string_view>

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
