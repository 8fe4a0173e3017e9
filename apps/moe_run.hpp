#pragma once
// moe-run's parts (README.md, "moe-run"): moe_run.cpp parses the command line, opens the model, reads
// the inputs and writes the outputs; each moe_run_<weights>.cpp builds the layers whose expert weights
// are of one type (moe_run_layer.hpp), so that the program compiles as several units, side by side.
#include <moe/io/checkpoint.hpp>
#include <moe/io/gguf_model.hpp>
#include <moe/io/safetensors.hpp>
#include <moe/parallel/communicator.hpp>
#include <moe/parallel/exchange.hpp>
#include <moe/routers/any_router.hpp>

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

namespace moe_run {

/// The command line (moe_run.cpp parses and checks it).
struct arguments {
    std::string model, input, output;
    moe::index layer = -1, threads = 1, repeat = 0;
    bool stats = false, backward = false, expert_parallel = false, rebalance = false;
    std::optional<moe::index> rebalance_cap_mb;    // with --rebalance: MB (1e6 bytes) of other ranks' weights per rank
    std::optional<moe::index> rebalance_min_rows;  // with --rebalance: the fewest rows moved with an expert's weights
    std::string weights;  // empty: the model's own (f32 for a checkpoint)
    std::optional<double> load_balance_coef, z_loss_coef;
    // Router overrides: empty means the family's own router; the settings' text by key (empty: not
    // given; routers/registry.hpp).
    std::string router;
    std::map<std::string, std::string, std::less<>> router_settings;
};

/// The processes of a run: one, or the ranks of an MPI job (`--expert-parallel`), of which rank 0 reads
/// the input and writes the output.
struct job {
    int rank = 0, ranks = 1;
    std::shared_ptr<moe::parallel::communicator> comm;  // null: one process
    [[nodiscard]] bool root() const { return rank == 0; }
};

/// The model --model names: a HuggingFace checkpoint folder, or a GGUF file.
class model_source {
public:
    explicit model_source(const std::string& path) {
        if (std::error_code ignored; std::filesystem::is_regular_file(path, ignored)) {
            gguf_.emplace(path);
            config_ = moe::io::gguf_config(*gguf_);
        } else {
            ckpt_.emplace(path);
            config_ = ckpt_->config();
        }
    }
    [[nodiscard]] const moe::io::model_config& config() const { return config_; }
    template <class Router>
    void check_layer(moe::index layer, const Router& router) const {
        if (gguf_) return moe::io::check_layer(*gguf_, layer, router);
        moe::io::check_layer(*ckpt_, layer, router);
    }
    template <class Layer>
    void load_layer(moe::index layer, Layer& l) const {
        if (gguf_) return moe::io::load_layer(*gguf_, layer, l);
        moe::io::load_layer(*ckpt_, layer, l);
    }
    /// --weights when none is given: the type of a GGUF file's expert tensors of layer L (Q8_0, Q4_0,
    /// BF16) where all three share it, else f32 (a checkpoint; mixed types: none is quantized again).
    [[nodiscard]] std::string own_weights(moe::index layer) const {
        if (!gguf_) return "f32";
        std::optional<moe::io::ggml_type> type;
        for (const char* part : {"gate", "up", "down"}) {
            const std::string experts = "blk." + std::to_string(layer) + ".ffn_" + part + "_exps.weight";
            if (!gguf_->contains(experts) || (type && *type != gguf_->tensor(experts).type)) return "f32";
            type = gguf_->tensor(experts).type;
        }
        switch (*type) {
            case moe::io::ggml_type::q8_0: return "q8_0";
            case moe::io::ggml_type::q4_0: return "q4_0";
            case moe::io::ggml_type::bf16: return "bf16";
            default: return "f32";
        }
    }

private:
    std::optional<moe::io::checkpoint> ckpt_;
    std::optional<moe::io::gguf_file> gguf_;
    moe::io::model_config config_;
};

/// The layer's inputs on this rank: its slice of the tokens under MPI, all of them otherwise.
struct inputs {
    std::vector<std::int64_t> shape;    ///< `hidden_states`' shape ([T, d] or [B, S, d]), on every rank
    moe::index tokens = 0;              ///< T, of the whole batch
    moe::matrix<float> x, grad_output;  ///< this rank's rows; `grad_output` with --backward
};

/// What a run of the layer gives to write: this rank's rows, and with --backward the gradients.
struct results {
    moe::matrix<float> y, logits, grad_x;
    std::vector<moe::parameter<float>> params;  ///< every trainable tensor, its gradient a view into the layer
    std::array<float, 2> losses{};              ///< load balance, z-loss
    const moe::parallel::expert_exchange<float>* owners = nullptr;  ///< who holds each expert (MPI)
};

/// Reads IN (rank 0) and hands each rank its rows.
inputs read_inputs(const arguments& a, const job& j, moe::index d);
/// Gathers the ranks' results on rank 0 (under MPI), which writes OUT.
void write_outputs(const arguments& a, const job& j, const model_source& model, const inputs& in, results& r);

/// Runs the layer the arguments ask for, its routed experts `Expert` (SwiGLU, its weights as --weights
/// says) and its router `router`, on `in`, and writes its outputs. Defined in moe_run_layer.hpp and
/// built in one unit per `Expert`.
template <class Expert>
void run_layer(const arguments& a, const model_source& model, const moe::routers::any_router& router, const job& j,
               const inputs& in);

}  // namespace moe_run
