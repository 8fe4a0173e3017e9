// moe-run: runs one MoE layer of a HuggingFace checkpoint on the hidden states of a safetensors file
// and writes the layer's output and router logits. See README.md ("moe-run").
#include <moe/io/checkpoint.hpp>
#include <moe/io/safetensors.hpp>
#include <moe/moe.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr const char* usage =
    "usage: moe-run --model DIR --layer L --input IN.safetensors --output OUT.safetensors\n"
    "               [--threads N] [--repeat N] [--stats] [router overrides]\n"
    "\n"
    "Runs MoE layer L of the HuggingFace checkpoint in DIR (config.json plus model.safetensors or\n"
    "model.safetensors.index.json and shards) on IN's `hidden_states` ([T, d] or [B, S, d]) and writes\n"
    "`hidden_states` (same shape) and `router_logits` ([T, E]) to OUT.\n"
    "  --threads N  worker threads (default 1); the output does not depend on it\n"
    "  --repeat N   run the forward N more times and print forward_ms_median=<ms>\n"
    "  --stats      print the routing statistics as JSON\n"
    "Router overrides (k, normalisation and scaling follow the checkpoint's config):\n"
    "  --router softmax_topk|expert_choice|sinkhorn|null_experts|top_p\n"
    "  --capacity-factor F     expert choice's bucket factor (default 1); with a top-k router it\n"
    "                          enables expert capacity and token dropping\n"
    "  --drop-policy position|probs   which assignments a full expert keeps (default position)\n"
    "  --sinkhorn-iters N (default 8)  --sinkhorn-tolerance X (default 0: run all iterations)\n"
    "  --sinkhorn-gates softmax|plan (default softmax)\n"
    "  --null-experts N        the router weight must have E+N rows\n"
    "  --top-p P (default 0.9)  --max-k K (default the config's num_experts_per_tok)\n";

/// Bad command-line arguments: exit code 2.
struct argument_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct arguments {
    std::string model, input, output;
    moe::index layer = -1, threads = 1, repeat = 0;
    bool stats = false;
    // Router overrides; empty/unset means the family's own router.
    std::string router, drop_policy, sinkhorn_gates;
    std::optional<double> capacity_factor, sinkhorn_tolerance, top_p;
    std::optional<moe::index> sinkhorn_iters, null_experts, max_k;
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
        "--top-p", "--max-k"};
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::fputs(usage, stdout);
            std::exit(0);
        }
        if (flag == "--stats") {
            a.stats = true;
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
        else if (flag == "--top-p") {
            a.top_p = parse_number(flag, value);
            if (*a.top_p <= 0 || *a.top_p > 1) throw argument_error(flag + " = " + value + " must be in (0, 1]");
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
    if (a.router == "null_experts" && !a.null_experts) throw argument_error("--router null_experts needs --null-experts N");
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

/// Reads `hidden_states` ([T, d] or [B, S, d]) as a T x d matrix; rejects other shapes and non-finite values.
moe::matrix<float> read_hidden_states(const moe::io::safetensors_file& in, moe::index d, std::vector<std::int64_t>& shape) {
    const std::string name = "hidden_states";
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

template <class Layer>
void run(const arguments& a, const moe::io::checkpoint& ckpt, Layer& layer) {
    moe::io::load_layer(ckpt, a.layer, layer);
    layer.set_threads(a.threads);
    const moe::io::safetensors_file in(a.input);
    std::vector<std::int64_t> shape;
    const moe::matrix<float> x = read_hidden_states(in, layer.shape().d_model, shape);
    moe::matrix<float> y(x.rows(), x.cols());
    layer.forward(x, y);
    if (a.repeat > 0) {
        std::vector<double> ms;
        for (moe::index i = 0; i < a.repeat; ++i) {
            const auto start = std::chrono::steady_clock::now();
            layer.forward(x, y);
            ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
        }
        std::nth_element(ms.begin(), ms.begin() + static_cast<std::ptrdiff_t>(ms.size() / 2), ms.end());
        std::printf("forward_ms_median=%.4f\n", ms[ms.size() / 2]);
    }
    if (a.stats) std::printf("%s\n", layer.statistics().to_json().c_str());
    const auto& logits = layer.logits();
    const moe::io::tensor_to_write out[] = {
        {.name = "hidden_states", .shape = shape, .type = moe::io::dtype::f32,
         .values = std::span<const float>(y.data(), static_cast<std::size_t>(y.size()))},
        {.name = "router_logits", .shape = {logits.rows(), logits.cols()}, .type = moe::io::dtype::f32,
         .values = std::span<const float>(logits.data(), static_cast<std::size_t>(logits.size()))}};
    moe::io::write_safetensors(a.output, out);
}

void run(const arguments& a) {
    const moe::io::checkpoint ckpt(a.model);
    const moe::io::model_config& c = ckpt.config();
    const moe::layer_shape shape = moe::io::shape_of(c);
    const moe::routers::any_router router = make_router(a, c);
    router.validate(c.n_experts);
    moe::io::check_layer(ckpt, a.layer, router.logit_rows(c.n_experts));  // before allocating the layer
    using moe::routers::any_router;
    namespace se = moe::shared_experts;
    if (c.shared_size == 0) {
        moe::layer<float, any_router, moe::experts::swiglu> layer(shape, router);
        run(a, ckpt, layer);
    } else if (c.shared_gated) {
        moe::layer<float, any_router, moe::experts::swiglu, se::sigmoid_gated<>> layer(shape, router);
        run(a, ckpt, layer);
    } else {
        moe::layer<float, any_router, moe::experts::swiglu, se::ungated<>> layer(shape, router);
        run(a, ckpt, layer);
    }
}

}  // namespace

int main(int argc, char** argv) {
    arguments a;
    try {
        a = parse_arguments(argc, argv);
    } catch (const argument_error& e) {
        std::fprintf(stderr, "moe-run: error: %s (see moe-run --help)\n", e.what());
        return 2;
    }
    try {
        run(a);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "moe-run: error: %s\n", e.what());
        return 1;
    }
    return 0;
}
