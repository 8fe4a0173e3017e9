// The expert exchange and an expert-parallel layer over a one-rank communicator (no MPI needed): the
// whole protocol runs, and the result must be the one-process layer's bit for bit. Several ranks are
// tested under mpirun by tests/parallel/test_parallel_mpi.cpp.
#include "one_of_ranks.hpp"

#include <catch2/catch.hpp>

#include <moe/moe.hpp>
#include <moe/parallel/exchange.hpp>

#include <algorithm>

namespace {
// One rank: an all-to-all is a copy and a sum changes nothing.
struct loopback final : moe::parallel::communicator {
    [[nodiscard]] int rank() const override { return 0; }
    [[nodiscard]] int size() const override { return 1; }
    template <class T>
    static void copy(std::span<const T> send, std::span<const moe::index> counts, std::span<T> recv,
                     std::span<const moe::index> recv_counts) {
        REQUIRE(counts.size() == 1);
        REQUIRE(counts[0] == recv_counts[0]);
        std::copy_n(send.begin(), counts[0], recv.begin());
    }
    void all_to_all(std::span<const float> s, std::span<const moe::index> c, std::span<float> r,
                    std::span<const moe::index> rc) override {
        copy(s, c, r, rc);
        ++exchanges;
    }
    void all_to_all(std::span<const double> s, std::span<const moe::index> c, std::span<double> r,
                    std::span<const moe::index> rc) override {
        copy(s, c, r, rc);
        ++exchanges;
    }
    void all_to_all(std::span<const moe::index> s, std::span<const moe::index> c, std::span<moe::index> r,
                    std::span<const moe::index> rc) override {
        copy(s, c, r, rc);
    }
    void all_sum(std::span<float>) override {}
    void all_sum(std::span<double>) override {}
    void all_sum(std::span<moe::index>) override {}
    int exchanges = 0;  // row exchanges (float or double)
};
}  // namespace

TEST_CASE("expert_exchange plans, sends and gives back the rows of a routing", "[parallel]") {
    moe::routing<float> r;
    r.reset_fixed_k(3, 3, 2);
    r.expert_ids = {2, 0, 1, 2, 0, 1};
    r.build_dispatch();
    auto comm = std::make_shared<loopback>();
    moe::parallel::expert_exchange<float> ex(moe::parallel::placement{.comm = comm}, 3);
    ex.plan(r, false);
    CHECK(ex.own_offsets() == std::vector<moe::index>{0, 2, 4, 6});
    moe::matrix<float> received;
    ex.send(2, [](moe::index row, float* to) { to[0] = static_cast<float>(row), to[1] = -static_cast<float>(row); },
            received);
    REQUIRE(received.rows() == 6);
    for (moe::index row = 0; row < 6; ++row) CHECK(received(ex.received_row(row), 0) == static_cast<float>(row));
    moe::matrix<float> back(6, 2);
    ex.give_back(received, back);  // own rows in received order are the routing rows again
    for (moe::index row = 0; row < 6; ++row) CHECK(back(row, 1) == -static_cast<float>(row));
    const auto load = ex.load();
    CHECK(load.rows == std::vector<moe::index>{6});
    CHECK(load.bytes_sent == std::vector<moe::index>{0});  // rows a rank keeps cross nothing
    CHECK(load.to_json() == R"({"ranks": 1, "rows": [6], "imbalance": 1, "imbalance_before": 1, "rows_moved": 0, "bytes_sent": [0], "bytes_received": [0], "weight_bytes_sent": [0], "gradient_bytes_sent": [0]})");
    CHECK_THROWS_AS(moe::parallel::expert_exchange<float>(moe::parallel::placement{}, 3), moe::value_error);
}

TEST_CASE("an expert-parallel layer of one rank is the one-process layer bit for bit", "[parallel][layer]") {
    auto comm = std::make_shared<loopback>();
    using layer = moe::qwen2_moe_layer<float, moe::losses::load_balance>;
    const moe::layer_shape shape{.d_model = 16, .d_ff = 24, .n_experts = 6, .d_shared = 20};
    const moe::routers::softmax_topk router{.k = 2};
    const std::tuple<moe::losses::load_balance> losses{{.alpha = 0.5}};
    layer one(shape, router, {}, {}, losses), part(shape, moe::parallel::placement{.comm = comm}, router, {}, {}, losses);
    one.randomize(4);
    part.randomize(4);
    one.set_training(true);
    part.set_training(true);
    const moe::matrix<float> x = moe::matrix<float>::Random(300, 16), g = moe::matrix<float>::Random(300, 16);
    moe::matrix<float> y(300, 16), y2(300, 16), gx(300, 16), gx2(300, 16);
    one.forward(x, y);
    part.forward(x, y2);
    CHECK(comm->exchanges == 2);  // rows out, results back
    CHECK((y.array() == y2.array()).all());
    CHECK(part.loss_values() == one.loss_values());
    one.backward(x, g, gx);
    part.backward(x, g, gx2);
    CHECK(comm->exchanges == 4);
    CHECK((gx.array() == gx2.array()).all());
    const auto a = one.parameters(), b = part.parameters();
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
        INFO(a[i].name);
        CHECK(a[i].name == b[i].name);
        CHECK((a[i].grad.array() == b[i].grad.array()).all());
    }
    CHECK(part.statistics().to_json() == one.statistics().to_json());
    CHECK(part.parallel_load().rows == std::vector<moe::index>{one.last_routing().rows()});
}

TEST_CASE("an expert-parallel layer of one rank routes the whole batch with a batch-dependent router",
          "[parallel][layer]") {
    // The routing of the whole batch (logits gathered, own slots taken, dL/dw gathered in backward) over
    // the communicator's default all_gather; at several ranks under mpirun in tests/parallel.
    const moe::layer_shape shape{.d_model = 16, .d_ff = 24, .n_experts = 6};
    std::shared_ptr<loopback> comm;
    const auto check = [&](auto one, auto part) {
        comm->exchanges = 0;
        one.randomize(6);
        part.randomize(6);
        one.set_training(true);
        part.set_training(true);
        const moe::matrix<float> x = moe::matrix<float>::Random(45, 16), g = moe::matrix<float>::Random(45, 16);
        moe::matrix<float> y(45, 16), y2(45, 16), gx(45, 16), gx2(45, 16);
        one.forward(x, y);
        part.forward(x, y2);
        CHECK(comm->exchanges == 3);  // the logits gathered, rows out, results back
        CHECK((y.array() == y2.array()).all());
        CHECK(part.last_routing().expert_ids == one.last_routing().expert_ids);
        one.backward(x, g, gx);
        part.backward(x, g, gx2);
        CHECK(comm->exchanges == 6);  // dL/dw per slot gathered, gradients of the rows out and back
        CHECK((gx.array() == gx2.array()).all());
        const auto a = one.parameters(), b = part.parameters();
        REQUIRE(a.size() == b.size());
        for (std::size_t i = 0; i < a.size(); ++i) {
            INFO(a[i].name);
            CHECK((a[i].grad.array() == b[i].grad.array()).all());
        }
        CHECK(part.statistics().to_json() == one.statistics().to_json());
    };
    comm = std::make_shared<loopback>();
    const moe::parallel::placement where{.comm = comm};
    namespace r = moe::routers;
    const r::sinkhorn plan{.k = 2, .iterations = 20, .gates = r::sinkhorn_gates::plan};
    check(moe::sbase_layer<float>(shape, plan), moe::sbase_layer<float>(shape, where, plan));
    const r::capacity<r::softmax_topk> cap{.inner = {.k = 2}, .capacity_factor = 0.75, .policy = r::drop_policy::probs};
    check(moe::switch_layer<float>(shape, cap), moe::switch_layer<float>(shape, where, cap));
}

TEST_CASE("expert_exchange gathers the batch's logits, takes a rank's slots and gathers its slot values",
          "[parallel]") {
    // Rank 1 of 3 with 1 of the batch's 5 tokens (rank 0 has 2, rank 2 has 2); its collectives play the
    // other ranks: each all_sum adds their canned values, each all-to-all hands in their blocks.
    struct rank_1_of_3 final : one_of_ranks {
        rank_1_of_3() : one_of_ranks(1, 3) {}
        using one_of_ranks::all_sum, one_of_ranks::all_to_all;
        std::vector<std::vector<moe::index>> others;  // what the other ranks add to each all_sum, in order
        std::vector<std::vector<float>> blocks;       // rank 0's and rank 2's values of each all-gather
        void all_to_all(std::span<const float> send, std::span<const moe::index> send_counts, std::span<float> recv,
                        std::span<const moe::index> recv_counts) override {
            REQUIRE(!blocks.empty());
            const auto mine = static_cast<std::size_t>(send_counts[1]);
            REQUIRE(static_cast<std::size_t>(recv_counts[0] + recv_counts[2]) == blocks.front().size());
            auto at = std::copy_n(blocks.front().begin(), recv_counts[0], recv.begin());
            at = std::copy_n(send.begin() + static_cast<std::ptrdiff_t>(mine), recv_counts[1], at);
            std::copy(blocks.front().begin() + recv_counts[0], blocks.front().end(), at);
            blocks.erase(blocks.begin());
        }
        void all_sum(std::span<moe::index> v) override {
            REQUIRE(!others.empty());
            REQUIRE(others.front().size() == v.size());
            for (std::size_t i = 0; i < v.size(); ++i) v[i] += others.front()[i];
            others.erase(others.begin());
        }
    };
    auto comm = std::make_shared<rank_1_of_3>();
    moe::parallel::expert_exchange<float> ex(moe::parallel::placement{.comm = comm}, 2);
    comm->others = {{0, 2, 0, 2}};                       // token counts (after a leading 0)
    comm->blocks = {{0, 1, 2, 3, 40, 41, 42, 43}};       // rank 0's two logit rows, rank 2's two
    moe::matrix<float> mine(1, 2), batch;
    mine << 20, 21;
    ex.gather_tokens(mine, batch);
    moe::matrix<float> expected(5, 2);
    expected << 0, 1, 2, 3, 20, 21, 40, 41, 42, 43;
    CHECK(batch == expected);
    CHECK(ex.own_tokens().first == 2);
    CHECK(ex.own_tokens().rows == 1);

    // A routing of the batch with 1, 2, 2, 0 and 1 slots: this rank's token is the third.
    moe::routing<float> whole, own;
    whole.begin_tokens(2);
    whole.scores = batch;
    for (const auto& token : std::vector<std::vector<std::int32_t>>{{0}, {1, 0}, {1, moe::dropped_slot}, {}, {0}}) {
        for (const auto id : token) whole.add_slot(id, 0.5f + static_cast<float>(whole.slots()));
        whole.end_token();
    }
    whole.undropped_ids = {0, 1, 0, 1, 1, 0};
    ex.take_own(whole, own);
    CHECK(own.tokens == 1);
    CHECK(own.token_offsets == std::vector<moe::index>{0, 2});
    CHECK(own.expert_ids == std::vector<std::int32_t>{1, moe::dropped_slot});
    CHECK(own.weights == std::vector<float>{3.5f, 4.5f});
    CHECK(own.undropped_ids == std::vector<std::int32_t>{1, 1});
    CHECK(own.scores == expected.middleRows(2, 1));

    comm->others = {{3, 0, 1}, {0}};  // slots of rank 0 and rank 2; no rank fails
    comm->blocks = {{7, 8, 9, 10}};
    const std::vector<float> grads{-1, -2};
    std::vector<float> all;
    ex.gather_slots(std::span<const float>(grads), whole, all);
    CHECK(all == std::vector<float>{7, 8, 9, -1, -2, 10});

    // Ranks whose routings of the batch differ (rank 2 counts 2 slots where this routing has 1): every
    // rank fails, this one with the reason.
    comm->others = {{3, 0, 2}, {0}};
    CHECK_THROWS_WITH(ex.gather_slots(std::span<const float>(grads), whole, all),
                      Catch::Contains("routings of the whole batch differ"));
    whole.tokens = 4;  // a router that lost a token
    CHECK_THROWS_WITH(ex.take_own(whole, own), Catch::Contains("routing of 4 tokens for the batch's 5"));
}

TEST_CASE("expert_exchange passes each re-balanced expert's weight-gradient sum along its segments", "[parallel]") {
    // Rank 1 of 4, experts owned in pairs (0 0 1 1 2 2 3 3), no rows of its own; the other ranks' rows
    // make the plan (rebalance.hpp's rule, min_rows 1):
    //   expert 4: rank 0 (38 rows), rank 1 (12), its owner rank 2 (0)
    //   expert 5: rank 1 (3), its owner rank 2 (41)      expert 6: rank 1 (1), its owner rank 3 (36)
    // So in round 1 rank 1 sends its sums of experts 5 and 6 to ranks 2 and 3 and receives expert 4's
    // from rank 0; in round 2 it sends expert 4's, continued, to rank 2.
    struct rank_1_of_4 final : one_of_ranks {
        rank_1_of_4() : one_of_ranks(1, 4) {}
        using one_of_ranks::all_sum, one_of_ranks::all_to_all;
        std::vector<moe::index> rows;                   // every expert's rows, as rank 0 holds them
        std::vector<moe::index> sent_counts;            // of the last float all-to-all
        std::vector<float> sent, from_rank_0;           // its values; what rank 0 sends in it
        void all_sum(std::span<moe::index> v) override {
            if (v.size() != 4 * rows.size() + 1) return;  // load(): the other ranks add nothing
            std::copy(rows.begin(), rows.end(), v.begin());  // plan(): [rank][expert] rows, then the ranks that train
            v.back() += 3;
        }
        void all_to_all(std::span<const float> send, std::span<const moe::index> send_counts, std::span<float> recv,
                        std::span<const moe::index> recv_counts) override {
            sent.assign(send.begin(), send.end());
            sent_counts.assign(send_counts.begin(), send_counts.end());
            REQUIRE(recv_counts[0] == static_cast<moe::index>(from_rank_0.size()));
            for (const std::size_t q : {1, 2, 3}) REQUIRE(recv_counts[q] == 0);
            std::copy(from_rank_0.begin(), from_rank_0.end(), recv.begin());
        }
    };
    auto comm = std::make_shared<rank_1_of_4>();
    comm->rows = {1, 2, 21, 2, 50, 44, 37, 5};
    moe::parallel::expert_exchange<float> ex(
        moe::parallel::placement{.comm = comm, .rebalance = {.enabled = true, .min_rows = 1}}, 8, 1);
    moe::routing<float> none;
    none.reset_fixed_k(0, 8, 2);
    none.build_dispatch();
    ex.plan(none, true);
    const auto& plan = ex.last_plan();
    REQUIRE(plan.experts[4].size() == 3);
    CHECK(plan.experts[4][1].rank == 1);
    CHECK(plan.experts[4][1].rows == 12);
    CHECK(ex.gradient_rounds() == 2);
    CHECK(ex.segment_position(4) == 1);
    CHECK(ex.segment_position(5) == 0);
    CHECK(ex.segment_position(6) == 0);
    CHECK(ex.segment_position(0) == -1);

    struct sums {
        moe::matrix<float> in, out;
    };
    std::vector<sums> grads(8);
    for (std::size_t e = 0; e < 8; ++e) {  // 2 x 3 and 3 x 1 values: 10 e + 0..5, 100 e + 0..2
        grads[e].in.resize(2, 3);
        grads[e].out.resize(3, 1);
        for (moe::index i = 0; i < 6; ++i) grads[e].in.data()[i] = static_cast<float>(10 * e) + static_cast<float>(i);
        for (moe::index i = 0; i < 3; ++i) grads[e].out.data()[i] = static_cast<float>(100 * e) + static_cast<float>(i);
    }
    const auto grad = [&](moe::index e) -> sums& { return grads[static_cast<std::size_t>(e)]; };
    comm->from_rank_0 = {-1, -2, -3, -4, -5, -6, -7, -8, -9};  // expert 4's sum from rank 0
    ex.pass_gradients(1, grad);
    CHECK(comm->sent_counts == std::vector<moe::index>{0, 0, 9, 9});
    CHECK(comm->sent == std::vector<float>{50, 51, 52, 53, 54, 55, 500, 501, 502,     // expert 5 to rank 2
                                           60, 61, 62, 63, 64, 65, 600, 601, 602});  // expert 6 to rank 3
    const auto values = [](const moe::matrix<float>& m) { return std::vector<float>(m.data(), m.data() + m.size()); };
    CHECK(values(grads[4].in) == std::vector<float>{-1, -2, -3, -4, -5, -6});  // received in place
    CHECK(values(grads[4].out) == std::vector<float>{-7, -8, -9});
    CHECK(values(grads[5].in) == std::vector<float>{50, 51, 52, 53, 54, 55});  // sent: unchanged
    comm->from_rank_0.clear();
    grads[4].in(0, 0) = 42;  // as if this rank's rows continued the sum
    ex.pass_gradients(2, grad);
    CHECK(comm->sent_counts == std::vector<moe::index>{0, 0, 9, 0});
    CHECK(comm->sent == std::vector<float>{42, -2, -3, -4, -5, -6, -7, -8, -9});
    CHECK(ex.load().gradient_bytes_sent[1] == 27 * static_cast<moe::index>(sizeof(float)));  // 18 values, then 9
}
