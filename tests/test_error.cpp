#include <moe/error.hpp>
#include <moe/moe.hpp>

#include <catch2/catch.hpp>

TEST_CASE("every library exception is a moe::error", "[error]") {
    STATIC_REQUIRE(std::is_base_of_v<moe::error, moe::shape_error>);
    STATIC_REQUIRE(std::is_base_of_v<moe::error, moe::value_error>);
    STATIC_REQUIRE(std::is_base_of_v<moe::error, moe::config_error>);
    STATIC_REQUIRE(std::is_base_of_v<moe::error, moe::io_error>);
    STATIC_REQUIRE(std::is_base_of_v<std::runtime_error, moe::error>);
    CHECK_THROWS_AS((moe::mixtral_layer<float>({.d_model = 4, .d_ff = 4, .n_experts = 0})), moe::error);
}
