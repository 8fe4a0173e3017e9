#pragma once
// Internal: the expert FFNs of a layer call (routed experts and shared FFN alike) run as one task list
// per stage on the thread pool, cut by `plan_tasks` (detail/expert_schedule.hpp).
//
// forward:  1. hidden columns: h = x W_in^T and a = act(h), tasks of (FFN, row block, column block of ff)
//           2. output columns: out = a W_out^T, tasks of (FFN, row block, column block of d)
// backward: 1. hidden columns: da = dout W_out, then a (recomputed) and dL/dh in place of h
//           2. dW_out = dout^T a and dW_in = dh^T x by blocks of their rows and columns, each summed over
//              all of the FFN's rows in order; dL/dx = dh W_in by blocks of rows and columns.
//           `weight_gradients` runs the weight gradients of step 2 alone (expert parallelism: a segment
//           of an expert's rows continuing the sum another rank began).
// Every value is one whole sum whose order does not depend on the block (kernels/linear.hpp,
// kernels/multiply.hpp): the results are the same bits at any thread count and for any plan.

#include "moe/detail/expert_schedule.hpp"
#include "moe/detail/thread_pool.hpp"
#include "moe/experts/ffn.hpp"
#include "moe/kernels/linear.hpp"
#include "moe/kernels/multiply.hpp"


#include <algorithm>
#include <array>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

namespace moe::detail {

/// One FFN's rows in the expert pass, forward and backward: a routed expert's block of rows or the
/// shared FFN's tokens, encoded alike. Pointers are to row 0; `ld*` are row strides, in elements of
/// what they point at (values, or the storage's input elements: blocks of `Storage::unit` values).
template <class Scalar, class Storage>
struct ffn_block {
    using input = typename Storage::input;
    const ffn_weights<Storage>* weights = nullptr;
    bool shared = false;  // runs the shared FFN's policy (else the routed experts')
    index rows = 0;
    const input* x = nullptr;  // input rows, as the storage converts them
    index ldx = 0;
    Scalar* hidden = nullptr;  // training: x W_in^T per row, overwritten by its gradient in backward; else null
    index ldh = 0;
    input* act = nullptr;  // act(h): the output projection's input, converted
    index lda = 0;
    Scalar* out = nullptr;
    index ldo = 0;
    // Backward.
    const Scalar* dout = nullptr;  // dL/d(out) per row
    index ldd = 0;
    ffn_weights<storages::scalar<Scalar>>* grad = nullptr;  // dL/dW_in and dL/dW_out (null or empty: none here)
    bool grad_accumulate = false;         // add to the sums `grad` holds (else overwrite them)
    Scalar* dx = nullptr;                 // dL/dx per row
    index lddx = 0;
};

template <class Scalar, class Storage>
class expert_pass {
public:
    using block = ffn_block<Scalar, Storage>;
    using input = typename Storage::input;

    /// Row blocks of the projections: at most this many rows.
    static constexpr index max_rows = 256;

    /// out of every block (and, with `hidden` set, h), by the routed policy `routed` or the shared one, the
    /// work cut into tasks for `threads` threads and run on `pool` (the same bits for any of either).
    template <class X, class S>
    void forward(const X& routed, const S& shared, std::span<const block> blocks, thread_pool& pool, index threads) {
        items_.clear();
        for (const block& b : blocks) items_.push_back({b.rows, ff(b), ff(b) > 0 ? b.weights->in.rows() / ff(b) * d(b) : 0});
        // Stage 1: hidden columns, by blocks of columns that convert whole (a multiple of the storage's
        // unit). Scratch per output: h (gate and up) unless kept for training, and where the storage
        // converts its inputs the float activations before converting.
        const bool keep_h = !blocks.empty() && blocks.front().hidden != nullptr;
        const index scratch = (keep_h ? 0 : 2) + (converts ? 1 : 0);
        constexpr index hidden_unit = std::lcm<index>(16, Storage::unit);
        run_plan(pool, threads, plans_[0], {max_rows, 16, hidden_unit}, scratch, [&](const work_task& tk, Scalar* scratch) {
            const block& b = blocks[static_cast<std::size_t>(tk.item)];
            const index n = tk.row_end - tk.row_begin, c0 = tk.column_begin, c1 = tk.column_end, cols = c1 - c0;
            Scalar* h = b.hidden ? b.hidden + tk.row_begin * b.ldh + c0 : scratch;
            const index ldh = b.hidden ? b.ldh : 2 * cols, up = b.hidden ? ff(b) : cols;
            input* act = b.act + tk.row_begin * b.lda + c0 / Storage::unit;
            with_policy(b, routed, shared, [&](const auto& policy) {
                const input* x = b.x + tk.row_begin * b.ldx;
                if constexpr (!converts) {
                    ffn_hidden_columns(policy, *b.weights, x, b.ldx, n, c0, c1, h, ldh, up, act, b.lda);
                } else {
                    Scalar* a = b.hidden ? scratch : scratch + 2 * n * cols;  // float activations, then converted
                    ffn_hidden_columns(policy, *b.weights, x, b.ldx, n, c0, c1, h, ldh, up, a, cols);
                    for (index r = 0; r < n; ++r) Storage::convert(a + r * cols, act + r * b.lda, cols);
                }
            });
        });
        // Stage 2: output columns.
        items_.clear();
        for (const block& b : blocks) items_.push_back({b.rows, d(b), ff(b)});
        run_plan(pool, threads, plans_[1], {max_rows, 16, 16}, 0, [&](const work_task& tk, Scalar*) {
            const block& b = blocks[static_cast<std::size_t>(tk.item)];
            ffn_output_columns(*b.weights, b.act + tk.row_begin * b.lda, b.lda, tk.row_end - tk.row_begin, tk.column_begin,
                               tk.column_end, b.out + tk.row_begin * b.ldo + tk.column_begin, b.ldo);
        });
    }

    /// Backward of `forward` (which ran with `hidden` set): every block's gradients and dx.
    template <class X, class S>
    void backward(const X& routed, const S& shared, std::span<const block> blocks, thread_pool& pool, index threads)
        requires Storage::trainable
    {
        const index panel = kernels::multiply_panel_width<Scalar>();
        // Stage 1: da, a and dh by hidden columns.
        items_.clear();
        for (const block& b : blocks) items_.push_back({b.rows, ff(b), d(b)});
        run_plan(pool, threads, plans_[2], {max_rows, 16, panel}, 1, [&](const work_task& tk, Scalar* da) {
            const block& b = blocks[static_cast<std::size_t>(tk.item)];
            const index r0 = tk.row_begin, c0 = tk.column_begin;
            with_policy(b, routed, shared, [&](const auto& policy) {
                ffn_hidden_columns_backward(policy, *b.weights, b.dout + r0 * b.ldd, b.ldd, tk.row_end - r0, c0,
                                            tk.column_end, b.hidden + r0 * b.ldh + c0, b.ldh, ff(b), b.act + r0 * b.lda + c0,
                                            b.lda, da);
            });
        });
        // Stage 2: dW_out, dW_in (each value summed over all rows) and dx.
        gradients(blocks, pool, threads, plans_[3], true);
    }

    /// Stage 2 of `backward` without dx: the weight gradients of every block with a `grad`, added to
    /// what it holds where `grad_accumulate`. The blocks are those `backward` ran (dout, hidden set).
    void weight_gradients(std::span<const block> blocks, thread_pool& pool, index threads)
        requires Storage::trainable
    {
        gradients(blocks, pool, threads, plans_[4], false);
    }

private:
    // Whether the projections take their inputs converted (else the float rows themselves).
    static constexpr bool converts = !std::is_same_v<input, Scalar>;

    static index ff(const block& b) { return b.weights ? b.weights->out.cols() : 0; }
    static index d(const block& b) { return b.weights ? b.weights->in.cols() : 0; }

    template <class X, class S, class F>
    static void with_policy(const block& b, const X& routed, const S& shared, F&& f) {
        if (b.shared)
            f(shared);
        else
            f(routed);
    }

    // Backward stage 2, three items per block: dW_out, dW_in (of blocks with a gradient here) and, with
    // `dx`, dL/dx.
    void gradients(std::span<const block> blocks, thread_pool& pool, index threads, stage_plan& plan, bool dx) {
        items_.clear();
        for (const block& b : blocks) {
            const bool here = b.grad != nullptr && b.grad->in.size() > 0;
            items_.push_back({here ? b.grad->out.rows() : 0, ff(b), b.rows});
            items_.push_back({here ? b.grad->in.rows() : 0, d(b), b.rows});
            items_.push_back({dx ? b.rows : 0, d(b), b.weights ? b.weights->in.rows() : 0});
        }
        run_plan(pool, threads, plan, {max_rows, 16, kernels::multiply_panel_width<Scalar>()}, 0,
                 [&](const work_task& tk, Scalar*) {
            const block& b = blocks[static_cast<std::size_t>(tk.item / 3)];
            const index r0 = tk.row_begin, r1 = tk.row_end, c0 = tk.column_begin, c1 = tk.column_end;
            switch (tk.item % 3) {
                case 0:
                    ffn_weight_gradient(b.dout, b.ldd, b.act, b.lda, b.rows, r0, r1, c0, c1, b.grad->out.data(), ff(b),
                                        b.grad_accumulate);
                    break;
                case 1:
                    ffn_weight_gradient(b.hidden, b.ldh, b.x, b.ldx, b.rows, r0, r1, c0, c1, b.grad->in.data(), d(b),
                                        b.grad_accumulate);
                    break;
                default:
                    ffn_input_gradient(*b.weights, b.hidden + r0 * b.ldh, b.ldh, r1 - r0, c0, c1, b.dx + r0 * b.lddx + c0,
                                       b.lddx);
            }
        });
    }

    // Plans the tasks of `items_` for `threads` threads (with the stage's `plan`) and runs f(task, scratch)
    // for each on the pool, the task's item an index of `items_`, with `per_output` values of scratch per
    // output of the task (sized for the largest task, per thread).
    template <class F>
    void run_plan(thread_pool& pool, index threads, stage_plan& plan, const split_rules& rules, index per_output, F&& f) {
        const std::vector<work_task>& tasks = plan.update(items_, threads, rules);
        const index per_thread = per_output * plan.largest();
        if (scratch_.size() < static_cast<std::size_t>(per_thread * pool.size()))
            scratch_.resize(static_cast<std::size_t>(per_thread * pool.size()));
        auto run = [&](index i, index thread) {
            work_task t = tasks[static_cast<std::size_t>(i)];
            t.item = plan.item(t);
            f(t, scratch_.data() + thread * per_thread);
        };
        pool.run(static_cast<index>(tasks.size()), run);
    }

    std::vector<work_item> items_;
    std::array<stage_plan, 5> plans_;  // forward stages 1 and 2, backward stages 1 and 2, weight gradients alone
    std::vector<Scalar> scratch_;
};

}  // namespace moe::detail
