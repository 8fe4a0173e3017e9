#pragma once
/// \file
/// c = a b (or c += a b) for a row-major b: the products of the backward pass, whose right operand is
/// a weight matrix read along its rows (dL/da = dL/dout W_out, dL/dx = dL/dh W_in) or a block of
/// activations (the weight gradients dout^T a and dh^T x, with a transposed left operand).
///
/// b is copied, 32 KiB at a time, into panels two SIMD vectors wide that stay in L1 while every row of
/// a passes; a register tile is 8 rows of a (broadcast) times one panel (16 accumulators, 10 loads per
/// 16 FMAs; 6 rows with 16 vector registers). Each output is summed in k order, one term at a time (a
/// k-block continues from the value the previous one stored), so its bits do not depend on its place
/// in a tile, nor on the panel's length, nor on the family
/// (`isa.hpp`) where every family fuses its multiply-adds. The panel lives on the stack: nothing is
/// allocated.

#include "moe/kernels/detail/products.hpp"
#include "moe/types.hpp"

namespace moe::kernels {

/// c = a b, or c += a b when `accumulate`: c (n x m, row stride ldc), a (n x k, any strides), b (k x m,
/// row-major with row stride ldb). c must not overlap a or b.
template <class Scalar>
void multiply(strided<Scalar> a, const Scalar* b, index ldb, Scalar* c, index ldc, index n, index m, index k,
              bool accumulate) {
    detail::with_products<Scalar>([&]<class P>() { P::template multiply<Scalar>(a, b, ldb, c, ldc, n, m, k, accumulate); });
}

/// The column blocks `multiply` runs at full speed on the active family: two vectors of `Scalar`.
template <class Scalar>
index multiply_panel_width() {
    return detail::with_products<Scalar>([]<class P>() { return P::template panel_width<Scalar>; });
}

/// The instantiations of this header a program may build once (as `MOE_LINEAR_INSTANCES`).
#define MOE_MULTIPLY_INSTANCES(EXTERN) \
    EXTERN template void multiply(strided<float>, const float*, index, float*, index, index, index, index, bool); \
    EXTERN template void multiply(strided<double>, const double*, index, double*, index, index, index, index, bool);
#if defined(MOE_EXTERN_TEMPLATES)
MOE_MULTIPLY_INSTANCES(extern)
#endif

}  // namespace moe::kernels
