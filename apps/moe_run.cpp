// moe-run: runs one MoE layer of a HuggingFace checkpoint or GGUF model on the hidden states of a
// safetensors file and writes the layer's output and router logits. See README.md ("moe-run"). This
// unit parses the command line, reads the inputs and writes the outputs (under MPI, scattered and
// gathered); the layers are built in moe_run_<weights>.cpp.
#include "moe_run.hpp"

#include <moe/experts/ffn.hpp>
#include <moe/layer.hpp>  // max_threads
#include <moe/routers/any_router.hpp>
#ifdef MOE_RUN_MPI
#include <moe/parallel/mpi.hpp>
#endif

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <span>
#include <string>
#include <vector>

namespace {

using moe_run::arguments;
using moe_run::job;

constexpr const char* usage =
    "usage: moe-run --model DIR|FILE.gguf --layer L --input IN.safetensors --output OUT.safetensors\n"
    "               [--threads N] [--repeat N] [--weights f32|bf16|q8_0|q4_0] [--stats] [router overrides]\n"
    "               [--backward ...]\n"
    "\n"
    "Runs MoE layer L of the HuggingFace checkpoint in DIR (config.json plus model.safetensors or\n"
    "model.safetensors.index.json and shards), or of a GGUF model file (llama.cpp's llama/Mixtral,\n"
    "qwen2moe, qwen3moe, olmoe, deepseek2), on IN's `hidden_states` ([T, d] or [B, S, d]) and writes\n"
    "`hidden_states` (same shape) and `router_logits` ([T, E]) to OUT.\n"
    "  --threads N  worker threads (default 1); the output does not depend on it\n"
    "  --repeat N   run the forward N more times and print forward_ms_median=<ms>\n"
    "  --weights T  how the expert weights are held: f32 (the default for a checkpoint); bf16 (BF16\n"
    "               tensors as stored, others rounded; each projection's input rounded to bf16, sums in\n"
    "               float32); q8_0 or q4_0 (ggml's block formats, quantized at load, a GGUF file's Q8_0 /\n"
    "               Q4_0 blocks taken as they are; each projection's input quantized to q8_0, integer\n"
    "               sums per block). A GGUF file's default is its experts' own type (Q8_0, Q4_0, BF16,\n"
    "               where gate, up and down share it; else f32). bf16, q8_0 and q4_0 are for inference. With\n"
    "               --repeat the kernel family (kernels=<name>) and the expert weights' size\n"
    "               (expert_weights_mb=<MB>) are printed\n"
    "  --stats      print the routing statistics as JSON\n"
    "Router overrides (k, normalisation and scaling follow the checkpoint's config):\n"
    "  --router softmax_topk|expert_choice|sinkhorn|null_experts|top_p\n"
    "  --capacity-factor F     expert choice's bucket factor (default 1); with a top-k router it\n"
    "                          enables expert capacity and token dropping\n"
    "  --drop-policy position|probs   which assignments a full expert keeps (default position)\n"
    "  --sinkhorn-iters N (default 8)  --sinkhorn-tolerance X (default 0: run all iterations)\n"
    "  --sinkhorn-gates softmax|plan (default softmax)\n"
    "  --null-experts N        the router weight must have E+N rows\n"
    "  --top-p P (default 0.9)  --max-k K (default the config's num_experts_per_tok)\n"
    "Backward:\n"
    "  --backward   IN also holds `grad_output` (the shape of `hidden_states`); OUT also receives\n"
    "               `grad_hidden_states` and `grad.<tensor>` for every trainable tensor of the layer:\n"
    "               the gradient of sum(output * grad_output) plus the enabled losses\n"
    "  --load-balance-coef A   add A * the load-balancing loss (Switch form); writes loss.load_balance\n"
    "  --z-loss-coef B         add B * the router z-loss; writes loss.z_loss\n"
    "  with --repeat, also prints backward_ms_median=<ms> (the backward alone)\n"
    "Expert parallelism (start under mpirun; needs a moe-run built with MPI):\n"
    "  --expert-parallel  the routed experts are spread over the ranks in contiguous blocks, the tokens\n"
    "               in contiguous slices; rank 0 reads IN and writes OUT, each rank reads only the\n"
    "               tensors of its own experts (and the router and shared experts). Batch-dependent\n"
    "               routers (capacity, expert choice, Sinkhorn) route the whole batch on every rank:\n"
    "               the output does not depend on the number of ranks.\n"
    "               --stats also prints the rows each rank computed, their imbalance before and after\n"
    "               re-balancing, the rows moved, and the bytes of rows and of weights each rank sent.\n"
    "  --rebalance  least-loaded re-balancing (inference): after the row counts are shared, the rows of\n"
    "               overloaded ranks' experts beyond the mean go to the least-loaded ranks with a copy of\n"
    "               the expert's weights; the output is the same bits.\n"
    "  --rebalance-cap-mb N    at most N MB of other ranks' expert weights per rank (default: no cap)\n"
    "  --rebalance-min-rows N  move no fewer than N rows with an expert's weights (default 16)\n";

/// Bad command-line arguments: exit code 2.
struct argument_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

moe::index parse_integer(const std::string& flag, const std::string& text, moe::index min,
                         moe::index max = std::numeric_limits<moe::index>::max()) {
    moe::index v = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc{} || end != text.data() + text.size())
        throw argument_error(flag + " expects an integer, got '" + text + "'");
    if (v < min) throw argument_error(flag + " = " + text + " must be >= " + std::to_string(min));
    if (v > max) throw argument_error(flag + " = " + text + " must be <= " + std::to_string(max));
    return v;
}

double parse_number(const std::string& flag, const std::string& text) {
    std::size_t used = 0;
    double v = 0;
    try {
        v = std::stod(text, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (used == 0 || used != text.size() || !std::isfinite(v))
        throw argument_error(flag + " expects a finite number, got '" + text + "'");
    return v;
}

std::string parse_choice(const std::string& flag, const std::string& text, std::initializer_list<const char*> choices) {
    std::string all;
    for (const char* c : choices) {
        if (text == c) return text;
        all += (all.empty() ? "" : ", ") + std::string(c);
    }
    throw argument_error(flag + " = '" + text + "' is not one of " + all);
}

arguments parse_arguments(int argc, char** argv) {
    arguments a;
    static const char* const with_value[] = {
        "--model", "--layer", "--input", "--output", "--threads", "--repeat", "--router", "--capacity-factor",
        "--drop-policy", "--sinkhorn-iters", "--sinkhorn-tolerance", "--sinkhorn-gates", "--null-experts",
        "--top-p", "--max-k", "--load-balance-coef", "--z-loss-coef", "--weights", "--rebalance-cap-mb", "--rebalance-min-rows"};
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::fputs(usage, stdout);
            std::exit(0);
        }
        if (flag == "--stats" || flag == "--backward" || flag == "--expert-parallel" || flag == "--rebalance") {
            (flag == "--stats" ? a.stats : flag == "--backward" ? a.backward : flag == "--rebalance" ? a.rebalance : a.expert_parallel) = true;
            continue;
        }
        if (std::find(std::begin(with_value), std::end(with_value), flag) == std::end(with_value))
            throw argument_error("unknown argument '" + flag + "'");
        if (i + 1 >= argc) throw argument_error(flag + " needs a value");
        const std::string value = argv[++i];
        if (flag == "--model") a.model = value;
        else if (flag == "--layer") a.layer = parse_integer(flag, value, 0);
        else if (flag == "--input") a.input = value;
        else if (flag == "--output") a.output = value;
        else if (flag == "--threads") a.threads = parse_integer(flag, value, 1, moe::max_threads);
        else if (flag == "--repeat") a.repeat = parse_integer(flag, value, 0);
        else if (flag == "--weights") a.weights = parse_choice(flag, value, {"f32", "bf16", "q8_0", "q4_0"});
        else if (flag == "--router")
            a.router = parse_choice(flag, value, {"softmax_topk", "expert_choice", "sinkhorn", "null_experts", "top_p"});
        else if (flag == "--capacity-factor") {
            a.capacity_factor = parse_number(flag, value);
            if (*a.capacity_factor <= 0) throw argument_error(flag + " = " + value + " must be > 0");
        } else if (flag == "--drop-policy") a.drop_policy = parse_choice(flag, value, {"position", "probs"});
        else if (flag == "--sinkhorn-iters") a.sinkhorn_iters = parse_integer(flag, value, 1);
        else if (flag == "--sinkhorn-tolerance") {
            a.sinkhorn_tolerance = parse_number(flag, value);
            if (*a.sinkhorn_tolerance < 0) throw argument_error(flag + " = " + value + " must be >= 0");
        } else if (flag == "--sinkhorn-gates") a.sinkhorn_gates = parse_choice(flag, value, {"softmax", "plan"});
        else if (flag == "--null-experts") a.null_experts = parse_integer(flag, value, 1);
        else if (flag == "--rebalance-cap-mb") a.rebalance_cap_mb = parse_integer(flag, value, 0, moe::index{1} << 40);
        else if (flag == "--rebalance-min-rows") a.rebalance_min_rows = parse_integer(flag, value, 1);
        else if (flag == "--top-p") {
            a.top_p = parse_number(flag, value);
            if (*a.top_p <= 0 || *a.top_p > 1) throw argument_error(flag + " = " + value + " must be in (0, 1]");
        } else if (flag == "--load-balance-coef" || flag == "--z-loss-coef") {
            const double v = parse_number(flag, value);
            if (v < 0) throw argument_error(flag + " = " + value + " must be >= 0");
            (flag == "--z-loss-coef" ? a.z_loss_coef : a.load_balance_coef) = v;
        } else a.max_k = parse_integer(flag, value, 1);
    }
    for (const auto& [flag, missing] : {std::pair{"--model", a.model.empty()}, std::pair{"--layer", a.layer < 0},
                                        std::pair{"--input", a.input.empty()}, std::pair{"--output", a.output.empty()}})
        if (missing) throw argument_error(std::string(flag) + " is required");
    // Options of one router given with another are mistakes, not silently ignored.
    const bool top_k = a.router.empty() || a.router == "softmax_topk";
    const auto only = [&](bool given, const char* flag, bool applies, const char* routers) {
        if (given && !applies) throw argument_error(std::string(flag) + " applies only to " + routers);
    };
    only(a.capacity_factor.has_value(), "--capacity-factor", top_k || a.router == "expert_choice",
         "top-k routers and --router expert_choice");
    only(!a.drop_policy.empty(), "--drop-policy", top_k && a.capacity_factor, "a top-k router with --capacity-factor");
    only(a.sinkhorn_iters || a.sinkhorn_tolerance || !a.sinkhorn_gates.empty(), "--sinkhorn-*", a.router == "sinkhorn",
         "--router sinkhorn");
    only(a.null_experts.has_value(), "--null-experts", a.router == "null_experts", "--router null_experts");
    only(a.top_p || a.max_k, "--top-p/--max-k", a.router == "top_p", "--router top_p");
    only(a.load_balance_coef || a.z_loss_coef, "--load-balance-coef/--z-loss-coef", a.backward, "--backward");
    only(a.rebalance, "--rebalance", a.expert_parallel && !a.backward, "--expert-parallel inference (not --backward)");
    only(a.rebalance_cap_mb.has_value(), "--rebalance-cap-mb", a.rebalance, "--rebalance");
    only(a.rebalance_min_rows.has_value(), "--rebalance-min-rows", a.rebalance, "--rebalance");
    if (a.router == "null_experts" && !a.null_experts) throw argument_error("--router null_experts needs --null-experts N");
    if (a.backward && !a.weights.empty() && a.weights != "f32")
        throw argument_error("--backward needs --weights f32 (" + a.weights + " weights are for inference)");
    if (std::error_code ignored; a.backward && std::filesystem::is_regular_file(a.model, ignored))
        throw argument_error("--backward needs a HuggingFace checkpoint folder (its gradients are written under "
                             "the checkpoint's tensor names), not a GGUF file");
#ifndef MOE_RUN_MPI
    if (a.expert_parallel) throw argument_error("--expert-parallel needs a moe-run built with MPI (CMake found no MPI)");
#endif
    return a;
}

/// The router the arguments ask for, with k, normalisation and scaling from the checkpoint's config.
moe::routers::any_router make_router(const arguments& a, const moe::io::model_config& c) {
    namespace r = moe::routers;
    const r::softmax_topk softmax{.k = c.top_k, .normalize = c.normalize, .scale = c.scale};
    const r::sigmoid_topk sigmoid{.k = c.top_k, .normalize = c.normalize, .scale = c.scale, .n_group = c.n_group,
                                  .topk_group = c.topk_group};
    const auto policy = a.drop_policy == "probs" ? r::drop_policy::probs : r::drop_policy::position;
    if (a.router.empty() || a.router == "softmax_topk") {
        const bool family = a.router.empty();
        if (!a.capacity_factor) return family && c.sigmoid_scoring ? r::any_router(sigmoid) : r::any_router(softmax);
        if (family && c.sigmoid_scoring)
            return r::capacity<r::sigmoid_topk>{.inner = sigmoid, .capacity_factor = *a.capacity_factor, .policy = policy};
        return r::capacity<r::softmax_topk>{.inner = softmax, .capacity_factor = *a.capacity_factor, .policy = policy};
    }
    if (a.router == "expert_choice") return r::expert_choice{.capacity_factor = a.capacity_factor.value_or(1.0)};
    if (a.router == "sinkhorn")
        return r::sinkhorn{.k = c.top_k, .iterations = a.sinkhorn_iters.value_or(8),
                           .tolerance = a.sinkhorn_tolerance.value_or(0.0),
                           .gates = a.sinkhorn_gates == "plan" ? r::sinkhorn_gates::plan : r::sinkhorn_gates::softmax,
                           .normalize = c.normalize};
    if (a.router == "null_experts") return r::null_experts{.k = c.top_k, .nulls = *a.null_experts, .normalize = c.normalize};
    return r::top_p{.threshold = a.top_p.value_or(0.9), .max_k = a.max_k.value_or(c.top_k), .normalize = c.normalize};
}

/// Reads tensor `name` ([T, d] or [B, S, d]) as a T x d matrix; rejects other shapes and non-finite values.
moe::matrix<float> read_hidden_states(const moe::io::safetensors_file& in, moe::index d, std::vector<std::int64_t>& shape,
                                      const std::string& name) {
    const std::string where = in.path().string() + ": tensor '" + name + "'";
    shape = in.info(name).shape;
    if (shape.size() != 2 && shape.size() != 3)
        throw moe::shape_error(where + " has rank " + std::to_string(shape.size()) + ", expected [T, d] or [B, S, d]");
    if (shape.back() != d)
        throw moe::shape_error(where + " has hidden size " + std::to_string(shape.back()) + ", the model's is " +
                               std::to_string(d));
    const moe::index t = in.info(name).numel() / d;
    moe::matrix<float> x(t, d);
    in.read(name, std::span<float>(x.data(), static_cast<std::size_t>(x.size())));
    for (moe::index i = 0; i < x.size(); ++i)
        if (!std::isfinite(x.data()[i])) {
            std::string at;
            moe::index rest = i;
            for (auto dim = shape.rbegin(); dim != shape.rend(); ++dim) {
                at = std::to_string(rest % *dim) + (at.empty() ? "" : ", ") + at;
                rest /= *dim;
            }
            throw moe::value_error(where + " has a non-finite value (" + std::to_string(x.data()[i]) + ") at [" + at + "]");
        }
    return x;
}

/// Reads tensor `name` of `in`, which must have `shape`, as a T x d matrix of finite values.
moe::matrix<float> read_like(const moe::io::safetensors_file& in, const std::string& name,
                             const std::vector<std::int64_t>& shape, moe::index d) {
    std::vector<std::int64_t> got;
    moe::matrix<float> m = read_hidden_states(in, d, got, name);
    if (got != shape) {
        const auto text = [](const std::vector<std::int64_t>& v) {
            std::string s;
            for (auto n : v) s += (s.empty() ? "" : ", ") + std::to_string(n);
            return "[" + s + "]";
        };
        throw moe::shape_error(in.path().string() + ": tensor '" + name + "' is " + text(got) + ", 'hidden_states' is " +
                               text(shape));
    }
    return m;
}

#ifdef MOE_RUN_MPI
/// MPI's int count of `v` values; value_error past it.
int to_int(moe::index v) {
    if (v > std::numeric_limits<int>::max())
        throw moe::value_error("--expert-parallel: a block of " + std::to_string(v) + " values exceeds MPI's int counts");
    return static_cast<int>(v);
}

/// Rank 0's `shape` on every rank.
void share_shape(std::vector<std::int64_t>& shape) {
    std::int64_t rank = static_cast<std::int64_t>(shape.size());
    MPI_Bcast(&rank, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
    shape.resize(static_cast<std::size_t>(rank));
    MPI_Bcast(shape.data(), static_cast<int>(rank), MPI_INT64_T, 0, MPI_COMM_WORLD);
}

/// Counts and displacements (in values) of every rank's token slice of `tokens` rows of `cols` values.
void slice_counts(const job& j, moe::index tokens, moe::index cols, std::vector<int>& counts, std::vector<int>& at) {
    counts.resize(static_cast<std::size_t>(j.ranks));
    at.resize(static_cast<std::size_t>(j.ranks));
    for (int r = 0; r < j.ranks; ++r) {
        const moe::parallel::slice s = moe::parallel::token_slice(tokens, r, j.ranks);
        counts[static_cast<std::size_t>(r)] = to_int(s.rows * cols);
        at[static_cast<std::size_t>(r)] = to_int(s.first * cols);
    }
}

/// This rank's slice of rank 0's `full` (`tokens` x `cols`).
moe::matrix<float> scatter_rows(const job& j, const moe::matrix<float>& full, moe::index tokens, moe::index cols) {
    std::vector<int> counts, at;
    slice_counts(j, tokens, cols, counts, at);
    moe::matrix<float> mine(moe::parallel::token_slice(tokens, j.rank, j.ranks).rows, cols);
    MPI_Scatterv(full.data(), counts.data(), at.data(), MPI_FLOAT, mine.data(), to_int(mine.size()), MPI_FLOAT, 0,
                 MPI_COMM_WORLD);
    return mine;
}

/// Every rank's slice end to end on rank 0 (empty elsewhere).
moe::matrix<float> gather_rows(const job& j, const moe::matrix<float>& mine, moe::index tokens) {
    std::vector<int> counts, at;
    slice_counts(j, tokens, mine.cols(), counts, at);
    moe::matrix<float> full(j.root() ? tokens : 0, mine.cols());
    MPI_Gatherv(mine.data(), to_int(mine.size()), MPI_FLOAT, full.data(), counts.data(), at.data(), MPI_FLOAT, 0,
                MPI_COMM_WORLD);
    return full;
}

/// On rank 0, `mine` (rank 0's trainable tensors) with the expert gradients of the other ranks
/// inserted, in the order of one process (`remote` holds them); the other ranks send theirs.
std::vector<moe::parameter<float>> gather_expert_grads(const job& j, const moe::parallel::expert_exchange<float>* owners,
                                                     std::vector<moe::parameter<float>> mine,
                                                     const moe::io::model_config& c, moe::index layer_index,
                                                     std::vector<moe::matrix<float>>& remote) {
    const auto names = moe::io::layer_tensor_names::of(c.kind, layer_index);
    // `mine`: the router, this rank's experts in ascending order (gate, up, down), the shared tensors.
    std::vector<moe::parameter<float>> all{mine[0]};
    std::size_t next = 1;
    remote.reserve(static_cast<std::size_t>(3 * c.n_experts));  // the views below stay valid
    for (moe::index e = 0; e < c.n_experts; ++e) {
        const std::array<std::string, 3> part_names{names.expert_gate(e), names.expert_up(e), names.expert_down(e)};
        for (int part = 0; part < 3; ++part) {
            const int tag = part;  // messages between two ranks arrive in order: experts ascending
            if (owners->owns(e)) {
                const auto& p = mine[next++];
                if (j.root())
                    all.push_back(p);
                else
                    MPI_Send(p.grad.data(), to_int(p.grad.size()), MPI_FLOAT, 0, tag, MPI_COMM_WORLD);
            } else if (j.root()) {
                moe::matrix<float>& g = remote.emplace_back(part < 2 ? c.expert_size : c.hidden_size,
                                                            part < 2 ? c.hidden_size : c.expert_size);
                MPI_Recv(g.data(), to_int(g.size()), MPI_FLOAT, owners->owner(e), tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                all.push_back({part_names[static_cast<std::size_t>(part)], {g.data(), g.rows(), g.cols()},
                               {g.data(), g.rows(), g.cols()}});
            }
        }
    }
    if (!j.root()) return mine;
    while (next < mine.size()) all.push_back(mine[next++]);  // shared experts and their gate
    return all;
}
#endif

void run(const arguments& a, const job& j) {
    const moe_run::model_source model(a.model);
    const moe::io::model_config& c = model.config();
    const moe::routers::any_router router = make_router(a, c);
    router.validate(c.n_experts);
    model.check_layer(a.layer, router.logit_rows(c.n_experts));  // before allocating the layer
    const moe_run::inputs in = moe_run::read_inputs(a, j, c.hidden_size);
    namespace ex = moe::experts;
    const std::string weights = a.weights.empty() ? model.own_weights(a.layer) : a.weights;
    if (weights == "bf16")
        moe_run::run_layer<ex::bf16_weights<ex::swiglu>>(a, model, router, j, in);
    else if (weights == "q8_0")
        moe_run::run_layer<ex::q8_0_weights<ex::swiglu>>(a, model, router, j, in);
    else if (weights == "q4_0")
        moe_run::run_layer<ex::q4_0_weights<ex::swiglu>>(a, model, router, j, in);
    else
        moe_run::run_layer<ex::swiglu>(a, model, router, j, in);
}

}  // namespace

namespace moe_run {

inputs read_inputs(const arguments& a, const job& j, moe::index d) {
    inputs in;
    if (j.root()) {
        const moe::io::safetensors_file file(a.input);
        in.x = read_hidden_states(file, d, in.shape, "hidden_states");
        if (a.backward) in.grad_output = read_like(file, "grad_output", in.shape, d);
    }
    in.tokens = in.x.rows();
#ifdef MOE_RUN_MPI
    if (j.comm) {  // rank 0 keeps the whole batch for the output
        share_shape(in.shape);
        in.tokens = in.shape.size() == 2 ? in.shape[0] : in.shape[0] * in.shape[1];
        in.x = scatter_rows(j, in.x, in.tokens, d);
        if (a.backward) in.grad_output = scatter_rows(j, in.grad_output, in.tokens, d);
    }
#endif
    return in;
}

void write_outputs(const arguments& a, const job& j, const model_source& model, const inputs& in, results& r) {
    std::vector<moe::matrix<float>> remote;  // rank 0: gradients of the experts other ranks hold
#ifdef MOE_RUN_MPI
    if (j.comm) {
        r.y = gather_rows(j, r.y, in.tokens);
        r.logits = gather_rows(j, r.logits, in.tokens);
        if (a.backward) {
            r.grad_x = gather_rows(j, r.grad_x, in.tokens);
            r.params = gather_expert_grads(j, r.owners, r.params, model.config(), a.layer, remote);
        }
    }
#else
    (void)model;
#endif
    if (!j.root()) return;
    const auto tensor = [](std::string name, std::vector<std::int64_t> dims, const float* data, moe::index n) {
        return moe::io::tensor_to_write{.name = std::move(name), .shape = std::move(dims), .type = moe::io::dtype::f32,
                                        .values = std::span<const float>(data, static_cast<std::size_t>(n))};
    };
    std::vector<moe::io::tensor_to_write> out = {tensor("hidden_states", in.shape, r.y.data(), r.y.size()),
                                                 tensor("router_logits", {r.logits.rows(), r.logits.cols()},
                                                        r.logits.data(), r.logits.size())};
    if (a.backward) {
        out.push_back(tensor("grad_hidden_states", in.shape, r.grad_x.data(), r.grad_x.size()));
        for (const auto& p : r.params)
            out.push_back(tensor("grad." + p.name, {p.grad.rows(), p.grad.cols()}, p.grad.data(), p.grad.size()));
        if (a.load_balance_coef) out.push_back(tensor("loss.load_balance", {}, &r.losses[0], 1));
        if (a.z_loss_coef) out.push_back(tensor("loss.z_loss", {}, &r.losses[1], 1));
    }
    moe::io::write_safetensors(a.output, out);
}

}  // namespace moe_run

int main(int argc, char** argv) {
    arguments a;
    try {
        a = parse_arguments(argc, argv);
    } catch (const argument_error& e) {
        std::fprintf(stderr, "moe-run: error: %s (see moe-run --help)\n", e.what());
        return 2;
    }
    if (a.expert_parallel) {
#ifdef MOE_RUN_MPI
        int provided = 0;
        MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
        job j;
        try {
            if (provided < MPI_THREAD_FUNNELED)  // the worker threads run beside MPI
                throw moe::parallel::mpi_error("the MPI library does not provide MPI_THREAD_FUNNELED");
            j.comm = std::make_shared<moe::parallel::mpi_communicator>(MPI_COMM_WORLD);
            j.rank = j.comm->rank();
            j.ranks = j.comm->size();
            run(a, j);
        } catch (const std::exception& e) {
            // Other ranks may wait in a collective: end the whole job rather than hang it.
            std::fprintf(stderr, "moe-run: error (rank %d of %d): %s\n", j.rank, j.ranks, e.what());
            std::fflush(stderr);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        MPI_Finalize();
#endif
        return 0;
    }
    try {
        run(a, job{});
    } catch (const std::exception& e) {
        std::fprintf(stderr, "moe-run: error: %s\n", e.what());
        return 1;
    }
    return 0;
}
