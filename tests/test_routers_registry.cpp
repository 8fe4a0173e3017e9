#include <moe/io/config.hpp>
#include <moe/routers/any_router.hpp>
#include <moe/routers/registry.hpp>
#include <moe/testing/conformance.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace r = moe::routers;

r::setting_values values(std::map<std::string, std::string, std::less<>> v) { return r::setting_values(std::move(v)); }

template <class R>
const R& held(const r::any_router& a) {
    REQUIRE(std::holds_alternative<R>(a.get()));
    return std::get<R>(a.get());
}

bool takes(const std::string& router, std::string_view key) {
    const auto s = r::builtin_routers::settings_of(router);
    return std::any_of(s.begin(), s.end(), [&](const r::setting& x) { return x.key == key; });
}

/// A router that is not built in: every token takes the k experts with the largest logits, weight 1/k.
struct toy_router {
    moe::index k = 1;
    static constexpr bool batch_dependent = false;
    static constexpr std::string_view name = "toy";
    static constexpr std::array settings{r::model_setting::k};
    static toy_router from(const r::setting_values::reader& v) {
        toy_router t;
        v.read("k", t.k);
        return t;
    }
    void validate(moe::index) const {}
    template <class Scalar>
    void route(const moe::matrix<Scalar>& logits, moe::routing<Scalar>& out) const {
        r::softmax_topk{.k = k, .normalize = true}.route(logits, out);
    }
};

}  // namespace

TEST_CASE("the registry lists the built-in routers and their settings", "[routers][registry]") {
    CHECK(r::builtin_routers::list() == "softmax_topk, sigmoid_topk, top_p, null_experts, sinkhorn, expert_choice");
    // any_router holds each, and capacity of each top-k router.
    CHECK(std::variant_size_v<r::any_router::variant> == 8);
    CHECK(takes("softmax_topk", "capacity_factor"));
    CHECK(takes("sigmoid_topk", "drop_policy"));
    CHECK(takes("expert_choice", "capacity_factor"));
    CHECK_FALSE(takes("expert_choice", "drop_policy"));
    CHECK_FALSE(takes("top_p", "capacity_factor"));
    CHECK(takes("top_p", "k"));  // max_k's default
    CHECK_THROWS_MATCHES(r::builtin_routers::settings_of("bogus"), moe::value_error,
                         Catch::Message("unknown router 'bogus' (the routers: softmax_topk, sigmoid_topk, top_p, "
                                        "null_experts, sinkhorn, expert_choice)"));
    // Each setting's example is valid, and its key unique within its router.
    for (std::string_view name : r::builtin_routers::names) {
        const auto settings = r::builtin_routers::settings_of(name);
        for (const r::setting& s : settings) {
            INFO(std::string(name) + "." + std::string(s.key));
            CHECK(s.problem(s.example).empty());
            CHECK(std::count_if(settings.begin(), settings.end(), [&](const r::setting& t) { return t.key == s.key; }) == 1);
        }
    }
}

TEST_CASE("make_router builds each router from its settings as text", "[routers][registry]") {
    const auto softmax = held<r::softmax_topk>(r::make_router("softmax_topk", values({{"k", "3"}, {"normalize", "true"}, {"scale", "2.5"}})));
    CHECK((softmax.k == 3 && softmax.normalize && softmax.scale == 2.5));
    const auto sigmoid = held<r::sigmoid_topk>(r::make_router(
        "sigmoid_topk", values({{"k", "4"}, {"normalize", "false"}, {"scale", "1.5"}, {"n_group", "4"}, {"topk_group", "2"}})));
    CHECK((sigmoid.k == 4 && !sigmoid.normalize && sigmoid.scale == 1.5 && sigmoid.n_group == 4 && sigmoid.topk_group == 2));
    const auto topp = held<r::top_p>(r::make_router("top_p", values({{"threshold", "0.6"}, {"max_k", "3"}, {"normalize", "true"}})));
    CHECK((topp.threshold == 0.6 && topp.max_k == 3 && topp.normalize));
    CHECK(held<r::top_p>(r::make_router("top_p", values({{"k", "5"}}))).max_k == 5);  // max_k defaults to k
    const auto nulls = held<r::null_experts>(r::make_router("null_experts", values({{"k", "2"}, {"null_experts", "3"}})));
    CHECK((nulls.k == 2 && nulls.nulls == 3 && nulls.normalize));
    const auto sk = held<r::sinkhorn>(r::make_router(
        "sinkhorn", values({{"k", "3"}, {"iterations", "5"}, {"tolerance", "0.01"}, {"gates", "plan"},
                            {"normalize", "false"}, {"inference_topk", "true"}})));
    CHECK((sk.k == 3 && sk.iterations == 5 && sk.tolerance == 0.01 && sk.gates == r::sinkhorn_gates::plan &&
           !sk.normalize && sk.inference_topk));
    // expert_choice's capacity_factor is its own; a top-k router given one is wrapped in capacity.
    CHECK(held<r::expert_choice>(r::make_router("expert_choice", values({{"capacity_factor", "2"}}))).capacity_factor == 2);
    const auto capped = held<r::capacity<r::sigmoid_topk>>(
        r::make_router("sigmoid_topk", values({{"k", "3"}, {"capacity_factor", "0.75"}, {"drop_policy", "probs"}})));
    CHECK((capped.inner.k == 3 && capped.capacity_factor == 0.75 && capped.policy == r::drop_policy::probs));
    CHECK(held<r::capacity<r::softmax_topk>>(r::make_router("softmax_topk", values({{"capacity_factor", "1"}}))).policy ==
          r::drop_policy::position);
}

TEST_CASE("an option means one setting across routers; the family routers take the same options", "[routers][registry]") {
    // moe-run declares each option once (--capacity-factor: capacity's and expert choice's) and checks
    // the options of the checkpoint's own router (softmax_topk or sigmoid_topk) before reading it.
    std::map<std::string_view, r::setting> by_flag;
    for (std::string_view name : r::builtin_routers::names)
        for (const r::setting& s : r::builtin_routers::settings_of(name)) {
            if (s.flag.empty()) continue;
            INFO(std::string(name) + ": --" + std::string(s.flag));
            const auto [it, first] = by_flag.emplace(s.flag, s);
            CHECK((it->second.key == s.key && it->second.type == s.type));
        }
    const auto flags_of = [](std::string_view name) {
        std::vector<std::string_view> flags;
        for (const r::setting& s : r::builtin_routers::settings_of(name))
            if (!s.flag.empty()) flags.push_back(s.flag);
        return flags;
    };
    CHECK(flags_of("softmax_topk") == flags_of("sigmoid_topk"));
}

TEST_CASE("make_router keeps defaults, ignores other keys and names what is wrong", "[routers][registry]") {
    // Not given (or empty): the member's default.
    const auto d = held<r::sinkhorn>(r::make_router("sinkhorn", values({{"iterations", ""}, {"d_model", "64"}})));
    const r::sinkhorn defaults;
    CHECK((d.k == defaults.k && d.iterations == defaults.iterations && d.gates == defaults.gates &&
           d.normalize == defaults.normalize));
    const auto bad = [](const char* router, std::map<std::string, std::string, std::less<>> v, const std::string& message) {
        CHECK_THROWS_MATCHES(r::make_router(router, values(std::move(v))), moe::value_error, Catch::Message(message));
    };
    bad("sinkhorn", {{"iterations", "0"}}, "sinkhorn: setting 'iterations' 0 must be in [1, inf)");
    bad("sinkhorn", {{"iterations", "2.5"}}, "sinkhorn: setting 'iterations' expects a decimal integer (in [1, inf)), got '2.5'");
    bad("sinkhorn", {{"iterations", "+3"}}, "sinkhorn: setting 'iterations' expects a decimal integer (in [1, inf)), got '+3'");
    bad("sinkhorn", {{"gates", "both"}}, "sinkhorn: setting 'gates' expects one of softmax|plan, got 'both'");
    bad("sinkhorn", {{"normalize", "yes"}}, "sinkhorn: setting 'normalize' expects true or false, got 'yes'");
    bad("top_p", {{"threshold", "0"}}, "top_p: setting 'threshold' 0 must be in (0, 1]");
    bad("top_p", {{"threshold", "nan"}}, "top_p: setting 'threshold' expects a finite number (in (0, 1]), got 'nan'");
    bad("softmax_topk", {{"scale", "inf"}}, "softmax_topk: setting 'scale' expects a finite number (in (0, inf)), got 'inf'");
    bad("softmax_topk", {{"k", "99999999999999999999"}},
        "softmax_topk: setting 'k' expects a decimal integer (in [1, inf)), got '99999999999999999999'");
    bad("sinkhorn", {{"tolerance", "1e-400"}}, "sinkhorn: setting 'tolerance' expects a finite number (in [0, inf)), got '1e-400'");
    bad("sinkhorn", {{"tolerance", " 1"}}, "sinkhorn: setting 'tolerance' expects a finite number (in [0, inf)), got ' 1'");
    bad("sinkhorn", {{"tolerance", "0x1p-3"}}, "sinkhorn: setting 'tolerance' expects a finite number (in [0, inf)), got '0x1p-3'");
    bad("null_experts", {{"k", "2"}}, "null_experts: setting 'null_experts' is needed");
    bad("softmax_topk", {{"drop_policy", "probs"}}, "softmax_topk: setting 'drop_policy' needs 'capacity_factor'");
    bad("mystery", {}, "unknown router 'mystery' (the routers: softmax_topk, sigmoid_topk, top_p, null_experts, sinkhorn, "
                       "expert_choice)");
}

TEST_CASE("a model config gives the settings of its family's router", "[routers][registry][io]") {
    const auto config = moe::io::parse_config(nlohmann::json::parse(R"({
        "model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 4, "num_experts_per_tok": 3,
        "moe_intermediate_size": 32, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.4999999999999996})"));
    CHECK(config.router_name() == "sigmoid_topk");
    const auto s = held<r::sigmoid_topk>(r::make_router(config.router_name(), moe::io::router_settings(config)));
    CHECK((s.k == 3 && s.normalize && s.n_group == 4 && s.topk_group == 2));
    CHECK(s.scale == config.scale);  // the text reads back to the same double
    const auto mixtral = moe::io::parse_config(nlohmann::json::parse(R"({
        "model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_experts_per_tok": 2,
        "intermediate_size": 32, "num_local_experts": 8})"));
    CHECK(mixtral.router_name() == "softmax_topk");
    const auto m = held<r::softmax_topk>(r::make_router(mixtral.router_name(), moe::io::router_settings(mixtral)));
    CHECK((m.k == 2 && m.normalize && m.scale == 1));
}

TEST_CASE("a registry of one's own builds a router it did not ship with", "[routers][registry]") {
    using registry = r::router_registry<r::softmax_topk, toy_router>;
    static_assert(std::is_same_v<registry::variant,
                                 std::variant<r::softmax_topk, r::capacity<r::softmax_topk>, toy_router>>);
    CHECK(registry::list() == "softmax_topk, toy");
    const auto toy = registry::make("toy", values({{"k", "3"}, {"capacity_factor", "2"}}));
    REQUIRE(std::holds_alternative<toy_router>(toy));
    CHECK(std::get<toy_router>(toy).k == 3);  // capacity_factor: not a toy setting, ignored
    const moe::matrix<float> logits = moe::matrix<float>::Random(50, 8);
    const auto report =
        moe::testing::check_router(std::get<toy_router>(toy), logits, 8, {.weight_sum = 1.0, .slots_per_token = 3});
    INFO(report.str());
    CHECK(report.ok());
    CHECK(registry::settings_of("toy").size() == 1);
}

TEST_CASE("README lists every built-in router", "[routers][registry]") {
    std::ifstream in(std::string(MOE_TEST_DATA) + "/../../README.md");
    REQUIRE(in);
    std::stringstream text;
    text << in.rdbuf();
    const std::string readme = text.str();
    std::string options;
    for (std::string_view name : r::builtin_routers::names) {
        INFO(name);
        // Its row in the table of parts, and moe-run's --router.
        CHECK(readme.find("| `moe/routers/" + std::string(name) + ".hpp` |") != std::string::npos);
        options += (options.empty() ? "" : "|") + std::string(name);
    }
    CHECK(readme.find("`--router " + options + "`") != std::string::npos);
}
