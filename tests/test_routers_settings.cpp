#include <moe/routers/settings.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <map>
#include <string>

namespace {
namespace r = moe::routers;

r::setting_values values(std::map<std::string, std::string, std::less<>> v) { return r::setting_values(std::move(v)); }
}  // namespace

TEST_CASE("a setting states its domain and what is wrong with a value", "[routers][settings]") {
    const r::setting ratio{.key = "x", .min = 0, .max = 1, .open_min = true};
    CHECK(ratio.domain() == "(0, 1]");
    CHECK(ratio.problem("0.5").empty());
    CHECK(ratio.problem("1").empty());
    CHECK(ratio.problem("0") == "0 must be in (0, 1]");
    CHECK(ratio.problem("1.0001") == "1.0001 must be in (0, 1]");
    CHECK(ratio.problem("") == "expects a finite number (in (0, 1]), got ''");
    CHECK(ratio.problem("0.5x") == "expects a finite number (in (0, 1]), got '0.5x'");
    const r::setting count{.key = "n", .type = r::setting_type::integer, .min = 2};
    CHECK(count.domain() == "[2, inf)");
    CHECK(count.problem("2").empty());
    CHECK(count.problem("1") == "1 must be in [2, inf)");
    CHECK(count.problem("0x10") == "expects a decimal integer (in [2, inf)), got '0x10'");
    const r::setting pick{.key = "p", .type = r::setting_type::choice, .choices = "a|bb|c"};
    CHECK(pick.domain() == "a|bb|c");
    CHECK((pick.problem("a").empty() && pick.problem("bb").empty() && pick.problem("c").empty()));
    CHECK(pick.problem("b") == "expects one of a|bb|c, got 'b'");
    CHECK(pick.problem("") == "expects one of a|bb|c, got ''");
    CHECK(r::setting{.key = "f", .min = 0.25, .max = 2.5}.domain() == "[0.25, 2.5]");
    CHECK(r::setting{.key = "tiny", .min = 1e-7}.domain() == "[1e-07, inf)");
    CHECK(r::setting{.key = "tiny", .min = 1e-7}.problem("1e-8") == "1e-8 must be in [1e-07, inf)");
}

TEST_CASE("a reader checks every given value of the settings it reads, and only those", "[routers][settings]") {
    constexpr std::array settings{
        r::setting{.key = "n", .type = r::setting_type::integer, .min = 1, .required = true},
        r::setting{.key = "x", .min = 0, .needs = "n"},
        r::setting{.key = "on", .type = r::setting_type::boolean}};
    r::setting_values v;
    v.set("n", "3").set("x", "0.5").set("on", "true").set("other", "not a number");
    const auto reader = v.read_as("toy", settings);
    moe::index n = 0;
    double x = 0;
    bool on = false;
    reader.read("n", n);
    reader.read("x", x);
    reader.read("on", on);
    CHECK((n == 3 && x == 0.5 && on));
    // Not given, or empty: the member keeps its value.
    r::setting_values partial;
    partial.set("n", "2").set("x", "");
    double kept = 7;
    partial.read_as("toy", settings).read("x", kept);
    CHECK(kept == 7);
    CHECK_FALSE(partial.has("x"));
    CHECK(partial.text("missing").empty());
    // Reading a key the router did not declare is the router's bug, not the user's.
    CHECK_THROWS_AS(reader.read("other", x), moe::error);
    const auto fails = [&](r::setting_values values, const std::string& message) {
        CHECK_THROWS_MATCHES(values.read_as("toy", settings), moe::value_error, Catch::Message(message));
    };
    fails(r::setting_values{}, "toy: setting 'n' is needed");
    fails(values({{"n", "0"}}), "toy: setting 'n' 0 must be in [1, inf)");
    fails(values({{"n", "1"}, {"on", "1"}}), "toy: setting 'on' expects true or false, got '1'");
    fails(values({{"x", "1"}}), "toy: setting 'n' is needed");
}
