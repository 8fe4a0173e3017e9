// The GGUF reader against tools/golden's own GGUF writer (gguf_io.py) (tests/data/gguf: reader.gguf and the
// values each tensor holds, reader_expected.safetensors), and against files built here with one defect
// each.
#include "golden.hpp"

#include <moe/io/gguf.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using moe::io::gguf_file;

const fs::path reader_gguf = golden::data_dir / "gguf" / "reader.gguf";

std::vector<float> read_all(const gguf_file& file, const std::string& name) {
    std::vector<float> out(file.tensor(name).numel());
    file.read(name, out);
    return out;
}

// A GGUF file built field by field, written to a temporary path (removed on destruction).
struct builder {
    std::string bytes;
    fs::path path = fs::temp_directory_path() / ("moe_test_gguf_" + std::to_string(::getpid()) + ".gguf");

    builder(std::uint64_t tensors, std::uint64_t keys, std::uint32_t version = 3) {
        bytes = "GGUF";
        put(version).put(tensors).put(keys);
    }
    builder(const builder&) = delete;
    builder& operator=(const builder&) = delete;
    ~builder() {
        std::error_code ignored;
        fs::remove(path, ignored);
    }

    template <class T>
    builder& put(T v) {
        bytes.append(reinterpret_cast<const char*>(&v), sizeof v);
        return *this;
    }
    builder& str(std::string_view s) {
        put<std::uint64_t>(s.size());
        bytes.append(s);
        return *this;
    }
    builder& key_u32(std::string_view key, std::uint32_t v) { return str(key).put<std::uint32_t>(4).put(v); }
    builder& tensor(std::string_view name, const std::vector<std::uint64_t>& dims, std::uint32_t type, std::uint64_t offset) {
        str(name).put<std::uint32_t>(static_cast<std::uint32_t>(dims.size()));
        for (const auto d : dims) put(d);
        return put(type).put(offset);
    }
    builder& pad(std::size_t alignment = 32) {
        bytes.append((alignment - bytes.size() % alignment) % alignment, '\0');
        return *this;
    }
    builder& data(std::size_t n) {
        bytes.append(n, '\x01');
        return *this;
    }
    const fs::path& write() {
        std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        return path;
    }
};

void fails_with(builder& file, const std::string& message) {
    INFO("expected: " << message);
    CHECK_THROWS_WITH(gguf_file(file.write()), Catch::Contains(message) && Catch::Contains(file.path.string()));
}

}  // namespace

TEST_CASE("gguf_file reads the header and the metadata of every value type", "[io][gguf]") {
    const gguf_file file(reader_gguf);
    CHECK(file.version() == 3);
    CHECK(file.alignment() == 64);
    CHECK(file.string("general.architecture") == "llama");
    CHECK(file.integer("test.u8") == 200);
    CHECK(file.integer("test.i8") == -100);
    CHECK(file.integer("test.u16") == 60000);
    CHECK(file.integer("test.i16") == -30000);
    CHECK(file.integer("test.u32") == 4000000000);
    CHECK(file.integer("test.i32") == -2000000000);
    CHECK(file.integer("test.i64") == -(std::int64_t{1} << 62));
    CHECK(std::get<std::uint64_t>(file.value("test.u64").value) == (std::uint64_t{1} << 63) + 5);
    CHECK(file.number("test.f32") == 0.5);
    CHECK(file.number("test.f64") == -1.25);
    CHECK(file.number("test.u16") == 60000.0);
    CHECK(file.boolean("test.bool"));
    CHECK(file.value("test.u16").type == moe::io::gguf_value_type::u16);
    const auto& strings = file.array("test.strings");
    CHECK(file.value("test.strings").element_type == moe::io::gguf_value_type::string);
    REQUIRE(strings.size() == 3);
    CHECK(std::get<std::string>(strings[0].value) == "a");
    CHECK(std::get<std::string>(strings[1].value).empty());
    CHECK(std::get<std::string>(strings[2].value) == "expert");
    const auto& ints = file.array("test.i32s");
    REQUIRE(ints.size() == 3);
    CHECK(std::get<std::int64_t>(ints[1].value) == -2);
    const auto& nested = file.array("test.nested");
    REQUIRE(nested.size() == 3);
    CHECK(std::get<std::vector<moe::io::gguf_value>>(nested[0].value).size() == 2);
    CHECK(std::get<std::vector<moe::io::gguf_value>>(nested[1].value).empty());
    CHECK(file.metadata().size() == 16);
    // Errors name the key.
    CHECK_THROWS_WITH(file.integer("test.missing"), Catch::Contains("no metadata key 'test.missing'"));
    CHECK_THROWS_WITH(file.integer("test.u64"), Catch::Contains("'test.u64'") && Catch::Contains("beyond int64"));
    CHECK_THROWS_WITH(file.string("test.u8"), Catch::Contains("'test.u8' is not a string"));
    CHECK_THROWS_WITH(file.integer("test.f32"), Catch::Contains("'test.f32' is not an integer"));
    CHECK_THROWS_AS(file.array("test.bool"), moe::io_error);
}

TEST_CASE("gguf_file reads F32, F16, BF16, Q8_0 and Q4_0 tensors as the writer's values", "[io][gguf]") {
    const gguf_file file(reader_gguf);
    const moe::io::safetensors_file expected(golden::data_dir / "gguf" / "reader_expected.safetensors");
    std::vector<std::string> names;
    for (const auto& t : file.tensors()) names.push_back(t.name);
    CHECK(names == std::vector<std::string>{"f32", "f16", "bf16", "blk.0.ffn_gate_exps.weight", "q4_0", "q4_k"});
    const auto& experts = file.tensor("blk.0.ffn_gate_exps.weight");
    CHECK(experts.dims == std::vector<std::uint64_t>{64, 3, 2});
    CHECK(experts.type == moe::io::ggml_type::q8_0);
    CHECK(experts.rows() == 6);
    CHECK(experts.cols() == 64);
    CHECK(experts.bytes == 6 * 2 * 34);
    CHECK(file.tensor("q4_k").bytes == 144);
    for (const auto& t : file.tensors()) {
        INFO("tensor " << t.name);
        CHECK(t.offset % 64 == 0);
        CHECK(reinterpret_cast<std::uintptr_t>(file.bytes(t.name).data()) % 64 == 0);
        if (t.type == moe::io::ggml_type::q4_k) continue;
        const moe::matrix<float> want = golden::read_matrix(expected, t.name);
        const std::vector<float> got = read_all(file, t.name);
        REQUIRE(static_cast<moe::index>(got.size()) == want.size());
        CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0);
    }
    // The blocks are ggml's: what the library's quantizer makes of the same rows.
    const auto same_blocks = [&](const std::string& name, auto block) {
        using Block = decltype(block);
        const moe::matrix<float> source = golden::read_matrix(expected, name + ".source");
        std::vector<Block> want(static_cast<std::size_t>(source.size() / moe::quant_block));
        moe::kernels::quantize(source.data(), source.size(), want.data());
        const auto bytes = file.bytes(name);
        REQUIRE(bytes.size() == want.size() * sizeof(Block));
        CHECK(std::memcmp(bytes.data(), want.data(), bytes.size()) == 0);
        // and a quantized matrix filled from them holds those values
        moe::quantized_matrix<Block> w(source.rows(), source.cols());
        w.assign(0, reinterpret_cast<const Block*>(bytes.data()), source.rows());
        CHECK(w.dequantized() == golden::read_matrix(expected, name));
    };
    same_blocks("blk.0.ffn_gate_exps.weight", moe::q8_0_block{});
    same_blocks("q4_0", moe::q4_0_block{});
    // Other types and sizes: clear errors.
    std::vector<float> out(256);
    CHECK_THROWS_WITH(file.read("q4_k", out), Catch::Contains("'q4_k' has type Q4_K") && Catch::Contains("Q8_0 and Q4_0"));
    CHECK_THROWS_AS(file.read("f32", out), moe::shape_error);
    CHECK_THROWS_WITH(file.tensor("nope"), Catch::Contains("no tensor 'nope'"));
}

TEST_CASE("gguf_file refuses malformed files, naming the problem", "[io][gguf][errors]") {
    SECTION("not GGUF, other versions, too short") {
        builder magic(0, 0);
        magic.bytes[0] = 'X';
        fails_with(magic, "not a GGUF file");
        builder v1(0, 0, 1);
        fails_with(v1, "GGUF version 1 is not supported");
        builder empty(0, 0);
        empty.bytes.resize(20);
        fails_with(empty, "shorter than a GGUF header");
        CHECK_THROWS_WITH(gguf_file("/nonexistent/model.gguf"), Catch::Contains("cannot open"));
    }
    SECTION("counts and lengths beyond the file") {
        builder keys(0, 1'000'000'000);
        fails_with(keys, "metadata count 1000000000 exceeds");
        builder tensors(1'000'000'000, 0);
        fails_with(tensors, "tensor count 1000000000 exceeds");
        builder length(0, 1);
        length.put<std::uint64_t>(1'000'000).bytes.append("key");
        length.data(16);
        fails_with(length, "metadata key 0 at byte 32 needs 1000000 bytes");
        builder array(0, 1);
        array.str("a").put<std::uint32_t>(9).put<std::uint32_t>(4).put<std::uint64_t>(1'000'000'000);
        fails_with(array, "'a' claims 1000000000 elements");
        builder cut(0, 1);
        cut.str("a").put<std::uint32_t>(5).put<std::uint16_t>(1);
        fails_with(cut, "metadata key 'a' at byte");
    }
    SECTION("values") {
        builder type(0, 1);
        type.str("a").put<std::uint32_t>(13).put<std::uint32_t>(0);
        fails_with(type, "'a' has value type 13");
        builder boolean(0, 1);
        boolean.str("a").put<std::uint32_t>(7).put<std::uint8_t>(2).data(32);
        fails_with(boolean, "'a' is a boolean stored as 2");
        builder twice(0, 2);
        twice.key_u32("a", 1).key_u32("a", 2);
        fails_with(twice, "'a' appears twice");
        builder alignment(0, 1);
        alignment.key_u32("general.alignment", 48);
        fails_with(alignment, "'general.alignment' must be a uint32 power of two");
        builder deep(0, 1);
        deep.str("a").put<std::uint32_t>(9);
        for (int i = 0; i < 9; ++i) deep.put<std::uint32_t>(9).put<std::uint64_t>(1);
        deep.put<std::uint32_t>(0).put<std::uint64_t>(0).data(64);
        fails_with(deep, "metadata key 'a'[0][0][0][0][0][0][0][0] nests arrays deeper than 8");
    }
    SECTION("tensor infos") {
        builder type(1, 0);
        type.tensor("w", {32}, 99, 0).pad().data(32);
        fails_with(type, "tensor 'w' has ggml type 99");
        builder rank(1, 0);
        rank.tensor("w", {1, 1, 1, 1, 1}, 0, 0).pad().data(32);
        fails_with(rank, "tensor 'w' has 5 dimensions");
        builder zero(1, 0);
        zero.tensor("w", {4, 0}, 0, 0).pad().data(32);
        fails_with(zero, "tensor 'w' has dimension 1 = 0");
        builder huge(1, 0);
        huge.tensor("w", {std::uint64_t{1} << 40, std::uint64_t{1} << 40}, 0, 0).pad().data(32);
        fails_with(huge, "the tensor's size overflows");
        builder block(1, 0);
        block.tensor("w", {48, 2}, 8, 0).pad().data(128);
        fails_with(block, "tensor 'w' of type Q8_0 has rows of 48 values, not a multiple of its blocks' 32");
        builder twice(2, 0);
        twice.tensor("w", {8}, 0, 0).tensor("w", {8}, 0, 32).pad().data(64);
        fails_with(twice, "tensor 'w' appears twice");
    }
    SECTION("tensor data") {
        builder misaligned(1, 0);
        misaligned.tensor("w", {8}, 0, 8).pad().data(64);
        fails_with(misaligned, "tensor 'w' starts at offset 8, not a multiple of the alignment 32");
        builder past(1, 0);
        past.tensor("w", {64}, 0, 0).pad().data(255);
        fails_with(past, "tensor 'w' (256 bytes at offset 0) extends past the end of the file (255 bytes of data)");
        builder overlap(2, 0);
        overlap.tensor("a", {16}, 0, 0).tensor("b", {8}, 0, 32).pad().data(64);
        fails_with(overlap, "tensors 'a' and 'b' overlap");
        builder fits(2, 0);
        fits.tensor("a", {8}, 0, 0).tensor("b", {8}, 1, 32).pad().data(48);
        const gguf_file ok(fits.write());
        CHECK(ok.tensors().size() == 2);
        CHECK(ok.tensor("b").bytes == 16);
    }
}

// ---------------------------------------------------------------------------------------------
// MoE layers from GGUF models: the generator writes each checkpoint family's case also as model.gguf
// (llama.cpp's names and keys; the quantized cases also model_q8_0.gguf / model_q4_0.gguf). A layer
// loaded from it holds the same weights as from the HuggingFace checkpoint, so it gives the same bits,
// and the checkpoint's expected outputs.

#include <moe/io/gguf_model.hpp>

namespace {

const fs::path ckpt_dir = golden::data_dir / "ckpt";

// Layer 1 of case `name` from its GGUF file and from its checkpoint, into layers made by `make`
// (from a model_config): the same config, bitwise the same output, the expected one (`output`).
template <class Make>
void check_gguf_case(const std::string& name, const std::string& gguf_name, const std::string& output, Make make,
                     double tolerance) {
    INFO("case " << name << ", " << gguf_name);
    const gguf_file file(ckpt_dir / name / gguf_name);
    const moe::io::checkpoint ckpt(ckpt_dir / name);
    const moe::io::model_config g = moe::io::gguf_config(file), c = ckpt.config();
    CHECK(g.kind == c.kind);
    CHECK(moe::io::shape_of(g).d_model == c.hidden_size);
    CHECK(g.expert_size == c.expert_size);
    CHECK(g.n_experts == c.n_experts);
    CHECK(g.top_k == c.top_k);
    CHECK(g.normalize == c.normalize);
    CHECK(g.scale == c.scale);
    CHECK(g.n_group == c.n_group);
    CHECK(g.topk_group == c.topk_group);
    CHECK(g.shared_size == c.shared_size);
    CHECK(g.shared_gated() == c.shared_gated());
    CHECK(g.sigmoid_scoring() == c.sigmoid_scoring());
    CHECK(g.n_layers == c.n_layers);
    auto from_gguf = make(g), from_ckpt = make(c);
    moe::io::load_layer(file, 1, from_gguf);
    moe::io::load_layer(ckpt, 1, from_ckpt);
    const moe::matrix<float> y = golden::forward_ckpt_case(name, from_gguf);
    CHECK(y == golden::forward_ckpt_case(name, from_ckpt));
    const moe::io::safetensors_file expected(ckpt_dir / name / "expected.safetensors");
    const auto want = golden::read_matrix(expected, output);
    CHECK(golden::relative_error(Eigen::Map<const moe::matrix<float>>(y.data(), want.rows(), want.cols()), want) <= tolerance);
}

template <class S = moe::storages::scalar<float>>
auto softmax_layer(const moe::io::model_config& c) {
    return moe::layer<float, moe::routers::softmax_topk, moe::experts::stored_as<moe::experts::swiglu, S>>(
        moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
}
template <class S = moe::storages::scalar<float>>
auto deepseek_layer(const moe::io::model_config& c) {
    return moe::layer<float, moe::routers::sigmoid_topk, moe::experts::stored_as<moe::experts::swiglu, S>,
                      moe::shared_experts::ungated<moe::experts::stored_as<moe::experts::swiglu, S>>>(
        moe::io::shape_of(c),
        {.k = c.top_k, .normalize = c.normalize, .scale = c.scale, .n_group = c.n_group, .topk_group = c.topk_group});
}

}  // namespace

TEST_CASE("load_layer reads each family's MoE layer from a GGUF model as from its checkpoint", "[io][gguf]") {
    for (const char* name : {"mixtral_f32", "mixtral_bf16", "qwen3_moe", "olmoe"})
        check_gguf_case(name, "model.gguf", "hidden_states", [](const auto& c) { return softmax_layer(c); }, 2e-5);
    check_gguf_case("qwen2_moe", "model.gguf", "hidden_states",
                    [](const auto& c) {
                        return moe::qwen2_moe_layer<float>(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
                    },
                    2e-5);
    check_gguf_case("deepseek_v3", "model.gguf", "hidden_states", [](const auto& c) { return deepseek_layer(c); }, 2e-5);
}

TEST_CASE("Q8_0 and Q4_0 GGUF tensors go into the quantized storages as they are", "[io][gguf][quantized]") {
    using q8 = moe::storages::q8_0;
    using q4 = moe::storages::q4_0;
    check_gguf_case("mixtral_quant", "model_q8_0.gguf", "hidden_states_q8_0_weights",
                    [](const auto& c) { return softmax_layer<q8>(c); }, 1e-6);
    check_gguf_case("mixtral_quant", "model_q4_0.gguf", "hidden_states_q4_0_weights",
                    [](const auto& c) { return softmax_layer<q4>(c); }, 1e-6);
    check_gguf_case("deepseek_v3_quant", "model_q8_0.gguf", "hidden_states_q8_0_weights",
                    [](const auto& c) { return deepseek_layer<q8>(c); }, 1e-6);
    check_gguf_case("deepseek_v3_quant", "model_q4_0.gguf", "hidden_states_q4_0_weights",
                    [](const auto& c) { return deepseek_layer<q4>(c); }, 1e-6);
    for (const char* name : {"qwen3_moe_quant", "olmoe_quant"}) {
        check_gguf_case(name, "model_q8_0.gguf", "hidden_states_q8_0_weights", [](const auto& c) { return softmax_layer<q8>(c); },
                        1e-6);
        check_gguf_case(name, "model_q4_0.gguf", "hidden_states_q4_0_weights", [](const auto& c) { return softmax_layer<q4>(c); },
                        1e-6);
    }
    const auto qwen2 = [](const auto& c) {
        return [&]<class S>() {
            using X = moe::experts::stored_as<moe::experts::swiglu, S>;
            return moe::layer<float, moe::routers::softmax_topk, X, moe::shared_experts::sigmoid_gated<X>>(
                moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        };
    };
    check_gguf_case("qwen2_moe_quant", "model_q8_0.gguf", "hidden_states_q8_0_weights",
                    [&](const auto& c) { return qwen2(c).template operator()<q8>(); }, 1e-6);
    check_gguf_case("qwen2_moe_quant", "model_q4_0.gguf", "hidden_states_q4_0_weights",
                    [&](const auto& c) { return qwen2(c).template operator()<q4>(); }, 1e-6);
    // And the F32 file of the same case, into a float layer: the same bits as from the checkpoint.
    check_gguf_case("qwen2_moe_quant", "model.gguf", "hidden_states",
                    [&](const auto& c) { return qwen2(c).template operator()<moe::storages::scalar<float>>(); }, 2e-5);
    // Other combinations go through float: Q8_0 blocks into q4_0 storage are quantized again, F32 tensors
    // into q8_0 storage quantized once (the same blocks as from the checkpoint: checked above).
    const gguf_file file(ckpt_dir / "mixtral_quant" / "model_q8_0.gguf");
    auto requantized = softmax_layer<q4>(moe::io::gguf_config(file));
    moe::io::load_layer(file, 1, requantized);
    moe::q8_0_block stored;
    CHECK_THROWS_AS(file.read_blocks<moe::q8_0_block>("blk.1.ffn_gate_exps.weight", 0, 1, std::span<moe::q8_0_block>(&stored, 1)),
                    moe::shape_error);  // a row holds 2 blocks
    std::vector<moe::q8_0_block> row(2);
    file.read_blocks<moe::q8_0_block>("blk.1.ffn_gate_exps.weight", 0, 1, row);
    stored = row[0];
    CHECK_THROWS_WITH(file.read_blocks<moe::q4_0_block>("blk.1.ffn_gate_exps.weight", 0, 1, std::span<moe::q4_0_block>()),
                      Catch::Contains("has type Q8_0, not Q4_0"));
    std::vector<float> values(32);
    moe::kernels::dequantize(&stored, 32, values.data());
    moe::q4_0_block want;
    moe::kernels::quantize(values.data(), 32, &want);
    const moe::q4_0_block got = requantized.expert_weights(0).in.block(0, 0);
    CHECK(std::memcmp(&got, &want, sizeof got) == 0);
    auto as_float = softmax_layer(moe::io::gguf_config(file));
    moe::io::load_layer(file, 1, as_float);
    CHECK(as_float.expert_weights(0).in.row(0).head(32).transpose() == Eigen::Map<const Eigen::VectorXf>(values.data(), 32));
}

TEST_CASE("load_layer from GGUF names what is wrong", "[io][gguf][errors]") {
    const gguf_file deepseek(ckpt_dir / "deepseek_v3" / "model.gguf");
    auto layer = deepseek_layer(moe::io::gguf_config(deepseek));
    CHECK_THROWS_WITH(moe::io::load_layer(deepseek, 0, layer),
                      Catch::Contains("layer 0 is a dense layer") && Catch::Contains("blk.0.ffn_gate_inp.weight"));
    CHECK_THROWS_WITH(moe::io::load_layer(deepseek, 2, layer), Catch::Contains("layer 2 is out of range (block_count = 2)"));
    auto wrong = softmax_layer(moe::io::gguf_config(gguf_file(ckpt_dir / "olmoe" / "model.gguf")));
    CHECK_THROWS_AS(moe::io::load_layer(deepseek, 1, wrong), moe::shape_error);
    CHECK_THROWS_WITH(moe::io::gguf_config(gguf_file(reader_gguf)), Catch::Contains("'llama.expert_count' is missing or 0"));
    builder other(0, 1);
    other.str("general.architecture").put<std::uint32_t>(8).str("gemma");
    CHECK_THROWS_WITH(moe::io::gguf_config(gguf_file(other.write())),
                      Catch::Contains("architecture 'gemma' is not one of") && Catch::Contains("deepseek2"));
    // Metadata out of range or missing, named by key (a DeepSeek-V3 header with one defect each).
    const auto deepseek_keys = [](builder& b, float scale, std::uint32_t shared, std::uint32_t gating = 2) -> builder& {
        b.str("general.architecture").put<std::uint32_t>(8).str("deepseek2");
        for (const auto& [k, v] : {std::pair<const char*, std::uint32_t>{"deepseek2.expert_count", 8}, {"deepseek2.embedding_length", 64},
                                   {"deepseek2.block_count", 2}, {"deepseek2.expert_used_count", 2},
                                   {"deepseek2.expert_feed_forward_length", 32}, {"deepseek2.expert_gating_func", gating},
                                   {"deepseek2.leading_dense_block_count", 1}})
            b.key_u32(k, v);
        b.key_u32("deepseek2.expert_shared_count", shared);
        return b.str("deepseek2.expert_weights_scale").put<std::uint32_t>(6).put(scale);
    };
    builder fine(0, 10);
    CHECK(moe::io::gguf_config(gguf_file(deepseek_keys(fine, 2.5f, 1).write())).shared_size == 32);
    builder huge(0, 10);
    CHECK_THROWS_WITH(moe::io::gguf_config(gguf_file(deepseek_keys(huge, 2.5f, 1u << 31).write())),
                      Catch::Contains("'deepseek2.expert_shared_count' is 2147483648, outside [0, 16777216]"));
    builder wide(0, 10);
    CHECK_THROWS_WITH(moe::io::gguf_config(gguf_file(deepseek_keys(wide, 2.5f, 1u << 20).write())),
                      Catch::Contains("'deepseek2.expert_shared_count' x 'deepseek2.expert_feed_forward_length' exceeds"));
    builder nan(0, 10);
    CHECK_THROWS_WITH(moe::io::gguf_config(gguf_file(deepseek_keys(nan, std::nanf(""), 1).write())),
                      Catch::Contains("'deepseek2.expert_weights_scale' is nan"));
    builder v2(0, 10);
    CHECK_THROWS_WITH(moe::io::gguf_config(gguf_file(deepseek_keys(v2, 2.5f, 1, 1).write())),
                      Catch::Contains("'deepseek2.expert_gating_func' is not 2 (sigmoid, DeepSeek-V3): DeepSeek-V2's "
                                      "softmax gating is not supported"));
    builder no_scale(0, 9);
    deepseek_keys(no_scale, 1.0f, 1);
    no_scale.bytes.resize(no_scale.bytes.size() - (8 + 30 + 4 + 4));  // the scale key (30 bytes) and value dropped
    CHECK_THROWS_WITH(moe::io::gguf_config(gguf_file(no_scale.write())), Catch::Contains("no metadata key 'deepseek2.expert_weights_scale'"));
    // K-quants: named with the types that work, before a layer is allocated.
    const gguf_file k_quant(golden::data_dir / "gguf" / "olmoe_q4_k.gguf");
    CHECK_THROWS_WITH(moe::io::check_layer(k_quant, 0, moe::routers::softmax_topk{}),
                      Catch::Contains("tensor 'blk.0.ffn_gate_exps.weight' has type Q4_K") &&
                          Catch::Contains("F32, F16, BF16, F64, Q8_0 and Q4_0"));
    // The correction bias where the router reads one: DeepSeek-V3's file has it, OLMoE's not.
    const gguf_file olmoe_file(ckpt_dir / "olmoe" / "model.gguf"), deepseek_file(ckpt_dir / "deepseek_v3" / "model.gguf");
    CHECK_NOTHROW(moe::io::check_layer(deepseek_file, 1, moe::routers::sigmoid_topk{}));
    CHECK_NOTHROW(moe::io::check_layer(deepseek_file, 1, moe::routers::softmax_topk{}));
    CHECK_THROWS_WITH(moe::io::check_layer(olmoe_file, 1, moe::routers::sigmoid_topk{}),
                      Catch::Contains("the router reads a correction bias") &&
                          Catch::Contains("olmoe file has no tensor 'blk.1.exp_probs_b.bias'"));
    // A quantized storage of rows that are not a multiple of 32 (the checkpoint's sizes): the layer refuses.
    CHECK_THROWS_WITH(softmax_layer<moe::storages::q8_0>(moe::io::gguf_config(gguf_file(ckpt_dir / "olmoe" / "model.gguf"))),
                      Catch::Contains("not a multiple of 32"));
}

TEST_CASE("a split GGUF model opens from its first file; its parts are checked", "[io][gguf]") {
    const gguf_file split(ckpt_dir / "mixtral_sharded" / "model-00001-of-00002.gguf");
    CHECK(split.files() == 2);
    CHECK(split.contains("blk.1.ffn_down_exps.weight"));  // in the second file
    CHECK(split.tensor("blk.1.ffn_down_exps.weight").part == 1);
    CHECK(split.tensor("blk.0.ffn_gate_inp.weight").part == 0);
    check_gguf_case("mixtral_sharded", "model-00001-of-00002.gguf", "hidden_states",
                    [](const auto& c) { return softmax_layer(c); }, 2e-5);
    CHECK_THROWS_WITH(gguf_file(ckpt_dir / "mixtral_sharded" / "model-00002-of-00002.gguf"),
                      Catch::Contains("is file 2 of a split model of 2 files; open the first"));
    // A first file whose name does not say it, and a missing part.
    const fs::path dir = fs::temp_directory_path() / ("moe_test_gguf_split_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    fs::copy_file(ckpt_dir / "mixtral_sharded" / "model-00001-of-00002.gguf", dir / "renamed.gguf");
    CHECK_THROWS_WITH(gguf_file(dir / "renamed.gguf"), Catch::Contains("is not named <name>-00001-of-00002.gguf"));
    fs::copy_file(ckpt_dir / "mixtral_sharded" / "model-00001-of-00002.gguf", dir / "m-00001-of-00002.gguf");
    CHECK_THROWS_WITH(gguf_file(dir / "m-00001-of-00002.gguf"), Catch::Contains("m-00002-of-00002.gguf: cannot open"));
    fs::remove_all(dir);
}
