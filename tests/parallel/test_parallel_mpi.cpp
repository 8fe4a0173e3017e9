// moe/parallel/mpi.hpp: expert parallelism over MPI, run under mpirun at 2 and 4 ranks
// (tests/CMakeLists.txt). Every rank of an expert-parallel layer against a one-process layer with the
// same weights.
//
// Every test case runs on every rank in the same order. Only CHECK is used where a collective may
// follow, so that a failure on one rank never leaves the others waiting.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <moe/moe.hpp>
#include <moe/parallel/mpi.hpp>

#include <algorithm>
#include <map>
#include <numeric>
#include <optional>
#include <random>

namespace {

using moe::index;

std::shared_ptr<moe::parallel::mpi_communicator> world() {
    static auto comm = std::make_shared<moe::parallel::mpi_communicator>(MPI_COMM_WORLD);
    return comm;
}

moe::matrix<float> random_matrix(index rows, index cols, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n(0.0f, 1.0f);
    moe::matrix<float> m(rows, cols);
    for (index i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
    return m;
}

template <class A, class B>
double relative_error(const A& a, const B& b) {
    if (a.size() == 0) return 0;
    const double diff = (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff();
    const double scale = b.template cast<double>().cwiseAbs().maxCoeff();
    return scale > 0 ? diff / scale : diff;
}

template <class A, class B>
bool bitwise(const A& a, const B& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}

/// What may differ from one process: expert outputs and expert weight gradients are bitwise equal
/// (each row is computed alone, and each expert's weight gradient summed over its rows in the
/// one-process order, along the ranks that computed them when re-balanced); sums over ranks (router and
/// shared-expert gradients, loss values) and the shared FFN (other row blocks) within 1e-6.
constexpr double tolerance = 1e-6;

/// `one` on the whole batch and `part` (this rank's layer) on this rank's slice, forward and backward.
/// Returns the rows `part` computed for other ranks' experts (re-balancing).
template <class Layer>
index check_against_one_process(Layer& one, Layer& part, index tokens, bool bitwise_output) {
    const auto comm = world();
    const index d = one.shape().d_model;
    const moe::matrix<float> x = random_matrix(tokens, d, 11), g = random_matrix(tokens, d, 12);
    const auto s = moe::parallel::token_slice(tokens, comm->rank(), comm->size());
    one.set_training(true);
    part.set_training(true);
    moe::matrix<float> y(tokens, d), y_part(s.rows, d);
    one.forward(x, y);
    const moe::matrix<float> x_part = x.middleRows(s.first, s.rows), g_part = g.middleRows(s.first, s.rows);
    part.forward(x_part, y_part);
    CHECK(relative_error(y_part, y.middleRows(s.first, s.rows)) <= tolerance);
    if (bitwise_output) CHECK(bitwise(y_part, y.middleRows(s.first, s.rows)));
    CHECK(bitwise(part.logits(), one.logits().middleRows(s.first, s.rows)));
    for (std::size_t i = 0; i < one.loss_values().size(); ++i)
        CHECK(std::abs(part.loss_values()[i] - one.loss_values()[i]) <= tolerance * std::abs(one.loss_values()[i]) + 1e-9);

    moe::matrix<float> gx(tokens, d), gx_part(s.rows, d);
    one.backward(x, g, gx);
    part.backward(x_part, g_part, gx_part);
    CHECK(relative_error(gx_part, gx.middleRows(s.first, s.rows)) <= tolerance);
    std::map<std::string, moe::parameter<float>> reference;
    for (auto& p : one.parameters()) reference.emplace(p.name, p);
    index experts_held = 0;
    for (const auto& p : part.parameters()) {
        INFO(p.name);
        const auto found = reference.find(p.name);
        CHECK(found != reference.end());
        if (found == reference.end()) continue;
        const auto& q = found->second;
        CHECK(bitwise(p.value, q.value));
        CHECK(relative_error(p.grad, q.grad) <= tolerance);
        if (p.name.starts_with("experts.")) {
            CHECK(bitwise(p.grad, q.grad));
            experts_held += p.name.ends_with(".in.weight");
        }
    }
    comm->all_sum(std::span<index>(&experts_held, 1));
    CHECK(experts_held == one.shape().n_experts);  // every expert on exactly one rank

    // Statistics of the whole batch; every routed row computed once.
    const auto stats = part.statistics(), expected = one.statistics();
    CHECK(stats.tokens == expected.tokens);
    CHECK(stats.load == expected.load);
    CHECK(stats.experts_per_token == expected.experts_per_token);
    CHECK(stats.null_slots == expected.null_slots);
    CHECK(stats.imbalance == expected.imbalance);
    CHECK(std::abs(stats.mean_entropy - expected.mean_entropy) <= 1e-6 * (1 + expected.mean_entropy));
    CHECK(stats.sinkhorn_iterations == expected.sinkhorn_iterations);
    CHECK(stats.sinkhorn_marginal_error == expected.sinkhorn_marginal_error);
    const auto load = part.parallel_load();
    index rows = 0, sent = 0, received = 0;
    for (std::size_t r = 0; r < load.rows.size(); ++r) {
        rows += load.rows[r];
        sent += load.bytes_sent[r];
        received += load.bytes_received[r];
    }
    CHECK(load.rows.size() == static_cast<std::size_t>(comm->size()));
    CHECK(rows == one.last_routing().rows());
    // Bytes: every routed row computed on another rank than its token's crosses four times (out and
    // back, forward and backward). A row is computed by the rank of the segment of its expert's
    // one-process block that holds it (the owner's, without re-balancing).
    const auto& r = one.last_routing();
    const auto& plan = part.exchange()->last_plan();
    index crossing = 0;
    for (index row = 0; row < r.rows(); ++row) {
        const auto slot = static_cast<std::size_t>(r.row_slots[static_cast<std::size_t>(row)]);
        int home = 0;  // the rank whose slice holds the row's token
        while (r.slot_tokens[slot] >= moe::parallel::token_slice(tokens, home + 1, comm->size()).first) ++home;
        const index e = r.expert_ids[slot], at = row - r.expert_offsets[static_cast<std::size_t>(e)];
        int computer = -1;
        for (const auto& seg : plan.experts[static_cast<std::size_t>(e)])
            if (at >= seg.first && at < seg.first + seg.rows) computer = seg.rank;
        CHECK(computer >= 0);
        crossing += computer != home;
    }
    CHECK(sent == received);
    CHECK(sent == 4 * crossing * d * static_cast<index>(sizeof(float)));
    // Each helped expert's weight-gradient sum crossed once per segment after the first on another rank.
    index passed = 0, expected_passed = 0;
    for (const index b : load.gradient_bytes_sent) passed += b;
    for (index e = 0; e < one.shape().n_experts; ++e) {
        const auto& segments = plan.experts[static_cast<std::size_t>(e)];
        const auto& w = one.expert_weights(e);
        // One sum per segment after the first (a rank has at most one segment of an expert).
        expected_passed += static_cast<index>(segments.size() - 1) * (w.in.size() + w.out.size()) * static_cast<index>(sizeof(float));
    }
    CHECK(passed == expected_passed);
    return load.rows_moved;
}

/// `check_against_one_process` for the layer with `owners`, without and with least-loaded re-balancing
/// (every move made: random routings are only mildly uneven). Returns the rows moved re-balanced.
template <class Layer, class... Args>
index compare_layers(moe::layer_shape shape, index tokens, std::vector<int> owners, bool bitwise_output, Args... args) {
    index moved = 0;
    for (const bool rebalance : {false, true}) {
        INFO((rebalance ? "re-balanced" : "owners only"));
        Layer one(shape, args...);
        Layer part(shape, moe::parallel::placement{.comm = world(), .owners = owners, .rebalance = {.enabled = rebalance, .min_rows = 1}},
                   args...);
        one.randomize(3);
        part.randomize(3);
        if (auto* bias = moe::correction_bias<float>(one.router_state())) {  // a bias that changes the selection
            auto* same = moe::correction_bias<float>(part.router_state());
            for (index e = 0; e < bias->size(); ++e) (*bias)[e] = (*same)[e] = 0.05f * static_cast<float>(e % 3);
        }
        moved = check_against_one_process(one, part, tokens, bitwise_output);
        if (!rebalance) CHECK(moved == 0);
    }
    return moved;
}

/// What routing each rank's slice as a group of its own would change: the tokens (over all ranks) whose
/// slots differ between a one-process layer routing the whole batch and the same layer routing the
/// rank's slice alone (the inputs of `check_against_one_process`).
template <class Layer, class... Args>
index routed_otherwise_by_slice(moe::layer_shape shape, index tokens, Args... args) {
    Layer layer(shape, args...);
    layer.randomize(3);
    const auto s = moe::parallel::token_slice(tokens, world()->rank(), world()->size());
    const moe::matrix<float> x = random_matrix(tokens, shape.d_model, 11), x_part = x.middleRows(s.first, s.rows);
    moe::matrix<float> y(tokens, shape.d_model), y_part(s.rows, shape.d_model);
    layer.forward(x, y);
    const moe::routing<float> whole = layer.last_routing();
    layer.forward(x_part, y_part);
    const auto& alone = layer.last_routing();
    index differ = 0;
    for (index t = 0; t < s.rows; ++t) {
        const auto slots = [](const moe::routing<float>& r, index token) {
            const auto b = r.expert_ids.begin() + r.first_slot(token), e = r.expert_ids.begin() + r.end_slot(token);
            const auto wb = r.weights.begin() + r.first_slot(token), we = r.weights.begin() + r.end_slot(token);
            return std::pair(std::vector<std::int32_t>(b, e), std::vector<float>(wb, we));
        };
        differ += slots(whole, s.first + t) != slots(alone, t);
    }
    world()->all_sum(std::span<index>(&differ, 1));
    return differ;
}

}  // namespace

TEST_CASE("expert-parallel top-k layers equal one process: outputs and expert gradients bitwise", "[parallel]") {
    using lb = moe::losses::load_balance;
    using zl = moe::losses::z_loss;
    using layer = moe::mixtral_layer<float, lb, zl>;
    const moe::layer_shape shape{.d_model = 32, .d_ff = 48, .n_experts = 8};
    const std::tuple<lb, zl> losses{{.alpha = 0.5}, {.beta = 0.05}};
    const moe::routers::softmax_topk router{.k = 2};
    for (const moe::index tokens : {0, 3, 37, 300}) {  // 3 < 4 ranks: a rank without tokens; 300: several pieces
        INFO("T = " << tokens);
        const moe::index moved =
            compare_layers<layer>(shape, tokens, {}, true, router, moe::experts::swiglu{}, moe::shared_experts::none{}, losses);
        if (tokens == 300) CHECK(moved > 0);  // re-balancing had work
    }
    const int ranks = world()->size();
    std::vector<int> interleaved(8), all_on_last(8, ranks - 1);
    for (int e = 0; e < 8; ++e) interleaved[static_cast<std::size_t>(e)] = (7 - e) % ranks;
    compare_layers<layer>(shape, 37, interleaved, true, router, moe::experts::swiglu{}, moe::shared_experts::none{}, losses);
    compare_layers<layer>(shape, 37, all_on_last, true, router, moe::experts::swiglu{}, moe::shared_experts::none{}, losses);
}

TEST_CASE("expert-parallel layers with shared experts, sigmoid groups, null experts and top-p equal one process",
          "[parallel]") {
    const moe::layer_shape shape{.d_model = 24, .d_ff = 40, .n_experts = 8, .d_shared = 32};
    {
        // DeepSeek-V3 style with the sequence-wise loss: 24 tokens in sequences of 6 (whole on every rank).
        using layer = moe::deepseek_v3_layer<float, moe::losses::seq_balance>;
        const moe::routers::sigmoid_topk router{.k = 2, .normalize = true, .scale = 2.5, .n_group = 4, .topk_group = 2};
        compare_layers<layer>(shape, 24, {}, false, router, moe::experts::swiglu{}, moe::shared_experts::ungated<>{},
                              std::tuple<moe::losses::seq_balance>{{.alpha = 0.1, .seq_len = 6}});
    }
    {
        using layer = moe::qwen2_moe_layer<float, moe::losses::load_balance>;
        compare_layers<layer>(shape, 41, {}, false, moe::routers::softmax_topk{.k = 4, .normalize = false},
                              moe::experts::swiglu{}, moe::shared_experts::sigmoid_gated<>{},
                              std::tuple<moe::losses::load_balance>{{.alpha = 0.3, .per_token = true}});
    }
    const moe::layer_shape routed{.d_model = 24, .d_ff = 40, .n_experts = 8};
    {
        using layer = moe::adamoe_layer<float, moe::losses::null_balance, moe::losses::z_loss>;
        compare_layers<layer>(routed, 29, {}, true, moe::routers::null_experts{.k = 2, .nulls = 3}, moe::experts::swiglu{},
                              moe::shared_experts::none{},
                              std::tuple<moe::losses::null_balance, moe::losses::z_loss>{{.alpha = 0.2}, {.beta = 0.1}});
    }
    {
        using layer = moe::layer<float, moe::routers::top_p, moe::experts::mlp>;
        compare_layers<layer>(routed, 33, {}, true, moe::routers::top_p{.threshold = 0.6, .max_k = 3},
                              moe::experts::mlp{moe::activation::gelu});
    }
}

TEST_CASE("batch-dependent routers route the whole batch: expert-parallel layers equal one process", "[parallel]") {
    // Capacity, expert choice and Sinkhorn decide a token's slots with every token of the batch: each
    // rank routes every rank's logits, so a rank's slice alone would route otherwise at these sizes.
    using lb = moe::losses::load_balance;
    using zl = moe::losses::z_loss;
    const moe::layer_shape shape{.d_model = 16, .d_ff = 24, .n_experts = 8};
    const moe::experts::mlp relu{moe::activation::relu};
    const std::tuple<lb, zl> losses{{.alpha = 0.5}, {.beta = 0.05}};
    namespace r = moe::routers;
    for (const moe::index tokens : {0, 3, 45}) {  // 3 < 4 ranks: a rank without tokens
        INFO("T = " << tokens);
        compare_layers<moe::expert_choice_layer<float>>(shape, tokens, {}, true, r::expert_choice{.capacity_factor = 1.5},
                                                        relu);
        for (const auto policy : {r::drop_policy::position, r::drop_policy::probs})
            compare_layers<moe::switch_layer<float, lb, zl>>(
                shape, tokens, {}, true,
                r::capacity<r::softmax_topk>{.inner = {.k = 2}, .capacity_factor = 0.75, .policy = policy}, relu,
                moe::shared_experts::none{}, losses);
        for (const auto gates : {r::sinkhorn_gates::softmax, r::sinkhorn_gates::plan})
            compare_layers<moe::sbase_layer<float>>(shape, tokens, {}, true,
                                                   r::sinkhorn{.k = 2, .iterations = 20, .gates = gates});
        // Batch-dependent at run time only (moe-run's router).
        compare_layers<moe::layer<float, r::any_router, moe::experts::swiglu, moe::shared_experts::none, lb, zl>>(
            shape, tokens, std::vector<int>{1 % world()->size(), 0, 0, 0, 0, 0, 0, 0}, true,
            r::any_router(r::expert_choice{.capacity_factor = 2.0}), moe::experts::swiglu{}, moe::shared_experts::none{},
            losses);
    }
    // The test tells routing the whole batch from routing each slice alone: at T = 45 they differ.
    CHECK(routed_otherwise_by_slice<moe::expert_choice_layer<float>>(shape, 45, r::expert_choice{.capacity_factor = 1.5},
                                                                      relu) > 0);
    for (const auto policy : {r::drop_policy::position, r::drop_policy::probs})
        CHECK(routed_otherwise_by_slice<moe::switch_layer<float>>(
                  shape, 45, r::capacity<r::softmax_topk>{.inner = {.k = 2}, .capacity_factor = 0.75, .policy = policy},
                  relu) > 0);
    for (const auto gates : {r::sinkhorn_gates::softmax, r::sinkhorn_gates::plan})
        CHECK(routed_otherwise_by_slice<moe::sbase_layer<float>>(shape, 45,
                                                                 r::sinkhorn{.k = 2, .iterations = 20, .gates = gates}) > 0);
}

/// A batch of `tokens` whose every token routes to experts `hot` and `hot` + 1 (both rank 0's at 2 and
/// 4 ranks when `hot` is 0): x's column 0 is 4 and their router weights there are 8 (randomized
/// layers' logits are far smaller). Without `hot`, the random batch.
moe::matrix<float> skewed_batch(moe::index tokens, moe::index d, std::optional<moe::index> hot, std::uint64_t seed) {
    moe::matrix<float> x = random_matrix(tokens, d, seed);
    if (hot) x.col(0).setConstant(4);
    return x;
}

/// `one` and `part` (re-balancing as its placement says) forward each batch (this rank's slice, in
/// inference; training, then backward, where `training`): outputs, and expert gradients, bitwise.
/// Returns the load of every call.
template <class Layer>
std::vector<moe::parallel::load_statistics> compare_rebalanced(Layer& one, Layer& part, const std::vector<moe::matrix<float>>& batches,
                                                              const std::vector<bool>& training) {
    const auto comm = world();
    const moe::index d = one.shape().d_model;
    std::vector<moe::parallel::load_statistics> loads;
    for (std::size_t i = 0; i < batches.size(); ++i) {
        INFO("call " << i);
        const moe::matrix<float>& x = batches[i];
        const auto s = moe::parallel::token_slice(x.rows(), comm->rank(), comm->size());
        moe::matrix<float> y(x.rows(), d), y_part(s.rows, d);
        if constexpr (Layer::trainable) {
            one.set_training(training[i]);
            part.set_training(training[i]);
        }
        one.forward(x, y);
        part.forward(x.middleRows(s.first, s.rows), y_part);
        CHECK(bitwise(y_part, y.middleRows(s.first, s.rows)));
        if constexpr (Layer::trainable) {
            if (training[i]) {
                const moe::matrix<float> g = random_matrix(x.rows(), d, 52);
                moe::matrix<float> gx(x.rows(), d), gx_part(s.rows, d);
                one.backward(x, g, gx);
                part.backward(x.middleRows(s.first, s.rows), g.middleRows(s.first, s.rows), gx_part);
                for (moe::index e = 0; e < one.shape().n_experts; ++e)
                    if (part.owns_expert(e)) {
                        CHECK(bitwise(part.grad_expert_weights(e).in, one.grad_expert_weights(e).in));
                        CHECK(bitwise(part.grad_expert_weights(e).out, one.grad_expert_weights(e).out));
                    }
            }
        }
        loads.push_back(part.parallel_load());
    }
    return loads;
}

template <class Layer>
std::vector<moe::parallel::load_statistics> rebalanced_calls(const moe::layer_shape& shape, moe::parallel::rebalancing how,
                                                            const std::vector<std::pair<moe::index, std::optional<moe::index>>>& batches,
                                                            std::vector<bool> training = {}) {
    const moe::routers::softmax_topk top2{.k = 2};
    Layer one(shape, top2), part(shape, moe::parallel::placement{.comm = world(), .rebalance = how}, top2);
    one.randomize(5);
    part.randomize(5);
    std::vector<moe::matrix<float>> xs;
    std::optional<moe::index> hot;
    for (const auto& [tokens, h] : batches) {
        xs.push_back(skewed_batch(tokens, shape.d_model, h, 50 + xs.size()));
        if (h) hot = h;
    }
    if (hot) {  // one hot pair for every skewed batch of a run (the router is the layer's)
        for (Layer* l : {&one, &part}) l->router_weight()(*hot, 0) = l->router_weight()(*hot + 1, 0) = 8;
    }
    training.resize(batches.size(), false);
    return compare_rebalanced(one, part, xs, training);
}

TEST_CASE("re-balancing moves an overloaded rank's rows to the least-loaded ranks: the same bits", "[parallel]") {
    const moe::layer_shape shape{.d_model = 64, .d_ff = 32, .n_experts = 8};
    const int ranks = world()->size();
    const moe::index tokens = 40, rows = 2 * tokens;  // top-2: experts 0 and 1 for every token
    const moe::index target = (rows + ranks - 1) / ranks;
    using f32 = moe::mixtral_layer<float>;
    using q8_0 = moe::layer<float, moe::routers::softmax_topk, moe::experts::q8_0_weights<moe::experts::swiglu>>;
    using bf16 = moe::layer<float, moe::routers::softmax_topk, moe::experts::bf16_weights<moe::experts::swiglu>>;
    const auto summed = [](const std::vector<moe::index>& v) { return std::accumulate(v.begin(), v.end(), moe::index{0}); };
    const std::vector<std::pair<moe::index, std::optional<moe::index>>> skewed{{tokens, 0}};

    const auto off = rebalanced_calls<f32>(shape, {}, skewed)[0];
    CHECK(off.rows_moved == 0);
    CHECK(off.imbalance == off.imbalance_before);
    CHECK(off.rows[0] == rows);  // rank 0 holds experts 0 and 1: every row

    const moe::parallel::rebalancing on{.enabled = true, .min_rows = 1};
    for (const auto& load : {rebalanced_calls<f32>(shape, on, skewed)[0], rebalanced_calls<q8_0>(shape, on, skewed)[0],
                             rebalanced_calls<bf16>(shape, on, skewed)[0]}) {
        CHECK(load.imbalance_before == off.imbalance);
        CHECK(*std::max_element(load.rows.begin(), load.rows.end()) <= target);  // the slowest rank at the mean
        CHECK(load.imbalance < load.imbalance_before);
        CHECK(load.rows_moved == rows - target);
        CHECK(summed(load.rows) == rows);
        CHECK(load.weight_bytes_sent[0] > 0);  // rank 0 sent the weights
        CHECK(summed(load.weight_bytes_sent) == load.weight_bytes_sent[0]);  // and no other rank
    }
    // The plan changes from call to call (the hot pair, then none, a batch smaller than the ranks,
    // T = 0, the hot pair again, in training twice and in inference); training calls move the same rows
    // and their expert gradients are bitwise those of one process.
    {
        const auto loads = rebalanced_calls<f32>(shape, on,
                                                 {{tokens, 0}, {tokens, std::nullopt}, {3, 0}, {0, 0}, {tokens, 0}, {tokens, 0}, {tokens, 0}},
                                                 {false, false, false, false, true, true, false});
        CHECK(loads[0].rows_moved > 0);
        CHECK(loads[2].rows_moved == (ranks > 1 ? 6 - (6 + ranks - 1) / ranks : 0));
        CHECK(loads[3].rows_moved == 0);
        for (const std::size_t i : {4, 5, 6}) CHECK(loads[i].rows_moved == loads[0].rows_moved);
        CHECK(summed(loads[4].gradient_bytes_sent) > 0);  // the helpers' sums, passed on
        CHECK(summed(loads[6].gradient_bytes_sent) == 0);
    }
    // The cap: none moves nothing; one expert's bytes lets each helper take one expert only (here no
    // helper needs two: tests/test_parallel_rebalance.cpp has a plan the cap changes).
    const auto capped = rebalanced_calls<f32>(shape, {.enabled = true, .cap_bytes = 0, .min_rows = 1}, skewed)[0];
    CHECK(capped.rows_moved == 0);
    CHECK(capped.rows == off.rows);
    {
        const std::size_t expert_bytes = 3 * 64 * 32 * sizeof(float);  // SwiGLU: gate, up and down
        const moe::routers::softmax_topk top2{.k = 2};
        f32 part(shape, moe::parallel::placement{.comm = world(), .rebalance = {.enabled = true, .cap_bytes = expert_bytes, .min_rows = 1}}, top2);
        part.randomize(5);
        part.router_weight()(0, 0) = part.router_weight()(1, 0) = 8;
        const moe::matrix<float> x = skewed_batch(tokens, 64, 0, 50);
        const auto s = moe::parallel::token_slice(tokens, world()->rank(), world()->size());
        moe::matrix<float> y(s.rows, 64);
        part.forward(x.middleRows(s.first, s.rows), y);
        const auto& plan = part.exchange()->last_plan();
        for (const moe::index h : plan.helped) CHECK(h <= 1);
        CHECK(plan.rows_moved > 0);
        // In training a helper also holds the expert's weight gradient: one expert's bytes are half of
        // what it needs.
        part.set_training(true);
        part.forward(x.middleRows(s.first, s.rows), y);
        CHECK(part.exchange()->last_plan().rows_moved == 0);
    }
    // min_rows: a plan whose moves are all smaller moves nothing.
    CHECK(rebalanced_calls<f32>(shape, {.enabled = true, .min_rows = rows}, skewed)[0].rows_moved == 0);
}

TEST_CASE("the bias update sees the whole batch's counts on every rank", "[parallel]") {
    using layer = moe::deepseek_v3_layer<float>;
    const moe::layer_shape with_shared{.d_model = 16, .d_ff = 8, .n_experts = 8, .d_shared = 8};
    const moe::routers::sigmoid_topk router{.k = 3};
    layer one(with_shared, router), part(with_shared, moe::parallel::placement{.comm = world()}, router);
    one.randomize(9);
    part.randomize(9);
    const moe::index tokens = 50;
    const auto s = moe::parallel::token_slice(tokens, world()->rank(), world()->size());
    const moe::matrix<float> x = random_matrix(tokens, 16, 31);
    moe::matrix<float> y(tokens, 16), y_part(s.rows, 16);
    one.forward(x, y);
    part.forward(x.middleRows(s.first, s.rows), y_part);
    moe::losses::bias_update u1(0.01), u1_part(0.01);
    u1.observe(one.last_routing());
    u1_part.observe(part.last_routing());
    CHECK(u1_part.counts() == u1.counts());
}

TEST_CASE("a loss that fails on one rank fails on every rank, and the layer runs on afterwards", "[parallel][errors]") {
    // seq_balance needs whole sequences of 3 on every rank: 11 tokens give a rank 5 (2 ranks) or 2 (4 ranks).
    using layer = moe::mixtral_layer<float, moe::losses::seq_balance>;
    const moe::layer_shape shape{.d_model = 8, .d_ff = 8, .n_experts = 4};
    layer part(shape, moe::parallel::placement{.comm = world()}, moe::routers::softmax_topk{.k = 2}, {}, {},
               std::tuple<moe::losses::seq_balance>{{.seq_len = 3}});
    part.randomize(1);
    const auto run = [&](moe::index tokens) {
        const auto s = moe::parallel::token_slice(tokens, world()->rank(), world()->size());
        const moe::matrix<float> x = random_matrix(tokens, 8, 41).middleRows(s.first, s.rows);
        moe::matrix<float> y(s.rows, 8);
        part.forward(x, y);
    };
    const bool whole = moe::parallel::token_slice(11, world()->rank(), world()->size()).rows % 3 == 0;
    if (whole)
        CHECK_THROWS_WITH(run(11), Catch::Contains("other rank(s) failed"));
    else
        CHECK_THROWS_WITH(run(11), Catch::Contains("whole sequences"));
    CHECK_NOTHROW(run(12));
}

TEST_CASE("expert-parallel placements are checked", "[parallel][errors]") {
    const moe::layer_shape shape{.d_model = 8, .d_ff = 8, .n_experts = 4};
    using layer = moe::mixtral_layer<float>;
    const auto comm = world();
    CHECK_THROWS_AS(layer(shape, moe::parallel::placement{.comm = comm, .owners = {0, 0, 0}}), moe::value_error);
    CHECK_THROWS_WITH(layer(shape, moe::parallel::placement{.comm = comm, .owners = {0, 0, comm->size(), 0}}),
                      Catch::Contains("expert 2") && Catch::Contains("rank " + std::to_string(comm->size())));
    layer one_process(shape);
    CHECK_THROWS_AS(one_process.parallel_load(), moe::error);
    // A rank holds (and allocates) only its experts.
    layer part(shape, moe::parallel::placement{.comm = comm});
    for (moe::index e = 0; e < 4; ++e) {
        const bool held = moe::parallel::placement::blocks(4, comm->size())[static_cast<std::size_t>(e)] == comm->rank();
        CHECK(part.owns_expert(e) == held);
        CHECK((part.expert_weights(e).in.size() > 0) == held);
    }
}

int main(int argc, char** argv) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    Catch::Session session;
    int failed = session.applyCommandLine(argc, argv);
    if (failed == 0) failed = session.run();
    // Every rank reports its own failures; the job fails when any rank failed.
    int any = failed != 0 ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return any;
}
