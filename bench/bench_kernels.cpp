// The expert kernels on the products of the standard shapes, each next to Eigen's GEMM of the same
// product: kernels::linear (x W^T, the forward projections) and kernels::multiply (the backward's
// dL/da = dout W_out, dL/dx = dh W_in and the weight gradients dout^T a, dh^T x). Rows are those of one
// expert at the mixtral shape (T k / E = 64) and of the largest task (256); the forward projections also
// for one row (decoding) and on bf16 (`kernel_bf16/`). Counter: GFLOP/s.
#include <moe/kernels/linear.hpp>
#include <moe/kernels/multiply.hpp>

#include <benchmark/benchmark.h>

#include <string>
#include <utility>

namespace {

using moe::index;
using moe::matrix;

void set_rate(benchmark::State& state, double flops) {
    state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// c (n x m) = a b with b (k x m) row-major and a (n x k) as stored or transposed from (k x n); `add`
// accumulates, as the weight gradients do.
void multiply(benchmark::State& state, index n, index m, index k, bool transposed, bool add, bool eigen) {
    const matrix<float> a = transposed ? matrix<float>::Random(k, n) : matrix<float>::Random(n, k);
    const matrix<float> b = matrix<float>::Random(k, m);
    matrix<float> c = matrix<float>::Zero(n, m);
    const moe::kernels::strided<float> view = transposed ? moe::kernels::strided<float>{a.data(), 1, n}
                                                         : moe::kernels::strided<float>{a.data(), k, 1};
    for (auto _ : state) {
        if (!eigen)
            moe::kernels::multiply(view, b.data(), m, c.data(), m, n, m, k, add);
        else if (transposed && add)
            c.noalias() += a.transpose() * b;
        else if (transposed)
            c.noalias() = a.transpose() * b;
        else if (add)
            c.noalias() += a * b;
        else
            c.noalias() = a * b;
        benchmark::DoNotOptimize(c.data());
        benchmark::ClobberMemory();
    }
    set_rate(state, 2.0 * static_cast<double>(n * m * k));
}

// The engines of the forward projections.
enum class engine { kernel, kernel_bf16, eigen };

// z (n x m) = x (n x d) W^T, W (m x d), by `how` (bf16: x and W bf16, the sums float32).
void linear(benchmark::State& state, index n, index m, index d, engine how) {
    const matrix<float> x = matrix<float>::Random(n, d), w = matrix<float>::Random(m, d);
    const matrix<moe::bf16> x16 = x.cast<moe::bf16>(), w16 = w.cast<moe::bf16>();
    matrix<float> z(n, m);
    for (auto _ : state) {
        if (how == engine::eigen)
            z.noalias() = x * w.transpose();
        else if (how == engine::kernel_bf16)
            moe::kernels::linear(x16.data(), d, w16.data(), d, z.data(), m, n, m, d);
        else
            moe::kernels::linear(x.data(), d, w.data(), d, z.data(), m, n, m, d);
        benchmark::DoNotOptimize(z.data());
        benchmark::ClobberMemory();
    }
    set_rate(state, 2.0 * static_cast<double>(n * m * d));
}

const bool registered = [] {
    const index d = 1024, ff = 2816;  // mixtral
    for (const index rows : {1, 64, 256}) {
        const std::string r = "/rows:" + std::to_string(rows);
        for (const auto& [how, who] : {std::pair{engine::kernel, "kernel/"}, std::pair{engine::kernel_bf16, "kernel_bf16/"},
                                       std::pair{engine::eigen, "eigen/"}}) {
            if (rows == 1 && how == engine::eigen) continue;
            benchmark::RegisterBenchmark((who + std::string("linear/in_projection") + r).c_str(), linear, rows, 2 * ff, d, how)
                ->Unit(benchmark::kMillisecond);
            benchmark::RegisterBenchmark((who + std::string("linear/out_projection") + r).c_str(), linear, rows, d, ff, how)
                ->Unit(benchmark::kMillisecond);
        }
        if (rows == 1) continue;  // the backward's products: training shapes only
        for (const bool eigen : {false, true}) {
            const std::string who = eigen ? "eigen/" : "kernel/";
            benchmark::RegisterBenchmark((who + "multiply/grad_activation" + r).c_str(), multiply, rows, ff, d, false, false,
                                         eigen)->Unit(benchmark::kMillisecond);
            benchmark::RegisterBenchmark((who + "multiply/grad_input" + r).c_str(), multiply, rows, d, 2 * ff, false, false,
                                         eigen)->Unit(benchmark::kMillisecond);
            benchmark::RegisterBenchmark((who + "multiply/grad_out_weight" + r).c_str(), multiply, d, ff, rows, true, true,
                                         eigen)->Unit(benchmark::kMillisecond);
            benchmark::RegisterBenchmark((who + "multiply/grad_in_weight" + r).c_str(), multiply, 2 * ff, d, rows, true, true,
                                         eigen)->Unit(benchmark::kMillisecond);
        }
    }
    return true;
}();

}  // namespace
