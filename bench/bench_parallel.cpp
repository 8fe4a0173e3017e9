// Expert parallelism over MPI: one layer forward (and forward + backward) over the ranks of an MPI job
// against the same layer in one process. Run under mpirun, e.g.
//   mpirun -np 2 build/bench/moe_bench_parallel --benchmark_format=json
// Every rank runs the same fixed iterations; an iteration's time is the slowest rank's (manual time
// after a barrier). Counters (rank 0 prints): GFLOP/s on the whole batch's active FLOPs, and bytes of
// rows exchanged per layer call (all ranks together, rows out and results back).
#include <moe/moe.hpp>
#include <moe/parallel/mpi.hpp>

#include <benchmark/benchmark.h>

#include <chrono>

namespace {

struct shape {
    const char* name;
    moe::index tokens, d, ff, experts, k;
};
constexpr shape shapes[] = {{"small", 512, 512, 1024, 8, 2}, {"mixtral", 256, 1024, 2816, 8, 2}, {"fine", 512, 1024, 512, 64, 8}};

std::shared_ptr<moe::parallel::mpi_communicator> world() {
    static auto comm = std::make_shared<moe::parallel::mpi_communicator>(MPI_COMM_WORLD);
    return comm;
}

double slowest(double seconds) {
    MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return seconds;
}

double batch_total(double v) {
    MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return v;
}

// Runs the layer on this rank's slice (the whole batch in one process) with the time of the slowest rank.
template <class Layer>
void run(benchmark::State& state, Layer& layer, const shape& s, bool parallel, bool backward) {
    const auto comm = world();
    layer.randomize(1);
    layer.set_training(backward);
    const moe::matrix<float> all = moe::matrix<float>::Random(s.tokens, s.d);
    const auto mine = parallel ? moe::parallel::token_slice(s.tokens, comm->rank(), comm->size())
                               : moe::parallel::slice{0, s.tokens};
    const moe::matrix<float> x = all.middleRows(mine.first, mine.rows), grad_y = x;
    moe::matrix<float> y(mine.rows, s.d), grad_x(mine.rows, s.d);
    const auto call = [&] {
        layer.forward(x, y);
        if (backward) layer.backward(x, grad_y, grad_x);
    };
    call();  // sizes the workspace
    for (auto _ : state) {
        MPI_Barrier(MPI_COMM_WORLD);
        const auto start = std::chrono::steady_clock::now();
        call();
        state.SetIterationTime(slowest(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()));
    }
    const double flops = (backward ? 3 : 1) * (parallel ? batch_total(layer.active_flops()) : layer.active_flops());
    state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["ranks"] = parallel ? comm->size() : 1;
    if (parallel) {
        double bytes = 0;
        for (const moe::index b : layer.parallel_load().bytes_sent) bytes += static_cast<double>(b);
        state.counters["bytes_exchanged"] = bytes;
    }
}

void expert_parallel(benchmark::State& state, shape s, bool parallel, bool backward) {
    const moe::routers::softmax_topk router{.k = s.k, .normalize = true};
    const moe::layer_shape ls{s.d, s.ff, s.experts, 0};
    if (parallel) {
        moe::mixtral_layer<float> layer(ls, moe::parallel::placement{.comm = world()}, router);
        run(state, layer, s, true, backward);
    } else {
        moe::mixtral_layer<float> layer(ls, router);
        run(state, layer, s, false, backward);
    }
}

// Prints nothing: every rank but 0 runs the benchmarks in step with rank 0 without reporting.
struct silent : benchmark::BenchmarkReporter {
    bool ReportContext(const Context&) override { return true; }
    void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    for (const shape& s : shapes)
        for (const bool backward : {false, true})
            for (const bool parallel : {false, true})
                benchmark::RegisterBenchmark(
                    (std::string("expert_parallel/") + s.name + (backward ? "/forward_backward" : "/forward") +
                     (parallel ? "/ranks" : "/one_process"))
                        .c_str(),
                    expert_parallel, s, parallel, backward)
                    ->UseManualTime()
                    ->Unit(benchmark::kMillisecond)
                    ->Iterations(5)
                    ->Repetitions(3)
                    ->ReportAggregatesOnly(true);
    benchmark::Initialize(&argc, argv);
    if (world()->rank() == 0) {
        benchmark::RunSpecifiedBenchmarks();
    } else {
        silent quiet;
        benchmark::RunSpecifiedBenchmarks(&quiet);
    }
    benchmark::Shutdown();
    MPI_Finalize();
}
