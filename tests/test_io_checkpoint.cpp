#include "golden.hpp"

#include <moe/io/checkpoint.hpp>

#include <unistd.h>

namespace {
const std::filesystem::path ckpt_dir = golden::data_dir / "ckpt";

// Loads layer 1 of a checkpoint case into the layer type its family needs and compares with the reference.
template <class Layer>
void check_case(const moe::io::checkpoint& ckpt, Layer& layer, const std::string& name) {
    INFO("checkpoint case " << name);
    moe::io::load_layer(ckpt, 1, layer);
    const moe::io::safetensors_file in(ckpt_dir / name / "input.safetensors");
    const moe::io::safetensors_file expected(ckpt_dir / name / "expected.safetensors");
    const auto d = ckpt.config().hidden_size;
    const auto raw = golden::read_matrix(in, "hidden_states");
    const Eigen::Map<const moe::matrix<float>> x(raw.data(), raw.size() / d, d);
    moe::matrix<float> y(x.rows(), d);
    layer.forward(x, y);
    const auto want = golden::read_matrix(expected, "hidden_states");
    CHECK(golden::relative_error(Eigen::Map<const moe::matrix<float>>(y.data(), want.rows(), want.cols()), want) <= 2e-5);
    CHECK(golden::relative_error(layer.logits(), golden::read_matrix(expected, "router_logits")) <= 2e-5);
}
}  // namespace

TEST_CASE("load_layer reads each family's tensors, single or sharded, f32/bf16/f16", "[io][checkpoint]") {
    for (const char* name : {"mixtral_f32", "mixtral_bf16", "mixtral_sharded", "qwen3_moe", "olmoe", "mixtral_t0",
                             "mixtral_k_eq_e", "mixtral_ties"}) {
        const moe::io::checkpoint ckpt(ckpt_dir / name);
        const auto& c = ckpt.config();
        moe::mixtral_layer<float> layer(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        check_case(ckpt, layer, name);
    }
    {
        const moe::io::checkpoint ckpt(ckpt_dir / "qwen2_moe");
        const auto& c = ckpt.config();
        moe::qwen2_moe_layer<float> layer(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        check_case(ckpt, layer, "qwen2_moe");
    }
    for (const char* name : {"deepseek_v3", "deepseek_v3_sharded_f32"}) {
        const moe::io::checkpoint ckpt(ckpt_dir / name);
        const auto& c = ckpt.config();
        moe::deepseek_v3_layer<float> layer(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize, .scale = c.scale,
                                                                   .n_group = c.n_group, .topk_group = c.topk_group});
        check_case(ckpt, layer, name);
    }
}

TEST_CASE("load_layer names the missing layer, tensor or shard", "[io][checkpoint][errors]") {
    const moe::io::checkpoint ds(ckpt_dir / "deepseek_v3");
    moe::deepseek_v3_layer<float> layer(moe::io::shape_of(ds.config()),
                                        {.k = 4, .n_group = 4, .topk_group = 2});
    CHECK_THROWS_WITH(moe::io::load_layer(ds, 0, layer), Catch::Contains("dense MLP layer"));
    CHECK_THROWS_WITH(moe::io::load_layer(ds, 2, layer), Catch::Contains("out of range"));
    const moe::io::checkpoint mixtral(ckpt_dir / "mixtral_f32");
    moe::mixtral_layer<float> wrong({.d_model = 32, .d_ff = 99, .n_experts = 4}, {.k = 2});
    CHECK_THROWS_AS(moe::io::load_layer(mixtral, 1, wrong), moe::shape_error);
    std::vector<float> out(4);
    const std::int64_t shape[1] = {4};
    CHECK_THROWS_WITH(mixtral.read<float>("model.layers.7.block_sparse_moe.gate.weight", out, shape),
                      Catch::Contains("no tensor 'model.layers.7.block_sparse_moe.gate.weight'"));
    const moe::io::checkpoint sharded(ckpt_dir / "mixtral_sharded");
    CHECK_THROWS_WITH(sharded.read<float>("model.nothing", out, shape), Catch::Contains("model.safetensors.index.json"));
    CHECK_THROWS_AS(moe::io::checkpoint(ckpt_dir / "does_not_exist"), moe::io_error);
}

TEST_CASE("check_layer rejects wrong shapes and integer weights from the headers alone", "[io][checkpoint][errors]") {
    const moe::io::checkpoint mixtral(ckpt_dir / "mixtral_f32");
    CHECK_NOTHROW(moe::io::check_layer(mixtral, 1, 4));
    CHECK_THROWS_WITH(moe::io::check_layer(mixtral, 1, 6),
                      Catch::Contains("'model.layers.1.block_sparse_moe.gate.weight' has shape [4, 32], expected [6, 32]"));
    const auto dir = std::filesystem::temp_directory_path() / ("moe_check_layer_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(ckpt_dir / "mixtral_f32" / "config.json", dir / "config.json",
                               std::filesystem::copy_options::overwrite_existing);
    const std::vector<std::int64_t> ints(4 * 32, 1);
    const moe::io::tensor_to_write router[] = {
        {.name = "model.layers.1.block_sparse_moe.gate.weight", .shape = {4, 32}, .type = moe::io::dtype::i64, .integers = ints}};
    moe::io::write_safetensors(dir / "model.safetensors", router);
    const moe::io::checkpoint ints_ckpt(dir);
    CHECK_THROWS_WITH(moe::io::check_layer(ints_ckpt, 1, 4), Catch::Contains("has dtype I64"));
    std::filesystem::remove_all(dir);
}
