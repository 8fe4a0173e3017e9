#include "golden.hpp"

#include <moe/layer.hpp>
#include <moe/testing/gradient_check.hpp>

#include <limits>
#include <type_traits>



TEST_CASE("layer matches the PyTorch reference for every expert type", "[layer]") {
    {
        const golden::layer_case c("geglu");
        moe::layer<float, moe::routers::softmax_topk, moe::experts::geglu> layer(c.shape(), c.router_as<moe::routers::softmax_topk>());
        c.load(layer);
        c.check(layer);
    }
    for (const char* name : {"mlp_relu", "mlp_gelu", "mlp_silu"}) {
        const golden::layer_case c(name);
        const auto act = c.option("activation") == "relu"   ? moe::activation::relu
                         : c.option("activation") == "gelu" ? moe::activation::gelu
                                                            : moe::activation::silu;
        moe::layer<float, moe::routers::softmax_topk, moe::experts::mlp> layer(c.shape(), c.router_as<moe::routers::softmax_topk>(), {act});
        c.load(layer);
        c.check(layer);
    }
    for (const char* name : {"swiglu_topk2", "t1"}) {
        const golden::layer_case c(name);
        moe::mixtral_layer<float> layer(c.shape(), c.router_as<moe::routers::softmax_topk>());
        c.load(layer);
        c.check(layer);
    }
}

TEST_CASE("layer in double precision agrees with the reference more tightly", "[layer]") {
    const golden::layer_case c("swiglu_topk2");
    moe::mixtral_layer<double> layer(c.shape(), c.router_as<moe::routers::softmax_topk>());
    c.load(layer);
    const auto x = golden::read_matrix<double>(c.file, "x");
    moe::matrix<double> y(x.rows(), x.cols());
    layer.forward(x, y);
    // The reference is float64 stored as float32: only that rounding remains.
    CHECK(golden::relative_error(y, golden::read_matrix(c.file, "expected.y")) <= 1e-6);
}

namespace {
moe::deepseek_v3_layer<float> random_deepseek(moe::index threads) {
    moe::deepseek_v3_layer<float> layer({.d_model = 48, .d_ff = 32, .n_experts = 16, .d_shared = 64},
                                        {.k = 4, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2});
    layer.randomize(7);
    layer.set_threads(threads);
    return layer;
}
}  // namespace

TEST_CASE("layer output is bitwise identical across runs and thread counts", "[layer][determinism]") {
    const moe::matrix<float> x = moe::matrix<float>::Random(777, 48);
    auto one = random_deepseek(1);
    auto two = random_deepseek(2);
    moe::matrix<float> y1(777, 48), y2(777, 48), y3(777, 48);
    one.forward(x, y1);
    two.forward(x, y2);
    two.forward(x, y3);
    CHECK(two.threads() == 2);
    CHECK((y1.array() == y2.array()).all());
    CHECK((y2.array() == y3.array()).all());
    CHECK(y1.norm() > 0);
}

namespace {
// y, dL/dx and every parameter's gradient of one training step at `threads` threads, with the tasks
// planned for `planned` threads (0: as many as run them).
template <class Layer, class Scalar = typename Layer::scalar_type>
std::vector<moe::matrix<Scalar>> training_step(Layer& layer, const moe::matrix<Scalar>& x, moe::index threads,
                                               moe::index planned = 0) {
    layer.set_threads(threads);
    layer.plan_for_threads(planned);
    layer.set_training(true);
    const moe::matrix<Scalar> grad_y = moe::matrix<Scalar>::Random(x.rows(), x.cols());
    std::vector<moe::matrix<Scalar>> out{moe::matrix<Scalar>(x.rows(), x.cols()), moe::matrix<Scalar>(x.rows(), x.cols())};
    layer.forward(x, out[0]);
    layer.backward(x, grad_y, out[1]);
    for (const auto& p : layer.parameters()) out.emplace_back(p.grad);
    return out;
}
}  // namespace

TEMPLATE_TEST_CASE("forward and backward are bitwise identical at 1, 2, 3, 7 and 16 threads and for any plan",
                   "[layer][determinism]", float, double) {
    // Widths that are no multiple of a SIMD vector or of a column block; a decoding step, a short batch,
    // a hot expert (all-zero router weights tie every token to expert 0) and a long batch; a gated
    // shared expert, so every kind of task runs.
    const moe::layer_shape shape{.d_model = 100, .d_ff = 150, .n_experts = 8, .d_shared = 120};
    using layer_type = moe::qwen2_moe_layer<TestType>;
    for (const moe::index tokens : {1, 3, 300}) {
        for (const bool hot : {false, true}) {
            layer_type layer(shape, {.k = hot ? 1 : 2, .normalize = true});
            layer.randomize(11);
            if (hot) layer.router_weight().setZero();
            const moe::matrix<TestType> x = moe::matrix<TestType>::Random(tokens, shape.d_model);
            std::srand(3);
            const auto want = training_step(layer, x, 1);
            if (hot) CHECK(layer.statistics().idle_experts == shape.n_experts - 1);
            for (const auto& [threads, planned] :
                 {std::pair<moe::index, moe::index>{2, 0}, {3, 0}, {7, 0}, {16, 0}, {1, 64}, {2, 13}}) {
                std::srand(3);
                const auto got = training_step(layer, x, threads, planned);
                INFO("tokens " << tokens << (hot ? ", hot expert" : "") << ", threads " << threads << ", planned " << planned);
                REQUIRE(got.size() == want.size());
                for (std::size_t i = 0; i < got.size(); ++i) CHECK((got[i].array() == want[i].array()).all());
            }
            CHECK(want[1].norm() > 0);
        }
    }
}

TEST_CASE("the router's products are cut into blocks of tokens and experts without changing a bit", "[layer][determinism]") {
    // 64 experts: a decoding step's logits are cut along the router's rows, a batch's along both; the
    // backward's dL/dW_router and dL/dx terms along their outputs too.
    const moe::layer_shape shape{.d_model = 256, .d_ff = 32, .n_experts = 64};
    moe::mixtral_layer<float> layer(shape, {.k = 2, .normalize = true});
    layer.randomize(5);
    for (const moe::index tokens : {1, 200}) {
        const moe::matrix<float> x = moe::matrix<float>::Random(tokens, shape.d_model);
        std::srand(4);
        const auto want = training_step(layer, x, 1);
        moe::detail::run_trace runs;  // the task times of each pool run of a call planned for 64
        layer.plan_for_threads(64, &runs);
        moe::matrix<float> y(tokens, shape.d_model);
        layer.forward(x, y);
        REQUIRE(runs.runs() > 0);
        CHECK(runs.run(0).size() > 1);  // the logits' blocks
        layer.plan_for_threads(0);
        for (const auto& [threads, planned] : {std::pair<moe::index, moe::index>{1, 64}, {3, 0}, {7, 0}, {16, 0}}) {
            std::srand(4);
            const auto got = training_step(layer, x, threads, planned);
            INFO("tokens " << tokens << ", threads " << threads << ", planned " << planned);
            REQUIRE(got.size() == want.size());
            for (std::size_t i = 0; i < got.size(); ++i) CHECK((got[i].array() == want[i].array()).all());
        }
        CHECK(layer.grad_router_weight().norm() > 0);
    }
    // An empty batch (an expert-parallel rank may have no tokens): nothing to cut, dL/dW_router zero.
    const auto empty = training_step(layer, moe::matrix<float>(0, shape.d_model), 7, 64);
    CHECK(empty[1].rows() == 0);
    CHECK(layer.grad_router_weight().rows() == shape.n_experts);
    CHECK((layer.grad_router_weight().array() == 0).all());
}

TEST_CASE("decoding token after token gives each token's output as a fresh layer does", "[layer][determinism]") {
    // One token a call: the plan made for the first token's experts is kept for the next ones, whose
    // experts differ and whose sizes do not; each output must be the bits a layer that never saw the
    // earlier tokens gives.
    const moe::matrix<float> tokens = moe::matrix<float>::Random(12, 48);
    for (const moe::index threads : {1, 3}) {
        auto decoding = random_deepseek(threads);
        decoding.plan_for_threads(64);
        moe::index changed = 0;
        std::vector<std::int32_t> previous;
        for (moe::index t = 0; t < tokens.rows(); ++t) {
            moe::matrix<float> y(1, 48), fresh_y(1, 48);
            decoding.forward(tokens.row(t), y);
            const auto& ids = decoding.last_routing().expert_ids;
            changed += t > 0 && std::vector<std::int32_t>(ids.begin(), ids.end()) != previous;
            previous.assign(ids.begin(), ids.end());
            auto fresh = random_deepseek(threads);
            fresh.plan_for_threads(64);
            fresh.forward(tokens.row(t), fresh_y);
            CHECK((y.array() == fresh_y.array()).all());
        }
        CHECK(changed > 0);  // the tokens went to other experts
    }
}

TEST_CASE("layer handles an empty batch and reuses its workspace across batch sizes", "[layer]") {
    auto layer = random_deepseek(2);
    moe::matrix<float> x0(0, 48), y0(0, 48);
    layer.forward(x0, y0);
    CHECK(layer.statistics().assignments == 0);
    CHECK(layer.logits().rows() == 0);
    const moe::matrix<float> big = moe::matrix<float>::Random(100, 48);
    moe::matrix<float> ybig(100, 48), ysmall(3, 48);
    layer.forward(big, ybig);
    layer.forward(big.topRows(3), ysmall);
    // A token's output does not depend on the others for a batch-independent router.
    CHECK((ysmall.array() - ybig.topRows(3).array()).abs().maxCoeff() <= 1e-6f);
}

TEST_CASE("layer rejects bad shapes and sizes with typed errors", "[layer][errors]") {
    auto layer = random_deepseek(1);
    moe::matrix<float> x(4, 47), y(4, 48);
    CHECK_THROWS_WITH(layer.forward(x, y), Catch::Contains("[4, 47]"));
    moe::matrix<float> x2(4, 48), y2(5, 48);
    CHECK_THROWS_AS(layer.forward(x2, y2), moe::shape_error);
    CHECK_THROWS_WITH((moe::mixtral_layer<float>({.d_model = 0, .d_ff = 4, .n_experts = 2})), Catch::Contains("d_model = 0"));
    CHECK_THROWS_WITH((moe::mixtral_layer<float>({.d_model = 4, .d_ff = 4, .n_experts = 2}, {.k = 3})),
                      Catch::Contains("k = 3"));
    CHECK_THROWS_WITH((moe::mixtral_layer<float>({.d_model = 4, .d_ff = 4, .n_experts = 2, .d_shared = 8})),
                      Catch::Contains("no shared expert"));
    CHECK_THROWS_WITH((moe::deepseek_v3_layer<float>({.d_model = 4, .d_ff = 4, .n_experts = 4})),
                      Catch::Contains("d_shared = 0"));
    CHECK_THROWS_AS(layer.set_threads(0), moe::value_error);
    CHECK_THROWS_WITH(layer.set_threads(5000), Catch::Contains("threads = 5000"));
    // Weights replaced with the wrong shape are caught before any kernel reads them.
    moe::matrix<float> ok_x(4, 48), ok_y(4, 48);
    ok_x.setOnes();
    layer.expert_weights(3).in = moe::matrix<float>::Random(65, 48);
    CHECK_THROWS_WITH(layer.forward(ok_x, ok_y), Catch::Contains("expert 3's input weight is [65, 48], expected [64, 48]"));
    layer.expert_weights(3).in = moe::matrix<float>::Random(64, 48);
    layer.router_state().bias = moe::vector<float>::Zero(3);
    CHECK_THROWS_WITH(layer.forward(ok_x, ok_y), Catch::Contains("the correction bias is [3, 1], expected [16, 1]"));
}

TEST_CASE("layer counts active FLOPs of the experts that ran", "[layer]") {
    moe::mixtral_layer<float> layer({.d_model = 8, .d_ff = 16, .n_experts = 4}, {.k = 2});
    layer.randomize(1);
    const moe::matrix<float> x = moe::matrix<float>::Random(10, 8);
    moe::matrix<float> y(10, 8);
    layer.forward(x, y);
    // 20 rows, each 2*d*(2*ff) for the fused gate/up projection and 2*d*ff for down.
    CHECK(layer.active_flops() == 20.0 * (2 * 8 * 32 + 2 * 8 * 16));
}

TEST_CASE("layer backward agrees with finite differences for every expert type, shared experts and L1-L4",
          "[layer][backward]") {
    using namespace moe;
    const matrix<double> x = matrix<double>::Random(13, 6);
    const layer_shape small{.d_model = 6, .d_ff = 5, .n_experts = 4};
    const auto check = [&](auto& layer, std::uint64_t seed) {
        layer.randomize(seed);
        const auto rep = testing::layer_gradient_check(layer, x, seed);
        INFO(rep.str());
        CHECK(rep.ok());
    };
    {
        layer<double, routers::softmax_topk, experts::swiglu, shared_experts::none, losses::load_balance, losses::z_loss>
            l(small, {.k = 2, .normalize = true}, {}, {}, {{.alpha = 0.3}, {.beta = 0.2}});
        check(l, 1);
    }
    {
        layer<double, routers::softmax_topk, experts::geglu> l(small, {.k = 2, .normalize = false, .scale = 1.5});
        check(l, 2);
    }
    for (auto act : {activation::relu, activation::gelu, activation::silu}) {
        layer<double, routers::softmax_topk, experts::mlp> l(small, {.k = 1}, {act});
        check(l, 3);
    }
    {
        layer<double, routers::sigmoid_topk, experts::swiglu, shared_experts::sigmoid_gated<>> l(
            {.d_model = 6, .d_ff = 5, .n_experts = 8, .d_shared = 7},
            {.k = 3, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2});
        check(l, 4);
    }
    {
        layer<double, routers::sigmoid_topk, experts::swiglu, shared_experts::ungated<>, losses::load_balance> l(
            {.d_model = 6, .d_ff = 5, .n_experts = 4, .d_shared = 7}, {.k = 2, .normalize = false, .n_group = 1},
            {}, {}, {{.alpha = 0.5, .per_token = true}});
        check(l, 5);
    }
    {
        layer<double, routers::sigmoid_topk, experts::swiglu, shared_experts::none, losses::seq_balance> l(
            {.d_model = 6, .d_ff = 5, .n_experts = 6}, {.k = 2, .normalize = true, .n_group = 1}, {}, {},
            {{.alpha = 0.7, .seq_len = 13}});
        check(l, 6);
    }
    {
        layer<double, routers::null_experts, experts::swiglu, shared_experts::none, losses::null_balance, losses::seq_balance>
            l(small, {.k = 2, .nulls = 2}, {}, {}, {{.alpha = 0.6}, {.alpha = 0.5}});
        check(l, 7);
    }
}

TEST_CASE("layer backward refuses what it cannot differentiate, with typed errors", "[layer][backward][errors]") {
    using namespace moe;
    layer<double, routers::softmax_topk, experts::swiglu, shared_experts::none, losses::seq_balance> l(
        {.d_model = 6, .d_ff = 5, .n_experts = 4}, {.k = 2}, {}, {}, {{.seq_len = 4}});
    l.randomize(1);
    const matrix<double> x = matrix<double>::Random(8, 6), g = matrix<double>::Random(8, 6);
    matrix<double> y(8, 6), gx(8, 6);
    l.forward(x, y);
    CHECK_THROWS_WITH(l.backward(x, g, gx), Catch::Contains("set_training(true)"));  // inference forward
    l.set_training(true);
    l.forward(x, y);
    matrix<double> short_x = x.topRows(4), short_gx(4, 6);
    CHECK_THROWS_AS(l.backward(short_x, g.topRows(4), short_gx), shape_error);
    matrix<double> in_place = g;
    CHECK_THROWS_WITH(l.backward(x, in_place, in_place), Catch::Contains("share memory"));
    l.backward(x, g, gx);
    CHECK_THROWS_AS(l.backward(x, g, gx), error);  // one backward per forward
    // A forward that fails (6 tokens are not whole sequences of 4) leaves nothing to differentiate.
    l.forward(x, y);
    const matrix<double> six = x.topRows(6);
    matrix<double> y6(6, 6), gx6(6, 6);
    CHECK_THROWS_AS(l.forward(six, y6), shape_error);
    CHECK_THROWS_WITH(l.backward(x, g, gx), Catch::Contains("no training forward"));
}

TEST_CASE("a layer with bf16 weights is the float layer of the rounded weights, up to bf16 inputs", "[layer][bf16]") {
    using bf16_layer = moe::layer<float, moe::routers::sigmoid_topk, moe::experts::bf16_weights<moe::experts::swiglu>,
                                  moe::shared_experts::ungated<>>;
    STATIC_REQUIRE(std::is_same_v<bf16_layer::storage_type, moe::storages::bfloat16>);
    STATIC_REQUIRE_FALSE(bf16_layer::trainable);
    STATIC_REQUIRE(moe::deepseek_v3_layer<float>::trainable);
    const moe::layer_shape shape{.d_model = 48, .d_ff = 40, .n_experts = 16, .d_shared = 64};
    const moe::routers::sigmoid_topk router{.k = 4, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2};
    bf16_layer one(shape, router), two(shape, router);
    moe::deepseek_v3_layer<float> reference(shape, router);
    one.randomize(5);
    two.randomize(5);
    reference.randomize(5);  // the same draws, as float
    // randomize rounds the float draws to bf16; the float layer gets those values.
    CHECK(one.expert_weights(3).in == reference.expert_weights(3).in.cast<moe::bf16>());
    for (moe::index e = 0; e < shape.n_experts; ++e) {
        reference.expert_weights(e).in = one.expert_weights(e).in.cast<float>();
        reference.expert_weights(e).out = one.expert_weights(e).out.cast<float>();
    }
    reference.shared_weights().in = one.shared_weights().in.cast<float>();
    reference.shared_weights().out = one.shared_weights().out.cast<float>();
    two.set_threads(2);
    const moe::matrix<float> x = moe::matrix<float>::Random(300, 48);
    moe::matrix<float> y1(300, 48), y2(300, 48), want(300, 48);
    one.forward(x, y1);
    two.forward(x, y2);
    reference.forward(x, want);
    CHECK((y1.array() == y2.array()).all());  // bitwise at 1 and 2 threads
    CHECK((one.logits().array() == reference.logits().array()).all());  // the router stays float
    // Rounding the projection inputs to bf16 (relative 2^-9 each) moves the output by about that much.
    const double error = (y1 - want).norm() / want.norm();
    CHECK(error < 1e-2);
    CHECK(error > 1e-4);
}

TEST_CASE("a layer with quantized weights: the same bits at any thread count and plan, its size, its errors",
          "[layer][quantized]") {
    using q4_layer = moe::layer<float, moe::routers::sigmoid_topk, moe::experts::q4_0_weights<moe::experts::swiglu>,
                                moe::shared_experts::ungated<>>;
    STATIC_REQUIRE(std::is_same_v<q4_layer::storage_type, moe::storages::q4_0>);
    STATIC_REQUIRE_FALSE(q4_layer::trainable);
    const moe::layer_shape shape{.d_model = 64, .d_ff = 96, .n_experts = 16, .d_shared = 64};
    const moe::routers::sigmoid_topk router{.k = 4, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2};
    q4_layer one(shape, router), two(shape, router);
    one.randomize(5);
    two.randomize(5);
    // q4_0 holds 18 bytes per 32 weights (0.14 of float32's 128), and here 32 bytes of padding per 16 rows
    // of the routed experts' down projections (d_ff = 96: 3 blocks a row, an odd number; quantized_matrix).
    moe::deepseek_v3_layer<float> as_float(shape, router);
    const double padding = 32.0 * shape.n_experts * (shape.d_model / 16);
    CHECK(static_cast<double>(one.expert_weight_bytes()) == static_cast<double>(as_float.expert_weight_bytes()) * 18 / 128 + padding);
    for (const moe::index tokens : {1, 3, 300}) {
        CAPTURE(tokens);
        const moe::matrix<float> x = moe::matrix<float>::Random(tokens, shape.d_model);
        moe::matrix<float> y1(tokens, shape.d_model), y2(tokens, shape.d_model);
        one.set_threads(1);
        one.forward(x, y1);
        for (const moe::index threads : {2, 3}) {
            two.set_threads(threads);
            for (const moe::index plan : {0, 16, 64}) {  // decode steps cut along the weight rows
                two.plan_for_threads(plan);
                two.forward(x, y2);
                CHECK((y1.array() == y2.array()).all());
            }
        }
    }
    SECTION("a token with a value that is not finite gets NaN outputs; the others are unchanged") {
        moe::matrix<float> x = moe::matrix<float>::Random(5, shape.d_model);
        moe::matrix<float> y(5, shape.d_model), clean(5, shape.d_model);
        one.forward(x, clean);
        x(2, 7) = std::numeric_limits<float>::infinity();
        one.forward(x, y);
        CHECK(y.row(2).array().isNaN().all());
        for (const moe::index t : {0, 1, 3, 4}) CHECK((y.row(t).array() == clean.row(t).array()).all());
    }
    SECTION("sizes that are not multiples of 32 are a typed error naming the size") {
        CHECK_THROWS_WITH(q4_layer({.d_model = 48, .d_ff = 96, .n_experts = 16, .d_shared = 64}, router),
                          Catch::Contains("d_model = 48 is not a multiple of 32") && Catch::Contains("q4_0"));
        CHECK_THROWS_AS(q4_layer({.d_model = 64, .d_ff = 96, .n_experts = 16, .d_shared = 80}, router), moe::shape_error);
    }
}
