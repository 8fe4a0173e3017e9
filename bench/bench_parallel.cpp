// Expert parallelism over MPI: one layer forward (and forward + backward) over the P ranks of an MPI
// job (one thread each) against the same layer in one process, with one thread and with
// min(P, cores) threads, in the same run (the one-process layer runs on rank 0 while the other ranks
// sleep). Run under mpirun, e.g.
//   mpirun -np 2 build/bench/moe_bench_parallel --benchmark_format=json
// Every rank runs the same fixed iterations; an iteration's time is the slowest rank's (manual time
// after a barrier). Counters (rank 0 prints): GFLOP/s on the whole batch's active FLOPs, and bytes of
// rows that crossed between ranks per layer call (all ranks together, rows out and results back).
// The skewed case routes every token to experts 0 and 1 (rank 0's at 2 ranks) and runs the forward
// (and forward + backward) with and without least-loaded re-balancing (`/ranks_rebalanced`: also the
// imbalance before and after, the bytes of weights moved per call and, with backward, of the
// weight-gradient sums passed on).
#include <moe/moe.hpp>
#include <moe/parallel/mpi.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <string_view>
#include <thread>
#include <vector>

namespace {

struct shape {
    const char* name;
    moe::index tokens, d, ff, experts, k;
    bool skewed = false;
};
constexpr shape shapes[] = {{"small", 512, 512, 1024, 8, 2},
                            {"mixtral", 256, 1024, 2816, 8, 2},
                            {"fine", 512, 1024, 512, 64, 8},
                            {"skewed", 512, 512, 1024, 8, 2, true}};

std::shared_ptr<moe::parallel::mpi_communicator> world() {
    static auto comm = std::make_shared<moe::parallel::mpi_communicator>(MPI_COMM_WORLD);
    return comm;
}

double slowest(double seconds) {
    MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return seconds;
}

// Waits for every rank without polling (OpenMPI's blocking calls spin), so that a waiting rank leaves
// its core to rank 0's threads.
void sleeping_barrier() {
    MPI_Request request;
    MPI_Ibarrier(MPI_COMM_WORLD, &request);
    for (int done = 0; MPI_Test(&request, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && !done;)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

double batch_total(double v) {
    MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return v;
}

enum class mode { one_thread, threads, ranks, rebalanced };

// Runs the layer on this rank's slice (the whole batch on rank 0 in one process) with the time of the
// slowest rank.
template <class Layer>
void run(benchmark::State& state, Layer& layer, const shape& s, mode m, bool backward) {
    const auto comm = world();
    const bool parallel = m == mode::ranks || m == mode::rebalanced, idle = !parallel && comm->rank() != 0;
    if (m == mode::threads)
        layer.set_threads(std::min<moe::index>(comm->size(), std::max(1u, std::thread::hardware_concurrency())));
    layer.randomize(1);
    layer.set_training(backward);
    moe::matrix<float> all = moe::matrix<float>::Random(s.tokens, s.d);
    if (s.skewed) {  // logits of experts 0 and 1 about 32 above the others
        all.col(0).setConstant(4);
        layer.router_weight()(0, 0) = layer.router_weight()(1, 0) = 8;
    }
    const auto mine = parallel ? moe::parallel::token_slice(s.tokens, comm->rank(), comm->size())
                               : moe::parallel::slice{0, s.tokens};
    const moe::matrix<float> x = all.middleRows(mine.first, mine.rows), grad_y = x;
    moe::matrix<float> y(mine.rows, s.d), grad_x(mine.rows, s.d);
    const auto call = [&] {
        if (idle) return;
        layer.forward(x, y);
        if (backward) layer.backward(x, grad_y, grad_x);
    };
    call();  // sizes the workspace
    sleeping_barrier();
    for (auto _ : state) {
        if (parallel) MPI_Barrier(MPI_COMM_WORLD);
        const auto start = std::chrono::steady_clock::now();
        call();
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        state.SetIterationTime(parallel ? slowest(seconds) : seconds);  // one process: rank 0's alone
    }
    sleeping_barrier();
    const double flops = (backward ? 3 : 1) * (parallel ? batch_total(layer.active_flops()) : layer.active_flops());
    state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["ranks"] = parallel ? comm->size() : 1;
    state.counters["threads"] = static_cast<double>(layer.threads());
    if (parallel) {
        const auto load = layer.parallel_load();
        const auto total = [](const std::vector<moe::index>& per_rank) {
            double sum = 0;
            for (const moe::index b : per_rank) sum += static_cast<double>(b);
            return sum;
        };
        state.counters["bytes_exchanged"] = total(load.bytes_sent);
        state.counters["imbalance"] = load.imbalance;
        if (m == mode::rebalanced) {
            state.counters["imbalance_before"] = load.imbalance_before;
            state.counters["weight_bytes_moved"] = total(load.weight_bytes_sent);
            if (backward) state.counters["gradient_bytes_moved"] = total(load.gradient_bytes_sent);
        }
    }
}

void expert_parallel(benchmark::State& state, shape s, mode m, bool backward) {
    const moe::routers::softmax_topk router{.k = s.k, .normalize = true};
    const moe::layer_shape ls{s.d, s.ff, s.experts, 0};
    if (m == mode::ranks || m == mode::rebalanced) {
        moe::parallel::placement where{.comm = world()};
        where.rebalance.enabled = m == mode::rebalanced;
        moe::mixtral_layer<float> layer(ls, where, router);
        run(state, layer, s, m, backward);
    } else {
        moe::mixtral_layer<float> layer(ls, router);
        run(state, layer, s, m, backward);
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
            for (const auto& [m, name] :
                 {std::pair{mode::one_thread, "/one_process"}, std::pair{mode::threads, "/one_process_threads"},
                  std::pair{mode::ranks, "/ranks"}, std::pair{mode::rebalanced, "/ranks_rebalanced"}}) {
                if (m == mode::rebalanced && !s.skewed) continue;
                if (s.skewed && m == mode::threads) continue;
                benchmark::RegisterBenchmark(
                    (std::string("expert_parallel/") + s.name + (backward ? "/forward_backward" : "/forward") + name).c_str(),
                    expert_parallel, s, m, backward)
                    ->UseManualTime()
                    ->Unit(benchmark::kMillisecond)
                    ->Iterations(5)
                    ->Repetitions(3)
                    ->ReportAggregatesOnly(true);
            }
    // Only rank 0 writes --benchmark_out: the other ranks drop it.
    std::vector<char*> args(argv, argv + argc);
    if (world()->rank() != 0)
        std::erase_if(args, [](const char* a) { return std::string_view(a).starts_with("--benchmark_out"); });
    int count = static_cast<int>(args.size());
    benchmark::Initialize(&count, args.data());
    if (world()->rank() == 0) {
        benchmark::RunSpecifiedBenchmarks();
    } else {
        silent quiet;
        benchmark::RunSpecifiedBenchmarks(&quiet);
    }
    benchmark::Shutdown();
    MPI_Finalize();
}
