// The layer's steady state allocates nothing: after a first call has sized its workspace, forward,
// training forward and backward make no heap allocation. This program replaces malloc and its kin
// (every allocation in the process: operator new, Eigen's aligned allocation, the standard library)
// with counting versions over glibc's own, so it is a program of its own and is not built under the
// sanitizers, which replace malloc themselves.
#include <moe/moe.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstddef>

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}

namespace {
std::atomic<long> allocations{0};
}

extern "C" {
void* malloc(std::size_t n) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_malloc(n);
}
void* calloc(std::size_t count, std::size_t n) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_calloc(count, n);
}
void* realloc(void* p, std::size_t n) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_memalign(alignment, n);
}
void* memalign(std::size_t alignment, std::size_t n) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    return __libc_memalign(alignment, n);
}
int posix_memalign(void** p, std::size_t alignment, std::size_t n) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    *p = __libc_memalign(alignment, n);
    return *p != nullptr ? 0 : 12;  // ENOMEM
}
void free(void* p) { __libc_free(p); }
}

namespace {

// Allocations made by f().
template <class F>
long allocations_in(F&& f) {
    const long before = allocations.load();
    f();
    return allocations.load() - before;
}

// Steady-state steps of `layer` on x: a forward, then a training forward and its backward (a forward
// alone for bf16 and quantized weights).
template <class Layer>
void check_steady_state(Layer& layer, moe::index tokens, moe::index threads) {
    CAPTURE(tokens, threads);
    const moe::index d = layer.shape().d_model;
    layer.randomize(3);
    layer.set_threads(threads);
    const moe::matrix<float> x = moe::matrix<float>::Random(tokens, d), grad_y = moe::matrix<float>::Random(tokens, d);
    moe::matrix<float> y(tokens, d), grad_x(tokens, d);
    const auto step = [&] {
        if constexpr (Layer::trainable) {
            layer.set_training(false);
            layer.forward(x, y);
            layer.set_training(true);
            layer.forward(x, y);
            layer.backward(x, grad_y, grad_x);
        } else {  // bf16 or quantized weights: inference only
            layer.forward(x, y);
        }
    };
    step();  // sizes the workspace
    CHECK(allocations_in(step) == 0);
    // The counter counts: a vector of the layer's size is one allocation.
    CHECK(allocations_in([&] { moe::matrix<float> copy = y; (void)copy; }) == 1);
}

}  // namespace

TEST_CASE("forward and backward allocate nothing once the workspace is sized", "[allocation]") {
    using moe::index;
    namespace losses = moe::losses;
    SECTION("Mixtral: softmax top-k, SwiGLU, load balance (Switch and per-token) and z-loss") {
        moe::mixtral_layer<float, losses::load_balance, losses::z_loss> layer({.d_model = 64, .d_ff = 96, .n_experts = 8},
                                                                         {.k = 2}, {}, {}, {{.alpha = 0.1}, {.beta = 0.01}});
        for (const index threads : {1, 2}) check_steady_state(layer, 300, threads);
        moe::mixtral_layer<float, losses::load_balance> per_token({.d_model = 32, .d_ff = 48, .n_experts = 8}, {.k = 2}, {},
                                                                {}, {{.alpha = 0.1, .per_token = true}});
        check_steady_state(per_token, 70, 1);
        // Products past Eigen's 128 KiB stack limit for its GEMM buffers (the router's gradient here).
        moe::mixtral_layer<float, losses::load_balance> wide({.d_model = 512, .d_ff = 64, .n_experts = 8}, {.k = 2}, {}, {},
                                                           {{.alpha = 0.1}});
        check_steady_state(wide, 256, 1);
    }
    SECTION("DeepSeek-V3: sigmoid groups with bias, shared expert, sequence-wise loss") {
        moe::deepseek_v3_layer<float, losses::seq_balance> layer(
            {.d_model = 48, .d_ff = 32, .n_experts = 16, .d_shared = 64},
            {.k = 4, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2}, {}, {}, {{.alpha = 0.01, .seq_len = 10}});
        for (const index threads : {1, 2}) check_steady_state(layer, 200, threads);
    }
    SECTION("Switch: capacity with drops by probability, MLP experts") {
        moe::switch_layer<float, losses::load_balance> layer(
            {.d_model = 32, .d_ff = 64, .n_experts = 8},
            {.inner = {.k = 1}, .capacity_factor = 0.8, .policy = moe::routers::drop_policy::probs}, {}, {}, {{.alpha = 0.1}});
        for (const index threads : {1, 2}) check_steady_state(layer, 150, threads);
    }
    SECTION("AdaMoE: null experts, null-aware balance") {
        moe::adamoe_layer<float, losses::null_balance> layer({.d_model = 32, .d_ff = 40, .n_experts = 6},
                                                            {.k = 2, .nulls = 3}, {}, {}, {{.alpha = 0.1}});
        check_steady_state(layer, 90, 2);
    }
    SECTION("expert choice, Sinkhorn, top-p") {
        moe::expert_choice_layer<float> choice({.d_model = 32, .d_ff = 48, .n_experts = 8}, {.capacity_factor = 2.0});
        check_steady_state(choice, 100, 2);
        moe::sbase_layer<float, losses::z_loss> sinkhorn({.d_model = 32, .d_ff = 48, .n_experts = 8}, {.k = 2}, {}, {},
                                                         {{.beta = 0.01}});
        check_steady_state(sinkhorn, 100, 2);
        moe::layer<float, moe::routers::top_p, moe::experts::geglu> top_p({.d_model = 32, .d_ff = 48, .n_experts = 8},
                                                                          {.threshold = 0.5, .max_k = 3});
        check_steady_state(top_p, 100, 1);
    }
    SECTION("bf16 weights, shared expert") {
        moe::layer<float, moe::routers::softmax_topk, moe::experts::bf16_weights<moe::experts::swiglu>, moe::shared_experts::ungated<>>
            layer({.d_model = 64, .d_ff = 96, .n_experts = 8, .d_shared = 80}, {.k = 2});
        for (const index threads : {1, 2}) check_steady_state(layer, 300, threads);
    }
    SECTION("q8_0 and q4_0 weights, shared expert") {
        moe::layer<float, moe::routers::softmax_topk, moe::experts::q8_0_weights<moe::experts::swiglu>, moe::shared_experts::ungated<>>
            q8({.d_model = 64, .d_ff = 96, .n_experts = 8, .d_shared = 64}, {.k = 2});
        for (const index threads : {1, 2}) check_steady_state(q8, 300, threads);
        moe::layer<float, moe::routers::softmax_topk, moe::experts::q4_0_weights<moe::experts::swiglu>> q4(
            {.d_model = 64, .d_ff = 96, .n_experts = 8}, {.k = 2});
        check_steady_state(q4, 1, 2);
    }
    SECTION("Qwen2-MoE: gated shared expert") {
        moe::qwen2_moe_layer<float> layer({.d_model = 32, .d_ff = 40, .n_experts = 6, .d_shared = 56}, {.k = 2});
        check_steady_state(layer, 129, 2);
    }
}
