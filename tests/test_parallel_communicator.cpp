#include "one_of_ranks.hpp"

#include <moe/parallel/communicator.hpp>

#include <catch2/catch.hpp>

TEST_CASE("placement gives nearly equal contiguous blocks and checks a given map", "[parallel]") {
    using moe::parallel::placement;
    CHECK(placement::blocks(8, 2) == std::vector<int>{0, 0, 0, 0, 1, 1, 1, 1});
    CHECK(placement::blocks(7, 3) == std::vector<int>{0, 0, 1, 1, 2, 2, 2});
    CHECK(placement::blocks(2, 4) == std::vector<int>{1, 3});  // more ranks than experts: some hold none
    const placement one_process;
    CHECK(one_process.owners_of(3) == std::vector<int>{0, 0, 0});
    const placement given{.owners = {0, 0, 0}};
    CHECK(given.owners_of(3) == std::vector<int>{0, 0, 0});
    CHECK_THROWS_WITH(given.owners_of(4), Catch::Contains("3 owners given for 4 experts"));
    const placement outside{.owners = {0, 1}};  // one process: rank 1 does not exist
    CHECK_THROWS_WITH(outside.owners_of(2), Catch::Contains("expert 1 is owned by rank 1, outside [0, 1)"));
}

TEST_CASE("token_slice spreads a batch in contiguous slices in rank order", "[parallel]") {
    using moe::parallel::token_slice;
    moe::index next = 0;
    for (int r = 0; r < 4; ++r) {
        const auto s = token_slice(10, r, 4);
        CHECK(s.first == next);
        CHECK((s.rows == 2 || s.rows == 3));
        next += s.rows;
    }
    CHECK(next == 10);
    CHECK(token_slice(3, 0, 4).rows == 0);  // fewer tokens than ranks: some ranks get none
    CHECK(token_slice(3, 3, 4).rows == 1);
}

TEST_CASE("the default all_gather sends a rank's values to every rank and takes each rank's block in rank order",
          "[parallel]") {
    // Rank 1 of 3; its all-to-all plays the other ranks: rank 0 sends {0}, rank 2 sends {20, 21, 22}.
    struct rank_1_of_3 final : one_of_ranks {
        rank_1_of_3() : one_of_ranks(1, 3) {}
        using one_of_ranks::all_to_all;
        void all_to_all(std::span<const float> send, std::span<const moe::index> send_counts, std::span<float> recv,
                        std::span<const moe::index> recv_counts) override {
            CHECK(std::vector<float>(send.begin(), send.end()) == std::vector<float>{5, 6, 5, 6, 5, 6});
            CHECK(std::vector<moe::index>(send_counts.begin(), send_counts.end()) == std::vector<moe::index>{2, 2, 2});
            REQUIRE(std::vector<moe::index>(recv_counts.begin(), recv_counts.end()) == std::vector<moe::index>{1, 2, 3});
            REQUIRE(recv.size() == 6);
            const float got[] = {0, send[2], send[3], 20, 21, 22};  // rank 1's block is what it sent itself
            std::copy(std::begin(got), std::end(got), recv.begin());
        }
    } comm;
    const std::vector<float> mine{5, 6};
    const std::vector<moe::index> counts{1, 2, 3};
    std::vector<float> all(6);
    comm.all_gather(std::span<const float>(mine), counts, std::span<float>(all));
    CHECK(all == std::vector<float>{0, 5, 6, 20, 21, 22});
    const std::vector<moe::index> two{1, 2};
    CHECK_THROWS_WITH(comm.all_gather(std::span<const float>(mine), two, std::span<float>(all)),
                      Catch::Contains("one count per rank (3)"));
}
