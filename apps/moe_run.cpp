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
    "               [--threads N] [--repeat N] [--stats]\n"
    "\n"
    "Runs MoE layer L of the HuggingFace checkpoint in DIR (config.json plus model.safetensors or\n"
    "model.safetensors.index.json and shards) on IN's `hidden_states` ([T, d] or [B, S, d]) and writes\n"
    "`hidden_states` (same shape) and `router_logits` ([T, E]) to OUT.\n"
    "  --threads N  worker threads (default 1); the output does not depend on it\n"
    "  --repeat N   run the forward N more times and print forward_ms_median=<ms>\n"
    "  --stats      print the routing statistics as JSON\n";

/// Bad command-line arguments: exit code 2.
struct argument_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct arguments {
    std::string model, input, output;
    moe::index layer = -1, threads = 1, repeat = 0;
    bool stats = false;
};

moe::index parse_integer(const std::string& flag, const std::string& text, moe::index min) {
    moe::index v = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc{} || end != text.data() + text.size())
        throw argument_error(flag + " expects an integer, got '" + text + "'");
    if (v < min) throw argument_error(flag + " = " + text + " must be >= " + std::to_string(min));
    return v;
}

arguments parse_arguments(int argc, char** argv) {
    arguments a;
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
        static const char* const with_value[] = {"--model", "--layer", "--input", "--output", "--threads", "--repeat"};
        if (std::find(std::begin(with_value), std::end(with_value), flag) == std::end(with_value))
            throw argument_error("unknown argument '" + flag + "'");
        if (i + 1 >= argc) throw argument_error(flag + " needs a value");
        const std::string value = argv[++i];
        if (flag == "--model") a.model = value;
        else if (flag == "--layer") a.layer = parse_integer(flag, value, 0);
        else if (flag == "--input") a.input = value;
        else if (flag == "--output") a.output = value;
        else if (flag == "--threads") a.threads = parse_integer(flag, value, 1);
        else a.repeat = parse_integer(flag, value, 0);
    }
    for (const auto& [flag, missing] : {std::pair{"--model", a.model.empty()}, std::pair{"--layer", a.layer < 0},
                                        std::pair{"--input", a.input.empty()}, std::pair{"--output", a.output.empty()}})
        if (missing) throw argument_error(std::string(flag) + " is required");
    return a;
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
    if (c.sigmoid_scoring) {
        moe::deepseek_v3_layer<float> layer(shape, {.k = c.top_k, .normalize = c.normalize, .scale = c.scale,
                                                    .n_group = c.n_group, .topk_group = c.topk_group});
        run(a, ckpt, layer);
    } else if (c.shared_size > 0) {
        moe::qwen2_moe_layer<float> layer(shape, {.k = c.top_k, .normalize = c.normalize, .scale = c.scale});
        run(a, ckpt, layer);
    } else {
        moe::mixtral_layer<float> layer(shape, {.k = c.top_k, .normalize = c.normalize, .scale = c.scale});
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
