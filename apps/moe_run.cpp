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

#include <CLI/CLI.hpp>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using moe_run::arguments;
using moe_run::job;

constexpr const char* description =
    "Runs MoE layer L of the HuggingFace checkpoint in DIR (config.json plus model.safetensors or\n"
    "model.safetensors.index.json and shards), or of a GGUF model file (llama.cpp's llama/Mixtral,\n"
    "qwen2moe, qwen3moe, olmoe, deepseek2), on IN's `hidden_states` ([T, d] or [B, S, d]) and writes\n"
    "`hidden_states` (same shape) and `router_logits` ([T, E]) to OUT. Router overrides take k,\n"
    "normalisation and scaling from the checkpoint's config.";

constexpr const char* footer =
    "--weights: f32 (a checkpoint's default); bf16 (BF16 tensors as stored, others rounded; each\n"
    "projection's input rounded to bf16, sums in float32); q8_0 or q4_0 (ggml's block formats, quantized\n"
    "at load, a GGUF file's Q8_0 / Q4_0 blocks taken as they are; each projection's input quantized to\n"
    "q8_0, integer sums per block). A GGUF file's default is its experts' own type (Q8_0, Q4_0, BF16,\n"
    "where gate, up and down share it; else f32). bf16, q8_0 and q4_0 are for inference.\n"
    "--repeat N prints forward_ms_median=<ms>, the kernel family (kernels=<name>) and the expert\n"
    "weights' size (expert_weights_mb=<MB>); with --backward also backward_ms_median=<ms>.\n"
    "--backward: IN also holds `grad_output` (the shape of `hidden_states`); OUT also receives\n"
    "`grad_hidden_states` and `grad.<tensor>` for every trainable tensor of the layer: the gradient of\n"
    "sum(output * grad_output) plus the enabled losses (written as loss.load_balance, loss.z_loss).\n"
    "Expert parallelism (start under mpirun; needs a moe-run built with MPI): the routed experts are\n"
    "spread over the ranks in contiguous blocks, the tokens in contiguous slices; rank 0 reads IN and\n"
    "writes OUT, each rank reads only the tensors of its own experts (and the router and shared experts).\n"
    "Batch-dependent routers (capacity, expert choice, Sinkhorn) route the whole batch on every rank: the\n"
    "output does not depend on the number of ranks. --rebalance moves the rows of overloaded ranks'\n"
    "experts beyond ceil(rows / ranks), with a copy of the expert's weights, to the least-loaded ranks\n"
    "(moves of at least --rebalance-min-rows rows); the output, and with --backward the gradients, are\n"
    "the same bits. --stats also prints the rows each rank computed, their imbalance before and after\n"
    "re-balancing, the rows moved, and the bytes of rows, of weights and of weight gradients each rank sent.\n"
    "Exit status: 0 on success, 2 for bad arguments, 1 for any other error (one line on stderr).";

/// Bad command-line arguments: exit code 2.
struct argument_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

/// A value of type T in [min, max] (the lower end open with `open_min`), described as `range`: an
/// integer in decimal, whole and in range (CLI11 alone reads octal and hex and clamps), or a finite
/// number. Rewrites the text as the value, which is what CLI11 then converts.
template <class T>
CLI::Validator in_range(T min, T max, const std::string& range, bool open_min = false) {
    return {[=](std::string& text) -> std::string {
                T v{};
                bool read = false;
                if constexpr (std::is_integral_v<T>) {
                    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
                    read = ec == std::errc{} && end == text.data() + text.size();
                } else {
                    read = CLI::detail::lexical_cast(text, v) && std::isfinite(v);
                }
                if (!read)
                    return std::string(std::is_integral_v<T> ? "expects a decimal integer" : "expects a finite number") +
                           " (in " + range + "), got '" + text + "'";
                if (v < min || v > max || (open_min && v == min)) return text + " must be in " + range;
                if constexpr (std::is_integral_v<T>) text = std::to_string(v);
                return {};
            },
            range};
}

arguments parse_arguments(int argc, char** argv) {
    arguments a;
    CLI::App app(description, "moe-run");
    app.footer(footer);
    app.get_formatter()->column_width(34);
    // A later value wins; a flag takes no value (`--backward=false` would pass the dependency checks).
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)->disable_flag_override();
    const auto at_least = [](moe::index min) {
        return in_range(min, std::numeric_limits<moe::index>::max(), "[" + std::to_string(min) + ", inf)");
    };
    const double inf = std::numeric_limits<double>::infinity();
    const CLI::Validator non_negative = in_range(0.0, inf, "[0, inf)");

    app.add_option("--model", a.model, "a HuggingFace checkpoint folder or a GGUF file")->required()->type_name("DIR|FILE.gguf");
    app.add_option("--layer", a.layer, "the MoE layer to run")->required()->transform(at_least(0))->type_name("L");
    app.add_option("--input", a.input, "safetensors file with `hidden_states` (and `grad_output`)")
        ->required()->type_name("IN");
    app.add_option("--output", a.output, "safetensors file to write")->required()->type_name("OUT");
    app.add_option("--threads", a.threads, "worker threads (per rank); the output does not depend on it")
        ->transform(in_range(moe::index{1}, moe::max_threads, "[1, " + std::to_string(moe::max_threads) + "]"))
        ->capture_default_str();
    app.add_option("--repeat", a.repeat, "run the forward N more times; print its median time and more (below)")
        ->transform(at_least(0))->type_name("N");
    app.add_option("--weights", a.weights,
                   "how the expert weights are held (below)")
        ->check(CLI::IsMember({"f32", "bf16", "q8_0", "q4_0"}));
    app.add_flag("--stats", a.stats, "print the routing statistics as JSON");

    // The router options come from the registry: one per setting that has a flag (a flag several routers
    // take, such as --capacity-factor, once, with each meaning in its help).
    namespace r = moe::routers;
    const auto routers = "Router overrides";
    const std::vector<std::string> names(r::builtin_routers::names.begin(), r::builtin_routers::names.end());
    app.add_option("--router", a.router, "the router instead of the checkpoint's")->group(routers)->check(CLI::IsMember(names));
    std::vector<std::pair<r::setting, std::string>> flags;  // each flag's setting and help
    for (const std::string& name : names)
        for (const r::setting& s : r::builtin_routers::settings_of(name)) {
            if (s.flag.empty()) continue;
            auto same = std::find_if(flags.begin(), flags.end(), [&](const auto& f) { return f.first.flag == s.flag; });
            if (same == flags.end())
                flags.emplace_back(s, s.help);
            else if (same->second.find(s.help) == std::string::npos)
                same->second += "; " + std::string(s.help);
        }
    for (const auto& [s, help] : flags)
        app.add_option("--" + std::string(s.flag), a.router_settings[std::string(s.key)], help)
            ->group(routers)
            ->transform(CLI::Validator([s = s](const std::string& text) { return s.problem(text); }, s.domain()))
            ->type_name(s.type == r::setting_type::integer ? "N" : s.type == r::setting_type::number ? "X" : "TEXT");

    const auto training = "Backward";
    CLI::Option* backward = app.add_flag("--backward", a.backward,
                                         "also the gradients (below)")
                                ->group(training);
    app.add_option("--load-balance-coef", a.load_balance_coef, "add A * the load-balancing loss (Switch form)")->group(training)->transform(non_negative)->needs(backward)->type_name("A");
    app.add_option("--z-loss-coef", a.z_loss_coef, "add B * the router z-loss")
        ->group(training)->transform(non_negative)->needs(backward)->type_name("B");

    const auto parallel = "Expert parallelism (see below)";
    CLI::Option* expert_parallel = app.add_flag("--expert-parallel", a.expert_parallel, "spread the routed experts over "
                                                "the ranks of the mpirun job")->group(parallel);
    CLI::Option* rebalance = app.add_flag("--rebalance", a.rebalance,
                                          "least-loaded re-balancing (below)")
                                 ->group(parallel)->needs(expert_parallel);
    app.add_option("--rebalance-cap-mb", a.rebalance_cap_mb, "at most N MB of other ranks' weights per rank (with --backward, each counts twice; default: no cap)")
        ->group(parallel)->needs(rebalance)->transform(in_range(moe::index{0}, moe::index{1} << 40, "[0, 2^40]"))->type_name("N");
    app.add_option("--rebalance-min-rows", a.rebalance_min_rows, "move no fewer than N rows with an expert (default 16)")
        ->group(parallel)->needs(rebalance)->transform(at_least(1))->type_name("N");
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
        std::fputs(app.help().c_str(), stdout);
        std::exit(0);
    } catch (const CLI::ParseError& e) {
        throw argument_error(e.what());
    }

    // Options of one router given with another are mistakes, not silently ignored. Without --router the
    // checkpoint's own router is softmax_topk or sigmoid_topk, which take the same options.
    const std::string chosen = a.router.empty() ? "softmax_topk" : a.router;
    const std::vector<r::setting> taken = r::builtin_routers::settings_of(chosen);
    const auto given = [&](std::string_view key) { return !a.router_settings[std::string(key)].empty(); };
    const auto flag_of = [&](std::string_view key) {
        for (const auto& f : flags)
            if (f.first.key == key) return "--" + std::string(f.first.flag);
        return std::string(key);
    };
    for (const auto& f : flags) {
        if (!given(f.first.key)) continue;
        const auto s = std::find_if(taken.begin(), taken.end(), [&](const r::setting& t) { return t.key == f.first.key; });
        if (s == taken.end()) {
            std::string takers;
            for (const std::string& name : names)
                for (const r::setting& t : r::builtin_routers::settings_of(name))
                    if (t.key == f.first.key) takers += (takers.empty() ? "" : ", ") + name;
            throw argument_error(flag_of(f.first.key) + " applies only to --router " + takers);
        }
        if (!s->needs.empty() && !given(s->needs))
            throw argument_error(flag_of(s->key) + " needs " + flag_of(s->needs));
    }
    for (const r::setting& s : taken)
        if (s.required && !given(s.key)) throw argument_error("--router " + chosen + " needs " + flag_of(s.key));
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
    moe::routers::setting_values v = moe::io::router_settings(c);
    for (const auto& [key, text] : a.router_settings)
        if (!text.empty()) v.set(key, text);
    return moe::routers::make_router(a.router.empty() ? c.router_name() : a.router, v);
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
    model.check_layer(a.layer, router);  // before allocating the layer
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
