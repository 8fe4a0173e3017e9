// The expert exchange and an expert-parallel layer over a one-rank communicator (no MPI needed): the
// whole protocol runs, and the result must be the one-process layer's bit for bit. Several ranks are
// tested under mpirun by tests/parallel/test_parallel_mpi.cpp.
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
    ex.plan(r);
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
    CHECK(load.to_json() == R"({"ranks": 1, "rows": [6], "imbalance": 1, "bytes_sent": [0], "bytes_received": [0]})");
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
    const auto check = [&](auto one, auto part) {
        one.randomize(6);
        part.randomize(6);
        one.set_training(true);
        part.set_training(true);
        const moe::matrix<float> x = moe::matrix<float>::Random(45, 16), g = moe::matrix<float>::Random(45, 16);
        moe::matrix<float> y(45, 16), y2(45, 16), gx(45, 16), gx2(45, 16);
        one.forward(x, y);
        part.forward(x, y2);
        CHECK((y.array() == y2.array()).all());
        CHECK(part.last_routing().expert_ids == one.last_routing().expert_ids);
        one.backward(x, g, gx);
        part.backward(x, g, gx2);
        CHECK((gx.array() == gx2.array()).all());
        const auto a = one.parameters(), b = part.parameters();
        REQUIRE(a.size() == b.size());
        for (std::size_t i = 0; i < a.size(); ++i) {
            INFO(a[i].name);
            CHECK((a[i].grad.array() == b[i].grad.array()).all());
        }
        CHECK(part.statistics().to_json() == one.statistics().to_json());
    };
    const moe::parallel::placement where{.comm = std::make_shared<loopback>()};
    namespace r = moe::routers;
    const r::sinkhorn plan{.k = 2, .iterations = 20, .gates = r::sinkhorn_gates::plan};
    check(moe::sbase_layer<float>(shape, plan), moe::sbase_layer<float>(shape, where, plan));
    const r::capacity<r::softmax_topk> cap{.inner = {.k = 2}, .capacity_factor = 0.75, .policy = r::drop_policy::probs};
    check(moe::switch_layer<float>(shape, cap), moe::switch_layer<float>(shape, where, cap));
}
