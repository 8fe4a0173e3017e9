// moe/parallel/rebalance.hpp: the least-loaded plan, by its rule on a worked case and by its
// guarantees on random loads (the layer under MPI: tests/parallel/test_parallel_mpi.cpp).
#include <catch2/catch.hpp>

#include <moe/parallel/rebalance.hpp>

#include <algorithm>
#include <initializer_list>
#include <random>
#include <vector>

using moe::parallel::plan_rebalance;
using moe::parallel::rebalancing;

namespace {

// Row counts built at run time: GCC 12.2 with AVX-512 (-march=native on Zen 4, x86-64-v4) at -O2
// stores the constant std::vector<std::int64_t>{50, 50, 50, 0} as four 50s (one vpbroadcastq), which
// the native build of this test met; a copy the compiler cannot fold keeps the values.
[[gnu::noinline]] std::vector<moe::index> loads(std::initializer_list<moe::index> values) {
    return {values.begin(), values.end()};
}

bool same(const moe::parallel::segment& a, const moe::parallel::segment& b) {
    return a.rank == b.rank && a.first == b.first && a.rows == b.rows;
}

}  // namespace

TEST_CASE("plan_rebalance: off, every expert's rows are its owner's", "[parallel]") {
    const std::vector<moe::index> rows = loads({100, 0, 10, 10});
    const std::vector<int> owners{0, 1, 2, 3};
    const auto plan = plan_rebalance(rows, owners, 4, {}, 1);
    for (std::size_t e = 0; e < rows.size(); ++e) {
        REQUIRE(plan.experts[e].size() == 1);
        CHECK(same(plan.experts[e][0], {owners[e], 0, rows[e]}));
    }
    CHECK(plan.rows_before == loads({100, 0, 10, 10}));
    CHECK(plan.rows_after == plan.rows_before);
    CHECK(plan.rows_moved == 0);
    CHECK(moe::parallel::imbalance(plan.rows_before) == Approx(100.0 * 4 / 120));
}

TEST_CASE("plan_rebalance: a hot expert's first rows go to the least-loaded ranks, up to the target", "[parallel]") {
    // 120 rows over 4 ranks: the target is 30. Rank 0's 70 extra rows go to rank 1 (0 rows: takes 30),
    // then rank 2 and rank 3 (10 rows each: take 20 each), in the block's order; rank 0 keeps the last 30.
    const std::vector<moe::index> rows = loads({100, 0, 10, 10});
    const auto plan = plan_rebalance(rows, std::vector<int>{0, 1, 2, 3}, 4, {.enabled = true, .min_rows = 1}, 1);
    REQUIRE(plan.experts[0].size() == 4);
    CHECK(same(plan.experts[0][0], {1, 0, 30}));
    CHECK(same(plan.experts[0][1], {2, 30, 20}));
    CHECK(same(plan.experts[0][2], {3, 50, 20}));
    CHECK(same(plan.experts[0][3], {0, 70, 30}));
    CHECK(plan.rows_after == loads({30, 30, 30, 30}));
    CHECK(plan.rows_moved == 70);
    CHECK(plan.helped == loads({0, 1, 1, 1}));
    CHECK(plan.find(0, 2) == &plan.experts[0][1]);
    CHECK(plan.find(1, 0) == nullptr);

    // A move of fewer than min_rows is not made (the default, 16, keeps decode-sized moves home).
    CHECK(plan_rebalance(rows, std::vector<int>{0, 1, 2, 3}, 4, {.enabled = true, .min_rows = 31}, 1).rows_moved == 0);
    CHECK(plan_rebalance(rows, std::vector<int>{0, 1, 2, 3}, 4, {.enabled = true, .min_rows = 30}, 1).rows_moved == 30);
}

TEST_CASE("plan_rebalance: the cap bounds the experts a rank helps with", "[parallel]") {
    // 150 rows over 2 ranks, target 75: rank 1 takes expert 0's 50 rows, then 25 of expert 1's.
    const std::vector<moe::index> rows = loads({50, 50, 50, 0});
    const std::vector<int> owners{0, 0, 0, 1};
    const rebalancing on{.enabled = true, .min_rows = 1};
    const auto uncapped = plan_rebalance(rows, owners, 2, on, 2);
    CHECK(uncapped.rows_after == loads({75, 75}));
    CHECK(uncapped.helped == loads({0, 2}));
    CHECK(same(uncapped.experts[1][0], {1, 0, 25}));
    // Room for one expert's bytes (2 of 3): rank 1 stops after expert 0.
    const auto capped = plan_rebalance(rows, owners, 2, {.enabled = true, .cap_bytes = 3, .min_rows = 1}, 2);
    CHECK(capped.rows_after == loads({100, 50}));
    CHECK(capped.helped == loads({0, 1}));
    CHECK(plan_rebalance(rows, owners, 2, {.enabled = true, .cap_bytes = 1, .min_rows = 1}, 2).rows_moved == 0);
    CHECK(plan_rebalance(rows, owners, 2, {.enabled = true, .cap_bytes = 0, .min_rows = 1}, 0).rows_moved == 0);  // 0: none
}

TEST_CASE("plan_rebalance: on random loads, segments cover each block once and no rank ends over the target",
          "[parallel]") {
    std::mt19937_64 rng(7);
    for (int trial = 0; trial < 500; ++trial) {
        const int ranks = 1 + static_cast<int>(rng() % 8);
        const auto experts = static_cast<std::size_t>(1 + rng() % 16);
        std::vector<moe::index> rows(experts);
        std::vector<int> owners(experts);
        for (std::size_t e = 0; e < experts; ++e) {
            rows[e] = rng() % 4 == 0 ? static_cast<moe::index>(rng() % 1000) : static_cast<moe::index>(rng() % 20);
            owners[e] = static_cast<int>(rng() % static_cast<unsigned>(ranks));
        }
        const bool capped = trial % 2 == 1, fewest = trial % 3 == 2;  // some with a cap, some with min_rows
        const std::size_t cap = capped ? rng() % 4 : rebalancing{}.cap_bytes;
        const moe::index min_rows = fewest ? 1 + static_cast<moe::index>(rng() % 50) : 1;
        INFO("trial " << trial << ", ranks " << ranks << ", experts " << experts << ", cap " << cap << ", min_rows " << min_rows);
        const auto plan = plan_rebalance(rows, owners, ranks, {.enabled = true, .cap_bytes = cap, .min_rows = min_rows}, 1);
        std::vector<moe::index> load(static_cast<std::size_t>(ranks), 0), helped(static_cast<std::size_t>(ranks), 0);
        moe::index moved = 0, total = 0;
        for (std::size_t e = 0; e < experts; ++e) {
            const auto& segments = plan.experts[e];
            REQUIRE(!segments.empty());
            CHECK(segments.back().rank == owners[e]);  // the owner's segment last
            moe::index next = 0;
            std::vector<bool> seen(static_cast<std::size_t>(ranks), false);
            for (const auto& s : segments) {
                CHECK(s.first == next);
                CHECK(s.rows >= 0);
                CHECK(!seen[static_cast<std::size_t>(s.rank)]);  // one segment per rank
                seen[static_cast<std::size_t>(s.rank)] = true;
                next += s.rows;
                load[static_cast<std::size_t>(s.rank)] += s.rows;
                if (s.rank != owners[e]) {
                    CHECK(s.rows >= min_rows);
                    moved += s.rows;
                    ++helped[static_cast<std::size_t>(s.rank)];
                }
            }
            CHECK(next == rows[e]);
            total += rows[e];
        }
        CHECK(load == plan.rows_after);
        CHECK(moved == plan.rows_moved);
        CHECK(helped == plan.helped);
        const moe::index target = (total + ranks - 1) / ranks;
        for (int q = 0; q < ranks; ++q) {
            const auto i = static_cast<std::size_t>(q);
            CHECK(static_cast<std::size_t>(helped[i]) <= cap);
            CHECK(load[i] <= std::max(target, plan.rows_before[i]));  // a helper never goes past the target
        }
        if (!capped && !fewest) CHECK(*std::max_element(load.begin(), load.end()) <= std::max<moe::index>(target, 0));
    }
}

TEST_CASE("plan_rebalance: bad input is a value_error naming it", "[parallel][errors]") {
    CHECK_THROWS_WITH(plan_rebalance(loads({1, 2}), std::vector<int>{0}, 2, {}, 1),
                      Catch::Contains("2 row counts for 1 owners"));
    CHECK_THROWS_WITH(plan_rebalance(loads({1}), std::vector<int>{2}, 2, {}, 1),
                      Catch::Contains("expert 0 is owned by rank 2"));
    CHECK_THROWS_WITH(plan_rebalance(loads({-1}), std::vector<int>{0}, 2, {}, 1),
                      Catch::Contains("expert 0 has -1 rows"));
    CHECK_THROWS_AS(plan_rebalance(loads({1}), std::vector<int>{0}, 0, {}, 1), moe::value_error);
}
