#include <moe/detail/expert_schedule.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <random>
#include <tuple>
#include <vector>

namespace {
using moe::detail::work_item;
using moe::detail::work_task;

// Whether the tasks cut every item into blocks that lie within it, do not overlap and together have
// its area: then they cover each of its outputs exactly once.
bool exact_cover(const std::vector<work_item>& items, const std::vector<work_task>& tasks) {
    std::vector<moe::index> area(items.size(), 0);
    for (std::size_t a = 0; a < tasks.size(); ++a) {
        const work_task& t = tasks[a];
        const work_item& it = items[static_cast<std::size_t>(t.item)];
        if (t.row_begin < 0 || t.row_end > it.rows || t.row_begin >= t.row_end || t.column_begin < 0 ||
            t.column_end > it.columns || t.column_begin >= t.column_end)
            return false;
        area[static_cast<std::size_t>(t.item)] += (t.row_end - t.row_begin) * (t.column_end - t.column_begin);
        for (std::size_t b = a + 1; b < tasks.size(); ++b) {
            const work_task& u = tasks[b];
            if (u.item == t.item && u.row_begin < t.row_end && t.row_begin < u.row_end && u.column_begin < t.column_end &&
                t.column_begin < u.column_end)
                return false;
        }
    }
    for (std::size_t i = 0; i < items.size(); ++i)
        if (area[i] != std::max<moe::index>(0, items[i].rows) * items[i].columns) return false;
    return true;
}

std::vector<work_task> plan(const std::vector<work_item>& items, moe::index threads, moe::detail::split_rules rules = {}) {
    std::vector<work_task> tasks;
    moe::detail::plan_tasks(items, threads, rules, tasks);
    return tasks;
}

// Whether the tasks are largest first, equal costs in the order (item, row_begin, column_begin).
bool largest_first_ties_in_order(const std::vector<work_task>& tasks) {
    for (std::size_t i = 1; i < tasks.size(); ++i) {
        const work_task &a = tasks[i - 1], &b = tasks[i];
        if (a.cost < b.cost) return false;
        if (a.cost == b.cost && std::tie(a.item, a.row_begin, a.column_begin) >= std::tie(b.item, b.row_begin, b.column_begin))
            return false;
    }
    return true;
}

// The efficiency the tasks reach on P workers if each takes time proportional to its cost.
double efficiency(const std::vector<work_task>& tasks, moe::index threads) {
    std::vector<double> times;
    double total = 0;
    for (const work_task& t : tasks) {
        times.push_back(t.cost);
        total += t.cost;
    }
    return total / (static_cast<double>(threads) * moe::detail::list_schedule(times, threads));
}
}  // namespace

TEST_CASE("plan_tasks covers every output of every item exactly once, largest task first", "[schedule]") {
    std::mt19937 rng(5);
    std::uniform_int_distribution<moe::index> rows(0, 700), cols(1, 3000), depth(0, 2048);
    for (int round = 0; round < 40; ++round) {
        std::vector<work_item> items(static_cast<std::size_t>(1 + round % 9));
        for (auto& it : items) it = {rows(rng), cols(rng), depth(rng)};
        for (const moe::index threads : {1, 2, 3, 7, 16, 64}) {
            const auto tasks = plan(items, threads);
            REQUIRE(exact_cover(items, tasks));
            REQUIRE(largest_first_ties_in_order(tasks));
            for (const work_task& t : tasks) {
                REQUIRE(t.row_end - t.row_begin <= 256);
                // Columns are cut at multiples of the unit; only an item's last block ends elsewhere.
                REQUIRE(t.column_begin % 16 == 0);
                const moe::index width = items[static_cast<std::size_t>(t.item)].columns;
                REQUIRE((t.column_end % 16 == 0 || t.column_end == width));
            }
        }
    }
}

TEST_CASE("plan_tasks cuts nothing but rows of 256 for one thread", "[schedule]") {
    const std::vector<work_item> items{{1, 2816, 2048}, {600, 1024, 2816}, {0, 100, 100}};
    const auto tasks = plan(items, 1);
    REQUIRE(tasks.size() == 1 + 3);  // 600 rows: 3 blocks of 200
    for (const work_task& t : tasks) {
        CHECK(t.column_begin == 0);
        CHECK(t.column_end == items[static_cast<std::size_t>(t.item)].columns);
        if (t.item == 1) CHECK(t.row_end - t.row_begin == 200);
    }
}

TEST_CASE("decoding cuts each active expert's weight rows across every thread", "[schedule]") {
    // T = 1, k = 2 at d 1024, ff 2816: two items of one row (the input projections' columns).
    const std::vector<work_item> items{{1, 2816, 2 * 1024}, {1, 2816, 2 * 1024}};
    for (const moe::index threads : {2, 4, 8, 16, 32, 64}) {
        const auto tasks = plan(items, threads);
        CHECK(static_cast<moe::index>(tasks.size()) >= moe::detail::tasks_per_thread * threads);
        for (const work_task& t : tasks) CHECK(t.row_end - t.row_begin == 1);  // disjoint weight slices
        CHECK(efficiency(tasks, threads) >= 0.85);
    }
}

TEST_CASE("a hot expert is cut into rows and columns", "[schedule]") {
    // Every one of 256 tokens on one expert, and the empty others.
    std::vector<work_item> items(8, work_item{0, 2816, 2048});
    items[3].rows = 256;
    for (const moe::index threads : {2, 16, 64}) {
        const auto tasks = plan(items, threads);
        CHECK(static_cast<moe::index>(tasks.size()) >= moe::detail::tasks_per_thread * threads);
        CHECK(efficiency(tasks, threads) >= 0.85);
    }
    // More rows than a block holds: blocks of rows, and columns where needed.
    items[3].rows = 2048;
    const auto tasks = plan(items, 64);
    CHECK(efficiency(tasks, 64) >= 0.85);
}

TEST_CASE("plan_tasks does not cut below the smallest useful task", "[schedule]") {
    const std::vector<work_item> items{{4, 64, 32}};  // 8192 multiply-adds in all
    CHECK(plan(items, 64).size() == 1);
    // Large work for 2 threads: about tasks_per_thread * 2 tasks, not more.
    const std::vector<work_item> big{{256, 4096, 1024}};
    const auto tasks = plan(big, 2);
    CHECK(tasks.size() >= 8);
    CHECK(tasks.size() <= 16);
}

TEST_CASE("a stage's own smallest task lets a decoding step's router logits go one router row a task",
          "[schedule]") {
    // One token's logits of 8 experts of d = 1024: as a batch's are cut (blocks of 8 experts), one
    // task; with a unit of one router row, about the default smallest task, two; with the layer's
    // decoding rules (one router row, tasks of at least one row's reads), eight.
    const std::vector<work_item> logits{{1, 8, 1024}};
    CHECK(plan(logits, 64, {.max_rows = 256, .row_unit = 16, .column_unit = 8}).size() == 1);
    CHECK(plan(logits, 64, {.max_rows = 256, .row_unit = 16, .column_unit = 1}).size() == 2);
    const auto tasks = plan(logits, 64, {.max_rows = 256, .row_unit = 16, .column_unit = 1, .min_cost = 16.0 * 1024});
    REQUIRE(tasks.size() == 8);
    CHECK(exact_cover(logits, tasks));
    // 2 threads: 4 tasks a thread. Never below the stage's smallest task: of about four rows' cost
    // (17 * 1024 multiply-adds a row, its reads counted), the eight rows go in two tasks.
    CHECK(plan(logits, 2, {.max_rows = 256, .row_unit = 16, .column_unit = 1, .min_cost = 16.0 * 1024}).size() == 8);
    CHECK(plan(logits, 64, {.max_rows = 256, .row_unit = 16, .column_unit = 1, .min_cost = 70000}).size() == 2);
}

TEST_CASE("list_schedule gives each task, in order, to the first worker free", "[schedule]") {
    const std::vector<double> times{3, 3, 2, 2, 2};
    // Two workers: 3 | 3, then 2 on each (5 | 5), then the last on the first (7).
    CHECK(moe::detail::list_schedule(times, 2) == 7);
    CHECK(moe::detail::list_schedule(times, 5) == 3);
    CHECK(moe::detail::list_schedule(times, 1) == 12);
    CHECK(moe::detail::list_schedule({}, 4) == 0);
}

TEST_CASE("chunk_rows gives about four chunks a thread, of 16 to 64 rows", "[schedule]") {
    CHECK(moe::detail::chunk_rows(1, 1) == 16);
    CHECK(moe::detail::chunk_rows(10000, 1) == 64);
    CHECK(moe::detail::chunk_rows(1024, 8) == 32);
    CHECK(moe::detail::chunk_rows(256, 64) == 16);
}

TEST_CASE("plan_tasks orders a decoding step's alike blocks as a varied batch's: largest first, ties in order",
          "[schedule]") {
    // Alike items (decoding: every active expert one row, the same width) give tasks of few costs,
    // which are bucketed; varied ones many, which are sorted. Both orders are the documented one.
    std::vector<work_task> tasks;
    for (const moe::index experts : {1, 2, 8, 64}) {
        const std::vector<work_item> alike(static_cast<std::size_t>(experts), work_item{1, 2816, 2048});
        for (const moe::index threads : {2, 16, 64, 128}) {
            moe::detail::plan_tasks(alike, threads, {}, tasks);
            CHECK(largest_first_ties_in_order(tasks));
            CHECK(exact_cover(alike, tasks));
        }
    }
    std::vector<work_item> varied;
    for (moe::index e = 0; e < 40; ++e) varied.push_back({1 + 37 * e % 300, 512 + 16 * e, 1024});
    moe::detail::plan_tasks(varied, 64, {}, tasks);
    CHECK(largest_first_ties_in_order(tasks));
    CHECK(exact_cover(varied, tasks));
}

TEST_CASE("stage_plan gives plan_tasks' tasks, and plans again only when the items with work change size",
          "[schedule]") {
    // The tasks of the items that have work, numbered among them; `item` maps them back.
    const auto mapped = [](const moe::detail::stage_plan& sp, std::vector<work_task> tasks) {
        for (work_task& t : tasks) t.item = sp.item(t);
        return tasks;
    };
    const auto same_tasks = [](const std::vector<work_task>& a, const std::vector<work_task>& b) {
        return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](const work_task& x, const work_task& y) {
            return std::tie(x.item, x.row_begin, x.row_end, x.column_begin, x.column_end, x.cost) ==
                   std::tie(y.item, y.row_begin, y.row_end, y.column_begin, y.column_end, y.cost);
        });
    };
    moe::detail::stage_plan sp;
    // Decoding: experts 1 and 5 active, then 0 and 7: the same sizes, the same plan, other items.
    std::vector<work_item> step(8, work_item{0, 2816, 2048});
    step[1].rows = step[5].rows = 1;
    const std::vector<work_task>* first = &sp.update(step, 64, {});
    const std::vector<work_task> kept = *first;
    CHECK(same_tasks(mapped(sp, kept), plan(step, 64)));
    CHECK(exact_cover(step, mapped(sp, kept)));
    step[1].rows = step[5].rows = 0;
    step[0].rows = step[7].rows = 1;
    CHECK(sp.plans() == 1);
    const std::vector<work_task>& again = sp.update(step, 64, {});
    CHECK(sp.plans() == 1);  // not planned again
    CHECK(same_tasks(again, kept));
    CHECK(same_tasks(mapped(sp, again), plan(step, 64)));
    std::size_t largest = 0;
    for (const work_task& t : again)
        largest = std::max<std::size_t>(largest, static_cast<std::size_t>((t.row_end - t.row_begin) * (t.column_end - t.column_begin)));
    CHECK(sp.largest() == static_cast<moe::index>(largest));
    // Other sizes, threads or rules: planned again.
    step[7].rows = 3;
    CHECK(same_tasks(mapped(sp, sp.update(step, 64, {})), plan(step, 64)));
    CHECK(sp.plans() == 2);
    CHECK(same_tasks(mapped(sp, sp.update(step, 16, {})), plan(step, 16)));
    CHECK(sp.plans() == 3);
    const moe::detail::split_rules wide{256, 16, 32};
    CHECK(same_tasks(mapped(sp, sp.update(step, 16, wide)), plan(step, 16, wide)));
    CHECK(sp.plans() == 4);
    // No work at all: no tasks.
    const std::vector<work_item> idle(4, work_item{0, 64, 64});
    CHECK(sp.update(idle, 16, {}).empty());
}
