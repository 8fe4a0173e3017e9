#pragma once
/// \file
/// c = a b (or c += a b) for a row-major b: the products of the backward pass, whose right operand is
/// a weight matrix read along its rows (dL/da = dL/dout W_out, dL/dx = dL/dh W_in) or a block of
/// activations (the weight gradients dout^T a and dh^T x, with a transposed left operand).
///
/// b is copied, 128 rows at a time, into panels two SIMD vectors wide that stay in L1 while every row
/// of a passes; a register tile is 8 rows of a (broadcast) times one panel (16 accumulators, 10 loads per
/// 16 FMAs). Each output is summed in k order, one term at a time (a k-block continues from the value
/// the previous one stored), so its bits do not depend on its place in a tile. The panel lives on the
/// stack: nothing is allocated.

#include "moe/kernels/linear.hpp"
#include "moe/types.hpp"

#include <xsimd/xsimd.hpp>

#include <algorithm>

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

/// R rows of c (row stride ldc), two vectors wide, updated with kc terms: c_r += sum_k a(r, k) panel_k
/// (or c_r = that sum when `!add`). `panel` holds kc rows of two vectors each.
template <int R, class Scalar>
void multiply_tile(strided<Scalar> a, const Scalar* panel, Scalar* c, index ldc, index kc, bool add) {
    using batch = xsimd::batch<Scalar>;
    constexpr index width = static_cast<index>(batch::size);
    batch acc[R][2];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < 2; ++v)
            acc[r][v] = add ? batch::load_unaligned(c + r * ldc + v * width) : batch(Scalar(0));
    for (index k = 0; k < kc; ++k) {
        batch b0 = batch::load_aligned(panel + k * 2 * width), b1 = batch::load_aligned(panel + k * 2 * width + width);
        in_register(b0);
        in_register(b1);
        for (int r = 0; r < R; ++r) {
            const batch av(a(r, k));
            acc[r][0] = fused_multiply_add(av, b0, acc[r][0]);
            acc[r][1] = fused_multiply_add(av, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < 2; ++v) acc[r][v].store_unaligned(c + r * ldc + v * width);
}

/// `multiply_tile<R>` for R = 1 to 7 rows chosen at run time (the last rows of a).
template <class Scalar>
void multiply_edge(int rows, strided<Scalar> a, const Scalar* panel, Scalar* c, index ldc, index kc, bool add) {
    switch (rows) {
        case 1: return multiply_tile<1>(a, panel, c, ldc, kc, add);
        case 2: return multiply_tile<2>(a, panel, c, ldc, kc, add);
        case 3: return multiply_tile<3>(a, panel, c, ldc, kc, add);
        case 4: return multiply_tile<4>(a, panel, c, ldc, kc, add);
        case 5: return multiply_tile<5>(a, panel, c, ldc, kc, add);
        case 6: return multiply_tile<6>(a, panel, c, ldc, kc, add);
        default: return multiply_tile<7>(a, panel, c, ldc, kc, add);
    }
}

}  // namespace detail

/// c = a b, or c += a b when `accumulate`: c (n x m, row stride ldc), a (n x k, any strides), b (k x m,
/// row-major with row stride ldb). c must not overlap a or b.
template <class Scalar>
void multiply(strided<Scalar> a, const Scalar* b, index ldb, Scalar* c, index ldc, index n, index m, index k,
              bool accumulate) {
    using batch = xsimd::batch<Scalar>;
    constexpr index width = static_cast<index>(batch::size), panel_width = 2 * width, kc_max = 128, tile = 8;
    alignas(64) Scalar panel[kc_max * panel_width];
    // The last columns (fewer than a panel) go through a tile-sized buffer in c's place (zeros beyond
    // them, so the unused lanes never hold garbage).
    alignas(64) Scalar edge[tile * panel_width] = {};
    if (k == 0 && !accumulate)
        for (index i = 0; i < n; ++i) std::fill(c + i * ldc, c + i * ldc + m, Scalar(0));
    for (index k0 = 0; k0 < k; k0 += kc_max) {
        const index kc = std::min(kc_max, k - k0);
        const bool add = accumulate || k0 > 0;
        for (index j0 = 0; j0 < m; j0 += panel_width) {
            const index cols = std::min(panel_width, m - j0);
            for (index kk = 0; kk < kc; ++kk) {
                const Scalar* from = b + (k0 + kk) * ldb + j0;
                Scalar* to = panel + kk * panel_width;
                std::copy(from, from + cols, to);
                std::fill(to + cols, to + panel_width, Scalar(0));
            }
            for (index r = 0; r < n; r += tile) {
                const int rows = static_cast<int>(std::min(tile, n - r));
                const strided<Scalar> ar{&a(r, k0), a.row_stride, a.col_stride};
                Scalar* cr = c + r * ldc + j0;
                const auto run = [&](Scalar* to, index ld) {
                    if (rows == tile)
                        detail::multiply_tile<tile>(ar, panel, to, ld, kc, add);
                    else
                        detail::multiply_edge(rows, ar, panel, to, ld, kc, add);
                };
                if (cols == panel_width) {
                    run(cr, ldc);
                    continue;
                }
                for (int i = 0; i < rows; ++i) std::copy(cr + i * ldc, cr + i * ldc + cols, edge + i * panel_width);
                run(edge, panel_width);
                for (int i = 0; i < rows; ++i) std::copy(edge + i * panel_width, edge + i * panel_width + cols, cr + i * ldc);
            }
        }
    }
}

}  // namespace moe::kernels
