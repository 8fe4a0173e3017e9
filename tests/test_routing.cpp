#include <moe/routing.hpp>

#include <catch2/catch.hpp>

TEST_CASE("build_dispatch groups slots per expert in token order", "[routing]") {
    moe::routing<float> r;
    r.reset_fixed_k(4, 3, 2);
    r.expert_ids = {2, 0, 0, 1, moe::dropped_slot, 2, 2, 0};
    r.build_dispatch();
    CHECK(r.expert_offsets == std::vector<moe::index>{0, 3, 4, 7});
    CHECK(r.row_slots == std::vector<moe::index>{1, 2, 7, 3, 0, 5, 6});
    CHECK(r.slot_tokens == std::vector<moe::index>{0, 0, 1, 1, 2, 2, 3, 3});
    CHECK(r.slot_rows[4] == -1);
    for (moe::index row = 0; row < r.rows(); ++row) CHECK(r.slot_rows[r.row_slots[row]] == row);
    CHECK(r.rows() == 7);
    CHECK(r.slots() == 8);
    CHECK(r.slot_count(3) == 2);
}

TEST_CASE("build_dispatch skips null experts and handles no tokens", "[routing]") {
    moe::routing<double> r;
    r.reset_fixed_k(2, 2, 1);
    r.expert_ids = {5, 1};  // id >= E: a null expert
    r.build_dispatch();
    CHECK(r.rows() == 1);
    CHECK(r.slot_rows[0] == -1);
    r.reset_fixed_k(0, 2, 1);
    r.build_dispatch();
    CHECK(r.rows() == 0);
}

TEST_CASE("bucket_size rounds decimal factors as written and clamps", "[routing]") {
    CHECK(moe::bucket_size(1.1, 100, 10) == 11);  // 1.1 * 10 is 11.000000000000002 in binary
    CHECK(moe::bucket_size(2.2, 100, 10) == 22);
    CHECK(moe::bucket_size(1.25, 30, 4) == 10);   // 9.375 rounds up
    CHECK(moe::bucket_size(0.5, 7, 4) == 1);
    CHECK(moe::bucket_size(1e300, 30, 4) == 30);  // at most every item
    CHECK(moe::sort_key(std::numeric_limits<float>::quiet_NaN()) == -std::numeric_limits<float>::infinity());
    CHECK(moe::sort_key(2.5) == 2.5);
}

TEST_CASE("chosen_count counts the choices before drops, of the whole batch when one is set", "[routing]") {
    moe::routing<float> r;
    r.reset_fixed_k(3, 3, 2);
    r.expert_ids = {0, 1, 1, 2, 3, 1};  // id 3: a null expert (with a score column, as routers give it)
    r.scores.resize(3, 4);
    CHECK(r.chosen_count(0) == 0);  // counted by build_dispatch
    r.build_dispatch();
    const auto counts = [&](moe::index width, bool whole_batch) {
        std::vector<moe::index> c;
        for (moe::index id = 0; id < width; ++id) c.push_back(r.chosen_count(id, whole_batch));
        return c;
    };
    CHECK(counts(5, true) == std::vector<moe::index>{1, 3, 1, 1, 0});  // id 4: chosen by none
    CHECK(r.chosen_count(-1) == 0);
    CHECK(r.batch_tokens() == 3);
    CHECK(r.batch_slots() == 6);
    r.batch = {.tokens = 10, .slots = 20, .chosen = {5, 6, 7, 2}};
    CHECK(counts(5, true) == std::vector<moe::index>{5, 6, 7, 2, 0});
    CHECK(counts(4, false) == std::vector<moe::index>{1, 3, 1, 1});
    CHECK(r.batch_tokens() == 10);
    CHECK(r.batch_slots() == 20);
    r.batch = {};
    r.undropped_ids = r.expert_ids;  // capacity dropped slot 1: it still counts as chosen
    r.expert_ids[1] = moe::dropped_slot;
    r.build_dispatch();
    CHECK(counts(4, false) == std::vector<moe::index>{1, 3, 1, 1});
    CHECK(r.expert_offsets[2] - r.expert_offsets[1] == 2);
    r.reset_fixed_k(1, 3, 1);  // a new routing is its own batch again
    CHECK(r.batch.chosen.empty());
    CHECK(r.batch_tokens() == 1);
}
