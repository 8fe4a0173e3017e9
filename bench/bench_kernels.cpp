// The expert kernels on the products of the standard shapes, once per instruction-set family this CPU
// runs (`kernel/<family>/...`), each next to the family's FMA peak (`fma_peak/<family>`, the limit)
// and to OpenBLAS's sgemm of the same product (`openblas/...`, one thread; OPENBLAS_CORETYPE=Haswell
// makes it use its AVX2 kernels, for the comparison with `kernel/avx2`): kernels::linear (x W^T, the
// forward projections, on float, bf16 and quantized q8_0 / q4_0 weights) and kernels::multiply (the
// backward's dL/da = dout W_out, dL/dx = dh W_in and the weight gradients dout^T a, dh^T x). Rows are
// those of one expert at the mixtral shape (T k / E = 64) and of the largest task (256); the forward
// projections also for one row (decoding). Counter: GFLOP/s.
#include <moe/kernels/isa.hpp>
#include <moe/kernels/linear.hpp>
#include <moe/kernels/multiply.hpp>
#include <moe/kernels/quantized.hpp>

#include <benchmark/benchmark.h>
#include <cblas.h>

#include <string>
#include <vector>

namespace {

using moe::index;
using moe::matrix;
using moe::kernels::isa;
// Operands on cache-line boundaries, as the layer holds its weights.
using aligned = moe::aligned_matrix<float>;

void set_rate(benchmark::State& state, double flops) {
    state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Runs the kernels on `family` for one benchmark (the process-wide setting, restored after).
struct on_family {
    isa before = moe::kernels::active_isa();
    explicit on_family(isa family) { moe::kernels::set_active_isa(family); }
    ~on_family() { moe::kernels::set_active_isa(before); }
};

// The family's fused multiply-add peak on one core: 12 independent chains of vector FMAs.
void fma_peak(benchmark::State& state, isa family) {
    const on_family scope(family);
    const index rounds = 1 << 20;
    index width = 0;
    for (auto _ : state) {
        float sum = 0;
        moe::kernels::detail::with_products<float>([&]<class P>() {
            sum = P::template peak<float>(rounds);
            width = P::template width<float>;
        });
        benchmark::DoNotOptimize(sum);
    }
    set_rate(state, 2.0 * 12 * static_cast<double>(width) * static_cast<double>(rounds));
}

// The engines of a product: one of the families' kernels, or OpenBLAS.
struct engine {
    bool blas;
    isa family;
};

// c (n x m) = a b with b (k x m) row-major and a (n x k) as stored or transposed from (k x n); `add`
// accumulates, as the weight gradients do.
void multiply(benchmark::State& state, engine how, index n, index m, index k, bool transposed, bool add) {
    const on_family scope(how.family);
    const aligned a = transposed ? matrix<float>::Random(k, n) : matrix<float>::Random(n, k);
    const aligned b = matrix<float>::Random(k, m);
    aligned c(n, m);
    const moe::kernels::strided<float> view = transposed ? moe::kernels::strided<float>{a.data(), 1, n}
                                                         : moe::kernels::strided<float>{a.data(), k, 1};
    for (auto _ : state) {
        if (how.blas)  // row-major a (n x k, or its transpose stored k x n) times b (k x m)
            cblas_sgemm(CblasRowMajor, transposed ? CblasTrans : CblasNoTrans, CblasNoTrans, static_cast<int>(n),
                        static_cast<int>(m), static_cast<int>(k), 1.0f, a.data(), static_cast<int>(transposed ? n : k),
                        b.data(), static_cast<int>(m), add ? 1.0f : 0.0f, c.data(), static_cast<int>(m));
        else
            moe::kernels::multiply(view, b.data(), m, c.data(), m, n, m, k, add);
        benchmark::DoNotOptimize(c.data());
        benchmark::ClobberMemory();
    }
    set_rate(state, 2.0 * static_cast<double>(n * m * k));
}

// The storage of the weights (and of x) in a `linear` benchmark.
enum class storage { f32, bf16, q8_0, q4_0 };
constexpr const char* storage_names[] = {"linear", "linear_bf16", "linear_q8_0", "linear_q4_0"};

template <class Block>
moe::quantized_matrix<Block> quantized(const aligned& m) {
    moe::quantized_matrix<Block> out(m.rows(), m.cols());
    out.assign(0, m.data(), m.rows());
    return out;
}

// z (n x m) = x (n x d) W^T, W (m x d); bf16: x and W bf16, the sums float32; q8_0 / q4_0: W in that
// format, x in q8_0 (converted before the timing, as bf16's x is); not OpenBLAS. Counters: GFLOP/s,
// and GB/s of weights read (their bytes in the storage, once per call).
void linear(benchmark::State& state, engine how, storage weights, index n, index m, index d) {
    const on_family scope(how.family);
    const aligned x = matrix<float>::Random(n, d), w = matrix<float>::Random(m, d);
    // Only the operands of this storage (the Mixtral-8x7B-size case holds 58 M weights).
    const bool is_bf16 = weights == storage::bf16, quantized_x = weights == storage::q8_0 || weights == storage::q4_0;
    const moe::aligned_matrix<moe::bf16> x16 = is_bf16 ? x.cast<moe::bf16>() : moe::aligned_matrix<moe::bf16>(),
                                         w16 = is_bf16 ? w.cast<moe::bf16>() : moe::aligned_matrix<moe::bf16>();
    const index blocks = d / moe::quant_block;
    std::vector<moe::q8_0_input> x8(quantized_x ? static_cast<std::size_t>(n * blocks) : 0);
    if (quantized_x) moe::kernels::quantize_input(x.data(), n * d, x8.data());
    const auto w8 = weights == storage::q8_0 ? quantized<moe::q8_0_block>(w) : moe::quantized_matrix<moe::q8_0_block>();
    const auto w4 = weights == storage::q4_0 ? quantized<moe::q4_0_block>(w) : moe::quantized_matrix<moe::q4_0_block>();
    aligned z(n, m);
    for (auto _ : state) {
        if (how.blas)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(m),
                        static_cast<int>(d), 1.0f, x.data(), static_cast<int>(d), w.data(), static_cast<int>(d), 0.0f,
                        z.data(), static_cast<int>(m));
        else if (weights == storage::bf16)
            moe::kernels::linear(x16.data(), d, w16.data(), d, z.data(), m, n, m, d);
        else if (weights == storage::q8_0)
            moe::kernels::linear(x8.data(), blocks, w8, 0, m, z.data(), m, n);
        else if (weights == storage::q4_0)
            moe::kernels::linear(x8.data(), blocks, w4, 0, m, z.data(), m, n);
        else
            moe::kernels::linear(x.data(), d, w.data(), d, z.data(), m, n, m, d);
        benchmark::DoNotOptimize(z.data());
        benchmark::ClobberMemory();
    }
    set_rate(state, 2.0 * static_cast<double>(n * m * d));
    const double bytes[] = {4.0 * d, 2.0 * d, static_cast<double>(blocks * sizeof(moe::q8_0_block)),
                            static_cast<double>(blocks * sizeof(moe::q4_0_block))};
    state.counters["GB/s"] = benchmark::Counter(bytes[static_cast<int>(weights)] * static_cast<double>(m) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

// The products of one engine (`who` names it), at the mixtral shape.
void register_products(const std::string& who, engine how) {
    const index d = 1024, ff = 2816;  // mixtral
    for (const index rows : {1, 64, 256}) {
        const std::string r = "/rows:" + std::to_string(rows);
        for (const storage weights : {storage::f32, storage::bf16, storage::q8_0, storage::q4_0}) {
            if (weights != storage::f32 && how.blas) continue;
            const std::string name = who + storage_names[static_cast<int>(weights)];
            benchmark::RegisterBenchmark((name + "/in_projection" + r).c_str(), linear, how, weights, rows, 2 * ff, d)
                ->Unit(benchmark::kMillisecond);
            benchmark::RegisterBenchmark((name + "/out_projection" + r).c_str(), linear, how, weights, rows, d, ff)
                ->Unit(benchmark::kMillisecond);
        }
        if (rows == 1) continue;  // the backward's products: training shapes only
        benchmark::RegisterBenchmark((who + "multiply/grad_activation" + r).c_str(), multiply, how, rows, ff, d, false, false)
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark((who + "multiply/grad_input" + r).c_str(), multiply, how, rows, d, 2 * ff, false, false)
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark((who + "multiply/grad_out_weight" + r).c_str(), multiply, how, d, ff, rows, true, true)
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark((who + "multiply/grad_in_weight" + r).c_str(), multiply, how, 2 * ff, d, rows, true, true)
            ->Unit(benchmark::kMillisecond);
    }
    // Mixtral-8x7B's size (d 4096, ff 14336): the down projection's rows of 56 KiB, which `linear`
    // sums in chunks (a prefill of about 1000 tokens gives an expert 256 rows).
    const std::string name = who + "linear/out_projection_8x7b/rows:256";
    benchmark::RegisterBenchmark(name.c_str(), linear, how, storage::f32, 256, 4096, 14336)->Unit(benchmark::kMillisecond);
}

const bool registered = [] {
    openblas_set_num_threads(1);
    // OpenBLAS picks its kernels by CPU model, and one it does not know gets old ones (0.3.21 ran SSE3
    // kernels on an Emerald Rapids Xeon at a fifth of its AVX-512 ones): say which ran.
    benchmark::AddCustomContext("openblas_kernels", openblas_get_corename());
    benchmark::AddCustomContext("moe_best_isa", std::string(moe::kernels::isa_name(moe::kernels::best_isa())));
    for (const isa family : moe::kernels::all_isas) {
        if (!moe::kernels::isa_supported(family)) continue;
        const std::string name(moe::kernels::isa_name(family));
        benchmark::RegisterBenchmark(("fma_peak/" + name).c_str(), fma_peak, family)->Unit(benchmark::kMillisecond);
        register_products("kernel/" + name + "/", engine{false, family});
    }
    register_products("openblas/", engine{true, moe::kernels::best_isa()});
    return true;
}();

}  // namespace
