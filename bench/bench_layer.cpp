// Layer forward and backward on the standard shapes, next to one dense Eigen FFN doing the same active
// FLOPs. Counters: GFLOP/s on active FLOPs (the expert projections that ran; backward counts twice the
// forward's, its gradients for the inputs and for the weights); for the forward also the rate at which
// the active experts' weights stream ("weights GB/s", the measure for decoding), next to the memory
// read bandwidth measured in the same run (`memory_read`). `layer_forward_bf16/*`, `layer_forward_q8_0/*`
// and `layer_forward_q4_0/*` are the same layer with its expert weights held as bf16, q8_0 or q4_0
// (experts/storage.hpp), to set against `layer_forward/*`.
// `task_list_efficiency/*` prints what the task lists would do on 1 to 64 cores (see run_efficiency);
// `plan_tasks/*` times the planning of one stage's tasks for 16 and 64 threads.
#include <moe/detail/expert_schedule.hpp>
#include <moe/detail/thread_pool.hpp>
#include <moe/moe.hpp>

#include <benchmark/benchmark.h>
#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

namespace {

struct shape {
    const char* name;
    moe::index tokens, d, ff, experts, k, shared_ff;
    bool hot = false;  // every token on expert 0 (all-zero router weights tie every logit)
};

// The standard shapes (float32). decode_* use the mixtral weights; decode_4096_* those of
// Mixtral-8x7B's size (one expert's weights, 704 MB, far beyond any cache).
constexpr shape shapes[] = {
    {"small", 512, 512, 1024, 8, 2, 0},          {"mixtral", 256, 1024, 2816, 8, 2, 0},
    {"fine", 512, 1024, 512, 64, 8, 0},          {"fine_shared", 512, 1024, 512, 64, 8, 1024},
    {"hot", 256, 1024, 2816, 8, 1, 0, true},     {"decode_t1", 1, 1024, 2816, 8, 2, 0},
    {"decode_k1", 1, 1024, 2816, 8, 1, 0},       {"decode_t8", 8, 1024, 2816, 8, 2, 0},
    {"decode_4096_k1", 1, 4096, 14336, 8, 1, 0}, {"decode_4096_k2", 1, 4096, 14336, 8, 2, 0},
};

// Fills the layer's weights: random draws, or (for the largest shapes, where drawing 1.4 G values
// would take a minute) a random router and constant experts, which run at the same speed.
template <class Layer>
void fill(Layer& layer, const shape& s) {
    if (s.d * s.ff < 16 * 1024 * 1024) {
        layer.randomize(1);
    } else {
        layer.router_weight() = moe::matrix<float>::Random(s.experts, s.d);
        using storage = typename Layer::storage_type;
        for (moe::index e = 0; e < s.experts; ++e)
            for (auto* m : {&layer.expert_weights(e).in, &layer.expert_weights(e).out}) {
                const std::vector<float> row(static_cast<std::size_t>(m->cols()), 0.01f);
                for (moe::index r = 0; r < m->rows(); ++r) storage::assign(*m, r, row.data(), 1);
            }
    }
    if (s.hot) layer.router_weight().setZero();
}

template <class Layer>
void run_layer(benchmark::State& state, Layer& layer, const shape& s) {
    fill(layer, s);
    layer.set_threads(state.range(0));
    const moe::matrix<float> x = moe::matrix<float>::Random(s.tokens, s.d);
    moe::matrix<float> y(s.tokens, s.d);
    layer.forward(x, y);
    for (auto _ : state) {
        layer.forward(x, y);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    state.counters["GFLOP/s"] = benchmark::Counter(layer.active_flops() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    // Decoding reads each active expert's weights once per call: the rate at which they stream, to set
    // against `memory_read`.
    const moe::routing<float>& r = layer.last_routing();
    double active = 0;
    for (moe::index e = 0; e < r.experts; ++e)
        active += r.expert_offsets[static_cast<std::size_t>(e) + 1] > r.expert_offsets[static_cast<std::size_t>(e)];
    using storage = typename Layer::storage_type;
    const auto& w = layer.expert_weights(0);
    const double weight_bytes = active * static_cast<double>(storage::bytes(w.in) + storage::bytes(w.out));
    state.counters["weights GB/s"] = benchmark::Counter(weight_bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// The backward alone: each iteration runs a training forward (not timed), then the backward.
template <class Layer>
void run_backward(benchmark::State& state, Layer& layer, const shape& s) {
    fill(layer, s);
    layer.set_threads(state.range(0));
    layer.set_training(true);
    const moe::matrix<float> x = moe::matrix<float>::Random(s.tokens, s.d);
    const moe::matrix<float> grad_y = moe::matrix<float>::Random(s.tokens, s.d);
    moe::matrix<float> y(s.tokens, s.d), grad_x(s.tokens, s.d);
    for (auto _ : state) {
        state.PauseTiming();
        layer.forward(x, y);
        state.ResumeTiming();
        layer.backward(x, grad_y, grad_x);
        benchmark::DoNotOptimize(grad_x.data());
        benchmark::ClobberMemory();
    }
    state.counters["GFLOP/s"] =
        benchmark::Counter(2 * layer.active_flops() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Runs `f(state, layer, s)` on the layer of shape `s` with SwiGLU experts `Expert` (float or bf16
// weights): Mixtral-like, or with an ungated shared expert.
template <class Expert = moe::experts::swiglu, class F>
void with_layer(benchmark::State& state, const shape& s, F&& f) {
    const moe::routers::softmax_topk router{.k = s.k, .normalize = true};
    if (s.shared_ff > 0) {
        moe::layer<float, moe::routers::softmax_topk, Expert, moe::shared_experts::ungated<>> layer({s.d, s.ff, s.experts, s.shared_ff},
                                                                                                 router);
        f(state, layer, s);
    } else {
        moe::layer<float, moe::routers::softmax_topk, Expert> layer({s.d, s.ff, s.experts, 0}, router);
        f(state, layer, s);
    }
}

void layer_forward(benchmark::State& state, shape s) {
    with_layer(state, s, [](auto& st, auto& layer, const shape& sh) { run_layer(st, layer, sh); });
}

// The layer with its expert weights in storage S.
template <class S>
void layer_forward_stored(benchmark::State& state, shape s) {
    with_layer<moe::experts::stored_as<moe::experts::swiglu, S>>(
        state, s, [](auto& st, auto& layer, const shape& sh) { run_layer(st, layer, sh); });
}

void layer_backward(benchmark::State& state, shape s) {
    with_layer(state, s, [](auto& st, auto& layer, const shape& sh) { run_backward(st, layer, sh); });
}

// One dense SwiGLU FFN over T*k rows (plus the shared FFN's FLOPs folded in as extra rows' width):
// the same active FLOPs as the layer, with no routing, dispatch or combine.
void dense_ffn(benchmark::State& state, shape s) {
    const moe::index rows = s.tokens * s.k;
    const moe::matrix<float> x = moe::matrix<float>::Random(rows, s.d);
    const moe::matrix<float> w_in = moe::matrix<float>::Random(2 * s.ff, s.d) * 0.03f;
    const moe::matrix<float> w_out = moe::matrix<float>::Random(s.d, s.ff) * 0.03f;
    const moe::matrix<float> xs = moe::matrix<float>::Random(s.tokens, s.d);
    const moe::matrix<float> ws_in = moe::matrix<float>::Random(2 * s.shared_ff, s.d) * 0.03f;
    const moe::matrix<float> ws_out = moe::matrix<float>::Random(s.d, s.shared_ff) * 0.03f;
    moe::matrix<float> h(rows, 2 * s.ff), a(rows, s.ff), y(rows, s.d);
    moe::matrix<float> hs(s.tokens, 2 * s.shared_ff), as(s.tokens, s.shared_ff), ys(s.tokens, s.d);
    for (auto _ : state) {
        h.noalias() = x * w_in.transpose();
        a = h.leftCols(s.ff).array() / (1 + (-h.leftCols(s.ff).array()).exp()) * h.rightCols(s.ff).array();
        y.noalias() = a * w_out.transpose();
        if (s.shared_ff > 0) {
            hs.noalias() = xs * ws_in.transpose();
            as = hs.leftCols(s.shared_ff).array() / (1 + (-hs.leftCols(s.shared_ff).array()).exp()) *
                 hs.rightCols(s.shared_ff).array();
            ys.noalias() = as * ws_out.transpose();
        }
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    const double flops = 2.0 * static_cast<double>(s.d) *
                         (static_cast<double>(rows) * 3.0 * static_cast<double>(s.ff) +
                          static_cast<double>(s.tokens) * 3.0 * static_cast<double>(s.shared_ff));
    state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// The backward of one dense SwiGLU FFN over T*k rows (shared width folded in as for dense_ffn): the
// gradients of the activations, of the weights and of the input, 4 GEMMs, twice the forward's FLOPs.
void dense_ffn_backward(benchmark::State& state, shape s) {
    const moe::index rows = s.tokens * s.k + (s.shared_ff > 0 ? s.tokens * s.shared_ff / s.ff : 0);
    const moe::matrix<float> x = moe::matrix<float>::Random(rows, s.d), dy = moe::matrix<float>::Random(rows, s.d);
    const moe::matrix<float> w_in = moe::matrix<float>::Random(2 * s.ff, s.d) * 0.03f;
    const moe::matrix<float> w_out = moe::matrix<float>::Random(s.d, s.ff) * 0.03f;
    const moe::matrix<float> h = moe::matrix<float>::Random(rows, 2 * s.ff);
    moe::matrix<float> a(rows, s.ff), da(rows, s.ff), dh(rows, 2 * s.ff), dx(rows, s.d);
    moe::matrix<float> dw_in(2 * s.ff, s.d), dw_out(s.d, s.ff);
    for (auto _ : state) {
        da.noalias() = dy * w_out;
        const auto g = h.leftCols(s.ff).array(), u = h.rightCols(s.ff).array();
        const auto sig = 1 / (1 + (-g).exp());
        a = g * sig * u;
        dh.rightCols(s.ff) = da.array() * g * sig;
        dh.leftCols(s.ff) = da.array() * u * sig * (1 + g * (1 - sig));
        dw_out.noalias() = dy.transpose() * a;
        dw_in.noalias() = dh.transpose() * x;
        dx.noalias() = dh * w_in;
        benchmark::DoNotOptimize(dx.data());
        benchmark::ClobberMemory();
    }
    const double flops = 4.0 * static_cast<double>(s.d) * static_cast<double>(rows) * 3.0 * static_cast<double>(s.ff);
    state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// The memory read bandwidth in the same run, at each thread count: the threads of the layer's own
// pool each sum their share of 1 GiB (far beyond the caches) in SIMD vectors with four accumulators,
// as the kernels read weights. (Google Benchmark's own threads time each thread apart, and their summed
// rates overstate what the threads read together.)
// The planning of one stage of the expert pass (the input projections) for P threads: serial work on
// every call, which a decoding step on many cores must keep small. Items as the layer makes them with
// the routing of balanced tokens (T k / E rows per expert, at least one expert with none when T k < E).
void plan_tasks(benchmark::State& state, shape s) {
    std::vector<moe::detail::work_item> items;
    for (moe::index e = 0; e < s.experts; ++e)
        items.push_back({(s.tokens * s.k * (e + 1)) / s.experts - (s.tokens * s.k * e) / s.experts, s.ff, 2 * s.d});
    std::vector<moe::detail::work_task> tasks;
    for (auto _ : state) {
        moe::detail::plan_tasks(items, state.range(0), {}, tasks);
        benchmark::DoNotOptimize(tasks.data());
    }
    state.counters["tasks"] = static_cast<double>(tasks.size());
}

void memory_read(benchmark::State& state) {
    using batch = xsimd::batch<float>;
    static const std::vector<float> data(std::size_t{1} << 28, 1.0f);
    const moe::index threads = state.range(0);
    moe::detail::thread_pool pool(threads);
    std::vector<float> sums(static_cast<std::size_t>(threads));
    auto read = [&](moe::index part, moe::index) {
        const std::size_t n = data.size() / static_cast<std::size_t>(threads);
        const float* first = data.data() + n * static_cast<std::size_t>(part);
        batch a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
        for (std::size_t i = 0; i + 4 * batch::size <= n; i += 4 * batch::size) {
            a0 += batch::load_unaligned(first + i);
            a1 += batch::load_unaligned(first + i + batch::size);
            a2 += batch::load_unaligned(first + i + 2 * batch::size);
            a3 += batch::load_unaligned(first + i + 3 * batch::size);
        }
        sums[static_cast<std::size_t>(part)] = xsimd::hadd(a0 + a1 + a2 + a3);
    };
    for (auto _ : state) {
        pool.run(threads, read);
        benchmark::DoNotOptimize(sums.data());
    }
    state.counters["GB/s"] = benchmark::Counter(static_cast<double>(data.size() * sizeof(float)) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

// What the layer's task lists would do on P cores, for P = 1 to 64, measured on one thread: the call
// runs 7 times with the tasks planned for P threads (`layer::plan_for_threads`), each in turn with a
// call with the one-thread plan (a machine whose speed drifts slows both alike). Each pool run's tasks
// are list-scheduled on P workers with their median measured times (a task's time includes taking it
// from the pool's counter and one clock read, which the thread running it pays), and the rest of the
// call (routing, starting each pool run; a backward's planning, see time_call) counts as serial, at its
// median. Counter `P<n>`:
// the parallel efficiency T1 / (P T_P), T1 the one-thread plan's calls estimated alike on one worker
// (a sum of medians is not the median of the sums: set against the median one-thread call, P = 1 read
// 0.93-1.11 on a noisy VM). It shows load balance and the cost of the finer cut; not memory
// bandwidth shared by the cores, nor the time P threads take to wake.
template <class Layer>
void run_efficiency(benchmark::State& state, Layer& layer, const shape& s, bool backward) {
    fill(layer, s);
    layer.set_threads(1);
    if constexpr (Layer::trainable)
        if (backward) layer.set_training(true);
    const moe::matrix<float> x = moe::matrix<float>::Random(s.tokens, s.d);
    const moe::matrix<float> grad_y = moe::matrix<float>::Random(s.tokens, s.d);
    moe::matrix<float> y(s.tokens, s.d), grad_x(s.tokens, s.d);
    const auto median = [](std::vector<double> v) {
        std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
        return v[v.size() / 2];
    };
    constexpr int calls = 7;
    // One call's wall time with the tasks of P threads (with `trace`, its pool runs' task times). A call
    // with other threads than the last plans its stages again (microseconds: at P = 64 it doubled a
    // decoding step's serial part), which a program running on the same threads does once; so a timed
    // forward follows an untimed one with the same plan. (A backward follows its forward; its own stages
    // plan again in the timed call, which takes tens of milliseconds or more at those shapes.)
    const auto time_call = [&](moe::index p, moe::detail::run_trace* trace) {
        layer.plan_for_threads(p);
        layer.forward(x, y);
        if (trace) {
            trace->clear();  // its storage kept from an earlier call: tracing allocates nothing in the call
            layer.plan_for_threads(p, trace);
        }
        const auto start = std::chrono::steady_clock::now();
        if constexpr (Layer::trainable) {
            if (backward)
                layer.backward(x, grad_y, grad_x);
            else
                layer.forward(x, y);
        } else {
            layer.forward(x, y);
        }
        const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        layer.plan_for_threads(0);
        return wall;
    };
    time_call(1, nullptr);  // warm: the weights as far in the caches as they will be
    // A call's time on P workers, from `calls` traced calls with the tasks of P threads: the median of
    // what is not in a pool run (serial) plus each pool run's tasks, at their median times, list-scheduled.
    const auto on_workers = [&](const std::vector<double>& walls, const std::vector<moe::detail::run_trace>& traces,
                                moe::index p) {
        std::vector<double> serial;
        for (int c = 0; c < calls; ++c) {
            double tasks = 0;
            for (const double t : traces[static_cast<std::size_t>(c)].times) tasks += t;
            serial.push_back(walls[static_cast<std::size_t>(c)] - tasks);
        }
        double time = median(serial);
        for (std::size_t r = 0; r < traces[0].runs(); ++r) {  // the same runs and tasks in every call
            std::vector<double> times(traces[0].run(r).size());
            for (std::size_t t = 0; t < times.size(); ++t) {
                std::vector<double> per_call;
                for (const auto& call : traces) per_call.push_back(call.run(r)[t]);
                times[t] = median(per_call);
            }
            time += moe::detail::list_schedule(times, p);
        }
        return time;
    };
    std::vector<moe::detail::run_trace> one_traces(calls), traces(calls);  // by call
    for (auto* set : {&one_traces, &traces})
        for (auto& trace : *set) {  // more than a call's tasks and runs at P = 64
            trace.times.reserve(1 << 16);
            trace.starts.reserve(64);
        }
    for (auto _ : state) {
        for (const moe::index p : {1, 2, 4, 8, 16, 32, 64}) {
            std::vector<double> ones, walls;  // call times with the one-thread plan, with P threads' plan
            for (int c = 0; c < calls; ++c) {
                ones.push_back(time_call(1, &one_traces[static_cast<std::size_t>(c)]));
                walls.push_back(time_call(p, &traces[static_cast<std::size_t>(c)]));
            }
            state.counters["P" + std::to_string(p)] =
                on_workers(ones, one_traces, 1) / (static_cast<double>(p) * on_workers(walls, traces, p));
        }
    }
}

void efficiency_forward(benchmark::State& state, shape s) {
    with_layer(state, s, [](auto& st, auto& layer, const shape& sh) { run_efficiency(st, layer, sh, false); });
}

void efficiency_backward(benchmark::State& state, shape s) {
    with_layer(state, s, [](auto& st, auto& layer, const shape& sh) { run_efficiency(st, layer, sh, true); });
}

// The thread counts of the threaded benchmarks: MOE_BENCH_THREADS (e.g. "1,2,4,8,16", as
// scripts/scaling sets it), else 1 and 2.
std::vector<int> thread_counts() {
    std::vector<int> counts;
    const char* list = std::getenv("MOE_BENCH_THREADS");
    for (const char* p = list ? list : "1,2"; *p != 0;) {
        char* end = nullptr;
        const long n = std::strtol(p, &end, 10);
        if (end == p || n < 1 || n > moe::max_threads) {
            std::fprintf(stderr, "moe_bench: MOE_BENCH_THREADS=%s: expected a list like 1,2,4\n", list);
            std::exit(2);
        }
        counts.push_back(static_cast<int>(n));
        p = *end == ',' ? end + 1 : end;
    }
    return counts;
}

// Each thread count as the benchmark's argument "threads".
void with_threads(benchmark::internal::Benchmark* b) {
    for (const int t : thread_counts()) b->Arg(t);
    b->ArgName("threads");
}

const bool registered = [] {
    benchmark::RegisterBenchmark("memory_read", memory_read)->Apply(with_threads)->Unit(benchmark::kMillisecond)->UseRealTime();
    for (const shape& s : shapes) {
        benchmark::RegisterBenchmark((std::string("layer_forward/") + s.name).c_str(), layer_forward, s)
            ->Apply(with_threads)->Unit(benchmark::kMillisecond)->UseRealTime();
        const auto stored = [&]<class S>() {
            benchmark::RegisterBenchmark(("layer_forward_" + std::string(S::name) + "/" + s.name).c_str(),
                                         layer_forward_stored<S>, s)
                ->Apply(with_threads)->Unit(benchmark::kMillisecond)->UseRealTime();
        };
        stored.template operator()<moe::storages::bfloat16>();
        stored.template operator()<moe::storages::q8_0>();
        stored.template operator()<moe::storages::q4_0>();
        if (s.d * s.ff < 16 * 1024 * 1024)  // the dense FFN of the largest shapes would only time a GEMV
            benchmark::RegisterBenchmark((std::string("dense_ffn/") + s.name).c_str(), dense_ffn, s)
                ->Unit(benchmark::kMillisecond)->UseRealTime();
        benchmark::RegisterBenchmark((std::string("task_list_efficiency/forward/") + s.name).c_str(), efficiency_forward, s)
            ->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
        benchmark::RegisterBenchmark((std::string("plan_tasks/") + s.name).c_str(), plan_tasks, s)
            ->Arg(16)->Arg(64)->ArgName("P")->Unit(benchmark::kMicrosecond);
    }
    for (const shape& s : shapes) {
        if (s.tokens < 64) continue;  // training shapes only
        benchmark::RegisterBenchmark((std::string("layer_backward/") + s.name).c_str(), layer_backward, s)
            ->Apply(with_threads)->Unit(benchmark::kMillisecond)->UseRealTime();
        benchmark::RegisterBenchmark((std::string("dense_ffn_backward/") + s.name).c_str(), dense_ffn_backward, s)
            ->Unit(benchmark::kMillisecond)->UseRealTime();
        benchmark::RegisterBenchmark((std::string("task_list_efficiency/backward/") + s.name).c_str(), efficiency_backward, s)
            ->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
    return true;
}();

}  // namespace
