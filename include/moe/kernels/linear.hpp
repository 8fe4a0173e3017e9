#pragma once
/// \file
/// z = x W^T with W stored [out_features, in_features] as checkpoints store it, computed as dot
/// products along the rows of x and W: both are read contiguously, so nothing is packed (and float
/// rows allocate nothing), and the summation order of an output depends only on the length d (one
/// SIMD accumulator over the body, a horizontal sum, then the scalar tail; float rows longer than 4 KiB
/// in chunks of up to 4 KiB summed so, bf16 rows longer than 16 KiB in chunks of up to 8 KiB, whose sums
/// are added in order). Equal inputs therefore give bitwise equal outputs wherever they sit in the
/// block: identical router rows give exactly tied logits, a token's logits do not change with the
/// batch around it, and an expert's output for a row does not depend on which other rows it was
/// computed with.
///
/// The register tile is up to 4 rows of x times 4 rows of W (16 accumulators; 8 loads per 16 FMAs);
/// its sums are reduced in a tree that is the same for every output (and the same for `dot`): on
/// AVX-512 the 16 sums of a tile together, by shuffles. Rows of x are taken in blocks
/// that stay in L2 while every W row passes once, so W streams from memory once per block: for a few
/// rows (decoding) this reads the weights at memory speed, for many it is a compute-bound GEMM. Long
/// rows pass in their chunks, so that the blocks still hold many rows.
///
/// With bf16 operands (weights kept as checkpoints store them, x rounded by `round_to_bf16`) the
/// products are exact and the sums float32. On the `avx512_bf16` family a tile takes `vdpbf16ps` steps
/// of 32 values (16 pairs per accumulator lane), the last step masked instead of a scalar tail; like
/// that instruction, it treats denormal inputs and sums as zero. The other families' float tiles widen
/// each bf16 exactly to float: as they load it for a few rows of x (under 16 on avx2, 4 on the
/// portable family; decoding reads half the bytes of float weights), else ahead into a scratch of
/// the calling thread (1088 KiB, allocated once: `reserve_bf16_scratch`), x's values once and W's once
/// per group of up to 512 KiB of x rows instead of once per tile; the same products summed in the
/// same order, so the same bits either way.
///
/// Each instruction-set family (`isa.hpp`, chosen at run time) keeps the properties above; two
/// families differ in summation order, so in the last bits.

#include "moe/kernels/detail/products.hpp"
#include "moe/kernels/isa.hpp"
#include "moe/types.hpp"

#include <concepts>

namespace moe::kernels {

/// sum_i a[i] * b[i] in a fixed order: one SIMD accumulator over the body, its horizontal sum, then the
/// scalar tail (for n over 4 KiB, so per chunk, the chunks' sums added in order), on the active
/// family's vectors. `linear` on float or double computes exactly this for
/// every output, so equal inputs give equal bits.
template <std::floating_point Scalar>
Scalar dot(const Scalar* a, const Scalar* b, index n) {
    Scalar z;
    detail::with_products<Scalar>([&]<class P>() { P::template linear<Scalar, Scalar>(a, n, b, n, &z, 1, 1, 1, n); });
    return z;
}

/// The operand types `linear` takes: float or double rows summed in their own type, or bf16 rows
/// summed in float32 (products of bf16 are exact).
template <class In, class Out>
concept linear_operands = (std::floating_point<In> && std::same_as<In, Out>) ||
                          (std::same_as<In, bf16> && std::same_as<Out, float>);

/// z = x W^T: z (n x m, row stride ldz), x (n x d, row stride ldx), w (m x d, row stride ldw). On float
/// and double every output equals `dot(x_r, w_j)` bit for bit; bf16 operands run AVX-512 BF16 dot
/// products on the `avx512_bf16` family, else float tiles that widen each value.
template <class In, class Out>
    requires linear_operands<In, Out>
void linear(const In* x, index ldx, const In* w, index ldw, Out* z, index ldz, index n, index m, index d) {
#if defined(MOE_X86_DISPATCH)
    if constexpr (std::is_same_v<In, bf16>)
        if (active_isa() == isa::avx512_bf16)
            return detail::avx512::linear_with<detail::avx512::bf16_dot_tiles>(x, ldx, w, ldw, z, ldz, n, m, d);
#endif
    detail::with_products<Out>([&]<class P>() { P::template linear<In, Out>(x, ldx, w, ldw, z, ldz, n, m, d); });
}

/// out[i] = to_bf16(x[i]) for i < n: the rows `linear` takes with bf16 weights (vectorised for the
/// active family).
inline void round_to_bf16(const float* x, bf16* out, index n) {
    detail::with_products<float>([&]<class P>() { P::round(x, out, n); });
}

/// Allocates the calling thread's scratch for the bf16 products that the active family widens ahead
/// (see the top of this header; nothing where the family needs none), so that no later product on
/// this thread allocates: a layer with bf16 weights calls it on each of its threads when it starts
/// them.
inline void reserve_bf16_scratch() {
    detail::with_products<float>([]<class P>() {
        if constexpr (P::widens_bf16_ahead) detail::scratch_floats(0);
    });
}

/// The instantiations of this header the library uses, which a program may build once (`MOE_EXTERN_TEMPLATES`,
/// `moe/compiled.hpp`): `EXTERN` is `extern` to declare them, empty to define them.
#define MOE_LINEAR_INSTANCES(EXTERN) \
    EXTERN template float dot(const float*, const float*, index); \
    EXTERN template double dot(const double*, const double*, index); \
    EXTERN template void linear(const float*, index, const float*, index, float*, index, index, index, index); \
    EXTERN template void linear(const double*, index, const double*, index, double*, index, index, index, index); \
    EXTERN template void linear(const bf16*, index, const bf16*, index, float*, index, index, index, index);
#if defined(MOE_EXTERN_TEMPLATES)
MOE_LINEAR_INSTANCES(extern)
#endif

}  // namespace moe::kernels
