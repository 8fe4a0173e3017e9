#include "golden.hpp"

#include <moe/losses/losses.hpp>

TEMPLATE_TEST_CASE("load-balance and z-loss match the PyTorch reference", "[losses]", float, double) {
    for (const char* name : {"swiglu_topk2", "capacity_position", "k_eq_e"}) {
        const golden::layer_case c(name);
        INFO(name);
        using router = moe::routers::capacity<moe::routers::softmax_topk>;
        // Cases without a capacity factor get one too large to drop anything.
        router r = c.option("capacity_factor").empty()
                       ? router{.inner = c.router_as<moe::routers::softmax_topk>(), .capacity_factor = 1e6}
                       : c.router_as<router>();
        moe::layer<TestType, router, moe::experts::swiglu, moe::shared_experts::none, moe::losses::load_balance,
                   moe::losses::z_loss>
            layer(c.shape(), r, {}, {}, {{.alpha = 1.0}, {.beta = 1.0}});
        c.load(layer);
        const auto x = golden::read_matrix<TestType>(c.file, "x");
        moe::matrix<TestType> y(x.rows(), x.cols());
        layer.forward(x, y);
        CHECK(layer.loss_values()[0] == Approx(golden::read_matrix(c.file, "expected.load_balance")(0, 0)).epsilon(2e-5));
        CHECK(layer.loss_values()[1] == Approx(golden::read_matrix(c.file, "expected.z_loss")(0, 0)).epsilon(2e-5));
    }
}

TEST_CASE("L1-L4 values and gradients match PyTorch autograd for every router", "[losses][backward]") {
    std::size_t cases = 0;
    for (const auto& entry : std::filesystem::directory_iterator(golden::data_dir / "layer")) {
        const golden::layer_case c(entry.path().stem().string());
        INFO("layer case " << c.name);
        ++cases;
        const auto x = golden::read_matrix(c.file, "x");
        const auto w = golden::read_matrix(c.file, "router.weight");
        // Row by row, so identical router rows (the ties case) give identical logits, as in the layer.
        moe::matrix<float> logits(x.rows(), w.rows());
        for (moe::index i = 0; i < x.rows(); ++i)
            for (moe::index e = 0; e < w.rows(); ++e) logits(i, e) = x.row(i).dot(w.row(e));
        const moe::routers::any_router r = c.router();
        auto state = moe::make_router_state<float>(r, c.shape().n_experts);
        if (auto* bias = moe::correction_bias<float>(state)) *bias = golden::read_matrix(c.file, "router.bias");
        moe::routing<float> routing;
        moe::route(r, logits, state, routing);
        routing.build_dispatch();

        const auto check = [&](const auto& loss, const std::string& name) {
            INFO(name);
            CHECK(loss.value(routing, logits) == Approx(golden::read_matrix(c.file, "expected." + name)(0, 0)).epsilon(2e-5));
            moe::matrix<float> gz = moe::matrix<float>::Zero(logits.rows(), logits.cols());
            loss.gradient(routing, logits, gz);
            const moe::matrix<float> grad_x = gz * w, grad_w = gz.transpose() * x;
            const auto expected_x = golden::read_matrix(c.file, "grad_" + name + ".x");
            const auto expected_w = golden::read_matrix(c.file, "grad_" + name + ".router.weight");
            if (expected_w.cwiseAbs().maxCoeff() < 1e-12f) {
                // Equal counts for every expert (expert choice, k = E): L1 and L3 are constant, gradient 0.
                CHECK(grad_w.cwiseAbs().maxCoeff() < 1e-6f);
                CHECK(grad_x.cwiseAbs().maxCoeff() < 1e-6f);
            } else {
                CHECK(golden::relative_error(grad_x, expected_x) <= 1e-4);
                CHECK(golden::relative_error(grad_w, expected_w) <= 1e-4);
            }
        };
        check(moe::losses::load_balance{.alpha = 1.0}, "load_balance");
        check(moe::losses::z_loss{.beta = 1.0}, "z_loss");
        check(moe::losses::seq_balance{.alpha = 1.0, .seq_len = c.file.read_integers("seq_balance.seq_len").at(0)},
              "seq_balance");
        if (c.file.contains("expected.null_balance")) check(moe::losses::null_balance{.alpha = 1.0}, "null_balance");
    }
    CHECK(cases >= 25);
}

namespace {
// A batch routed in two parts (expert parallelism): with the parts' `batch` totals set, every loss
// value of the parts sums to the whole batch's and every gradient row is the whole batch's.
template <class Router, class Loss>
void check_parts(const Router& router, const Loss& loss, moe::index tokens, moe::index split, moe::index experts) {
    const moe::index cols = moe::logit_rows(router, experts);
    const moe::matrix<double> z = moe::matrix<double>::Random(tokens, cols) * 2.0;
    const auto routed = [&](const moe::matrix<double>& logits) {
        moe::routing<double> r;
        auto state = moe::make_router_state<double>(router, experts);
        moe::route(router, logits, state, r);
        r.build_dispatch();
        return r;
    };
    const moe::matrix<double> za = z.topRows(split), zb = z.bottomRows(tokens - split);
    const moe::routing<double> whole = routed(z);
    moe::routing<double> a = routed(za), b = routed(zb);
    std::vector<moe::index> chosen;
    for (moe::index id = 0; id < cols; ++id) {
        chosen.push_back(a.chosen_count(id, false) + b.chosen_count(id, false));
        CHECK(chosen.back() == whole.chosen_count(id));
    }
    for (auto* part : {&a, &b}) part->batch = {.tokens = tokens, .slots = a.slots() + b.slots(), .chosen = chosen};
    CHECK(a.batch_tokens() == tokens);
    CHECK(loss.value(a, za) + loss.value(b, zb) == Approx(loss.value(whole, z)).epsilon(1e-12));
    moe::matrix<double> g = moe::matrix<double>::Zero(tokens, cols), ga = moe::matrix<double>::Zero(split, cols),
                        gb = moe::matrix<double>::Zero(tokens - split, cols);
    loss.gradient(whole, z, g);
    loss.gradient(a, za, ga);
    loss.gradient(b, zb, gb);
    CHECK((ga - g.topRows(split)).cwiseAbs().maxCoeff() <= 1e-15);
    CHECK((gb - g.bottomRows(tokens - split)).cwiseAbs().maxCoeff() <= 1e-15);
    CHECK(g.cwiseAbs().maxCoeff() > 1e-6);  // the comparison is not of zeros
}
}  // namespace

TEST_CASE("L1-L4 of a batch routed in parts sum to the whole batch's loss", "[losses][parallel]") {
    const moe::routers::softmax_topk top2{.k = 2};
    check_parts(top2, moe::losses::load_balance{.alpha = 0.7}, 12, 5, 6);
    check_parts(top2, moe::losses::load_balance{.alpha = 0.7, .per_token = true}, 12, 5, 6);
    check_parts(top2, moe::losses::z_loss{.beta = 0.3}, 12, 5, 6);
    check_parts(top2, moe::losses::seq_balance{.alpha = 0.4, .seq_len = 4}, 12, 8, 6);  // parts of whole sequences
    check_parts(moe::routers::sigmoid_topk{.k = 3}, moe::losses::seq_balance{.alpha = 0.4, .seq_len = 3}, 12, 6, 6);
    check_parts(moe::routers::null_experts{.k = 2, .nulls = 2}, moe::losses::null_balance{.alpha = 0.5}, 12, 7, 6);

    // A part that is not whole sequences (seq_len 0: the whole batch is one sequence) is refused.
    moe::routing<double> r;
    r.reset_fixed_k(4, 4, 1);
    r.scores = moe::matrix<double>::Constant(4, 4, 0.25);
    r.build_dispatch();
    r.batch = {.tokens = 8, .slots = 8, .chosen = {8, 0, 0, 0}};
    const moe::matrix<double> z = moe::matrix<double>::Zero(4, 4);
    CHECK_THROWS_WITH(moe::losses::seq_balance{}.value(r, z),
                      Catch::Contains("each part must hold whole sequences"));
}
