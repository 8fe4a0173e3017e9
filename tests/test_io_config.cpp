#include <moe/io/config.hpp>

#include <catch2/catch.hpp>

using nlohmann::json;

namespace {
json mixtral() {
    return {{"model_type", "mixtral"},  {"hidden_size", 32},        {"intermediate_size", 24},
            {"num_local_experts", 4},   {"num_experts_per_tok", 2}, {"num_hidden_layers", 2}};
}
json deepseek() {
    return {{"model_type", "deepseek_v3"}, {"hidden_size", 32},       {"moe_intermediate_size", 16},
            {"n_routed_experts", 16},      {"num_experts_per_tok", 4}, {"num_hidden_layers", 4},
            {"n_group", 4},                {"topk_group", 2},          {"first_k_dense_replace", 1},
            {"n_shared_experts", 2}};
}
}  // namespace

TEST_CASE("config.json of each family maps to the layer's hyper-parameters", "[io][config]") {
    const auto m = moe::io::parse_config(mixtral());
    CHECK(m.kind == moe::io::family::mixtral);
    CHECK(m.normalize);
    CHECK(m.expert_size == 24);
    CHECK(m.is_moe_layer(1));
    CHECK_FALSE(m.is_moe_layer(2));
    const auto d = moe::io::parse_config(deepseek());
    CHECK(d.sigmoid_scoring());
    CHECK(d.scale == 2.5);  // HuggingFace's default routed_scaling_factor
    CHECK(d.shared_size == 32);
    CHECK_FALSE(d.is_moe_layer(0));
    CHECK(d.is_moe_layer(3));
    for (const char* dir : {"mixtral_f32", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"}) {
        const auto c = moe::io::read_config(std::filesystem::path(MOE_TEST_DATA) / "ckpt" / dir);
        CHECK(c.is_moe_layer(1));
    }
    auto q = mixtral();
    q["model_type"] = "qwen2_moe";
    q["moe_intermediate_size"] = 8;
    q["num_experts"] = 4;
    q["shared_expert_intermediate_size"] = 12;
    q["mlp_only_layers"] = {0};
    const auto qc = moe::io::parse_config(q);
    CHECK(qc.shared_gated());
    CHECK_FALSE(qc.normalize);
    CHECK_FALSE(qc.is_moe_layer(0));
}

TEST_CASE("broken config.json values are rejected naming the key", "[io][config][errors]") {
    const auto fails_with = [](json j, const std::string& text) {
        INFO(j.dump());
        CHECK_THROWS_AS(moe::io::parse_config(j), moe::config_error);
        CHECK_THROWS_WITH(moe::io::parse_config(j), Catch::Contains(text));
    };
    auto j = mixtral();
    j.erase("hidden_size");
    fails_with(j, "'hidden_size' is missing");
    j = mixtral();
    j["hidden_size"] = "32";
    fails_with(j, "'hidden_size' must be an integer");
    j = mixtral();
    j["intermediate_size"] = -4;
    fails_with(j, "'intermediate_size' = -4");
    j = mixtral();
    j["num_experts_per_tok"] = 5;
    fails_with(j, "'num_experts_per_tok' = 5 exceeds");
    j = mixtral();
    j["model_type"] = "llama";
    fails_with(j, "'llama' is not a supported");
    j = deepseek();
    j["n_group"] = 3;
    fails_with(j, "'n_group' = 3");
    j = deepseek();
    j["topk_group"] = 5;
    fails_with(j, "'topk_group' = 5");
    j = deepseek();
    j["scoring_func"] = "softmax";
    fails_with(j, "'scoring_func'");
    j = deepseek();
    j["norm_topk_prob"] = 1;
    fails_with(j, "'norm_topk_prob' must be true or false");
    fails_with(json::array(), "not a JSON object");
    CHECK_THROWS_AS(moe::io::read_config("/nonexistent/config.json"), moe::io_error);
}

TEST_CASE("the family table has one entry per family, found by each of its names", "[io][config]") {
    using moe::io::family_info;
    for (std::size_t i = 0; i < moe::io::families.size(); ++i) {
        const family_info& f = moe::io::families[i];
        INFO(f.model_type);
        CHECK(static_cast<std::size_t>(f.kind) == i);  // family_of indexes by the enum
        CHECK(&moe::io::family_of(f.kind) == &f);
        CHECK(moe::io::find_family(&family_info::model_type, f.model_type) == &f);
        CHECK(moe::io::find_family(&family_info::gguf_architecture, f.gguf_architecture) == &f);
        // A config with the family's keys parses as it.
        json j = {{"model_type", f.model_type}, {"hidden_size", 64}, {"num_hidden_layers", 2}, {"num_experts_per_tok", 2},
                  {f.expert_size_key, 32}, {f.experts_key, 8}, {"shared_expert_intermediate_size", 16},
                  {"n_group", 1}, {"topk_group", 1}};
        const auto c = moe::io::parse_config(j);
        CHECK(c.kind == f.kind);
        CHECK((c.expert_size == 32 && c.n_experts == 8));
    }
    CHECK(moe::io::find_family(&family_info::model_type, "llama") == nullptr);
    CHECK(moe::io::family_list(&family_info::gguf_architecture) == "llama, qwen2moe, qwen3moe, olmoe, deepseek2");
}

TEST_CASE("each family's entry gives what its HuggingFace configuration class defaults to", "[io][config]") {
    // A config.json with only the required keys: the defaults below are written out from each family's
    // configuration and modeling code in HuggingFace transformers, not read from the table.
    struct expected {
        const char* model_type;
        const char* router;
        bool normalize;
        moe::index shared_size;
        bool shared_gated;
        bool moe_layer_2;  // with 5 layers: DeepSeek-V3's first_k_dense_replace defaults to 3
    };
    for (const expected& e : {expected{"mixtral", "softmax_topk", true, 0, false, true},
                              expected{"qwen2_moe", "softmax_topk", false, 16, true, true},
                              expected{"qwen3_moe", "softmax_topk", false, 0, false, true},
                              expected{"olmoe", "softmax_topk", false, 0, false, true},
                              expected{"deepseek_v3", "sigmoid_topk", true, 32, false, false}}) {
        INFO(e.model_type);
        const auto& f = *moe::io::find_family(&moe::io::family_info::model_type, e.model_type);
        json j = {{"model_type", e.model_type}, {"hidden_size", 64}, {"num_hidden_layers", 5}, {"num_experts_per_tok", 2},
                  {f.expert_size_key, 32}, {f.experts_key, 8}, {"n_group", 1}, {"topk_group", 1}};
        if (e.shared_gated) j["shared_expert_intermediate_size"] = 16;
        const auto c = moe::io::parse_config(j);
        CHECK(c.router_name() == e.router);
        CHECK(c.sigmoid_scoring() == (std::string_view(e.router) == "sigmoid_topk"));
        CHECK(c.normalize == e.normalize);
        CHECK(c.shared_size == e.shared_size);
        CHECK(c.shared_gated() == e.shared_gated);
        CHECK(c.is_moe_layer(2) == e.moe_layer_2);
        CHECK(c.is_moe_layer(3));
        CHECK(c.scale == (std::string_view(e.router) == "sigmoid_topk" ? 2.5 : 1.0));
        // norm_topk_prob: read where the family reads it, ignored by Mixtral (always normalises).
        j["norm_topk_prob"] = !e.normalize;
        CHECK(moe::io::parse_config(j).normalize == (e.model_type == std::string_view("mixtral") ? true : !e.normalize));
    }
    // DeepSeek-V3's expert groups default to 8, 4 of them eligible.
    auto groups = deepseek();
    groups.erase("n_group");
    groups.erase("topk_group");
    const auto g = moe::io::parse_config(groups);
    CHECK((g.n_group == 8 && g.topk_group == 4));
    // Qwen2-MoE needs its shared expert's width; DeepSeek-V3's shared experts x their width stay in range.
    json q = {{"model_type", "qwen2_moe"}, {"hidden_size", 64}, {"num_hidden_layers", 2}, {"num_experts_per_tok", 2},
              {"moe_intermediate_size", 32}, {"num_experts", 8}};
    CHECK_THROWS_WITH(moe::io::parse_config(q), Catch::Contains("'shared_expert_intermediate_size' is missing"));
    auto d = deepseek();
    d["n_shared_experts"] = 1 << 22;
    CHECK_THROWS_WITH(moe::io::parse_config(d), Catch::Contains("'n_shared_experts' = 4194304 times the expert size exceeds"));
}
