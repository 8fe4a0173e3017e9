#pragma once
/// \file
/// Loading one MoE layer of a HuggingFace checkpoint folder: `config.json` plus `model.safetensors`,
/// or `model.safetensors.index.json` plus its shards. Shards are memory-mapped and opened only when
/// one of the requested tensors lives in them, so loading a layer of a huge checkpoint costs that
/// layer. Weights stored as F32, BF16, F16 or F64 are converted to the layer's scalar type, expert
/// weights to its storage (experts/storage.hpp): bf16 keeps BF16 tensors as stored, q8_0 and q4_0
/// quantize each row from float at load.

#include "moe/error.hpp"
#include "moe/io/config.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/layer.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace moe::io {

/// HuggingFace's tensor names of one MoE layer of a family (`family_info`).
struct layer_tensor_names {
    std::string prefix;  ///< e.g. "model.layers.3.mlp."
    family kind;

    [[nodiscard]] std::string router() const { return prefix + "gate.weight"; }
    [[nodiscard]] std::string correction_bias() const { return prefix + "gate.e_score_correction_bias"; }
    /// Gate, up and down projections of routed expert e.
    [[nodiscard]] std::string expert_gate(index e) const { return expert(e, family_of(kind).gate); }
    [[nodiscard]] std::string expert_up(index e) const { return expert(e, family_of(kind).up); }
    [[nodiscard]] std::string expert_down(index e) const { return expert(e, family_of(kind).down); }
    /// Gate, up and down projections of the shared FFN.
    [[nodiscard]] std::string shared_gate_proj() const { return shared() + "gate_proj.weight"; }
    [[nodiscard]] std::string shared_up_proj() const { return shared() + "up_proj.weight"; }
    [[nodiscard]] std::string shared_down_proj() const { return shared() + "down_proj.weight"; }
    /// Qwen2-MoE's shared-expert gate, [1, d].
    [[nodiscard]] std::string shared_expert_gate() const { return prefix + "shared_expert_gate.weight"; }

    /// The names for decoder layer `layer` of family `kind`.
    static layer_tensor_names of(family kind, index layer) {
        return {"model.layers." + std::to_string(layer) + "." + std::string(family_of(kind).block), kind};
    }

private:
    [[nodiscard]] std::string expert(index e, std::string_view projection) const {
        return prefix + "experts." + std::to_string(e) + "." + std::string(projection) + ".weight";
    }
    [[nodiscard]] std::string shared() const { return prefix + std::string(family_of(kind).shared); }
};

/// A checkpoint folder: its config and its tensors, wherever they are stored.
class checkpoint {
public:
    /// Opens `dir`: reads config.json and the shard index (if any). Throws `io_error` / `config_error`
    /// naming the file and the problem.
    explicit checkpoint(const std::filesystem::path& dir) : dir_(dir), config_(read_model_config(dir)) {
        const auto index_file = dir / "model.safetensors.index.json";
        const auto single = dir / "model.safetensors";
        if (std::filesystem::exists(index_file)) {
            read_index(index_file);
        } else if (std::filesystem::exists(single)) {
            single_ = "model.safetensors";
        } else {
            throw io_error(dir.string() + ": neither model.safetensors nor model.safetensors.index.json found");
        }
    }

    [[nodiscard]] const model_config& config() const { return config_; }
    [[nodiscard]] const std::filesystem::path& directory() const { return dir_; }

    /// Whether the checkpoint holds tensor `name`.
    [[nodiscard]] bool contains(const std::string& name) const {
        return single_.empty() ? weight_map_.count(name) > 0 : file(single_).contains(name);
    }

    /// The header entry of tensor `name` (no data is read). Throws `io_error` when it is missing.
    [[nodiscard]] const tensor_info& info(const std::string& name) const {
        const safetensors_file& f = file(shard_of(name));
        if (!f.contains(name)) throw io_error(f.path().string() + ": no tensor '" + name + "'");
        return f.info(name);
    }

    /// Reads tensor `name` of shape `shape` into `out` (converted to T). Throws `io_error` when the
    /// tensor is missing or not floating-point, `shape_error` when its shape differs.
    template <class T>
    void read(const std::string& name, std::span<T> out, std::span<const std::int64_t> shape) const {
        const safetensors_file& f = file(shard_of(name));
        if (!f.contains(name)) throw io_error(f.path().string() + ": no tensor '" + name + "'");
        f.read(name, out, shape);
    }

private:
    static model_config read_model_config(const std::filesystem::path& dir) {
        if (!std::filesystem::is_directory(dir)) throw io_error(dir.string() + ": not a model folder (no such directory)");
        return read_config(dir / "config.json");
    }

    void read_index(const std::filesystem::path& index_file) {
        const nlohmann::json j = detail::read_json_file<io_error>(index_file);
        if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
            throw io_error(index_file.string() + ": no 'weight_map' object");
        for (const auto& [name, shard] : j["weight_map"].items()) {
            if (!shard.is_string())
                throw io_error(index_file.string() + ": weight_map entry '" + name + "' is not a file name");
            const auto file_name = shard.get<std::string>();
            // Shards must be plain names inside the folder.
            if (file_name.empty() || file_name.find('/') != std::string::npos || file_name == "." || file_name == "..")
                throw io_error(index_file.string() + ": weight_map entry '" + name + "' names an invalid shard '" +
                               file_name + "'");
            weight_map_[name] = file_name;
        }
    }

    [[nodiscard]] const std::string& shard_of(const std::string& name) const {
        if (!single_.empty()) return single_;
        const auto it = weight_map_.find(name);
        if (it == weight_map_.end())
            throw io_error((dir_ / "model.safetensors.index.json").string() + ": no tensor '" + name + "'");
        return it->second;
    }

    [[nodiscard]] const safetensors_file& file(const std::string& shard) const {
        auto it = open_.find(shard);
        if (it == open_.end()) it = open_.emplace(shard, std::make_unique<safetensors_file>(dir_ / shard)).first;
        return *it->second;
    }

    std::filesystem::path dir_;
    model_config config_;
    std::string single_;
    std::map<std::string, std::string> weight_map_;
    mutable std::map<std::string, std::unique_ptr<safetensors_file>> open_;
};

/// The layer shape of a config's MoE layers.
inline layer_shape shape_of(const model_config& c) {
    return {.d_model = c.hidden_size, .d_ff = c.expert_size, .n_experts = c.n_experts, .d_shared = c.shared_size};
}

/// Checks, from the headers alone, that MoE layer `layer_index` of `ckpt` exists and that every tensor
/// `load_layer` reads for a layer with `router` is present, floating-point and of the shape the config
/// implies (the router weight with `logit_rows(router, E)` rows; the correction bias when the router
/// reads one, whatever the family), so that a bad checkpoint fails before a layer is allocated. Throws
/// `config_error` for a missing or dense layer, or a router that reads a correction bias the checkpoint
/// does not have; `io_error` / `shape_error` naming the tensor.
template <class Router>
    requires moe::router<Router, float>
void check_layer(const checkpoint& ckpt, index layer_index, const Router& router) {
    const model_config& c = ckpt.config();
    if (layer_index < 0 || layer_index >= c.n_layers)
        throw config_error(ckpt.directory().string() + ": layer " + std::to_string(layer_index) +
                           " is out of range (num_hidden_layers = " + std::to_string(c.n_layers) + ")");
    if (!c.is_moe_layer(layer_index))
        throw config_error(ckpt.directory().string() + ": layer " + std::to_string(layer_index) +
                           " is a dense MLP layer, not an MoE layer");
    const auto names = layer_tensor_names::of(c.kind, layer_index);
    const index d = c.hidden_size;
    const auto expect = [&](const std::string& name, std::vector<std::int64_t> shape) {
        const tensor_info& info = ckpt.info(name);
        if (!detail::is_floating(info.type))
            throw io_error(ckpt.directory().string() + ": tensor '" + name + "' has dtype " +
                           std::string(dtype_name(info.type)) + "; weights must be F32, BF16, F16 or F64");
        if (info.shape != shape)
            throw shape_error(ckpt.directory().string() + ": tensor '" + name + "' has shape " +
                              detail::format_shape(info.shape) + ", expected " + detail::format_shape(shape));
    };
    expect(names.router(), {logit_rows(router, c.n_experts), d});
    for (index e = 0; e < c.n_experts; ++e) {
        expect(names.expert_gate(e), {c.expert_size, d});
        expect(names.expert_up(e), {c.expert_size, d});
        expect(names.expert_down(e), {d, c.expert_size});
    }
    if (c.shared_size > 0) {
        expect(names.shared_gate_proj(), {c.shared_size, d});
        expect(names.shared_up_proj(), {c.shared_size, d});
        expect(names.shared_down_proj(), {d, c.shared_size});
    }
    if (c.shared_gated()) expect(names.shared_expert_gate(), {1, d});
    if (reads_correction_bias(router)) {
        if (!ckpt.contains(names.correction_bias()))
            throw config_error(ckpt.directory().string() + ": the router reads a correction bias (DeepSeek-V3's sigmoid "
                               "routing), and this " + c.model_type + " checkpoint has no tensor '" +
                               names.correction_bias() + "'");
        expect(names.correction_bias(), {c.n_experts});
    }
}

/// Loads MoE layer `layer_index` of `ckpt` into `layer`, whose shape must be `shape_of(ckpt.config())`.
/// Only that layer's tensors are read, and of an expert-parallel layer only the experts its rank holds.
/// Throws `config_error` when the layer is out of range or dense, `io_error` / `shape_error` naming
/// the tensor when one is missing or has another shape.
template <class Layer>
void load_layer(const checkpoint& ckpt, index layer_index, Layer& layer) {
    using Scalar = typename Layer::scalar_type;
    const model_config& c = ckpt.config();
    check_layer(ckpt, layer_index, layer.router());
    const layer_shape expected = shape_of(c), actual = layer.shape();
    if (actual.d_model != expected.d_model || actual.d_ff != expected.d_ff || actual.n_experts != expected.n_experts ||
        actual.d_shared != expected.d_shared)
        throw shape_error("load_layer: the layer's shape does not match " + ckpt.directory().string() + "/config.json");
    const auto names = layer_tensor_names::of(c.kind, layer_index);
    const index d = c.hidden_size;
    const auto read = [&]<class T>(const std::string& name, T* out, index rows, index cols) {
        const std::int64_t shape[2] = {rows, cols};
        ckpt.read(name, std::span<T>(out, static_cast<std::size_t>(rows * cols)), std::span<const std::int64_t>(shape));
    };
    using storage = typename Layer::storage_type;
    std::vector<float> values;  // storages of blocks: a tensor as float, then assigned
    // Rows [row, row + rows) of weight matrix w from tensor `name` (rows x w.cols()).
    const auto read_weight = [&](typename storage::matrix& w, index row, const std::string& name, index rows) {
        const index cols = w.cols();
        if constexpr (moe::detail::holds_numbers<storage>) {
            read(name, w.data() + row * cols, rows, cols);
        } else {
            values.resize(static_cast<std::size_t>(rows * cols));
            read(name, values.data(), rows, cols);
            try {
                storage::assign(w, row, values.data(), rows);
            } catch (const value_error& e) {
                throw value_error(ckpt.directory().string() + ": tensor '" + name + "' cannot be held as " +
                                  std::string(storage::name) + ": " + e.what());
            }
        }
    };
    const auto read_ffn = [&](typename Layer::weights_type& w, const std::string& gate, const std::string& up,
                              const std::string& down) {
        const index ff = w.out.cols();
        read_weight(w.in, 0, gate, ff);  // gate rows first, then up rows: one fused input projection
        read_weight(w.in, ff, up, ff);
        read_weight(w.out, 0, down, d);
    };
    read(names.router(), layer.router_weight().data(), layer.router_weight().rows(), d);
    for (index e = 0; e < c.n_experts; ++e)  // an expert-parallel rank reads only the experts it holds
        if (layer.owns_expert(e))
            read_ffn(layer.expert_weights(e), names.expert_gate(e), names.expert_up(e), names.expert_down(e));
    if constexpr (Layer::shared_type::enabled)
        read_ffn(layer.shared_weights(), names.shared_gate_proj(), names.shared_up_proj(), names.shared_down_proj());
    if constexpr (Layer::shared_type::gated) read(names.shared_expert_gate(), layer.shared_gate().data(), 1, d);
    if (vector<Scalar>* bias = correction_bias<Scalar>(layer.router_state())) {
        const std::int64_t shape[1] = {c.n_experts};
        ckpt.read(names.correction_bias(), std::span<Scalar>(bias->data(), static_cast<std::size_t>(bias->size())),
                  std::span<const std::int64_t>(shape));
    }
}

/// The trainable tensors of `layer` (see `layer::parameters`) under their checkpoint names for MoE layer
/// `layer_index` of family `kind`: a fused gate-and-up weight appears as its two checkpoint tensors
/// (views of its row halves), so an optimiser, a gradient dump or a writer sees HuggingFace's layout.
template <class Layer>
std::vector<parameter<typename Layer::scalar_type>> checkpoint_parameters(Layer& layer, family kind, index layer_index) {
    static_assert(Layer::trainable, "checkpoint_parameters lists trainable weights with their gradients: not of a bf16 or quantized layer");
    using Scalar = typename Layer::scalar_type;
    static_assert(Layer::expert_type::gated, "checkpoint families store gated (SwiGLU) experts");
    if constexpr (Layer::shared_type::enabled)
        static_assert(std::remove_cvref_t<decltype(layer.shared().expert)>::gated,
                      "checkpoint families store gated (SwiGLU) shared experts");
    const auto names = layer_tensor_names::of(kind, layer_index);
    const auto params = layer.parameters();
    std::vector<parameter<Scalar>> out;
    const auto rows = [](Eigen::Map<matrix<Scalar>> m, index first, index n) {
        return m.size() == 0 ? Eigen::Map<matrix<Scalar>>(nullptr, 0, 0)
                             : Eigen::Map<matrix<Scalar>>(m.data() + first * m.cols(), n, m.cols());
    };
    // Gate rows first, then up rows (see `ffn_weights`).
    const auto split = [&](const parameter<Scalar>& p, const std::string& gate, const std::string& up) {
        const index ff = p.value.rows() / 2;
        out.push_back({gate, rows(p.value, 0, ff), rows(p.grad, 0, ff)});
        out.push_back({up, rows(p.value, ff, ff), rows(p.grad, ff, ff)});
    };
    std::size_t i = 0;
    out.push_back({names.router(), params[i].value, params[i].grad});
    ++i;
    for (index e = 0; e < layer.shape().n_experts; ++e) {
        if (!layer.owns_expert(e)) continue;  // held by another rank (see `layer::parameters`)
        split(params[i], names.expert_gate(e), names.expert_up(e));
        out.push_back({names.expert_down(e), params[i + 1].value, params[i + 1].grad});
        i += 2;
    }
    if constexpr (Layer::shared_type::enabled) {
        split(params[i], names.shared_gate_proj(), names.shared_up_proj());
        out.push_back({names.shared_down_proj(), params[i + 1].value, params[i + 1].grad});
        i += 2;
    }
    if constexpr (Layer::shared_type::gated) out.push_back({names.shared_expert_gate(), params[i].value, params[i].grad});
    return out;
}

/// Writes the weights of `layer` (and its correction bias, if any) as float32 to the safetensors file
/// `file`, under the tensor names of MoE layer `layer_index` of family `kind`: with the family's
/// config.json beside it as `model.safetensors`, the folder is a checkpoint that `load_layer` and
/// moe-run read, so training can save and resume. The file appears only once complete (written to
/// a temporary file, then renamed). Throws `io_error` naming the file when it cannot be written. An
/// expert-parallel rank writes only the tensors it holds (the router, the shared experts, its
/// experts): give each rank its own file.
template <class Layer>
void save_layer(const std::filesystem::path& file, Layer& layer, family kind, index layer_index) {
    using Scalar = typename Layer::scalar_type;
    const auto params = checkpoint_parameters(layer, kind, layer_index);
    std::vector<std::vector<float>> values;  // float32 copies (the layer may be double)
    std::vector<tensor_to_write> tensors;
    const auto add = [&](const std::string& name, std::vector<std::int64_t> shape, const Scalar* data, index n) {
        values.emplace_back(data, data + n);
        tensors.push_back({.name = name, .shape = std::move(shape), .type = dtype::f32});
    };
    values.reserve(params.size() + 1);
    for (const auto& p : params) add(p.name, {p.value.rows(), p.value.cols()}, p.value.data(), p.value.size());
    if (const vector<Scalar>* bias = correction_bias<Scalar>(layer.router_state()))
        add(layer_tensor_names::of(kind, layer_index).correction_bias(), {bias->size()}, bias->data(), bias->size());
    for (std::size_t i = 0; i < tensors.size(); ++i) tensors[i].values = values[i];
    write_safetensors(file, tensors);
}

}  // namespace moe::io
