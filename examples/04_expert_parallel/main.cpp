// Expert parallelism: one DeepSeek-V3-like layer whose 16 routed experts are spread over the ranks of
// an MPI job (mpirun -np 2 or 4). Every rank routes its own tokens; rows travel to their experts'
// owners and back. One training step: forward, backward, an SGD step in which each rank updates the
// experts it holds and every rank the replicated router and shared expert (their gradients are
// already summed over the ranks). Checks itself against the same layer in one process.
#include <moe/moe.hpp>
#include <moe/parallel/mpi.hpp>

#include <chrono>
#include <cstdio>
#include <map>

int main(int argc, char** argv) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    auto comm = std::make_shared<moe::parallel::mpi_communicator>(MPI_COMM_WORLD);
    const int rank = comm->rank(), ranks = comm->size();

    using layer_type = moe::deepseek_v3_layer<float, moe::losses::load_balance>;
    const moe::layer_shape shape{.d_model = 256, .d_ff = 128, .n_experts = 16, .d_shared = 256};
    const moe::routers::sigmoid_topk router{.k = 4, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2};
    const std::tuple<moe::losses::load_balance> losses{{.alpha = 0.01}};

    // This rank's part: the router, the shared expert and experts [16 r / P, 16 (r + 1) / P) only.
    layer_type part(shape, moe::parallel::placement{.comm = comm}, router, {}, {}, losses);
    part.randomize(7);  // every rank draws the same weights; each keeps its own experts
    part.set_training(true);

    // Every rank builds the same batch and takes its contiguous slice of tokens.
    const moe::index tokens = 1024, d = shape.d_model;
    const moe::matrix<float> x = moe::matrix<float>::Random(tokens, d), grad_y = moe::matrix<float>::Random(tokens, d);
    const moe::parallel::slice mine = moe::parallel::token_slice(tokens, rank, ranks);
    const moe::matrix<float> x_mine = x.middleRows(mine.first, mine.rows), g_mine = grad_y.middleRows(mine.first, mine.rows);
    moe::matrix<float> y_mine(mine.rows, d), grad_x_mine(mine.rows, d);

    const auto start = std::chrono::steady_clock::now();
    part.forward(x_mine, y_mine);
    part.backward(x_mine, g_mine, grad_x_mine);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

    const moe::parallel::load_statistics load = part.parallel_load();  // collective
    const moe::routing_statistics stats = part.statistics();           // of the whole batch; collective
    if (rank == 0) {
        std::printf("%d ranks, %ld tokens: forward + backward %.1f ms on rank 0\n", ranks, static_cast<long>(tokens), ms);
        std::printf("  per-rank load: %s\n", load.to_json().c_str());
        std::printf("  expert imbalance of the batch: %.3f, load-balance loss %.5f\n", stats.imbalance, part.loss_values()[0]);
    }

    // The same layer in one process on the whole batch: this rank's outputs and gradients must agree.
    layer_type whole(shape, router, {}, {}, losses);
    whole.randomize(7);
    whole.set_training(true);
    moe::matrix<float> y(tokens, d), grad_x(tokens, d);
    whole.forward(x, y);
    whole.backward(x, grad_y, grad_x);
    const auto error = [](const auto& a, const auto& b) {
        return a.size() == 0 ? 0.0 : static_cast<double>((a - b).cwiseAbs().maxCoeff() / (b.cwiseAbs().maxCoeff() + 1e-30f));
    };
    double worst = std::max(error(y_mine, y.middleRows(mine.first, mine.rows)),
                            error(grad_x_mine, grad_x.middleRows(mine.first, mine.rows)));
    std::map<std::string, moe::parameter<float>> reference;
    for (auto& p : whole.parameters()) reference.emplace(p.name, p);
    for (auto& p : part.parameters()) {
        worst = std::max(worst, error(p.grad, reference.at(p.name).grad));
        p.value -= 0.01f * p.grad;  // SGD: the tensors this rank holds
    }
    comm->all_sum(std::span<double>(&worst, 1));  // the sum bounds the largest error of any rank
    if (rank == 0) std::printf("  largest relative difference to one process (summed over ranks): %.2e\n", worst);
    MPI_Finalize();
    return worst <= 1e-5 * ranks ? 0 : 1;
}
