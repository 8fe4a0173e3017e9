// moe-run as a user runs it: on every checkpoint case, at 1 and 2 threads, and on broken inputs.
#include "golden.hpp"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <utility>
#include <fstream>
#include <limits>
#include <numeric>
#include <sstream>
#include <tuple>

#include <sys/wait.h>
#include <unistd.h>

namespace {
namespace fs = std::filesystem;

const fs::path ckpt_dir = golden::data_dir / "ckpt";

struct temp_dir {
    temp_dir() : path(fs::temp_directory_path() / ("moe_run_test_" + std::to_string(::getpid()))) {
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~temp_dir() { fs::remove_all(path); }
    fs::path path;
};

struct result {
    int status;
    std::string out, err;
    long max_rss_kib = 0;  ///< peak resident memory of moe-run itself
};

std::string slurp(const fs::path& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

result moe_run(const std::string& args, const temp_dir& tmp) {
    const auto out = tmp.path / "stdout", err = tmp.path / "stderr";
    // The shell execs peak_rss, which runs moe-run and writes its peak memory (see tests/peak_rss.cpp).
    const std::string cmd = "exec " + std::string(MOE_PEAK_RSS_PATH) + " " + (tmp.path / "peak_rss").string() + " " +
                            MOE_RUN_PATH + " " + args + " >" + out.string() + " 2>" + err.string();
    const pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
        _exit(127);
    }
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    std::ifstream rss(tmp.path / "peak_rss");
    long peak = 0;
    rss >> peak;
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err), peak};
}

/// "--model M --layer L <flags>" of a case folder's args.json (the flags under `keys`, in order).
std::string case_flags(const fs::path& dir, std::initializer_list<const char*> keys) {
    std::ifstream args_file(dir / "args.json");
    const auto args = nlohmann::json::parse(args_file);
    const fs::path model = args.contains("model") ? ckpt_dir / args["model"].get<std::string>() : dir;
    std::string flags = "--model " + model.string() + " --layer " + std::to_string(args["layer"].get<int>());
    for (const char* key : keys)
        if (args.contains(key))
            for (const auto& f : args[key]) flags += " " + f.get<std::string>();
    return flags;
}

/// Every tensor of `expected` is in `got` (and nothing else), of its shape, within `tolerance` (the
/// forward's two within 2e-5 at most).
void check_file(const moe::io::safetensors_file& got, const moe::io::safetensors_file& expected, double tolerance) {
    CHECK(got.names() == expected.names());
    for (const auto& tensor : expected.names()) {
        INFO(tensor);
        REQUIRE(got.contains(tensor));
        CHECK(got.info(tensor).shape == expected.info(tensor).shape);
        const bool forward = tensor == "hidden_states" || tensor == "router_logits";
        CHECK(golden::relative_error(golden::read_matrix(got, tensor), golden::read_matrix(expected, tensor)) <=
              (forward ? std::min(tolerance, 2e-5) : tolerance));
    }
}

/// Every tensor of `a` is bitwise the same in `b`.
void check_bitwise(const moe::io::safetensors_file& a, const moe::io::safetensors_file& b) {
    for (const auto& tensor : a.names()) {
        INFO(tensor);
        const auto x = a.bytes(tensor), y = b.bytes(tensor);
        CHECK(std::equal(x.begin(), x.end(), y.begin(), y.end()));
    }
}

/// The model, layer, flags, backward flags and input of a case with backward data.
std::string backward_case_args(const fs::path& dir) {
    return case_flags(dir, {"flags", "backward_flags"}) + " --input " + (dir / "input.safetensors").string();
}

/// The checkpoint and override cases with backward data (ckpt/mixtral_null has no input of its own).
std::vector<fs::path> backward_cases() {
    std::vector<fs::path> dirs;
    for (const char* kind : {"ckpt", "overrides"})
        for (const auto& entry : fs::directory_iterator(golden::data_dir / kind))
            if (fs::exists(entry.path() / "expected_backward.safetensors")) dirs.push_back(entry.path());
    return dirs;
}

std::string case_args(const std::string& name, const fs::path& output, const std::string& input = "") {
    const fs::path dir = ckpt_dir / name;
    return "--model " + dir.string() + " --layer 1 --input " + (input.empty() ? (dir / "input.safetensors").string() : input) +
           " --output " + output.string();
}
}  // namespace

TEST_CASE("moe-run reproduces the PyTorch reference for every checkpoint case", "[moe-run]") {
    temp_dir tmp;
    for (const char* name : {"mixtral_f32", "mixtral_bf16", "mixtral_sharded", "qwen2_moe", "qwen3_moe", "olmoe",
                             "deepseek_v3", "mixtral_t0", "mixtral_k_eq_e", "mixtral_ties", "deepseek_v3_sharded_f32"}) {
        INFO("checkpoint case " << name);
        const fs::path one = tmp.path / "one.safetensors", two = tmp.path / "two.safetensors";
        const auto r1 = moe_run(case_args(name, one) + " --threads 1", tmp);
        REQUIRE(r1.status == 0);
        CHECK(r1.err.empty());
        REQUIRE(moe_run(case_args(name, two) + " --threads 2", tmp).status == 0);
        const moe::io::safetensors_file got(one), got2(two);
        const moe::io::safetensors_file expected(ckpt_dir / name / "expected.safetensors");
        const moe::io::safetensors_file input(ckpt_dir / name / "input.safetensors");
        CHECK(got.info("hidden_states").shape == input.info("hidden_states").shape);
        CHECK(got.info("router_logits").shape == expected.info("router_logits").shape);
        for (const char* tensor : {"hidden_states", "router_logits"}) {
            INFO(tensor);
            CHECK(golden::relative_error(golden::read_matrix(got, tensor), golden::read_matrix(expected, tensor)) <= 2e-5);
            const auto a = got.bytes(tensor), b = got2.bytes(tensor);
            CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));  // bitwise, 1 vs 2 threads
        }
    }
}

TEST_CASE("moe-run --weights bf16|q8_0|q4_0 reproduces the PyTorch reference of bf16 or quantized experts",
          "[moe-run][bf16][quantized]") {
    temp_dir tmp;
    const std::pair<const char*, const char*> runs[] = {{"mixtral_bf16", "bf16"},      {"deepseek_v3", "bf16"},
                                                        {"mixtral_quant", "q8_0"},     {"mixtral_quant", "q4_0"},
                                                        {"deepseek_v3_quant", "q8_0"}, {"deepseek_v3_quant", "q4_0"}};
    for (const auto& [name, weights] : runs) {
        INFO("checkpoint case " << name << ", --weights " << weights);
        const fs::path one = tmp.path / "one.safetensors", two = tmp.path / "two.safetensors";
        const std::string flag = std::string(" --weights ") + weights;
        const auto r = moe_run(case_args(name, one) + flag + " --repeat 1", tmp);
        REQUIRE(r.status == 0);
        CHECK_THAT(r.out, Catch::Contains("kernels=") && Catch::Contains("expert_weights_mb="));
        REQUIRE(moe_run(case_args(name, two) + flag + " --threads 2", tmp).status == 0);
        const moe::io::safetensors_file got(one), got2(two), expected(ckpt_dir / name / "expected.safetensors");
        // Within float32 sums of the reference (see test_io_checkpoint.cpp), not of the float one.
        const auto y = golden::read_matrix(got, "hidden_states");
        // bf16: an activation may round to the other bf16 neighbour (2^-8 of one term); quantized: the
        // generator keeps the activations clear of quantization ties (see test_io_checkpoint.cpp).
        CHECK(golden::relative_error(y, golden::read_matrix(expected, "hidden_states_" + std::string(weights) + "_weights")) <=
              (std::string(weights) == "bf16" ? 1e-4 : 1e-6));
        CHECK(golden::relative_error(y, golden::read_matrix(expected, "hidden_states")) > 1e-3);
        CHECK(golden::relative_error(golden::read_matrix(got, "router_logits"), golden::read_matrix(expected, "router_logits")) <=
              2e-5);
        check_bitwise(got, got2);  // 1 vs 2 threads
    }
    for (const char* weights : {"bf16", "q4_0"}) {
        const auto r = moe_run(case_args("mixtral_quant", tmp.path / "out.safetensors") + " --weights " + weights + " --backward", tmp);
        CHECK(r.status == 2);
        CHECK_THAT(r.err, Catch::Contains("--backward needs --weights f32") && Catch::Contains(weights));
    }
    // The formats need rows of a multiple of 32 values: mixtral_f32's experts are 24 wide.
    const auto r = moe_run(case_args("mixtral_f32", tmp.path / "out.safetensors") + " --weights q8_0", tmp);
    CHECK(r.status == 1);
    CHECK_THAT(r.err, Catch::Contains("d_ff = 24 is not a multiple of 32"));
    CHECK_FALSE(fs::exists(tmp.path / "out.safetensors"));
}

TEST_CASE("moe-run runs a layer of a GGUF model as of its checkpoint; --weights defaults to the file's type",
          "[moe-run][gguf]") {
    temp_dir tmp;
    const auto gguf_args = [&](const std::string& name, const std::string& file, const fs::path& output) {
        return "--model " + (ckpt_dir / name / file).string() + " --layer 1 --input " +
               (ckpt_dir / name / "input.safetensors").string() + " --output " + output.string();
    };
    // A GGUF model's own types, against the checkpoint with the same --weights: the same bits.
    const std::pair<const char*, const char*> runs[] = {
        {"qwen2_moe", "model.gguf"}, {"deepseek_v3", "model.gguf"}, {"mixtral_quant", "model_q4_0.gguf"},
        {"deepseek_v3_quant", "model_q8_0.gguf"}};
    const std::string weights[] = {"f32", "bf16", "q4_0", "q8_0"};  // what each file holds
    for (std::size_t i = 0; i < std::size(runs); ++i) {
        const auto& [name, file] = runs[i];
        INFO("case " << name << ", " << file);
        const fs::path from_gguf = tmp.path / "gguf.safetensors", from_ckpt = tmp.path / "ckpt.safetensors";
        const auto r = moe_run(gguf_args(name, file, from_gguf) + " --repeat 1 --stats", tmp);
        REQUIRE(r.status == 0);
        CHECK_THAT(r.out, Catch::Contains("expert_weights_mb=") && Catch::Contains("\"tokens\""));
        REQUIRE(moe_run(case_args(name, from_ckpt) + " --weights " + weights[i], tmp).status == 0);
        const moe::io::safetensors_file got(from_gguf), want(from_ckpt);
        CHECK(got.names() == want.names());
        check_bitwise(got, want);
        if (weights[i] == "q8_0" || weights[i] == "q4_0") {  // against the reference's quantized arithmetic
            const moe::io::safetensors_file reference(ckpt_dir / name / "expected.safetensors");
            CHECK(golden::relative_error(golden::read_matrix(got, "hidden_states"),
                                         golden::read_matrix(reference, "hidden_states_" + weights[i] + "_weights")) <= 1e-6);
        }
    }
    // --weights still chooses: the Q4_0 file's blocks in float.
    const fs::path as_float = tmp.path / "float.safetensors";
    REQUIRE(moe_run(gguf_args("mixtral_quant", "model_q4_0.gguf", as_float) + " --weights f32", tmp).status == 0);
    const moe::io::safetensors_file expected(ckpt_dir / "mixtral_quant" / "expected.safetensors");
    CHECK(golden::relative_error(golden::read_matrix(moe::io::safetensors_file(as_float), "hidden_states"),
                                 golden::read_matrix(expected, "hidden_states")) > 1e-3);
    // No backward from a GGUF file; a dense layer and a missing file are errors naming them.
    auto r = moe_run(gguf_args("qwen2_moe", "model.gguf", tmp.path / "out.safetensors") + " --backward", tmp);
    CHECK(r.status == 2);
    CHECK_THAT(r.err, Catch::Contains("--backward needs a HuggingFace checkpoint folder"));
    r = moe_run("--model " + (ckpt_dir / "deepseek_v3" / "model.gguf").string() + " --layer 0 --input " +
                    (ckpt_dir / "deepseek_v3" / "input.safetensors").string() + " --output " + (tmp.path / "out.safetensors").string(),
                tmp);
    CHECK(r.status == 1);
    CHECK_THAT(r.err, Catch::Contains("layer 0 is a dense layer"));
    CHECK_FALSE(fs::exists(tmp.path / "out.safetensors"));
    // A K-quant model: one line saying which types work.
    r = moe_run("--model " + (golden::data_dir / "gguf" / "olmoe_q4_k.gguf").string() + " --layer 0 --input " +
                    (ckpt_dir / "olmoe" / "input.safetensors").string() + " --output " + (tmp.path / "out.safetensors").string(),
                tmp);
    CHECK(r.status == 1);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK_THAT(r.err, Catch::Contains("has type Q4_K; this library reads F32, F16, BF16, F64, Q8_0 and Q4_0 tensors"));
    CHECK_FALSE(fs::exists(tmp.path / "out.safetensors"));
}

TEST_CASE("moe-run router overrides reproduce the PyTorch reference", "[moe-run][routers]") {
    temp_dir tmp;
    moe::index cases = 0;
    for (const auto& entry : fs::directory_iterator(golden::data_dir / "overrides")) {
        const fs::path dir = entry.path();
        INFO("override case " << dir.filename().string());
        const std::string common = case_flags(dir, {"flags"}) + " --input " + (dir / "input.safetensors").string();
        const fs::path one = tmp.path / "one.safetensors", two = tmp.path / "two.safetensors";
        const auto r = moe_run(common + " --output " + one.string(), tmp);
        INFO(r.err);
        REQUIRE(r.status == 0);
        REQUIRE(moe_run(common + " --threads 2 --output " + two.string(), tmp).status == 0);
        const moe::io::safetensors_file got(one), got2(two);
        check_file(got, moe::io::safetensors_file(dir / "expected.safetensors"), 2e-5);
        check_bitwise(got, got2);  // 1 vs 2 threads
        ++cases;
    }
    CHECK(cases >= 12);
}

TEST_CASE("moe-run --router sigmoid_topk is a DeepSeek-V3 checkpoint's own router, and only that", "[moe-run][routers]") {
    temp_dir tmp;
    for (const char* name : {"deepseek_v3", "deepseek_capacity_probs"}) {
        INFO(name);
        const fs::path dir = golden::data_dir / (name == std::string("deepseek_v3") ? "ckpt" : "overrides") / name;
        const std::string common = case_flags(dir, {"flags"}) + " --input " + (dir / "input.safetensors").string();
        const fs::path own = tmp.path / "own.safetensors", named = tmp.path / "named.safetensors";
        REQUIRE(moe_run(common + " --output " + own.string(), tmp).status == 0);
        const auto r = moe_run(common + " --router sigmoid_topk --output " + named.string(), tmp);
        INFO(r.err);
        REQUIRE(r.status == 0);
        check_bitwise(moe::io::safetensors_file(named), moe::io::safetensors_file(own));
    }
    const auto r = moe_run(case_args("mixtral_f32", tmp.path / "out.safetensors") + " --router sigmoid_topk", tmp);
    CHECK(r.status == 1);
    CHECK_THAT(r.err, Catch::Contains("the router reads a correction bias (DeepSeek-V3's sigmoid routing), and this "
                                      "mixtral checkpoint has no tensor 'model.layers.1.block_sparse_moe.gate.e_score_correction_bias'"));
    CHECK_FALSE(fs::exists(tmp.path / "out.safetensors"));
}

TEST_CASE("moe-run --backward reproduces PyTorch autograd for every checkpoint and override case",
          "[moe-run][backward]") {
    temp_dir tmp;
    moe::index cases = 0;
    for (const fs::path& dir : backward_cases()) {
        INFO("case " << dir.parent_path().filename().string() << "/" << dir.filename().string());
        const std::string common = backward_case_args(dir);
        const fs::path one = tmp.path / "one.safetensors", two = tmp.path / "two.safetensors";
        const auto r = moe_run(common + " --output " + one.string(), tmp);
        INFO(r.err);
        REQUIRE(r.status == 0);
        REQUIRE(moe_run(common + " --threads 2 --output " + two.string(), tmp).status == 0);
        const moe::io::safetensors_file got(one), got2(two);
        check_file(got, moe::io::safetensors_file(dir / "expected_backward.safetensors"), 1e-4);
        check_bitwise(got, got2);  // 1 vs 2 threads
        ++cases;
    }
    CHECK(cases >= 23);
}

TEST_CASE("moe-run --backward prints the backward time and rejects a missing or misshapen grad_output",
          "[moe-run][backward][errors]") {
    temp_dir tmp;
    const fs::path out = tmp.path / "o.safetensors";
    const auto r = moe_run(case_args("qwen2_moe", out) + " --backward --repeat 2", tmp);
    REQUIRE(r.status == 0);
    CHECK(r.out.find("forward_ms_median=") != std::string::npos);
    CHECK(r.out.find("backward_ms_median=") != std::string::npos);
    fs::remove(out);

    const moe::io::safetensors_file input(ckpt_dir / "qwen2_moe" / "input.safetensors");
    const auto x = golden::read_matrix(input, "hidden_states");
    const auto write = [&](const std::string& name, std::vector<std::int64_t> shape) {
        const fs::path p = tmp.path / "in.safetensors";
        const std::vector<moe::io::tensor_to_write> t = {
            {.name = "hidden_states", .shape = input.info("hidden_states").shape,
             .values = std::span<const float>(x.data(), static_cast<std::size_t>(x.size()))},
            {.name = name, .shape = std::move(shape), .values = std::span<const float>(x.data(), static_cast<std::size_t>(x.size()))}};
        moe::io::write_safetensors(p, t);
        return p.string();
    };
    const auto missing = moe_run(case_args("qwen2_moe", out, write("other", {x.rows(), x.cols()})) + " --backward", tmp);
    CHECK(missing.status == 1);
    CHECK(missing.err.find("grad_output") != std::string::npos);
    CHECK(!fs::exists(out));
    const auto misshapen = moe_run(case_args("qwen2_moe", out, write("grad_output", {x.rows(), x.cols()})) + " --backward", tmp);
    CHECK(misshapen.status == 1);
    CHECK(misshapen.err.find("grad_output") != std::string::npos);
    CHECK(!fs::exists(out));
    const auto without = moe_run(case_args("qwen2_moe", out) + " --z-loss-coef 0.1", tmp);
    CHECK(without.status == 2);
    CHECK(without.err.find("--backward") != std::string::npos);
    const auto negative = moe_run(case_args("qwen2_moe", out) + " --backward --load-balance-coef -1", tmp);
    CHECK(negative.status == 2);
    CHECK(!fs::exists(out));
}

TEST_CASE("moe-run is bitwise identical at 1, 2 and 3 threads on a long batch", "[moe-run][determinism]") {
    // Long enough (T = 2 x 150) that logits, experts and combine all split into several tasks.
    temp_dir tmp;
    for (const char* name : {"deepseek_v3", "qwen2_moe"}) {
        INFO(name);
        std::vector<float> x(2 * 150 * 32);
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
        const fs::path in = tmp.path / "long.safetensors";
        const moe::io::tensor_to_write t[] = {{.name = "hidden_states", .shape = {2, 150, 32}, .values = x}};
        moe::io::write_safetensors(in, t);
        std::vector<std::string> outputs;
        for (int threads : {1, 2, 3}) {
            const fs::path out = tmp.path / ("out" + std::to_string(threads) + ".safetensors");
            REQUIRE(moe_run(case_args(name, out, in.string()) + " --threads " + std::to_string(threads), tmp).status == 0);
            outputs.push_back(slurp(out));
        }
        CHECK(outputs[0] == outputs[1]);
        CHECK(outputs[0] == outputs[2]);
        CHECK(outputs[0].size() > 2 * 150 * 32 * 4);
    }
}

TEST_CASE("moe-run prints statistics and timings on request", "[moe-run]") {
    temp_dir tmp;
    const auto r = moe_run(case_args("deepseek_v3", tmp.path / "o.safetensors") + " --stats --repeat 3", tmp);
    REQUIRE(r.status == 0);
    std::istringstream lines(r.out);
    std::string timing, kernels, size, stats;
    std::getline(lines, timing);
    std::getline(lines, kernels);
    std::getline(lines, size);
    std::getline(lines, stats);
    CHECK(timing.rfind("forward_ms_median=", 0) == 0);
    // The instruction-set family the kernels ran on: this process's (the same CPU, the same MOE_ISA).
    CHECK(kernels == "kernels=" + std::string(moe::kernels::isa_name(moe::kernels::active_isa())));
    // deepseek_v3's expert weights as float32: 16 experts of 3 x 32 x 16 and the shared FFN of 3 x 32 x 32
    // values, 4 x 3 x 32 x (16 x 16 + 32) = 110592 bytes.
    CHECK(size == "expert_weights_mb=0.111");
    const auto j = nlohmann::json::parse(stats);
    CHECK(j["tokens"] == 40);
    CHECK(j["assignments"] == 160);
    CHECK(moe_run("--help", tmp).status == 0);
}

TEST_CASE("moe-run fails cleanly: exit 2 for bad arguments, 1 otherwise, no output file", "[moe-run][errors]") {
    temp_dir tmp;
    const fs::path out = tmp.path / "out.safetensors";
    const auto fails = [&](const std::string& args, int status, const std::string& text) {
        INFO(args);
        const auto r = moe_run(args, tmp);
        CHECK(r.status == status);
        CHECK(r.err.rfind("moe-run: error: ", 0) == 0);
        CHECK(r.err.find(text) != std::string::npos);
        CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
        CHECK_FALSE(fs::exists(out));
    };
    const std::string ok = case_args("mixtral_f32", out);
    fails(ok + " --threads 0", 2, "--threads: 0 must be in [1, 1024]");
    fails(ok + " --threads 99999999999", 2, "--threads: 99999999999 must be in [1, 1024]");
    fails(ok + " --frobnicate", 2, "not expected: --frobnicate");
    fails(ok + " --layer x", 2, "--layer: expects a decimal integer (in [0, inf)), got 'x'");
    // Integers are decimal and whole: no octal, hex or clamping of what does not fit.
    fails(ok + " --layer 010", 1, "layer 10 is out of range");
    fails(ok + " --threads 0x10", 2, "--threads: expects a decimal integer");
    fails(ok + " --repeat 99999999999999999999", 2, "got '99999999999999999999'");
    // A flag takes no value: `--backward=false` would pass --load-balance-coef's need of --backward.
    fails(ok + " --backward=false --load-balance-coef 1", 2, "backward was given a disallowed flag override");
    fails("--layer 1 --input a --output b", 2, "--model is required");
    fails(ok + " --repeat", 2, "--repeat: 1 required");
    fails(case_args("does_not_exist", out), 1, "does_not_exist: not a model folder");
    fails(case_args("deepseek_v3", out).replace(case_args("deepseek_v3", out).find("--layer 1"), 9, "--layer 0"), 1,
          "dense MLP layer");
    fails(ok + " --layer 9", 1, "out of range");
    // Router overrides.
    fails(ok + " --router bogus", 2, "--router: bogus not in {softmax_topk,");
    fails(ok + " --capacity-factor -1", 2, "--capacity-factor: -1 must be in (0, inf)");
    fails(ok + " --capacity-factor abc", 2, "--capacity-factor: expects a finite number");
    fails(ok + " --null-experts 2", 2, "--null-experts applies only to --router null_experts");
    fails(ok + " --router null_experts", 2, "needs --null-experts");
    fails(ok + " --router top_p --top-p 1.5", 2, "--top-p: 1.5 must be in (0, 1]");
    fails(ok + " --drop-policy probs", 2, "--drop-policy needs --capacity-factor");
    fails(ok + " --router expert_choice --sinkhorn-iters 3", 2, "--sinkhorn-iters applies only to --router sinkhorn");
    fails(ok + " --router top_p --capacity-factor 2", 2,
          "--capacity-factor applies only to --router softmax_topk, sigmoid_topk, expert_choice");
    fails(ok + " --router sinkhorn --sinkhorn-gates both", 2, "--sinkhorn-gates: expects one of softmax|plan, got 'both'");
    fails(ok + " --router sinkhorn --sinkhorn-iters 2.5", 2, "--sinkhorn-iters: expects a decimal integer (in [1, inf)), got '2.5'");
    fails(ok + " --router sinkhorn --sinkhorn-iters 0", 2, "--sinkhorn-iters: 0 must be in [1, inf)");
    fails(ok + " --router top_p --max-k 9", 1, "max_k = 9");
    // The router weight must have E + N rows for N null experts.
    fails(ok + " --router null_experts --null-experts 2", 1, "model.layers.1.block_sparse_moe.gate.weight");
    // (mixtral_null has no input file of its own: the router's shape is checked before the input is read.)
    fails(case_args("mixtral_null", out) + " --router null_experts --null-experts 3", 1, "[6, 32]");
    // Input of the wrong hidden size, missing tensor, non-finite value.
    const fs::path bad = tmp.path / "bad.safetensors";
    std::vector<float> v(3 * 5, 0.5f);
    const moe::io::tensor_to_write wrong[] = {{.name = "hidden_states", .shape = {3, 5}, .values = v}};
    moe::io::write_safetensors(bad, wrong);
    fails(case_args("mixtral_f32", out, bad.string()), 1, "hidden size 5");
    const moe::io::tensor_to_write other[] = {{.name = "x", .shape = {3, 5}, .values = v}};
    moe::io::write_safetensors(bad, other);
    fails(case_args("mixtral_f32", out, bad.string()), 1, "no tensor 'hidden_states'");
    std::vector<float> nan(2 * 2 * 32, 0.25f);
    nan[1 * 64 + 1 * 32 + 7] = std::numeric_limits<float>::quiet_NaN();
    const moe::io::tensor_to_write with_nan[] = {{.name = "hidden_states", .shape = {2, 2, 32}, .values = nan}};
    moe::io::write_safetensors(bad, with_nan);
    fails(case_args("mixtral_f32", out, bad.string()), 1, "non-finite value (nan) at [1, 1, 7]");
    std::vector<float> flat(32, 0.5f);
    const moe::io::tensor_to_write rank_one[] = {{.name = "hidden_states", .shape = {32}, .values = flat}};
    moe::io::write_safetensors(bad, rank_one);
    fails(case_args("mixtral_f32", out, bad.string()), 1, "has rank 1");
    std::vector<float> inf(3 * 32, 0.5f);
    inf[2 * 32 + 5] = -std::numeric_limits<float>::infinity();
    const moe::io::tensor_to_write with_inf[] = {{.name = "hidden_states", .shape = {3, 32}, .values = inf}};
    moe::io::write_safetensors(bad, with_inf);
    fails(case_args("mixtral_f32", out, bad.string()), 1, "non-finite value (-inf) at [2, 5]");
    fs::resize_file(bad, fs::file_size(bad) - 7);  // truncated
    fails(case_args("mixtral_f32", out, bad.string()), 1, bad.string());
    // A config.json that is not JSON.
    const fs::path broken = tmp.path / "broken";
    fs::create_directories(broken);
    std::ofstream(broken / "config.json") << "{\"model_type\": \"mixtral\",";
    fails("--model " + broken.string() + " --layer 1 --input a --output " + out.string(), 1, "config.json: not valid JSON");
    // A shard listed in the index but absent.
    const fs::path model = tmp.path / "model";
    fs::create_directories(model);
    fs::copy_file(ckpt_dir / "mixtral_sharded" / "config.json", model / "config.json");
    fs::copy_file(ckpt_dir / "mixtral_sharded" / "model.safetensors.index.json", model / "model.safetensors.index.json");
    fails("--model " + model.string() + " --layer 1 --input " + (ckpt_dir / "mixtral_sharded" / "input.safetensors").string() +
              " --output " + out.string(),
          1, "model-0000");
}

TEST_CASE("moe-run reads only the requested layer of a huge checkpoint", "[moe-run][io]") {
    // A single-file checkpoint whose first tensor is 64 GB of another layer (a hole in a sparse file),
    // followed by the tensors of mixtral_f32's layer 1. Reading anything but layer 1 would take
    // minutes and gigabytes; moe-run must finish with a small peak memory.
    temp_dir tmp;
    const fs::path model = tmp.path / "huge";
    fs::create_directories(model);
    fs::copy_file(ckpt_dir / "mixtral_f32" / "config.json", model / "config.json");
    const moe::io::safetensors_file src(ckpt_dir / "mixtral_f32" / "model.safetensors");
    const std::uint64_t hole = std::uint64_t{64} << 30;
    nlohmann::json header;
    header["model.layers.0.block_sparse_moe.huge"] = {
        {"dtype", "F32"}, {"shape", {hole / 4}}, {"data_offsets", {0, hole}}};
    std::uint64_t offset = hole;
    std::vector<std::string> names;
    for (const auto& name : src.names()) {
        if (name.rfind("model.layers.1.", 0) != 0) continue;
        const auto& info = src.info(name);
        header[name] = {{"dtype", std::string(moe::io::dtype_name(info.type))}, {"shape", info.shape},
                        {"data_offsets", {offset, offset + (info.end - info.begin)}}};
        offset += info.end - info.begin;
        names.push_back(name);
    }
    std::string text = header.dump();
    text.resize((text.size() + 7) / 8 * 8, ' ');
    {
        std::ofstream out(model / "model.safetensors", std::ios::binary);
        const std::uint64_t length = text.size();
        out.write(reinterpret_cast<const char*>(&length), 8);
        out.write(text.data(), static_cast<std::streamsize>(text.size()));
        out.seekp(static_cast<std::streamoff>(8 + text.size() + hole));
        for (const auto& name : names) {
            const auto bytes = src.bytes(name);
            out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
        }
        REQUIRE(out.good());
    }
    REQUIRE(fs::file_size(model / "model.safetensors") > hole);
    const fs::path output = tmp.path / "out.safetensors";
    const auto r = moe_run("--model " + model.string() + " --layer 1 --input " +
                               (ckpt_dir / "mixtral_f32" / "input.safetensors").string() + " --output " + output.string(),
                           tmp);
    REQUIRE(r.status == 0);
    CHECK(r.max_rss_kib > 0);
    CHECK(r.max_rss_kib < 200 * 1024);  // KiB: far below the 64 GB the other tensor holds
    const moe::io::safetensors_file got(output), expected(ckpt_dir / "mixtral_f32" / "expected.safetensors");
    CHECK(golden::relative_error(golden::read_matrix(got, "hidden_states"), golden::read_matrix(expected, "hidden_states")) <=
          2e-5);
}

#ifdef MOE_MPIEXEC
namespace {
/// moe-run --expert-parallel under mpirun with `ranks` ranks (bounded in time: a hang fails).
result moe_run_parallel(int ranks, const std::string& args, const temp_dir& tmp) {
    const auto out = tmp.path / "stdout", err = tmp.path / "stderr";
    const std::string cmd = "timeout 120 " MOE_MPIEXEC " -np " + std::to_string(ranks) + " " + MOE_RUN_PATH +
                            " --expert-parallel " + args + " >" + out.string() + " 2>" + err.string();
    const int raw = std::system(cmd.c_str());
    return {WIFEXITED(raw) ? WEXITSTATUS(raw) : -1, slurp(out), slurp(err)};
}

}  // namespace

TEST_CASE("moe-run --expert-parallel at 2 and 4 ranks reproduces every checkpoint and override case, forward and "
          "backward", "[moe-run][mpirun]") {
    // The override cases give every router, the batch-dependent ones (capacity, expert choice, Sinkhorn)
    // included: they route the whole batch on every rank, so no case depends on the number of ranks.
    temp_dir tmp;
    moe::index cases = 0;
    for (const fs::path& dir : backward_cases()) {
        INFO("case " << dir.parent_path().filename().string() << "/" << dir.filename().string());
        const std::string common = backward_case_args(dir);
        const fs::path one = tmp.path / "one.safetensors";
        REQUIRE(moe_run(common + " --output " + one.string(), tmp).status == 0);
        const moe::io::safetensors_file single(one), reference(dir / "expected_backward.safetensors");
        for (const int ranks : {2, 4}) {
            INFO(ranks << " ranks");
            const fs::path out = tmp.path / ("np" + std::to_string(ranks) + ".safetensors");
            const auto r = moe_run_parallel(ranks, common + " --output " + out.string(), tmp);
            INFO(r.err);
            REQUIRE(r.status == 0);
            const moe::io::safetensors_file got(out);
            check_file(got, reference, 1e-4);  // the PyTorch reference
            check_file(got, single, 1e-6);     // one process: sums over ranks differ only by rounding
        }
        ++cases;
    }
    CHECK(cases >= 23);
}

TEST_CASE("moe-run --expert-parallel --rebalance writes the same output and brings the slowest rank near the mean",
          "[moe-run][mpirun]") {
    temp_dir tmp;
    const fs::path dir = ckpt_dir / "mixtral_f32";
    const moe::io::safetensors_file model(dir / "model.safetensors"), input(dir / "input.safetensors");
    const moe::matrix<float> w = golden::read_matrix(model, "model.layers.1.block_sparse_moe.gate.weight");
    moe::matrix<float> x = golden::read_matrix(input, "hidden_states");
    // A skewed batch: one input column set large where experts 0 and 1 gain most over the others, so
    // that every token routes to both (rank 0's at 2 ranks; ranks 0 and 1 at 4).
    moe::index best = 0;
    float margin = -1, sign = 1;
    for (moe::index c = 0; c < w.cols(); ++c)
        for (const float s : {1.0f, -1.0f}) {
            float m = std::numeric_limits<float>::max();
            for (moe::index e = 2; e < w.rows(); ++e) m = std::min(m, std::min(s * w(0, c), s * w(1, c)) - s * w(e, c));
            if (m > margin) std::tie(best, margin, sign) = std::tuple{c, m, s};
        }
    REQUIRE(margin > 0);
    x.col(best).setConstant(60 * sign);
    const fs::path skewed = tmp.path / "skewed.safetensors";
    const moe::matrix<float> g = golden::read_matrix(input, "grad_output");  // for --backward
    const std::array<moe::io::tensor_to_write, 2> t{
        moe::io::tensor_to_write{"hidden_states", {x.rows(), x.cols()}, moe::io::dtype::f32, {x.data(), static_cast<std::size_t>(x.size())}},
        moe::io::tensor_to_write{"grad_output", {g.rows(), g.cols()}, moe::io::dtype::f32, {g.data(), static_cast<std::size_t>(g.size())}}};
    moe::io::write_safetensors(skewed, std::span(t));
    const moe::index rows = 2 * x.rows();  // Mixtral: top-2

    const auto load_of = [](const std::string& out) {  // the second line of --stats
        std::istringstream lines(out);
        std::string stats, load;
        std::getline(lines, stats);
        std::getline(lines, load);
        return nlohmann::json::parse(load);
    };
    for (const int ranks : {2, 4}) {
        INFO(ranks << " ranks");
        // moe-run with `flags` (--stats among them) without and with --rebalance: both succeed and write
        // the same bytes (to `name`_off and `name`_on); their load lines.
        const auto off_and_on = [&](const std::string& name, const std::string& flags) {
            const fs::path off = tmp.path / (name + "_off.safetensors"), on = tmp.path / (name + "_on.safetensors");
            const auto r_off = moe_run_parallel(ranks, case_args("mixtral_f32", off, skewed.string()) + flags, tmp);
            const auto r_on = moe_run_parallel(ranks, case_args("mixtral_f32", on, skewed.string()) + flags + " --rebalance", tmp);
            INFO(r_off.err << r_on.err);
            REQUIRE(r_off.status == 0);
            REQUIRE(r_on.status == 0);
            CHECK(slurp(on) == slurp(off));
            return std::pair{load_of(r_off.out), load_of(r_on.out)};
        };
        const auto [before, after] = off_and_on("forward", " --stats");
        const fs::path on = tmp.path / "capped.safetensors";
        const auto most = [](const nlohmann::json& j) {
            const auto v = j["rows"].get<std::vector<moe::index>>();
            return *std::max_element(v.begin(), v.end());
        };
        CHECK(before["rows_moved"] == 0);
        CHECK(before["imbalance"].get<double>() == 2);  // half the ranks compute every row
        CHECK(after["imbalance_before"] == before["imbalance"]);
        CHECK(most(after) <= (rows + ranks - 1) / ranks);  // at the mean, rounded up
        CHECK(after["rows_moved"].get<moe::index>() > 0);
        CHECK(after["weight_bytes_sent"][0].get<moe::index>() > 0);
        // A cap below one expert's weights moves nothing.
        const auto capped = moe_run_parallel(ranks, case_args("mixtral_f32", on, skewed.string()) + " --stats --rebalance --rebalance-cap-mb 0", tmp);
        REQUIRE(capped.status == 0);
        CHECK(load_of(capped.out)["rows_moved"] == 0);
        // Moves smaller than --rebalance-min-rows are not made (here 33 rows at 2 ranks, 16 at 4).
        const auto few = moe_run_parallel(ranks, case_args("mixtral_f32", on, skewed.string()) + " --stats --rebalance --rebalance-min-rows 34", tmp);
        REQUIRE(few.status == 0);
        CHECK(load_of(few.out)["rows_moved"] == 0);
        // Backward: every gradient the same bytes; the helpers passed their weight-gradient sums on.
        const auto trained = off_and_on("trained", " --backward --stats").second;
        CHECK(moe::io::safetensors_file(tmp.path / "trained_on.safetensors")
                  .contains("grad.model.layers.1.block_sparse_moe.experts.0.w1.weight"));
        CHECK(most(trained) <= (rows + ranks - 1) / ranks);
        const auto passed = trained["gradient_bytes_sent"].get<std::vector<moe::index>>();
        CHECK(std::accumulate(passed.begin(), passed.end(), moe::index{0}) > 0);
    }
    // Misuse is a bad argument (exit 2).
    const fs::path out = tmp.path / "x.safetensors";
    CHECK(moe_run(case_args("mixtral_f32", out) + " --rebalance", tmp).status == 2);
    CHECK(moe_run_parallel(2, case_args("mixtral_f32", out) + " --rebalance-cap-mb 4", tmp).status == 2);
    CHECK(moe_run_parallel(2, case_args("mixtral_f32", out) + " --rebalance --rebalance-min-rows 0", tmp).status == 2);
    CHECK_FALSE(fs::exists(out));
}

TEST_CASE("moe-run --expert-parallel reports the whole batch's statistics and per-rank load, and fails cleanly",
          "[moe-run][mpirun][errors]") {
    temp_dir tmp;
    const fs::path out = tmp.path / "o.safetensors";
    const auto single = moe_run(case_args("deepseek_v3", out) + " --stats", tmp);
    const auto r = moe_run_parallel(4, case_args("deepseek_v3", out) + " --stats --repeat 2", tmp);
    REQUIRE(r.status == 0);
    std::istringstream lines(r.out);
    std::string timing, kernels, size, stats, load;
    std::getline(lines, timing);
    std::getline(lines, kernels);
    std::getline(lines, size);
    std::getline(lines, stats);
    std::getline(lines, load);
    CHECK(timing.rfind("forward_ms_median=", 0) == 0);
    CHECK(stats + "\n" == single.out);  // rank 0 prints the statistics of every rank's tokens
    const auto j = nlohmann::json::parse(load);
    CHECK(j["ranks"] == 4);
    CHECK(j["rows"].get<std::vector<moe::index>>().size() == 4);
    moe::index rows = 0;
    for (const auto n : j["rows"].get<std::vector<moe::index>>()) rows += n;
    CHECK(rows == 160);  // 40 tokens x 8 experts each
    const auto per_rank = j["rows"].get<std::vector<moe::index>>();
    CHECK(j["imbalance"].get<double>() ==
          Approx(4.0 * static_cast<double>(*std::max_element(per_rank.begin(), per_rank.end())) / 160.0));
    fs::remove(out);

    // An error on one rank ends the whole job (no hang) with exit 1 and no output file.
    const auto missing = moe_run_parallel(2, case_args("deepseek_v3", out, (tmp.path / "none.safetensors").string()), tmp);
    CHECK(missing.status == 1);
    CHECK(missing.err.find("moe-run: error (rank 0 of 2)") != std::string::npos);
    CHECK(missing.err.find("none.safetensors") != std::string::npos);
    CHECK_FALSE(fs::exists(out));
    const auto bad = moe_run_parallel(2, case_args("deepseek_v3", out) + " --threads 0", tmp);
    CHECK(bad.status == 2);
    CHECK_FALSE(fs::exists(out));
}
#endif
