#include <catch2/catch.hpp>

#include <moe/parallel/communicator.hpp>

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
