#include "golden.hpp"
#include "one_of_ranks.hpp"

#include <moe/io/checkpoint.hpp>

#include <cstring>
#include <limits>

#include <unistd.h>

namespace {
const std::filesystem::path ckpt_dir = golden::data_dir / "ckpt";

// Loads layer 1 of a checkpoint case into the layer type its family needs and compares with the reference.
template <class Layer>
void check_case(const moe::io::checkpoint& ckpt, Layer& layer, const std::string& name) {
    INFO("checkpoint case " << name);
    moe::io::load_layer(ckpt, 1, layer);
    const moe::io::safetensors_file expected(ckpt_dir / name / "expected.safetensors");
    const moe::matrix<float> y = golden::forward_ckpt_case(name, layer);
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

namespace {
// A bf16-weight layer loaded from a BF16 checkpoint holds the stored bits and matches the PyTorch
// reference with bf16-rounded projection inputs (hidden_states_bf16_weights); `Float` is the same
// family with float weights, loaded from the same tensors.
template <class Bf16, class Float>
void check_bf16_case(const std::string& name, Bf16& layer, Float& reference) {
    INFO("checkpoint case " << name);
    const moe::io::checkpoint ckpt(ckpt_dir / name);
    moe::io::load_layer(ckpt, 1, layer);
    moe::io::load_layer(ckpt, 1, reference);
    for (moe::index e = 0; e < ckpt.config().n_experts; ++e) {  // BF16 tensors are kept as stored
        CHECK(layer.expert_weights(e).in.template cast<float>() == reference.expert_weights(e).in);
        CHECK(layer.expert_weights(e).out.template cast<float>() == reference.expert_weights(e).out);
    }
    const moe::io::safetensors_file expected(ckpt_dir / name / "expected.safetensors");
    const moe::matrix<float> y = golden::forward_ckpt_case(name, layer);
    const auto want = golden::read_matrix(expected, "hidden_states_bf16_weights");
    const auto as_float = golden::read_matrix(expected, "hidden_states");
    const Eigen::Map<const moe::matrix<float>> got(y.data(), want.rows(), want.cols());
    // Float32 sums against float64 ones, plus the rare activation that rounds to the other bf16
    // neighbour (one term off by 2^-8 of itself); bf16 rounding itself moves the output ~100x more.
    CHECK(golden::relative_error(got, want) <= 1e-4);
    CHECK(golden::relative_error(as_float, want) > 1e-3);
    CHECK(golden::relative_error(layer.logits(), golden::read_matrix(expected, "router_logits")) <= 2e-5);
}
}  // namespace

TEST_CASE("load_layer keeps BF16 expert weights as bf16; the layer matches PyTorch with bf16 inputs", "[io][checkpoint][bf16]") {
    using bf16_swiglu = moe::experts::bf16_weights<moe::experts::swiglu>;
    {
        const auto c = moe::io::checkpoint(ckpt_dir / "mixtral_bf16").config();
        moe::layer<float, moe::routers::softmax_topk, bf16_swiglu> layer(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        moe::mixtral_layer<float> reference(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        check_bf16_case("mixtral_bf16", layer, reference);
    }
    {
        const auto c = moe::io::checkpoint(ckpt_dir / "deepseek_v3").config();
        const moe::routers::sigmoid_topk router{.k = c.top_k, .normalize = c.normalize, .scale = c.scale, .n_group = c.n_group,
                                                .topk_group = c.topk_group};
        moe::layer<float, moe::routers::sigmoid_topk, bf16_swiglu, moe::shared_experts::ungated<>> layer(moe::io::shape_of(c),
                                                                                                         router);
        moe::deepseek_v3_layer<float> reference(moe::io::shape_of(c), router);
        check_bf16_case("deepseek_v3", layer, reference);
        CHECK(layer.shared_weights().in.cast<float>() == reference.shared_weights().in);
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
    CHECK_NOTHROW(moe::io::check_layer(mixtral, 1, moe::routers::softmax_topk{}));
    // A router with 2 null experts reads a router weight of 4 + 2 rows.
    CHECK_THROWS_WITH(moe::io::check_layer(mixtral, 1, moe::routers::null_experts{.k = 2, .nulls = 2}),
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
    CHECK_THROWS_WITH(moe::io::check_layer(ints_ckpt, 1, moe::routers::softmax_topk{}), Catch::Contains("has dtype I64"));
    std::filesystem::remove_all(dir);
}

TEST_CASE("check_layer asks the router whether it reads a correction bias", "[io][checkpoint][errors]") {
    // sigmoid_topk keeps one in its state (capacity around it too): DeepSeek-V3 has it, OLMoE not; a
    // softmax router on DeepSeek-V3's layer reads none.
    CHECK(moe::reads_correction_bias(moe::routers::sigmoid_topk{}));
    CHECK(moe::reads_correction_bias(moe::routers::capacity<moe::routers::sigmoid_topk>{}));
    CHECK(moe::reads_correction_bias(moe::routers::any_router(moe::routers::sigmoid_topk{})));
    CHECK_FALSE(moe::reads_correction_bias(moe::routers::softmax_topk{}));
    CHECK_FALSE(moe::reads_correction_bias(moe::routers::capacity<moe::routers::softmax_topk>{}));
    CHECK_FALSE(moe::reads_correction_bias(moe::routers::any_router(moe::routers::expert_choice{})));
    const moe::io::checkpoint deepseek(ckpt_dir / "deepseek_v3"), olmoe(ckpt_dir / "olmoe");
    const moe::index layer = 1;
    CHECK_NOTHROW(moe::io::check_layer(deepseek, layer, moe::routers::sigmoid_topk{}));
    CHECK_NOTHROW(moe::io::check_layer(deepseek, layer, moe::routers::softmax_topk{}));
    CHECK_NOTHROW(moe::io::check_layer(olmoe, layer, moe::routers::softmax_topk{}));
    CHECK_THROWS_AS(moe::io::check_layer(olmoe, layer, moe::routers::sigmoid_topk{}), moe::config_error);
    CHECK_THROWS_WITH(moe::io::check_layer(olmoe, layer, moe::routers::sigmoid_topk{}),
                      Catch::Contains("the router reads a correction bias") &&
                          Catch::Contains("olmoe checkpoint has no tensor 'model.layers.1.mlp.gate.e_score_correction_bias'"));
}

namespace {
// Takes one gradient step on `layer` (loaded from `name`), saves it next to the case's config.json,
// and checks that the saved folder loads back bitwise, tensor names and shapes as in the source.
template <class Layer>
void check_save_and_resume(const std::string& name, Layer& layer, Layer& resumed) {
    INFO("checkpoint case " << name);
    const moe::io::checkpoint source(ckpt_dir / name);
    const auto& c = source.config();
    moe::io::load_layer(source, 1, layer);
    layer.set_training(true);
    const moe::io::safetensors_file in(ckpt_dir / name / "input.safetensors");
    const auto raw = golden::read_matrix(in, "hidden_states");
    const Eigen::Map<const moe::matrix<float>> x(raw.data(), raw.size() / c.hidden_size, c.hidden_size);
    moe::matrix<float> y(x.rows(), x.cols()), grad_x(x.rows(), x.cols());
    layer.forward(x, y);
    layer.backward(x, y, grad_x);  // L = |y|^2 / 2
    for (auto& p : layer.parameters()) p.value -= 0.1f * p.grad;
    if (auto* bias = moe::correction_bias<float>(layer.router_state())) bias->array() += 0.25f;

    const auto dir = std::filesystem::temp_directory_path() / ("moe_save_test_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(ckpt_dir / name / "config.json", dir / "config.json");
    moe::io::save_layer(dir / "model.safetensors", layer, c.kind, 1);

    const moe::io::safetensors_file saved(dir / "model.safetensors");
    const auto params = moe::io::checkpoint_parameters(layer, c.kind, 1);
    CHECK(saved.names().size() == params.size() + (moe::correction_bias<float>(layer.router_state()) ? 1 : 0));
    for (const auto& p : params) {
        INFO(p.name);
        REQUIRE(saved.contains(p.name));
        CHECK(saved.info(p.name).shape == source.info(p.name).shape);  // the checkpoint's own names and shapes
    }
    moe::io::load_layer(moe::io::checkpoint(dir), 1, resumed);
    auto got = resumed.parameters();
    const auto want = layer.parameters();
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
        INFO(want[i].name);
        CHECK(got[i].value == want[i].value);
    }
    if (auto* bias = moe::correction_bias<float>(layer.router_state()))
        CHECK(*moe::correction_bias<float>(resumed.router_state()) == *bias);
    std::filesystem::remove_all(dir);
}
}  // namespace

TEST_CASE("save_layer writes a checkpoint that load_layer resumes bitwise, under the family's names",
          "[io][checkpoint][backward]") {
    {
        const auto c = moe::io::checkpoint(ckpt_dir / "mixtral_f32").config();
        moe::mixtral_layer<float> a(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize}),
            b(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        check_save_and_resume("mixtral_f32", a, b);
    }
    {
        const auto c = moe::io::checkpoint(ckpt_dir / "qwen2_moe").config();
        moe::qwen2_moe_layer<float> a(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize}),
            b(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        check_save_and_resume("qwen2_moe", a, b);
    }
    {
        const auto c = moe::io::checkpoint(ckpt_dir / "deepseek_v3").config();
        const moe::routers::sigmoid_topk r{.k = c.top_k, .normalize = c.normalize, .scale = c.scale, .n_group = c.n_group,
                                           .topk_group = c.topk_group};
        moe::deepseek_v3_layer<float> a(moe::io::shape_of(c), r), b(moe::io::shape_of(c), r);
        check_save_and_resume("deepseek_v3", a, b);
    }
}

TEST_CASE("save_layer names an unwritable file and leaves nothing behind", "[io][checkpoint][errors]") {
    const auto c = moe::io::checkpoint(ckpt_dir / "mixtral_f32").config();
    moe::mixtral_layer<float> layer(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
    const std::filesystem::path file = "/nonexistent_dir_for_moe/model.safetensors";
    CHECK_THROWS_AS(moe::io::save_layer(file, layer, c.kind, 1), moe::io_error);
    CHECK(!std::filesystem::exists(file));
}

TEST_CASE("load_layer and checkpoint_parameters of an expert-parallel rank cover only its experts", "[io][checkpoint][parallel]") {
    // Rank 1 of 2 (loading makes no collective call, so no other rank is needed).
    const moe::io::checkpoint ckpt(ckpt_dir / "deepseek_v3");
    const auto& c = ckpt.config();
    const moe::routers::sigmoid_topk router{.k = c.top_k, .normalize = c.normalize, .scale = c.scale,
                                            .n_group = c.n_group, .topk_group = c.topk_group};
    moe::deepseek_v3_layer<float> whole(moe::io::shape_of(c), router),
        part(moe::io::shape_of(c), moe::parallel::placement{.comm = std::make_shared<one_of_ranks>(1, 2)}, router);
    moe::io::load_layer(ckpt, 1, whole);
    moe::io::load_layer(ckpt, 1, part);
    const moe::index half = c.n_experts / 2;  // rank 1 holds the second half
    for (moe::index e = 0; e < c.n_experts; ++e) {
        INFO("expert " << e);
        CHECK(part.owns_expert(e) == (e >= half));
        if (e >= half) {
            CHECK(part.expert_weights(e).in == whole.expert_weights(e).in);
            CHECK(part.expert_weights(e).out == whole.expert_weights(e).out);
        } else {
            CHECK(part.expert_weights(e).in.size() == 0);  // never allocated or read
        }
    }
    CHECK(part.router_weight() == whole.router_weight());
    CHECK(part.shared_weights().in == whole.shared_weights().in);
    const auto names = moe::io::layer_tensor_names::of(c.kind, 1);
    std::vector<std::string> listed, expected{names.router()};
    for (const auto& p : moe::io::checkpoint_parameters(part, c.kind, 1)) listed.push_back(p.name);
    for (moe::index e = half; e < c.n_experts; ++e)
        for (const auto& n : {names.expert_gate(e), names.expert_up(e), names.expert_down(e)}) expected.push_back(n);
    for (const auto& n : {names.shared_gate_proj(), names.shared_up_proj(), names.shared_down_proj()}) expected.push_back(n);
    CHECK(listed == expected);
}

namespace {
// A layer with quantized experts (storage S) loaded from checkpoint case `name` holds ggml's blocks of
// the stored values (quantized here from the float layer `reference`, loaded from the same tensors)
// and matches the PyTorch reference with quantized weights and inputs (hidden_states_<S>_weights).
template <class S, class Quantized, class Float>
void check_quantized_case(const std::string& name, Quantized& layer, Float& reference) {
    INFO("checkpoint case " << name << ", " << S::name << " weights");
    const moe::io::checkpoint ckpt(ckpt_dir / name);
    moe::io::load_layer(ckpt, 1, layer);
    moe::io::load_layer(ckpt, 1, reference);
    const auto same_blocks = [](const auto& q, const moe::aligned_matrix<float>& f) {
        typename S::matrix want(f.rows(), f.cols());
        S::assign(want, 0, f.data(), f.rows());
        bool same = q.bytes() == want.bytes();
        for (moe::index r = 0; r < f.rows(); ++r)
            for (moe::index b = 0; b < q.blocks_per_row(); ++b) {
                const auto got = q.block(r, b), expected = want.block(r, b);
                same = same && std::memcmp(&got, &expected, sizeof got) == 0;
            }
        return same;
    };
    for (moe::index e = 0; e < ckpt.config().n_experts; ++e) {
        CHECK(same_blocks(layer.expert_weights(e).in, reference.expert_weights(e).in));
        CHECK(same_blocks(layer.expert_weights(e).out, reference.expert_weights(e).out));
    }
    if constexpr (Quantized::shared_type::enabled) {
        CHECK(same_blocks(layer.shared_weights().in, reference.shared_weights().in));
        CHECK(same_blocks(layer.shared_weights().out, reference.shared_weights().out));
    }
    const moe::io::safetensors_file expected(ckpt_dir / name / "expected.safetensors");
    const moe::matrix<float> y = golden::forward_ckpt_case(name, layer);
    const auto want = golden::read_matrix(expected, "hidden_states_" + std::string(S::name) + "_weights");
    const auto as_float = golden::read_matrix(expected, "hidden_states");
    const Eigen::Map<const moe::matrix<float>> got(y.data(), want.rows(), want.cols());
    // Float32 sums against exact ones (1-2e-7); the generator keeps every activation's quantization clear
    // of a tie (QUANT_VALUE_MARGIN, QUANT_SCALE_MARGIN): one value quantized differently would move an
    // output by ~1e-3.
    CHECK(golden::relative_error(got, want) <= 1e-6);
    CHECK(golden::relative_error(as_float, want) > 1e-3);  // what quantizing moves: far more
    CHECK(golden::relative_error(layer.logits(), golden::read_matrix(expected, "router_logits")) <= 2e-5);
}

template <class S>
void check_quantized_families() {
    using X = moe::experts::stored_as<moe::experts::swiglu, S>;
    {
        const auto c = moe::io::checkpoint(ckpt_dir / "mixtral_quant").config();
        moe::layer<float, moe::routers::softmax_topk, X> layer(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        moe::mixtral_layer<float> reference(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        check_quantized_case<S>("mixtral_quant", layer, reference);
    }
    {
        const auto c = moe::io::checkpoint(ckpt_dir / "deepseek_v3_quant").config();
        const moe::routers::sigmoid_topk router{.k = c.top_k, .normalize = c.normalize, .scale = c.scale, .n_group = c.n_group,
                                                .topk_group = c.topk_group};
        moe::layer<float, moe::routers::sigmoid_topk, X, moe::shared_experts::ungated<>> layer(moe::io::shape_of(c), router);
        moe::deepseek_v3_layer<float> reference(moe::io::shape_of(c), router);
        check_quantized_case<S>("deepseek_v3_quant", layer, reference);
    }
    for (const char* name : {"qwen3_moe_quant", "olmoe_quant"}) {
        const auto c = moe::io::checkpoint(ckpt_dir / name).config();
        moe::layer<float, moe::routers::softmax_topk, X> layer(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        moe::mixtral_layer<float> reference(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        check_quantized_case<S>(name, layer, reference);
    }
    {
        const auto c = moe::io::checkpoint(ckpt_dir / "qwen2_moe_quant").config();
        moe::layer<float, moe::routers::softmax_topk, X, moe::shared_experts::sigmoid_gated<>> layer(
            moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        moe::qwen2_moe_layer<float> reference(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
        check_quantized_case<S>("qwen2_moe_quant", layer, reference);
    }
}
}  // namespace

TEST_CASE("load_layer quantizes expert weights to q8_0 / q4_0; the layer matches PyTorch's quantized arithmetic",
          "[io][checkpoint][quantized]") {
    SECTION("q8_0") { check_quantized_families<moe::storages::q8_0>(); }
    SECTION("q4_0") { check_quantized_families<moe::storages::q4_0>(); }
}

TEST_CASE("a quantized layer needs rows of a multiple of 32 values; a checkpoint of other sizes is a clear error",
          "[io][checkpoint][quantized][errors]") {
    const moe::io::checkpoint ckpt(ckpt_dir / "mixtral_f32");  // d 32, ff 24
    const auto& c = ckpt.config();
    using layer_type = moe::layer<float, moe::routers::softmax_topk, moe::experts::q8_0_weights<moe::experts::swiglu>>;
    CHECK_THROWS_WITH(layer_type(moe::io::shape_of(c), {.k = c.top_k}),
                      Catch::Contains("d_ff = 24 is not a multiple of 32") && Catch::Contains("q8_0"));
}

TEST_CASE("load_layer names the tensor a quantized storage cannot hold", "[io][checkpoint][quantized][errors]") {
    const moe::io::checkpoint source(ckpt_dir / "mixtral_quant");
    const auto& c = source.config();
    moe::mixtral_layer<float> layer(moe::io::shape_of(c), {.k = c.top_k, .normalize = c.normalize});
    moe::io::load_layer(source, 1, layer);
    layer.expert_weights(2).in(3, 5) = std::numeric_limits<float>::quiet_NaN();  // in the gate rows: w1
    layer.expert_weights(1).out(7, 40) = 1e6f;  // q4_0's scale would be 125000, beyond fp16
    const auto dir = std::filesystem::temp_directory_path() / ("moe_quant_load_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(ckpt_dir / "mixtral_quant" / "config.json", dir / "config.json");
    moe::io::save_layer(dir / "model.safetensors", layer, c.kind, 1);
    const moe::io::checkpoint bad(dir);
    moe::layer<float, moe::routers::softmax_topk, moe::experts::q8_0_weights<moe::experts::swiglu>> q8(moe::io::shape_of(c),
                                                                                                      {.k = c.top_k});
    CHECK_THROWS_WITH(moe::io::load_layer(bad, 1, q8), Catch::Contains("'model.layers.1.block_sparse_moe.experts.2.w1.weight' "
                                                                       "cannot be held as q8_0") &&
                                                           Catch::Contains("only finite values can be quantized"));
    layer.expert_weights(2).in(3, 5) = 0;
    moe::io::save_layer(dir / "model.safetensors", layer, c.kind, 1);
    moe::layer<float, moe::routers::softmax_topk, moe::experts::q4_0_weights<moe::experts::swiglu>> q4(moe::io::shape_of(c),
                                                                                                      {.k = c.top_k});
    CHECK_NOTHROW(moe::io::load_layer(moe::io::checkpoint(dir), 1, q8));  // q8_0's scale is 1e6 / 127
    CHECK_THROWS_WITH(moe::io::load_layer(moe::io::checkpoint(dir), 1, q4),
                      Catch::Contains("'model.layers.1.block_sparse_moe.experts.1.w2.weight' cannot be held as q4_0") &&
                          Catch::Contains("beyond fp16's largest"));
    std::filesystem::remove_all(dir);
}

TEST_CASE("a family's tensor names come from its entry in the family table", "[io][checkpoint]") {
    const auto mixtral = moe::io::layer_tensor_names::of(moe::io::family::mixtral, 3);
    CHECK(mixtral.router() == "model.layers.3.block_sparse_moe.gate.weight");
    CHECK(mixtral.expert_gate(5) == "model.layers.3.block_sparse_moe.experts.5.w1.weight");
    CHECK(mixtral.expert_up(5) == "model.layers.3.block_sparse_moe.experts.5.w3.weight");
    CHECK(mixtral.expert_down(5) == "model.layers.3.block_sparse_moe.experts.5.w2.weight");
    const auto qwen2 = moe::io::layer_tensor_names::of(moe::io::family::qwen2_moe, 0);
    CHECK(qwen2.expert_down(1) == "model.layers.0.mlp.experts.1.down_proj.weight");
    CHECK(qwen2.shared_up_proj() == "model.layers.0.mlp.shared_expert.up_proj.weight");
    CHECK(qwen2.shared_expert_gate() == "model.layers.0.mlp.shared_expert_gate.weight");
    const auto deepseek = moe::io::layer_tensor_names::of(moe::io::family::deepseek_v3, 7);
    CHECK(deepseek.shared_gate_proj() == "model.layers.7.mlp.shared_experts.gate_proj.weight");
    CHECK(deepseek.correction_bias() == "model.layers.7.mlp.gate.e_score_correction_bias");
}
