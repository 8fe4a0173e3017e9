#pragma once
/// \file
/// MoE layers from GGUF files (`gguf_file`): the hyper-parameters of a model's MoE layers from
/// llama.cpp's metadata keys, and `load_layer` from llama.cpp's tensor names.
///
/// Architectures (`general.architecture`) and what llama.cpp computes for them (src/llama-model.cpp,
/// each architecture's graph): `llama` with `llama.expert_count` > 0 (Mixtral: softmax top-k,
/// normalised), `qwen2moe` (softmax top-k, not normalised; a shared expert gated by sigmoid),
/// `qwen3moe` (softmax top-k, normalised), `olmoe` (softmax top-k, not normalised), `deepseek2` with
/// `deepseek2.expert_gating_func` = 2 (DeepSeek-V3: sigmoid scores with the correction bias, groups,
/// `expert_weights_norm`, `expert_weights_scale`; shared experts). Every size in [1, 2^24] (as a
/// checkpoint's config), else config_error naming the key. Keys (src/llama-arch.cpp, `%s` the
/// architecture): `%s.block_count`, `%s.embedding_length`, `%s.expert_count`, `%s.expert_used_count`,
/// `%s.expert_feed_forward_length` (else `%s.feed_forward_length`: Mixtral, OLMoE),
/// `%s.expert_shared_feed_forward_length` (Qwen2-MoE), `%s.expert_shared_count`,
/// `%s.leading_dense_block_count`, `%s.expert_weights_norm`, `%s.expert_weights_scale`,
/// `%s.expert_gating_func`, `%s.expert_group_count`, `%s.expert_group_used_count`. Tensors of layer L:
/// `blk.L.ffn_gate_inp.weight` (router, [E, d]), `blk.L.ffn_{gate,up,down}_exps.weight` (all experts
/// in one tensor, [E, ff, d] and [E, d, ff]), `blk.L.ffn_{gate,up,down}_shexp.weight` (shared FFN),
/// `blk.L.ffn_gate_inp_shexp.weight` (Qwen2-MoE's shared gate, [d]), `blk.L.exp_probs_b.bias`
/// (DeepSeek-V3's correction bias, [E]); a layer without `ffn_gate_inp` is dense.

#include "moe/error.hpp"
#include "moe/experts/storage.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/io/config.hpp"
#include "moe/io/gguf.hpp"

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace moe::io {

/// The hyper-parameters of a GGUF model's MoE layers (see the top of this header); config_error naming
/// the key or the architecture when the file does not describe a supported MoE model.
inline model_config gguf_config(const gguf_file& file) {
    const std::string where = file.path().string() + ": ";
    const std::string arch = file.contains_key("general.architecture") ? file.string("general.architecture") : "";
    const family_info* f = find_family(&family_info::gguf_architecture, arch);
    if (f == nullptr)
        throw config_error(where + "architecture '" + arch + "' is not one of the MoE architectures this library reads (" +
                           family_list(&family_info::gguf_architecture) + ")");
    model_config c;
    c.kind = f->kind;
    c.model_type = arch;
    const auto key = [&](const char* name) { return arch + "." + name; };
    constexpr index largest = detail::config_reader::largest;  // the checkpoint's bound on every size
    // An integer key in [min, largest]; `fallback` when absent and not required.
    const auto integer = [&](const char* name, index min, std::optional<index> fallback = std::nullopt) -> index {
        if (!file.contains_key(key(name))) {
            if (!fallback) throw config_error(where + "no metadata key '" + key(name) + "'");
            return *fallback;
        }
        const std::int64_t v = file.integer(key(name));
        if (v < min || v > largest)
            throw config_error(where + "'" + key(name) + "' is " + std::to_string(v) + ", outside [" + std::to_string(min) +
                               ", " + std::to_string(largest) + "]");
        return static_cast<index>(v);
    };
    if (integer("expert_count", 0, 0) == 0)
        throw config_error(where + "'" + key("expert_count") + "' is missing or 0: not an MoE model");
    c.n_experts = integer("expert_count", 1);
    c.hidden_size = integer("embedding_length", 1);
    c.n_layers = integer("block_count", 1);
    c.top_k = integer("expert_used_count", 1);
    c.expert_size = file.contains_key(key("expert_feed_forward_length")) ? integer("expert_feed_forward_length", 1)
                                                                         : integer("feed_forward_length", 1);
    // What llama.cpp computes for each (src/llama-model.cpp), as the family's entry says.
    if (c.sigmoid_scoring() && integer("expert_gating_func", 0, 1) != 2)
        throw config_error(where + "'" + key("expert_gating_func") +
                           "' is not 2 (sigmoid, DeepSeek-V3): DeepSeek-V2's softmax gating is not supported");
    c.normalize = f->gguf_normalize.value;
    if (f->gguf_normalize.from_key && file.contains_key(key("expert_weights_norm")))
        c.normalize = file.boolean(key("expert_weights_norm"));
    switch (f->shared_kind) {
        case shared_ffn::none: break;
        case shared_ffn::gated:
            c.shared_size = integer("expert_shared_feed_forward_length", 1);
            break;
        case shared_ffn::experts: {
            const index shared = integer("expert_shared_count", 0);
            if (shared > largest / c.expert_size)
                throw config_error(where + "'" + key("expert_shared_count") + "' x '" + key("expert_feed_forward_length") +
                                   "' exceeds " + std::to_string(largest));
            c.shared_size = shared * c.expert_size;
            break;
        }
    }
    if (f->layers == moe_layers::after_dense) c.first_k_dense_replace = integer("leading_dense_block_count", 0);
    if (c.sigmoid_scoring()) {  // DeepSeek-V3's keys
        c.scale = file.number(key("expert_weights_scale"));
        if (!std::isfinite(c.scale) || c.scale <= 0)
            throw config_error(where + "'" + key("expert_weights_scale") + "' is " + std::to_string(c.scale) +
                               "; a finite value > 0 is needed");
        c.n_group = integer("expert_group_count", 1, 1);
        c.topk_group = integer("expert_group_used_count", 1, 1);
    }
    return c;
}

namespace detail {

/// llama.cpp's tensor names of layer L.
struct gguf_layer_names {
    std::string prefix;  // "blk.L."
    [[nodiscard]] std::string operator()(const char* name) const { return prefix + name; }
};

// check_layer with the file's configuration `c` already read.
template <class Router>
    requires moe::router<Router, float>
void check_layer(const gguf_file& file, const model_config& c, index layer_index, const Router& router) {
    const std::string where = file.path().string() + ": ";
    const gguf_layer_names name{"blk." + std::to_string(layer_index) + "."};
    if (layer_index < 0 || layer_index >= c.n_layers)
        throw config_error(where + "layer " + std::to_string(layer_index) + " is out of range (block_count = " +
                           std::to_string(c.n_layers) + ")");
    if (!file.contains(name("ffn_gate_inp.weight")))
        throw config_error(where + "layer " + std::to_string(layer_index) + " is a dense layer, not an MoE layer (no '" +
                           name("ffn_gate_inp.weight") + "')");
    // Each tensor present with the dimensions llama.cpp gives it (fastest first).
    const auto expect = [&](const std::string& tensor, std::vector<std::uint64_t> dims) {
        const gguf_tensor& t = file.tensor(tensor);
        if (!ggml_type_readable(t.type))
            throw io_error(where + "tensor '" + tensor + "' has type " + std::string(ggml_type_name(t.type)) +
                           "; this library reads " + std::string(ggml_readable_types) + " tensors");
        if (t.dims != dims)
            throw shape_error(where + "tensor '" + tensor + "' has dimensions " + format_shape(t.dims) + ", expected " +
                              format_shape(dims));
    };
    const auto u = [](index v) { return static_cast<std::uint64_t>(v); };
    const index d = c.hidden_size, ff = c.expert_size, e_count = c.n_experts;
    expect(name("ffn_gate_inp.weight"), {u(d), u(logit_rows(router, e_count))});
    expect(name("ffn_gate_exps.weight"), {u(d), u(ff), u(e_count)});
    expect(name("ffn_up_exps.weight"), {u(d), u(ff), u(e_count)});
    expect(name("ffn_down_exps.weight"), {u(ff), u(d), u(e_count)});
    if (c.shared_size > 0) {
        expect(name("ffn_gate_shexp.weight"), {u(d), u(c.shared_size)});
        expect(name("ffn_up_shexp.weight"), {u(d), u(c.shared_size)});
        expect(name("ffn_down_shexp.weight"), {u(c.shared_size), u(d)});
    }
    if (c.shared_gated()) expect(name("ffn_gate_inp_shexp.weight"), {u(d)});
    if (reads_correction_bias(router)) {
        if (!file.contains(name("exp_probs_b.bias")))
            throw config_error(where + "the router reads a correction bias (DeepSeek-V3's sigmoid routing), and this " +
                               c.model_type + " file has no tensor '" + name("exp_probs_b.bias") + "'");
        expect(name("exp_probs_b.bias"), {u(e_count)});
    }
}

}  // namespace detail

/// Checks, from the tensor infos alone, that MoE layer `layer_index` of `file` exists and that every
/// tensor `load_layer` reads for a layer with `router` is there, of a type it reads, with the dimensions
/// the metadata implies (the router weight with `logit_rows(router, E)` rows; the correction bias when
/// the router reads one), so that a bad file fails before a layer is allocated. config_error for a
/// layer out of range or dense, or a router that reads a correction bias the file does not have;
/// io_error / shape_error naming the tensor.
template <class Router>
    requires moe::router<Router, float>
void check_layer(const gguf_file& file, index layer_index, const Router& router) {
    detail::check_layer(file, gguf_config(file), layer_index, router);
}

/// Loads MoE layer `layer_index` of GGUF `file` into `layer`, whose shape must be
/// `shape_of(gguf_config(file))` (`check_layer` first); only the experts an expert-parallel rank holds
/// are read. Q8_0 and Q4_0 tensors go into a layer of the same storage as they are (ggml's blocks, not
/// quantized again); other combinations go through float (a quantized storage quantizes them; a float
/// or bf16 one takes the values). config_error for a layer out of range or dense, io_error /
/// shape_error naming the tensor.
template <class Layer>
void load_layer(const gguf_file& file, index layer_index, Layer& layer) {
    using Scalar = typename Layer::scalar_type;
    using storage = typename Layer::storage_type;
    const model_config c = gguf_config(file);
    const std::string where = file.path().string() + ": ";
    const detail::gguf_layer_names name{"blk." + std::to_string(layer_index) + "."};
    const index router_rows = layer.router_weight().rows();
    detail::check_layer(file, c, layer_index, layer.router());
    const layer_shape expected = shape_of(c), actual = layer.shape();
    if (actual.d_model != expected.d_model || actual.d_ff != expected.d_ff || actual.n_experts != expected.n_experts ||
        actual.d_shared != expected.d_shared)
        throw shape_error("load_layer: the layer's shape does not match " + file.path().string());
    const index d = c.hidden_size, ff = c.expert_size, e_count = c.n_experts;
    const auto u = [](index v) { return static_cast<std::uint64_t>(v); };
    std::vector<float> values;
    // Rows [first, first + rows) of a tensor as float, into `out` (converted to its type).
    const auto read_values = [&]<class T>(const std::string& tensor, index first, index rows, T* out) {
        const index cols = static_cast<index>(file.tensor(tensor).cols());
        values.resize(static_cast<std::size_t>(rows * cols));
        file.read_rows(tensor, u(first), u(rows), values);
        for (std::size_t i = 0; i < values.size(); ++i) {
            if constexpr (std::is_same_v<T, bf16>)
                out[i] = to_bf16(values[i]);
            else
                out[i] = static_cast<T>(values[i]);
        }
    };
    // Rows [row, row + rows) of weight matrix w from rows [first, first + rows) of a tensor.
    const auto read_weight = [&](typename storage::matrix& w, index row, const std::string& tensor, index first, index rows) {
        if constexpr (moe::detail::holds_numbers<storage>) {
            read_values(tensor, first, rows, w.data() + row * w.cols());
        } else {
            using matrix_type = typename storage::matrix;
            if constexpr (requires { typename matrix_type::block_type; }) {
                using Block = typename matrix_type::block_type;
                if (file.holds<Block>(tensor)) {
                    std::vector<Block> blocks(static_cast<std::size_t>(rows * w.blocks_per_row()));
                    file.read_blocks<Block>(tensor, u(first), u(rows), blocks);
                    w.assign(row, blocks.data(), rows);
                    return;
                }
            }
            values.resize(static_cast<std::size_t>(rows * w.cols()));
            file.read_rows(tensor, u(first), u(rows), values);
            try {
                storage::assign(w, row, values.data(), rows);
            } catch (const value_error& e) {
                throw value_error(where + "tensor '" + tensor + "' cannot be held as " + std::string(storage::name) + ": " + e.what());
            }
        }
    };
    read_values(name("ffn_gate_inp.weight"), 0, router_rows, layer.router_weight().data());
    for (index e = 0; e < e_count; ++e) {
        if (!layer.owns_expert(e)) continue;
        auto& w = layer.expert_weights(e);
        read_weight(w.in, 0, name("ffn_gate_exps.weight"), e * ff, ff);  // gate rows, then up rows: one fused projection
        read_weight(w.in, ff, name("ffn_up_exps.weight"), e * ff, ff);
        read_weight(w.out, 0, name("ffn_down_exps.weight"), e * d, d);
    }
    if constexpr (Layer::shared_type::enabled) {
        auto& w = layer.shared_weights();
        read_weight(w.in, 0, name("ffn_gate_shexp.weight"), 0, c.shared_size);
        read_weight(w.in, c.shared_size, name("ffn_up_shexp.weight"), 0, c.shared_size);
        read_weight(w.out, 0, name("ffn_down_shexp.weight"), 0, d);
    }
    if constexpr (Layer::shared_type::gated) read_values(name("ffn_gate_inp_shexp.weight"), 0, 1, layer.shared_gate().data());
    if (vector<Scalar>* bias = correction_bias<Scalar>(layer.router_state())) read_values(name("exp_probs_b.bias"), 0, 1, bias->data());
}

}  // namespace moe::io
