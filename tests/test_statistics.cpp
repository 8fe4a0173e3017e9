#include <moe/statistics.hpp>

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

TEST_CASE("routing statistics count loads, drops, nulls and imbalance", "[statistics]") {
    moe::routing<double> r;
    r.reset_fixed_k(3, 4, 2);
    r.expert_ids = {0, 1, 0, moe::dropped_slot, 0, 6};
    r.scores = moe::matrix<double>::Constant(3, 4, 0.25);
    r.build_dispatch();
    const auto s = moe::compute_statistics(r);
    CHECK(s.load == std::vector<moe::index>{3, 1, 0, 0});
    CHECK(s.assignments == 4);
    CHECK(s.dropped == 1);
    CHECK(s.null_slots == 1);
    CHECK(s.idle_experts == 2);
    CHECK(s.experts_per_token == std::vector<moe::index>{0, 2, 1});
    CHECK(s.imbalance == Approx(3.0));  // max 3 / mean 1
    CHECK(s.max_vio == Approx(2.0));
    CHECK(s.null_fraction == Approx(1.0 / 6));
    CHECK(s.mean_entropy == Approx(std::log(4.0)));
    const auto j = nlohmann::json::parse(s.to_json());
    CHECK(j["load"] == nlohmann::json::array({3, 1, 0, 0}));
    CHECK(j["imbalance"].get<double>() == Approx(3.0));
}
