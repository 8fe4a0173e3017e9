// moe/compiled.hpp: this suite is linked with moe::compiled and built with MOE_EXTERN_TEMPLATES, so the
// listed instantiations used here come from the compiled unit (a missing one would not link). Each is
// compared with a layer type that is not listed, instantiated header-only in this unit from the same
// code: the outputs must be the same bits.
#include <moe/configurations.hpp>
#include <moe/losses/losses.hpp>
#include <moe/routers/any_router.hpp>

#include <catch2/catch.hpp>

#if !defined(MOE_EXTERN_TEMPLATES)
#error "the suite is built with MOE_EXTERN_TEMPLATES (it links moe::compiled)"
#endif

namespace {

/// Forward of two layers with the same shape, router and weights (same seed) on the same rows.
template <class Compiled, class HeaderOnly, class Router>
void check_same_bits(const moe::layer_shape& shape, const Router& router) {
    Compiled a(shape, router);
    HeaderOnly b(shape, router);
    a.randomize(11);
    b.randomize(11);
    a.set_threads(2);
    b.set_threads(2);
    const moe::matrix<float> x = moe::matrix<float>::Random(37, shape.d_model);
    moe::matrix<float> ya(37, shape.d_model), yb(37, shape.d_model);
    a.forward(x, ya);
    b.forward(x, yb);
    CHECK(ya == yb);
    CHECK(a.logits() == b.logits());
}

}  // namespace

TEST_CASE("the compiled layers of the checkpoint families give the header-only bits", "[compiled]") {
    using zl = moe::losses::z_loss;  // an extra policy makes a type that moe::compiled does not hold
    namespace r = moe::routers;
    namespace se = moe::shared_experts;
    using swiglu = moe::experts::swiglu;
    const r::softmax_topk softmax{.k = 2, .normalize = true};
    check_same_bits<moe::mixtral_layer<float>, moe::mixtral_layer<float, zl>>({.d_model = 32, .d_ff = 48, .n_experts = 4},
                                                                           softmax);
    check_same_bits<moe::qwen2_moe_layer<float>, moe::qwen2_moe_layer<float, zl>>(
        {.d_model = 32, .d_ff = 48, .n_experts = 4, .d_shared = 40}, softmax);
    check_same_bits<moe::deepseek_v3_layer<float>, moe::deepseek_v3_layer<float, zl>>(
        {.d_model = 32, .d_ff = 48, .n_experts = 8, .d_shared = 40},
        r::sigmoid_topk{.k = 2, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2});
    // any_router's routing (compiled) against the router it holds (header-only).
    check_same_bits<moe::layer<float, r::any_router, swiglu, se::none, zl>, moe::layer<float, r::softmax_topk, swiglu, se::none, zl>>(
        {.d_model = 32, .d_ff = 48, .n_experts = 4}, softmax);
}
