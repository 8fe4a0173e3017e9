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

/// How a family is named in its files: config.json's `model_type` and the keys of its expert sizes,
/// llama.cpp's architecture (`general.architecture` of a GGUF file), and HuggingFace's tensor names of
/// its MoE block in `model.layers.L.`. What a family computes beyond these (its router, shared
/// experts, which layers are MoE) is read by `parse_config` and `gguf_config`.
struct family_names {
    family kind;
    std::string_view model_type;         ///< config.json
    std::string_view gguf_architecture;  ///< a GGUF file's `general.architecture`
    std::string_view expert_size_key;    ///< config.json: the width of one routed expert
    std::string_view experts_key;        ///< config.json: the number of routed experts
    std::string_view block;              ///< the MoE block's prefix within a decoder layer
    std::string_view gate, up, down;     ///< an expert's projections (`<name>.weight`)
    std::string_view shared;             ///< the shared FFN's prefix within the block; empty without
};

/// One entry per family, in `family`'s order.
inline constexpr std::array<family_names, 5> families{{
    {family::mixtral, "mixtral", "llama", "intermediate_size", "num_local_experts", "block_sparse_moe.", "w1", "w3",
     "w2", ""},
    {family::qwen2_moe, "qwen2_moe", "qwen2moe", "moe_intermediate_size", "num_experts", "mlp.", "gate_proj", "up_proj",
     "down_proj", "shared_expert."},
    {family::qwen3_moe, "qwen3_moe", "qwen3moe", "moe_intermediate_size", "num_experts", "mlp.", "gate_proj", "up_proj",
     "down_proj", ""},
    {family::olmoe, "olmoe", "olmoe", "intermediate_size", "num_experts", "mlp.", "gate_proj", "up_proj", "down_proj", ""},
    {family::deepseek_v3, "deepseek_v3", "deepseek2", "moe_intermediate_size", "n_routed_experts", "mlp.", "gate_proj",
     "up_proj", "down_proj", "shared_experts."},
}};

/// The names of family `kind`.
[[nodiscard]] inline const family_names& names_of(family kind) { return families[static_cast<std::size_t>(kind)]; }

/// The family whose `member` (`&family_names::model_type` or `&family_names::gguf_architecture`) is
/// `name`; null when none is.
[[nodiscard]] inline const family_names* find_family(std::string_view family_names::*member, std::string_view name) {
    for (const family_names& f : families)
        if (f.*member == name) return &f;
    return nullptr;
}

/// Every family's `member`, "a, b, c" (for error messages).
[[nodiscard]] inline std::string family_list(std::string_view family_names::*member) {
    std::string s;
    for (const family_names& f : families) s += (s.empty() ? "" : ", ") + std::string(f.*member);
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
    bool sigmoid_scoring = false; ///< R2 (DeepSeek-V3) instead of R1
    bool normalize = false;       ///< `norm_topk_prob` (always true for Mixtral)
    double scale = 1.0;           ///< `routed_scaling_factor`
    index n_group = 1;
    index topk_group = 1;
    index shared_size = 0;        ///< width of the shared FFN; 0 without
    bool shared_gated = false;    ///< Qwen2-MoE's sigmoid `shared_expert_gate`

    // Which layers are MoE (the others are dense MLPs).
    index first_k_dense_replace = 0;
    index moe_layer_freq = 1;
    index decoder_sparse_step = 1;
    std::vector<index> mlp_only_layers;

    /// The family's own router in the router registry (routers/registry.hpp).
    [[nodiscard]] std::string_view router_name() const { return sigmoid_scoring ? "sigmoid_topk" : "softmax_topk"; }

    /// Whether decoder layer `layer` (0-based) is an MoE layer, following the family's modeling code.
    [[nodiscard]] bool is_moe_layer(index layer) const {
        if (layer < 0 || layer >= n_layers) return false;
        switch (kind) {
            case family::qwen2_moe:
            case family::qwen3_moe:
                return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) == mlp_only_layers.end() &&
                       (layer + 1) % decoder_sparse_step == 0;
            case family::deepseek_v3: return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
            case family::mixtral:
            case family::olmoe: break;
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
    const family_names* f = find_family(&family_names::model_type, c.model_type);
    if (f == nullptr)
        r.fail("model_type", "= '" + c.model_type + "' is not a supported MoE family (" +
                                 family_list(&family_names::model_type) + ")");
    c.kind = f->kind;
    c.expert_size = r.integer(f->expert_size_key.data());  // the table's keys are literals: null-terminated
    c.n_experts = r.integer(f->experts_key.data());
    switch (c.kind) {
        case family::mixtral: c.normalize = true; break;  // Mixtral always renormalises its top-k weights
        case family::qwen2_moe:
        case family::qwen3_moe:
            c.normalize = r.boolean_or("norm_topk_prob", false);
            c.decoder_sparse_step = r.integer_or("decoder_sparse_step", 1, 1);
            c.mlp_only_layers = r.integers_or_empty("mlp_only_layers");
            if (c.kind == family::qwen2_moe) {
                c.shared_size = r.integer("shared_expert_intermediate_size");
                c.shared_gated = true;
            }
            break;
        case family::olmoe: c.normalize = r.boolean_or("norm_topk_prob", false); break;
        case family::deepseek_v3:
            c.sigmoid_scoring = true;
            c.normalize = r.boolean_or("norm_topk_prob", true);
            c.scale = r.number_or("routed_scaling_factor", 2.5);
            c.n_group = r.integer_or("n_group", 8, 1);
            c.topk_group = r.integer_or("topk_group", 4, 1);
            c.shared_size = r.integer_or("n_shared_experts", 1, 1) * c.expert_size;
            c.first_k_dense_replace = r.integer_or("first_k_dense_replace", 3);
            c.moe_layer_freq = r.integer_or("moe_layer_freq", 1, 1);
            if (r.string_or("scoring_func", "sigmoid") != "sigmoid")
                r.fail("scoring_func", "= '" + r.string_or("scoring_func", "") + "' is not supported (only 'sigmoid')");
            if (r.string_or("topk_method", "noaux_tc") != "noaux_tc")
                r.fail("topk_method", "= '" + r.string_or("topk_method", "") + "' is not supported (only 'noaux_tc')");
            break;
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
