#include <moe/layer.hpp>
#include <moe/routers/any_router.hpp>
#include <moe/routers/softmax_topk.hpp>
#include <moe/testing/conformance.hpp>

#include <catch2/catch.hpp>

#include <algorithm>

namespace {
// Routers that break one rule each, to show the checks catch them.
struct duplicate_ids {
    static constexpr bool batch_dependent = false;
    void validate(moe::index) const {}
    template <class Scalar>
    void route(const moe::matrix<Scalar>& logits, moe::routing<Scalar>& out) const {
        out.reset_fixed_k(logits.rows(), logits.cols(), 2);
        out.scores = logits;
        std::fill(out.expert_ids.begin(), out.expert_ids.end(), 0);
        std::fill(out.weights.begin(), out.weights.end(), Scalar(0.5));
    }
};
struct peeks_at_batch {  // claims batch independence but uses the batch size
    static constexpr bool batch_dependent = false;
    void validate(moe::index) const {}
    template <class Scalar>
    void route(const moe::matrix<Scalar>& logits, moe::routing<Scalar>& out) const {
        out.reset_fixed_k(logits.rows(), logits.cols(), 1);
        out.scores = logits;
        for (moe::index t = 0; t < logits.rows(); ++t) {
            out.expert_ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(logits.rows() % logits.cols());
            out.weights[static_cast<std::size_t>(t)] = 1;
        }
    }
};
}  // namespace

TEST_CASE("check_router accepts a conforming router and reports each broken rule", "[testing]") {
    const moe::matrix<float> logits = moe::matrix<float>::Random(10, 4);
    CHECK(moe::testing::check_router(moe::routers::softmax_topk{.k = 2, .normalize = true}, logits, 4,
                                     {.weight_sum = 1.0, .slots_per_token = 2})
              .ok());
    const auto unnormalised = moe::testing::check_router(moe::routers::softmax_topk{.k = 2}, logits, 4, {.weight_sum = 1.0});
    CHECK_FALSE(unnormalised.ok());
    CHECK_THAT(unnormalised.str(), Catch::Contains("weights sum to"));
    CHECK_THAT(moe::testing::check_router(duplicate_ids{}, logits, 4).str(), Catch::Contains("chosen twice"));
    CHECK_THAT(moe::testing::check_router(peeks_at_batch{}, logits, 4).str(), Catch::Contains("routed differently alone"));
    CHECK_THAT(moe::testing::check_router(moe::routers::softmax_topk{.k = 9}, logits, 4).str(), Catch::Contains("validate"));
    CHECK_THAT(moe::testing::check_router(moe::routers::softmax_topk{.k = 2}, logits, 4, {.rows_per_expert = 5}).str(),
               Catch::Contains("rows, expected 5"));
}

TEST_CASE("check_thread_invariance compares 1 and 2 threads", "[testing]") {
    moe::layer<float, moe::routers::softmax_topk, moe::experts::swiglu> layer({.d_model = 16, .d_ff = 8, .n_experts = 4});
    layer.randomize(9);
    const moe::matrix<float> x = moe::matrix<float>::Random(200, 16);
    CHECK(moe::testing::check_thread_invariance(layer, x).ok());
    CHECK(layer.threads() == 1);
}

namespace {

/// The conformance checks of `router` on random and extreme logits, and the thread invariance of a
/// layer routed by it.
void check_conformance(const moe::routers::any_router& router, const moe::testing::router_expectations& expect) {
    namespace r = moe::routers;
    const moe::index experts = 8, tokens = 300;
    const moe::matrix<float> logits = moe::matrix<float>::Random(tokens, router.logit_rows(experts)) * 3.0f;
    // Check the router itself (its own batch_dependent, not any_router's conservative one).
    const auto report = std::visit(
        [&](const auto& held) { return moe::testing::check_router(held, logits, experts, expect); }, router.get());
    INFO(report.str());
    CHECK(report.ok());
    // Extreme logits: huge of both signs, all equal (ties everywhere), denormal. Invariants only:
    // weights stay finite, ids valid and distinct, routing deterministic.
    const moe::index rows = router.logit_rows(experts);
    moe::matrix<float> huge(tokens, rows), equal = moe::matrix<float>::Constant(tokens, rows, 0.25f);
    for (moe::index i = 0; i < huge.size(); ++i) huge.data()[i] = (i * 7919 % 3 == 0 ? -1e30f : 1e30f) * (1 + i % 5);
    const moe::matrix<float> tiny = moe::matrix<float>::Random(tokens, rows) * 1e-39f;
    for (const moe::matrix<float>* extreme : std::initializer_list<const moe::matrix<float>*>{&huge, &equal, &tiny}) {
        const auto r2 = std::visit([&](const auto& held) { return moe::testing::check_router(held, *extreme, experts); },
                                   router.get());
        INFO(r2.str());
        CHECK(r2.ok());
    }
    moe::layer<float, r::any_router, moe::experts::swiglu> layer({.d_model = 24, .d_ff = 16, .n_experts = experts}, router);
    layer.randomize(11);
    const moe::matrix<float> x = moe::matrix<float>::Random(tokens, 24);
    const auto threads = moe::testing::check_thread_invariance(layer, x);
    INFO(threads.str());
    CHECK(threads.ok());
}

}  // namespace

TEST_CASE("every built-in router passes the conformance checks and is thread-count invariant", "[testing][routers]") {
    namespace r = moe::routers;
    struct entry {
        const char* name;
        moe::routers::any_router router;
        bool batch_dependent;
        moe::testing::router_expectations expect;
    };
    const entry entries[] = {
        {"softmax_topk", r::softmax_topk{.k = 2, .normalize = true}, false, {.weight_sum = 1.0, .slots_per_token = 2}},
        {"softmax_topk scaled", r::softmax_topk{.k = 3, .normalize = true, .scale = 2.0}, false, {.weight_sum = 2.0}},
        {"sigmoid_topk", r::sigmoid_topk{.k = 2, .normalize = true, .scale = 1.0, .n_group = 4, .topk_group = 2}, false,
         {.weight_sum = 1.0, .slots_per_token = 2}},
        {"capacity", r::capacity<r::softmax_topk>{.inner = {.k = 2}, .capacity_factor = 0.8, .policy = r::drop_policy::probs},
         true, {.slots_per_token = 2}},
        {"top_p", r::top_p{.threshold = 0.6, .max_k = 4, .normalize = true}, false, {.weight_sum = 1.0}},
        {"null_experts", r::null_experts{.k = 2, .nulls = 2}, false, {.weight_sum = 1.0, .slots_per_token = 2}},
        {"sinkhorn", r::sinkhorn{.k = 2, .iterations = 5}, true, {.weight_sum = 1.0, .slots_per_token = 2}},
        {"expert_choice", r::expert_choice{.capacity_factor = 2.0}, true, {.rows_per_expert = 75}},
    };
    for (const auto& e : entries) {
        INFO(e.name);
        CHECK(e.router.is_batch_dependent() == e.batch_dependent);
        check_conformance(e.router, e.expect);
    }
}

TEST_CASE("every registered router, built from its settings' examples, passes the conformance checks",
          "[testing][routers][registry]") {
    // A router added to the registry is checked here without a line of its own: built from the
    // example of each setting it takes, and again without capacity where it takes capacity.
    namespace r = moe::routers;
    for (std::string_view name : r::builtin_routers::names) {
        const auto capacitys = [&](const r::setting& s) {  // capacity's settings, where it wraps the router
            const auto& c = r::capacity<r::softmax_topk>::settings;
            return r::builtin_routers::capacity_applies(name) &&
                   std::any_of(c.begin(), c.end(), [&](const r::setting& t) { return t.key == s.key; });
        };
        INFO(name);
        moe::routers::setting_values examples, uncapped;
        for (const r::setting& s : r::builtin_routers::settings_of(name)) {
            examples.set(std::string(s.key), std::string(s.example));
            if (!capacitys(s)) uncapped.set(std::string(s.key), std::string(s.example));
        }
        check_conformance(r::make_router(name, examples), {});
        if (r::builtin_routers::capacity_applies(name)) {
            INFO(std::string(name) + " without capacity");
            check_conformance(r::make_router(name, uncapped), {});
        }
    }
}
