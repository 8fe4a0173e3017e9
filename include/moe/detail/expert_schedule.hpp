#pragma once
// Internal: how the layer's expert work is cut into tasks for P threads.
//
// A stage of the expert pass (the input projections, the output projections, the gradient products)
// is a list of items, one or more per FFN (the routed experts, then the shared FFN): an output of
// `rows` x `columns` values, each a sum of `depth` products. `plan_tasks` cuts every item into blocks
// of rows x columns so that P threads stay busy when the work allows (about `tasks_per_thread` P tasks
// of similar cost, never cheaper than `split_rules::min_cost` multiply-adds) and orders them largest first,
// which is what a pool pulling tasks from a shared counter needs to finish together. A decoding step
// (one to a few rows per expert) is cut along the columns, so every thread streams its own slice of
// each active expert's weights; a hot expert is cut along rows and columns like any other work.
//
// A block never splits `depth`: each output is one whole sum, computed by a kernel whose summation
// order does not depend on the block around it (kernels/linear.hpp, kernels/multiply.hpp). So the plan
// may depend on P and the results still do not.

#include "moe/types.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <queue>
#include <span>
#include <vector>

namespace moe::detail {

/// One item of a stage: `rows` x `columns` outputs of `depth` products each.
struct work_item {
    index rows = 0;
    index columns = 0;
    index depth = 0;
    bool operator==(const work_item&) const = default;
};

/// Tasks a stage aims at per thread, and the smallest task worth its scheduling (multiply-adds).
inline constexpr index tasks_per_thread = 4;
inline constexpr double min_task_cost = 1 << 17;

/// How finely a stage may be cut: blocks have at most `max_rows` rows and at least `row_unit` (unless
/// the item has fewer), columns in multiples of `column_unit` (the last block takes the rest), and no
/// task costs less than `min_cost` unless the stage as a whole does.
struct split_rules {
    index max_rows = 256;
    index row_unit = 16;
    index column_unit = 16;
    double min_cost = min_task_cost;
    bool operator==(const split_rules&) const = default;
};

/// One task: rows [row_begin, row_end) x columns [column_begin, column_end) of item `item`.
struct work_task {
    index item;
    index row_begin, row_end;
    index column_begin, column_end;
    double cost;  // estimated multiply-adds, with the reads of the right operand (see `task_cost`)
};

/// Estimated cost of a block in multiply-adds: the products, plus the right operand's values (a
/// weight slice, read once per block whatever its rows: a memory read costs about as much as 16
/// multiply-adds on one core), plus the outputs written.
inline double task_cost(index rows, index columns, index depth) {
    const double r = static_cast<double>(rows), c = static_cast<double>(columns), k = static_cast<double>(depth);
    return r * c * k + 16.0 * c * k + r * c;
}

/// Orders tasks made in the order (item, then rows, then columns) largest first, ties in that order.
/// Where the costs take few values (a decoding step: every block of every active expert alike) the
/// tasks are bucketed by cost (linear; the scatter's destination past the end of `tasks` keeps its
/// capacity between calls), else sorted.
inline void largest_first(std::vector<work_task>& tasks) {
    constexpr std::size_t max_classes = 8;
    std::array<double, max_classes> costs{};
    std::size_t classes = 0;
    for (const work_task& t : tasks) {
        if (std::find(costs.begin(), costs.begin() + static_cast<std::ptrdiff_t>(classes), t.cost) !=
            costs.begin() + static_cast<std::ptrdiff_t>(classes))
            continue;
        if (classes == max_classes) {
            std::sort(tasks.begin(), tasks.end(), [](const work_task& a, const work_task& b) {
                if (a.cost != b.cost) return a.cost > b.cost;
                if (a.item != b.item) return a.item < b.item;
                if (a.row_begin != b.row_begin) return a.row_begin < b.row_begin;
                return a.column_begin < b.column_begin;
            });
            return;
        }
        costs[classes++] = t.cost;
    }
    for (std::size_t i = 1; i < classes; ++i)  // largest first (by insertion: a few values)
        for (std::size_t j = i; j > 0 && costs[j - 1] < costs[j]; --j) std::swap(costs[j - 1], costs[j]);
    const auto first = costs.begin(), last = costs.begin() + static_cast<std::ptrdiff_t>(classes);
    const auto class_of = [&](double cost) { return static_cast<std::size_t>(std::find(first, last, cost) - first); };
    std::array<std::size_t, max_classes + 1> start{};  // where each class begins
    for (const work_task& t : tasks) ++start[class_of(t.cost) + 1];
    for (std::size_t c = 1; c <= classes; ++c) start[c] += start[c - 1];
    const std::size_t n = tasks.size();
    tasks.resize(2 * n);
    for (std::size_t i = 0; i < n; ++i) tasks[n + start[class_of(tasks[i].cost)]++] = tasks[i];
    std::copy(tasks.begin() + static_cast<std::ptrdiff_t>(n), tasks.end(), tasks.begin());
    tasks.resize(n);
}

/// The tasks of `items` for `threads` threads, largest first (ties: item, then rows, then columns), into
/// `out` (cleared first; reuses its capacity). Items without outputs get no task; every output of the
/// others is in exactly one task. With one thread each item is only cut into blocks of `max_rows` rows.
inline void plan_tasks(std::span<const work_item> items, index threads, const split_rules& rules,
                       std::vector<work_task>& out) {
    out.clear();
    double total = 0;
    for (const work_item& it : items)
        if (it.rows > 0 && it.columns > 0) total += task_cost(it.rows, it.columns, it.depth);
    const double target = threads > 1 ? std::max(total / static_cast<double>(tasks_per_thread * threads), rules.min_cost)
                                       : total + 1;
    const auto ceil_div = [](index a, index b) { return (a + b - 1) / b; };
    for (index i = 0; i < static_cast<index>(items.size()); ++i) {
        const work_item& it = items[static_cast<std::size_t>(i)];
        if (it.rows <= 0 || it.columns <= 0) continue;
        const double cost = task_cost(it.rows, it.columns, it.depth);
        const index want = std::max<index>(1, static_cast<index>(std::ceil(cost / target)));
        index row_blocks = ceil_div(it.rows, rules.max_rows);
        const index column_units = ceil_div(it.columns, rules.column_unit);
        const index column_blocks = std::min(column_units, std::max<index>(1, ceil_div(want, row_blocks)));
        if (row_blocks * column_blocks < want)
            row_blocks = std::max(row_blocks, std::min(ceil_div(it.rows, rules.row_unit), ceil_div(want, column_blocks)));
        for (index rb = 0; rb < row_blocks; ++rb) {
            const index r0 = it.rows * rb / row_blocks, r1 = it.rows * (rb + 1) / row_blocks;
            for (index cb = 0; cb < column_blocks; ++cb) {
                const index c0 = std::min(it.columns, column_units * cb / column_blocks * rules.column_unit);
                const index c1 = cb + 1 == column_blocks
                                     ? it.columns
                                     : std::min(it.columns, column_units * (cb + 1) / column_blocks * rules.column_unit);
                if (r1 > r0 && c1 > c0) out.push_back({i, r0, r1, c0, c1, task_cost(r1 - r0, c1 - c0, it.depth)});
            }
        }
    }
    largest_first(out);
}

/// A stage's plan, kept between calls: planned again only when the sizes of the items that have work,
/// the threads or the rules change. Tasks name those items by their place among them (`item` maps it
/// back), so a decoding step, whose active experts change from token to token but not their sizes,
/// plans once: on 64 cores planning a step's few hundred tasks would cost a tenth of the step.
class stage_plan {
public:
    /// The tasks of `items` for `threads` threads by `rules`, as `plan_tasks` makes them, with `item`
    /// numbering the items that have work.
    const std::vector<work_task>& update(std::span<const work_item> items, index threads, const split_rules& rules) {
        active_.clear();
        sized_.clear();
        for (index i = 0; i < static_cast<index>(items.size()); ++i) {
            const work_item& it = items[static_cast<std::size_t>(i)];
            if (it.rows <= 0 || it.columns <= 0) continue;
            active_.push_back(i);
            sized_.push_back(it);
        }
        if (plans_ == 0 || threads != threads_ || rules != rules_ || sized_ != planned_sizes_) {
            plan_tasks(sized_, threads, rules, tasks_);
            largest_ = 0;
            for (const work_task& t : tasks_)
                largest_ = std::max(largest_, (t.row_end - t.row_begin) * (t.column_end - t.column_begin));
            planned_sizes_ = sized_;
            threads_ = threads;
            rules_ = rules;
            ++plans_;
        }
        return tasks_;
    }

    /// The index in `update`'s items of task `t`'s item.
    [[nodiscard]] index item(const work_task& t) const { return active_[static_cast<std::size_t>(t.item)]; }

    /// The most outputs (rows x columns) a task of the plan has.
    [[nodiscard]] index largest() const { return largest_; }

    /// How many times `update` has planned.
    [[nodiscard]] index plans() const { return plans_; }

private:
    std::vector<index> active_;       // items with work, by their index in the last `update`
    std::vector<work_item> sized_;    // their sizes
    std::vector<work_item> planned_sizes_;  // the sizes `tasks_` was planned for
    index threads_ = 0;
    split_rules rules_{};
    std::vector<work_task> tasks_;
    index largest_ = 0;
    index plans_ = 0;
};

/// Rows per chunk of the row-wise passes (gathering rows, combine, the gates' gradients) over n rows: about
/// `tasks_per_thread` chunks per thread, between 16 and 64 rows each.
inline index chunk_rows(index n, index threads) {
    const index per = (n + tasks_per_thread * threads - 1) / std::max<index>(1, tasks_per_thread * threads);
    return std::clamp<index>(per, 16, 64);
}

/// The time P workers take to run tasks of the given `times` when each, in order, goes to the first
/// worker free (what the pool's shared counter does): greedy list scheduling.
inline double list_schedule(std::span<const double> times, index workers) {
    std::priority_queue<double, std::vector<double>, std::greater<>> free_at;
    for (index w = 0; w < workers; ++w) free_at.push(0.0);
    double end = 0;
    for (const double t : times) {
        const double start = free_at.top();
        free_at.pop();
        free_at.push(start + t);
        end = std::max(end, start + t);
    }
    return end;
}

}  // namespace moe::detail
