// The tiles and blocks of the products, written once over the vector type `vec<Scalar>` of the
// namespace that includes this file (see products.hpp: once per instruction-set family, so no include
// guard; nothing here may include a header). No lambdas: every function must be a declaration that
// the family's target pragma applies to.

// ---- linear: z = x W^T by dot products along rows ------------------------------------------------------

/// Parts of a step of a tile: 1, or `vec::bf16_parts` for bf16 (2 where the family widens the even
/// and the odd values of 2 x width bf16 apart).
template <class V, class In>
inline constexpr int parts = std::is_same_v<In, bf16> ? V::bf16_parts : 1;

/// Part `part` of a step's values from p: a vector of them, or with 2 parts of 2 x width bf16 the even
/// (part 0) or odd (part 1) ones, widened.
template <class V, class In>
MOE_ALWAYS_INLINE typename V::reg load_part(const In* p, [[maybe_unused]] int part) {
    if constexpr (parts<V, In> == 2)
        return V::load(p, part);
    else
        return V::load(p);
}

/// acc[r J + j] += the products of part `part` of a step's values from x_r and w_j.
template <int R, int J, class V, class In>
MOE_ALWAYS_INLINE void tile_step(typename V::reg* acc, const In* x, index ldx, const In* w, index ldw, int part) {
    typename V::reg wv[J];
    MOE_UNROLL
    for (int j = 0; j < J; ++j) {
        wv[j] = load_part<V>(w + j * ldw, part);
        // Used by R rows: loaded once. With one row each is used once, and folding its load into the
        // FMA leaves the registers to the accumulators (1 x 16 tiles would spill otherwise).
        if constexpr (R > 1) V::keep(wv[j]);
    }
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
        typename V::reg xv = load_part<V>(x + r * ldx, part);
        V::keep(xv);
        MOE_UNROLL
        for (int j = 0; j < J; ++j) acc[r * J + j] = V::fma(xv, wv[j], acc[r * J + j]);
    }
}

/// Tiles of this family's vectors (bf16 widened exactly to float): `tile<R, J>` sets z[r][j] =
/// dot(x_r, w_j) over d values (or adds it to z[r][j], when `add`) for R rows of x and J rows of W, one
/// accumulator per output over the body of d, then `vec::sums` and the scalar tail, asking for the
/// lines of `next`, one per step. With bf16 in 2 parts a step of 2 x width values adds the products of
/// its even values, then of its odd ones. Never inlined: inside `linear_tile`'s loop over chunks GCC 12
/// stored every accumulator each step.
struct simd_tiles {
    template <int R, int J, class In, class Scalar>
    __attribute__((noinline)) static void tile(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz,
                                               index d, bool add, ahead next) {
        using V = vec<Scalar>;
        using reg = typename V::reg;
        constexpr index step = V::width * parts<V, In>;
        const index body = d / step * step;
        reg acc[R * J];
        // Zeros through a register: a zeroing loop the compiler sees becomes `memset`, at the x86-64
        // baseline's tuning `rep stos`, which costs a tenth of a 4 x 4 tile at d = 1024.
        MOE_UNROLL
        for (int i = 0; i < R * J; ++i) {
            acc[i] = V::zero();
            V::keep(acc[i]);
        }
        for (index i = 0; i < body; i += step) {
            next.one();
            // The parts as straight code: as a loop, GCC 12 stored every accumulator each step.
            tile_step<R, J, V>(acc, x + i, ldx, w + i, ldw, 0);
            if constexpr (parts<V, In> == 2) tile_step<R, J, V>(acc, x + i, ldx, w + i, ldw, 1);
        }
        next.rest();
        Scalar sums[R * J];
        V::template sums<R * J>(acc, sums);
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < J; ++j) {
                Scalar s = sums[r * J + j];
                for (index i = body; i < d; ++i) s += static_cast<Scalar>(x[r * ldx + i]) * static_cast<Scalar>(w[j * ldw + i]);
                z[r * ldz + j] = add ? z[r * ldz + j] + s : s;
            }
    }
};

/// One register tile: z[r][j] = dot(x_r, w_j) for R rows of x and J rows of W (or z[r][j] + that,
/// when `add`), by `Tiles::tile` chunk by chunk (`chunk`: `linear_chunk` of the rows' length and type),
/// each chunk's sums added to z in order. Only tiles of fewer rows than a block's, which prefetch
/// nothing, get more than one chunk.
template <class Tiles, int R, int J, class In, class Scalar>
MOE_ALWAYS_INLINE void linear_tile(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index d,
                                   index chunk, bool add, ahead next) {
    if (d <= chunk) return Tiles::template tile<R, J>(x, ldx, w, ldw, z, ldz, d, add, next);
    for (index k = 0; k < d; k += chunk)
        Tiles::template tile<R, J>(x + k, ldx, w + k, ldw, z, ldz, std::min(chunk, d - k), add || k > 0, ahead{});
}

/// `linear_tile<Tiles, R, J>` for J = 1 to 4 rows of W chosen at run time (the edge of a block).
template <class Tiles, int R, class In, class Scalar>
void linear_edge(index j, const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index d, index chunk,
                 bool add, ahead next) {
    switch (j) {
        case 1: return linear_tile<Tiles, R, 1>(x, ldx, w, ldw, z, ldz, d, chunk, add, next);
        case 2: return linear_tile<Tiles, R, 2>(x, ldx, w, ldw, z, ldz, d, chunk, add, next);
        case 3: return linear_tile<Tiles, R, 3>(x, ldx, w, ldw, z, ldz, d, chunk, add, next);
        default: return linear_tile<Tiles, R, 4>(x, ldx, w, ldw, z, ldz, d, chunk, add, next);
    }
}

/// Rows of x in a block from which `linear_block` puts x's tiles outside W's (where J < 4), and the
/// most bytes of a tile's rows of x for it (half of a 32 KiB L1).
inline constexpr index x_outer_rows = 32, x_outer_bytes = 16384;

/// The tiles of rows [r, r1) of x (4 at most; 4 is a full tile) against the tile of W rows [j,
/// min(j + J, j1)).
template <class Tiles, int J, class In, class Scalar>
MOE_ALWAYS_INLINE void linear_tiles_at(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index r,
                                       index r1, index j, index j1, index d, index chunk, bool add, ahead next) {
    const index jn = std::min<index>(J, j1 - j);
    x += r * ldx;
    w += j * ldw;
    z += r * ldz + j;
    if (r1 - r == 4 && jn == J) return linear_tile<Tiles, 4, J>(x, ldx, w, ldw, z, ldz, d, chunk, add, next);
    switch (r1 - r) {
        case 4: return linear_edge<Tiles, 4>(jn, x, ldx, w, ldw, z, ldz, d, chunk, add, next);
        case 3: return linear_edge<Tiles, 3>(jn, x, ldx, w, ldw, z, ldz, d, chunk, add, next);
        case 2: return linear_edge<Tiles, 2>(jn, x, ldx, w, ldw, z, ldz, d, chunk, add, next);
        default: return;
    }
}

/// Rows [r0, r1) of x against rows [j0, j1) of W: 4 x J tiles (J = `vec::tile_columns`: 4 where the
/// family has 32 vector registers, 3 where it has 16, so that 4 J accumulators, J rows of W and a row
/// of x fit); leftover rows of x in tiles of 2 or 3 rows, a single one in 1 x `vec::row_tile` tiles (a
/// row against W streams W: more rows of W per tile hide the loads' latency). The tiles sum d values by
/// `linear_tile` in chunks of `chunk` and add their sums to z when `add`.
///
/// All of x's tiles pass one tile of W rows before the next (W's rows stay in L1 while x's come from
/// L2), or, where a tile holds fewer rows of W than of x, the block has `x_outer_rows` rows of x or more
/// and a tile's rows of x fit in half of L1, all of W's tiles pass one tile of x rows before the next
/// (x's rows stay in L1 and the fewer rows of W come from L2: at J = 3 a quarter fewer loads from L2).
/// Each full tile asks for a share of the lines of the rows of W that come next (the next tile's, or
/// with x outside the next block's), so that they wait in L2. Both orders sum every output in the same
/// order: the same bits.
template <class Tiles, class In, class Scalar>
void linear_block(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index r0, index r1, index j0,
                  index j1, index m, index d, index chunk, bool add) {
    constexpr int J = vec<Scalar>::tile_columns, single = vec<Scalar>::row_tile;
    const index full = r0 + (r1 - r0) / 4 * 4, x_tiles = (full - r0) / 4, per_row = ahead::lines_per_row<In>(d);
    const index edge = r1 - full == 1 ? full : r1;  // the rows of x in tiles of 2 to 4 rows end there
    ahead none;
    if (J < 4 && full - r0 >= x_outer_rows && 4 * d * static_cast<index>(sizeof(In)) <= x_outer_bytes) {
        const index lines = std::min<index>(j1 - j0, m - j1) * per_row, tiles = x_tiles * ((j1 - j0 + J - 1) / J);
        for (index r = r0, t = 0; r < full; r += 4)
            for (index j = j0; j < j1; j += J, ++t)
                linear_tiles_at<Tiles, J>(x, ldx, w, ldw, z, ldz, r, r + 4, j, j1, d, chunk, add,
                                          ahead::of(w + j1 * ldw, ldw, d, lines * t / tiles, lines * (t + 1) / tiles));
        for (index j = j0; j < j1; j += J)
            linear_tiles_at<Tiles, J>(x, ldx, w, ldw, z, ldz, full, edge, j, j1, d, chunk, add, none);
    } else {
        for (index j = j0; j < j1; j += J) {
            const index jn = std::min<index>(J, j1 - j), lines = std::min<index>(J, m - j - jn) * per_row;
            const In* after = w + (j + jn) * ldw;  // the next tile's rows
            for (index r = r0, t = 0; r < full; r += 4, ++t)
                linear_tiles_at<Tiles, J>(x, ldx, w, ldw, z, ldz, r, r + 4, j, j1, d, chunk, add,
                                          ahead::of(after, ldw, d, lines * t / x_tiles, lines * (t + 1) / x_tiles));
            linear_tiles_at<Tiles, J>(x, ldx, w, ldw, z, ldz, full, edge, j, j1, d, chunk, add, none);
        }
    }
    if (edge == r1) return;
    const In* xr = x + full * ldx;
    Scalar* zr = z + full * ldz;
    index j = j0;
    for (; j + single <= j1; j += single)
        linear_tile<Tiles, 1, single>(xr, ldx, w + j * ldw, ldw, zr + j, ldz, d, chunk, add, none);
    for (; j < j1; j += J)
        linear_edge<Tiles, 1>(std::min<index>(J, j1 - j), xr, ldx, w + j * ldw, ldw, zr + j, ldz, d, chunk, add, none);
}

/// Rows of W in a block of `linear` (rows of `per_row` bytes): about 128 KiB, a multiple of 4 tiles'
/// rows of W so that no tile inside a block is an edge.
template <class Scalar>
index w_block_rows(index per_row) {
    constexpr index unit = 4 * vec<Scalar>::tile_columns;
    return std::max<index>(unit, 128 * 1024 / per_row / unit * unit);
}

/// Rows of x in a block of `linear` (rows of `per_row` bytes): about 256 KiB, a multiple of 4.
inline index x_block_rows(index per_row) { return std::max<index>(4, 256 * 1024 / per_row / 4 * 4); }

/// Rows of one operand of the tiles: at `data`, `ld` apart, of which `readable` may be read (the rows
/// a tile asks for ahead stop there).
template <class T>
struct rows_at {
    const T* data;
    index ld;
    index readable;
};

/// The blocking of `linear` (n >= 4 rows of x, m rows of W, d values each, `per_row` bytes per row
/// of a chunk as the tiles read it): chunk by chunk of d, group by group of `group` x rows, block by
/// block of W rows and of x rows, the sums of each chunk added to z. `rows.x(k, kn, g0, gn)` gives the
/// tiles' operand for values [k, k + kn) of x rows [g0, g0 + gn), `rows.w(k, kn, j0, jn)` that of W
/// rows [j0, j0 + jn): the rows as stored (`stored_rows`) or widened copies (`widened_rows`).
template <class Tiles, class Scalar, class Rows>
void linear_blocks(const Rows& rows, Scalar* z, index ldz, index n, index m, index d, index chunk, index per_row,
                   index group) {
    const index w_block = w_block_rows<Scalar>(per_row), x_block = x_block_rows(per_row);
    for (index k = 0; k == 0 || k < d; k += chunk) {
        const index kn = std::min(chunk, d - k);
        for (index g0 = 0; g0 < n; g0 += group) {
            const index gn = std::min(group, n - g0);
            const auto x = rows.x(k, kn, g0, gn);
            for (index j0 = 0; j0 < m; j0 += w_block) {
                const index jn = std::min(w_block, m - j0);
                const auto w = rows.w(k, kn, j0, jn);
                for (index r0 = 0; r0 < gn; r0 += x_block)
                    linear_block<Tiles>(x.data, x.ld, w.data, w.ld, z + g0 * ldz + j0, ldz, r0, std::min(gn, r0 + x_block),
                                        0, jn, w.readable, kn, chunk, k > 0);
            }
        }
    }
}

/// The operands of `linear_blocks` where they are stored.
template <class In>
struct stored_rows {
    const In* xs;
    index ldx;
    const In* ws;
    index ldw;
    index m;
    rows_at<In> x(index k, index, index g0, index gn) const { return {xs + g0 * ldx + k, ldx, gn}; }
    rows_at<In> w(index k, index, index j0, index) const { return {ws + j0 * ldw + k, ldw, m - j0}; }
};

/// Rows [0, rows) of `from` (row stride ld, `count` values each) widened into `to` (row stride ldt).
template <class V>
void widen_rows(const bf16* from, index ld, float* to, index ldt, index rows, index count) {
    const index body = count / V::width * V::width;
    for (index r = 0; r < rows; ++r) {
        const bf16* f = from + r * ld;
        float* t = to + r * ldt;
        for (index i = 0; i < body; i += V::width) V::store(t + i, V::load(f + i));
        for (index i = body; i < count; ++i) t[i] = widen(f[i]);
    }
}

/// The operands of `linear_blocks` for bf16 rows, widened into `xf` (a group of x rows) and `wf` (a
/// block of W rows) as the blocking asks for them: x's once, W's once per group.
template <class V>
struct widened_rows {
    stored_rows<bf16> stored;
    float* xf;
    float* wf;
    index ldf;
    rows_at<float> x(index k, index kn, index g0, index gn) const {
        const rows_at<bf16> from = stored.x(k, kn, g0, gn);
        widen_rows<V>(from.data, from.ld, xf, ldf, gn, kn);
        return {xf, ldf, gn};
    }
    rows_at<float> w(index k, index kn, index j0, index jn) const {
        const rows_at<bf16> from = stored.w(k, kn, j0, jn);
        widen_rows<V>(from.data, from.ld, wf, ldf, jn, kn);
        return {wf, ldf, jn};
    }
};

/// `linear` by the tiles of `Tiles`. Blocks of W rows (about 128 KiB) and of x rows (about 256 KiB)
/// stay in L2 together: W passes from memory once, each block of x once per block of W. Long rows
/// (`linear_chunk`) pass one chunk at a time, each chunk's sums added to z, so that a block still
/// holds many rows (a row of 14336 floats would leave blocks of 4 rows of x, each reading its block of
/// W from L3 again). Fewer rows than a tile stream W instead: each tile sums its chunks in turn, the
/// same sums in the same order, without storing them between chunks.
///
/// bf16 rows on a family that widens them in its tiles (every value of W once per 4 rows of x, x's
/// once per tile of W rows) are widened ahead when there are many: groups of x rows (about 512 KiB of
/// floats) once, and the blocks of W once per group, into the thread's scratch (`scratch_floats`). The
/// float tiles then sum the same exact products in the same order (the chunks are the bf16 rows'), so
/// the bits are those of widening in the tiles.
template <class Tiles, class In, class Scalar>
void linear_with(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index n, index m, index d) {
    const index chunk = linear_chunk<In>(d);
    if (n < 4) return linear_block<Tiles>(x, ldx, w, ldw, z, ldz, 0, n, 0, m, m, d, chunk, false);
    if constexpr (std::is_same_v<In, bf16> && parts<vec<Scalar>, In> == 1) {
        if (n >= vec<Scalar>::widen_ahead_rows) {
            const index ldf = (chunk + 15) / 16 * 16;  // rows on cache lines
            const index per_row = static_cast<index>(sizeof(float)) * ldf, x_block = x_block_rows(per_row);
            const index group = std::min(n, std::max<index>(x_block, 512 * 1024 / per_row / x_block * x_block));
            float* xf = scratch_floats((group + w_block_rows<Scalar>(per_row)) * ldf);
            const widened_rows<vec<Scalar>> rows{{x, ldx, w, ldw, m}, xf, xf + group * ldf, ldf};
            return linear_blocks<Tiles>(rows, z, ldz, n, m, d, chunk, per_row, group);
        }
    }
    linear_blocks<Tiles>(stored_rows<In>{x, ldx, w, ldw, m}, z, ldz, n, m, d, chunk, static_cast<index>(sizeof(In)) * chunk, n);
}

// ---- multiply: c = a b (or c += a b) for a row-major b -------------------------------------------------

/// R rows of c (row stride ldc), two vectors wide, updated with kc terms: c_r += sum_k a(r, k) panel_k
/// (or c_r = that sum when `!add`). `panel` holds kc rows of two vectors each, aligned.
template <int R, class Scalar>
void multiply_tile(strided<Scalar> a, const Scalar* panel, Scalar* c, index ldc, index kc, bool add) {
    using V = vec<Scalar>;
    using reg = typename V::reg;
    constexpr index width = V::width;
    reg acc[R][2];
    MOE_UNROLL
    for (int r = 0; r < R; ++r)
        MOE_UNROLL
        for (int v = 0; v < 2; ++v) acc[r][v] = add ? V::load(c + r * ldc + v * width) : V::zero();
    for (index k = 0; k < kc; ++k) {
        reg b0 = V::load_aligned(panel + k * 2 * width), b1 = V::load_aligned(panel + k * 2 * width + width);
        V::keep(b0);
        V::keep(b1);
        MOE_UNROLL
        for (int r = 0; r < R; ++r) {
            const reg av = V::broadcast(a(r, k));
            acc[r][0] = V::fma(av, b0, acc[r][0]);
            acc[r][1] = V::fma(av, b1, acc[r][1]);
        }
    }
    MOE_UNROLL
    for (int r = 0; r < R; ++r)
        MOE_UNROLL
        for (int v = 0; v < 2; ++v) V::store(c + r * ldc + v * width, acc[r][v]);
}

/// `multiply_tile<R>` for R = 1 to 8 rows chosen at run time (up to `vec::multiply_rows`).
template <class Scalar>
void multiply_rows(int rows, strided<Scalar> a, const Scalar* panel, Scalar* c, index ldc, index kc, bool add) {
    switch (rows) {
        case 1: return multiply_tile<1>(a, panel, c, ldc, kc, add);
        case 2: return multiply_tile<2>(a, panel, c, ldc, kc, add);
        case 3: return multiply_tile<3>(a, panel, c, ldc, kc, add);
        case 4: return multiply_tile<4>(a, panel, c, ldc, kc, add);
        case 5: return multiply_tile<5>(a, panel, c, ldc, kc, add);
        case 6: return multiply_tile<6>(a, panel, c, ldc, kc, add);
        case 7: return multiply_tile<7>(a, panel, c, ldc, kc, add);
        default: return multiply_tile<8>(a, panel, c, ldc, kc, add);
    }
}

/// c = a b, or c += a b when `accumulate` (see `kernels::multiply`). b is copied, 32 KiB at a time
/// (512 rows of a panel with AVX2, 256 with AVX-512), into panels two vectors wide that stay in L1
/// while every row of a passes; a register tile is `vec::multiply_rows` rows of a (broadcast: 8 with
/// 32 vector registers, 6 with 16) times one panel. Each output is summed in k order, one term at a
/// time (a k-block continues from the value the previous one stored), so its bits do not depend on its
/// place in a tile nor on the panel's length.
/// The panel lives on the stack: nothing is allocated.
template <class Scalar>
void multiply_with(strided<Scalar> a, const Scalar* b, index ldb, Scalar* c, index ldc, index n, index m, index k,
                   bool accumulate) {
    using V = vec<Scalar>;
    constexpr index panel_width = 2 * V::width, tile = V::multiply_rows;
    // The fewer k-blocks, the fewer loads and stores of c: 32 KiB panels measured 3-10% (AVX-512, Xeon)
    // and up to 1.2x (AVX2, Zen 3) faster than 128-row ones; 64 KiB gained nothing more.
    constexpr index kc_max = 32 * 1024 / (panel_width * static_cast<index>(sizeof(Scalar)));
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
            // The panel: two vector loads and stores a row (std::copy of a run-time length may become
            // `rep movs`, whose start-up cost per 2-vector row is that of the row's multiply-adds
            // when a task has few rows).
            for (index kk = 0; kk < kc; ++kk) {
                const Scalar* from = b + (k0 + kk) * ldb + j0;
                Scalar* to = panel + kk * panel_width;
                if (cols == panel_width) {
                    V::store(to, V::load(from));
                    V::store(to + V::width, V::load(from + V::width));
                    continue;
                }
                for (index j = 0; j < panel_width; ++j) to[j] = j < cols ? from[j] : Scalar(0);
            }
            for (index r = 0; r < n; r += tile) {
                const int rows = static_cast<int>(std::min(tile, n - r));
                const strided<Scalar> ar{&a(r, k0), a.row_stride, a.col_stride};
                Scalar* cr = c + r * ldc + j0;
                if (cols == panel_width) {
                    multiply_rows(rows, ar, panel, cr, ldc, kc, add);
                    continue;
                }
                for (int i = 0; i < rows; ++i) std::copy(cr + i * ldc, cr + i * ldc + cols, edge + i * panel_width);
                multiply_rows(rows, ar, panel, edge, panel_width, kc, add);
                for (int i = 0; i < rows; ++i) std::copy(edge + i * panel_width, edge + i * panel_width + cols, cr + i * ldc);
            }
        }
    }
}

// ---- the limit --------------------------------------------------------------------------------------

/// `rounds` times 12 independent fused multiply-adds of a vector (enough in flight to cover the FMA
/// latency on the cores we know): the benchmarks' measure of this family's peak. Returns the sum of the
/// lanes so that nothing is optimised away.
template <class Scalar>
Scalar fma_peak(index rounds) {
    using V = vec<Scalar>;
    using reg = typename V::reg;
    constexpr int chains = 12;
    reg acc[chains];
    const reg scale = V::broadcast(Scalar(0.999999)), step = V::broadcast(Scalar(1e-6));
    MOE_UNROLL
    for (int j = 0; j < chains; ++j) acc[j] = V::broadcast(Scalar(j));
    for (index i = 0; i < rounds; ++i)
        MOE_UNROLL
        for (int j = 0; j < chains; ++j) acc[j] = V::fma(acc[j], scale, step);
    Scalar sums[chains], total = 0;
    V::template sums<chains>(acc, sums);
    for (int j = 0; j < chains; ++j) total += sums[j];
    return total;
}

/// out[i] = to_bf16(x[i]): bit operations the compiler vectorises for this family.
inline void round_to_bf16(const float* x, bf16* out, index n) {
    for (index i = 0; i < n; ++i) out[i] = to_bf16(x[i]);
}

/// This family's products, as `with_products` hands them to the public functions.
struct products {
    static void round(const float* x, bf16* out, index n) { round_to_bf16(x, out, n); }
    /// `fma_peak` (benchmarks): 2 x 12 x width FLOPs a round.
    template <class Scalar>
    static Scalar peak(index rounds) {
        return fma_peak<Scalar>(rounds);
    }
    template <class In, class Scalar>
    static void linear(const In* x, index ldx, const In* w, index ldw, Scalar* z, index ldz, index n, index m, index d) {
        linear_with<simd_tiles>(x, ldx, w, ldw, z, ldz, n, m, d);
    }
    template <class Scalar>
    static void multiply(strided<Scalar> a, const Scalar* b, index ldb, Scalar* c, index ldc, index n, index m, index k,
                         bool accumulate) {
        multiply_with(a, b, ldb, c, ldc, n, m, k, accumulate);
    }
    /// Whether `linear` on bf16 widens many rows ahead into the thread's scratch (`widened_rows`).
    static constexpr bool widens_bf16_ahead = parts<vec<float>, bf16> == 1;
    /// Values of `Scalar` in a vector.
    template <class Scalar>
    static constexpr index width = vec<Scalar>::width;
    /// The width of `multiply`'s panels: the column blocks it runs at full speed.
    template <class Scalar>
    static constexpr index panel_width = 2 * vec<Scalar>::width;
};
