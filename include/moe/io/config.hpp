#pragma once
/// \file
/// A checkpoint's `config.json`: which MoE family it is and the hyper-parameters of its MoE layers,
/// read with HuggingFace's key names for `mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe` and `deepseek_v3`.

#include "moe/error.hpp"
#include "moe/routers/settings.hpp"
#include "moe/types.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace moe::io {

/// The checkpoint families moe can load, by `model_type`.
enum class family { mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 };

/// Which decoder layers of a family are MoE layers (the others are dense MLPs), by config.json's keys.
enum class moe_layers {
    every,        ///< all of them (Mixtral, OLMoE)
    sparse_step,  ///< L with (L + 1) % `decoder_sparse_step` == 0, not in `mlp_only_layers` (Qwen-MoE)
    after_dense,  ///< L >= `first_k_dense_replace` (default 3) with L % `moe_layer_freq` == 0 (DeepSeek-V3)
};

/// The shared FFN beside a family's routed experts.
enum class shared_ffn {
    none,
    gated,    ///< one FFN of its own width, scaled by sigmoid(x . g) (Qwen2-MoE's `shared_expert_gate`)
    experts,  ///< a number of routed experts' width (default 1), ungated (DeepSeek-V3)
};

/// Whether a family renormalises a token's top-k weights: fixed, or as a key says with a default.
struct normalization {
    bool from_key = false;  ///< read config.json's `norm_topk_prob` / GGUF's `<arch>.expert_weights_norm`
    bool value = false;     ///< the value when fixed, the default when read from the key
};

/// A checkpoint family: how it is named in its files (config.json's `model_type` and the keys of its
/// expert sizes, llama.cpp's architecture, HuggingFace's tensor names of its MoE block in
/// `model.layers.L.`) and what its MoE layers compute (router, normalisation, shared FFN, which layers
/// are MoE). `parse_config`, `gguf_config` and `layer_tensor_names` read nothing else of a family.
struct family_info {
    family kind = family::mixtral;
    // Names.
    std::string_view model_type{};         ///< config.json
    std::string_view gguf_architecture{};  ///< a GGUF file's `general.architecture`
    std::string_view expert_size_key{};    ///< config.json: the width of one routed expert
    std::string_view experts_key{};        ///< config.json: the number of routed experts
    std::string_view block{};              ///< the MoE block's prefix within a decoder layer
    std::string_view gate{}, up{}, down{};  ///< an expert's projections (`<name>.weight`)
    std::string_view shared{};             ///< the shared FFN's prefix within the block; empty without
    // What it computes.
    std::string_view router{};          ///< its router in the registry: `softmax_topk`, or `sigmoid_topk`
                                        ///< with DeepSeek-V3's keys (scaling, groups) and correction bias
    normalization config_normalize{};   ///< as HuggingFace's modeling code reads config.json
    normalization gguf_normalize{};     ///< as llama.cpp computes the architecture
    shared_ffn shared_kind = shared_ffn::none;
    std::string_view shared_size_key{};  ///< config.json: the shared FFN's width (gated) or experts (experts)
    moe_layers layers = moe_layers::every;
};

/// One entry per family, in `family`'s order.
inline constexpr std::array<family_info, 5> families{{
    {.kind = family::mixtral, .model_type = "mixtral", .gguf_architecture = "llama",
     .expert_size_key = "intermediate_size", .experts_key = "num_local_experts", .block = "block_sparse_moe.",
     .gate = "w1", .up = "w3", .down = "w2", .shared = "", .router = "softmax_topk",
     .config_normalize = {false, true}, .gguf_normalize = {false, true}},  // Mixtral always renormalises
    {.kind = family::qwen2_moe, .model_type = "qwen2_moe", .gguf_architecture = "qwen2moe",
     .expert_size_key = "moe_intermediate_size", .experts_key = "num_experts", .block = "mlp.", .gate = "gate_proj",
     .up = "up_proj", .down = "down_proj", .shared = "shared_expert.", .router = "softmax_topk",
     .config_normalize = {true, false}, .gguf_normalize = {false, false}, .shared_kind = shared_ffn::gated,
     .shared_size_key = "shared_expert_intermediate_size", .layers = moe_layers::sparse_step},
    {.kind = family::qwen3_moe, .model_type = "qwen3_moe", .gguf_architecture = "qwen3moe",
     .expert_size_key = "moe_intermediate_size", .experts_key = "num_experts", .block = "mlp.", .gate = "gate_proj",
     .up = "up_proj", .down = "down_proj", .shared = "", .router = "softmax_topk", .config_normalize = {true, false},
     .gguf_normalize = {false, true}, .layers = moe_layers::sparse_step},
    {.kind = family::olmoe, .model_type = "olmoe", .gguf_architecture = "olmoe", .expert_size_key = "intermediate_size",
     .experts_key = "num_experts", .block = "mlp.", .gate = "gate_proj", .up = "up_proj", .down = "down_proj",
     .shared = "", .router = "softmax_topk", .config_normalize = {true, false}, .gguf_normalize = {false, false}},
    {.kind = family::deepseek_v3, .model_type = "deepseek_v3", .gguf_architecture = "deepseek2",
     .expert_size_key = "moe_intermediate_size", .experts_key = "n_routed_experts", .block = "mlp.",
     .gate = "gate_proj", .up = "up_proj", .down = "down_proj", .shared = "shared_experts.", .router = "sigmoid_topk",
     .config_normalize = {true, true}, .gguf_normalize = {true, false}, .shared_kind = shared_ffn::experts,
     .shared_size_key = "n_shared_experts", .layers = moe_layers::after_dense},
}};

/// The entry of family `kind`.
[[nodiscard]] inline const family_info& family_of(family kind) { return families[static_cast<std::size_t>(kind)]; }

/// The family whose `member` (`&family_info::model_type` or `&family_info::gguf_architecture`) is
/// `name`; null when none is.
[[nodiscard]] inline const family_info* find_family(std::string_view family_info::*member, std::string_view name) {
    for (const family_info& f : families)
        if (f.*member == name) return &f;
    return nullptr;
}

/// Every family's `member`, "a, b, c" (for error messages).
[[nodiscard]] inline std::string family_list(std::string_view family_info::*member) {
    std::string s;
    for (const family_info& f : families) s += (s.empty() ? "" : ", ") + std::string(f.*member);
    return s;
}

/// What a family's MoE layers compute, and which decoder layers are MoE.
struct model_config {
    family kind = family::mixtral;
    std::string model_type;
    index hidden_size = 0;        ///< d
    index expert_size = 0;        ///< width of one routed expert
    index n_experts = 0;          ///< routed experts E
    index top_k = 0;              ///< `num_experts_per_tok`
    index n_layers = 0;           ///< `num_hidden_layers`
    bool normalize = false;       ///< `norm_topk_prob` (always true for Mixtral)
    double scale = 1.0;           ///< `routed_scaling_factor`
    index n_group = 1;
    index topk_group = 1;
    index shared_size = 0;        ///< width of the shared FFN; 0 without

    // Which layers are MoE (the others are dense MLPs).
    index first_k_dense_replace = 0;
    index moe_layer_freq = 1;
    index decoder_sparse_step = 1;
    std::vector<index> mlp_only_layers;

    /// The family's own router in the router registry (routers/registry.hpp).
    [[nodiscard]] std::string_view router_name() const { return family_of(kind).router; }
    /// Whether the family scores with sigmoids (DeepSeek-V3's R2) instead of a softmax (R1).
    [[nodiscard]] bool sigmoid_scoring() const { return router_name() == "sigmoid_topk"; }
    /// Whether the shared FFN is scaled by a sigmoid gate (Qwen2-MoE's `shared_expert_gate`).
    [[nodiscard]] bool shared_gated() const { return family_of(kind).shared_kind == shared_ffn::gated; }

    /// Whether decoder layer `layer` (0-based) is an MoE layer, following the family's modeling code.
    [[nodiscard]] bool is_moe_layer(index layer) const {
        if (layer < 0 || layer >= n_layers) return false;
        switch (family_of(kind).layers) {
            case moe_layers::sparse_step:
                return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) == mlp_only_layers.end() &&
                       (layer + 1) % decoder_sparse_step == 0;
            case moe_layers::after_dense: return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
            case moe_layers::every: break;
        }
        return true;
    }
};

namespace detail {

/// Reads and parses a JSON file: `io_error` when it cannot be opened, `Error` when it is not JSON.
template <class Error>
nlohmann::json read_json_file(const std::filesystem::path& file) {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw io_error(file.string() + ": cannot open the file");
    std::stringstream text;
    text << in.rdbuf();
    try {
        return nlohmann::json::parse(text.str());
    } catch (const nlohmann::json::exception& e) {
        throw Error(file.string() + ": not valid JSON (" + e.what() + ")");
    }
}

class config_reader {
public:
    config_reader(const nlohmann::json& j, std::string source) : j_(j), source_(std::move(source)) {}

    [[nodiscard]] bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }

    /// Sizes beyond this are absurd for any model and are rejected before anything is allocated.
    static constexpr index largest = index{1} << 24;

    /// A required integer in [min, max].
    [[nodiscard]] index integer(const char* key, index min = 1, index max = largest) const {
        if (!has(key)) fail(key, "is missing");
        return checked_integer(key, min, max);
    }
    /// An optional integer, `fallback` when absent.
    [[nodiscard]] index integer_or(const char* key, index fallback, index min = 0) const {
        return has(key) ? checked_integer(key, min, largest) : fallback;
    }
    [[nodiscard]] bool boolean_or(const char* key, bool fallback) const {
        if (!has(key)) return fallback;
        if (!j_.at(key).is_boolean()) fail(key, "must be true or false, got " + j_.at(key).dump());
        return j_.at(key).get<bool>();
    }
    [[nodiscard]] double number_or(const char* key, double fallback) const {
        if (!has(key)) return fallback;
        if (!j_.at(key).is_number()) fail(key, "must be a number, got " + j_.at(key).dump());
        return j_.at(key).get<double>();
    }
    [[nodiscard]] std::string string_or(const char* key, const std::string& fallback) const {
        if (!has(key)) return fallback;
        if (!j_.at(key).is_string()) fail(key, "must be a string, got " + j_.at(key).dump());
        return j_.at(key).get<std::string>();
    }
    [[nodiscard]] std::vector<index> integers_or_empty(const char* key) const {
        std::vector<index> v;
        if (!has(key)) return v;
        if (!j_.at(key).is_array()) fail(key, "must be a list of integers, got " + j_.at(key).dump());
        for (const auto& x : j_.at(key)) {
            if (!x.is_number_integer()) fail(key, "must be a list of integers, got " + j_.at(key).dump());
            v.push_back(x.get<index>());
        }
        return v;
    }
    [[noreturn]] void fail(const char* key, const std::string& what) const {
        throw config_error(source_ + ": key '" + key + "' " + what);
    }

private:
    [[nodiscard]] index checked_integer(const char* key, index min, index max) const {
        const auto& v = j_.at(key);
        if (!v.is_number_integer()) fail(key, "must be an integer, got " + v.dump());
        const auto x = v.get<long long>();
        if (x < min || x > max)
            fail(key, "= " + std::to_string(x) + " is out of range [" + std::to_string(min) + ", " +
                          std::to_string(max) + "]");
        return static_cast<index>(x);
    }

    const nlohmann::json& j_;
    std::string source_;
};

}  // namespace detail

/// Parses a config.json object; `source` names it in error messages. Throws `config_error` naming the
/// key for a missing, mistyped or out-of-range value, or an unsupported `model_type`. Optional keys
/// take the defaults of HuggingFace's configuration classes.
inline model_config parse_config(const nlohmann::json& j, const std::string& source = "config.json") {
    if (!j.is_object()) throw config_error(source + ": not a JSON object");
    const detail::config_reader r(j, source);
    model_config c;
    if (!r.has("model_type")) r.fail("model_type", "is missing");
    c.model_type = r.string_or("model_type", "");
    c.hidden_size = r.integer("hidden_size");
    c.n_layers = r.integer("num_hidden_layers");
    c.top_k = r.integer("num_experts_per_tok");
    const family_info* f = find_family(&family_info::model_type, c.model_type);
    if (f == nullptr)
        r.fail("model_type", "= '" + c.model_type + "' is not a supported MoE family (" +
                                 family_list(&family_info::model_type) + ")");
    c.kind = f->kind;
    c.expert_size = r.integer(f->expert_size_key.data());  // the table's keys are literals: null-terminated
    c.n_experts = r.integer(f->experts_key.data());
    c.normalize = f->config_normalize.from_key ? r.boolean_or("norm_topk_prob", f->config_normalize.value)
                                                : f->config_normalize.value;
    switch (f->shared_kind) {
        case shared_ffn::none: break;
        case shared_ffn::gated:
            c.shared_size = r.integer(f->shared_size_key.data());
            break;
        case shared_ffn::experts: {
            const index count = r.integer_or(f->shared_size_key.data(), 1, 1);
            if (count > detail::config_reader::largest / c.expert_size)
                r.fail(f->shared_size_key.data(), "= " + std::to_string(count) + " times the expert size exceeds " +
                                                      std::to_string(detail::config_reader::largest));
            c.shared_size = count * c.expert_size;
            break;
        }
    }
    switch (f->layers) {
        case moe_layers::every: break;
        case moe_layers::sparse_step:
            c.decoder_sparse_step = r.integer_or("decoder_sparse_step", 1, 1);
            c.mlp_only_layers = r.integers_or_empty("mlp_only_layers");
            break;
        case moe_layers::after_dense:
            c.first_k_dense_replace = r.integer_or("first_k_dense_replace", 3);
            c.moe_layer_freq = r.integer_or("moe_layer_freq", 1, 1);
            break;
    }
    if (c.sigmoid_scoring()) {  // DeepSeek-V3's keys and defaults
        c.scale = r.number_or("routed_scaling_factor", 2.5);
        c.n_group = r.integer_or("n_group", 8, 1);
        c.topk_group = r.integer_or("topk_group", 4, 1);
        if (r.string_or("scoring_func", "sigmoid") != "sigmoid")
            r.fail("scoring_func", "= '" + r.string_or("scoring_func", "") + "' is not supported (only 'sigmoid')");
        if (r.string_or("topk_method", "noaux_tc") != "noaux_tc")
            r.fail("topk_method", "= '" + r.string_or("topk_method", "") + "' is not supported (only 'noaux_tc')");
    }
    if (c.top_k > c.n_experts)
        r.fail("num_experts_per_tok", "= " + std::to_string(c.top_k) + " exceeds the number of experts (" +
                                          std::to_string(c.n_experts) + ")");
    if (!(c.scale > 0) || !std::isfinite(c.scale))
        r.fail("routed_scaling_factor", "= " + std::to_string(c.scale) + " must be a finite number > 0");
    if (c.n_experts % c.n_group != 0)
        r.fail("n_group", "= " + std::to_string(c.n_group) + " does not divide the number of experts (" +
                              std::to_string(c.n_experts) + ")");
    if (c.topk_group > c.n_group)
        r.fail("topk_group", "= " + std::to_string(c.topk_group) + " exceeds n_group (" + std::to_string(c.n_group) + ")");
    if (c.top_k > c.topk_group * (c.n_experts / c.n_group))
        r.fail("num_experts_per_tok", "= " + std::to_string(c.top_k) + " exceeds the experts of the " +
                                          std::to_string(c.topk_group) + " eligible groups");
    return c;
}

/// The router settings the config gives (routers/settings.hpp, `model_setting`): experts per token,
/// normalisation, scaling and the expert groups. `routers::make_router(c.router_name(),
/// router_settings(c))` is the family's own router; other routers take what applies to them.
inline routers::setting_values router_settings(const model_config& c) {
    char scale[32];
    const auto end = std::to_chars(scale, scale + sizeof scale, c.scale).ptr;  // the shortest text that reads back exactly
    routers::setting_values v;
    v.set("k", std::to_string(c.top_k))
        .set("normalize", c.normalize ? "true" : "false")
        .set("scale", std::string(scale, end))
        .set("n_group", std::to_string(c.n_group))
        .set("topk_group", std::to_string(c.topk_group));
    return v;
}

/// Reads and parses `path` (a config.json file, or a model folder holding one).
inline model_config read_config(const std::filesystem::path& path) {
    const auto file = std::filesystem::is_directory(path) ? path / "config.json" : path;
    return parse_config(detail::read_json_file<config_error>(file), file.string());
}

}  // namespace moe::io
