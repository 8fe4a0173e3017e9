#pragma once
/// \file
/// Conformance checks any router must pass, for the library's own routers and for routers users
/// write. Each check returns a `report` listing what failed, so it fits any test framework:
/// `REQUIRE(moe::testing::check_router(my_router, logits).ok())`.

#include "moe/concepts.hpp"
#include "moe/routing.hpp"

#include <cmath>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace moe::testing {

/// What a check found wrong; empty when the router conforms.
struct report {
    std::vector<std::string> failures;
    [[nodiscard]] bool ok() const { return failures.empty(); }
    /// All failures, one per line.
    [[nodiscard]] std::string str() const {
        std::string s;
        for (const auto& f : failures) s += f + "\n";
        return s;
    }
};

/// Properties a router declares, checked on top of the invariants every router has.
struct router_expectations {
    /// Every token's weights on real experts sum to this (when it has any), e.g. 1 for normalised routers.
    std::optional<double> weight_sum{};
    /// Every expert processes exactly this many rows (expert choice's bucket size C).
    std::optional<index> rows_per_expert{};
    /// Every token has exactly this many slots (fixed-k routers).
    std::optional<index> slots_per_token{};
    /// Relative tolerance of `weight_sum`.
    double tolerance = 1e-5;
};

namespace detail {
template <class... Args>
void fail(report& r, const Args&... parts) {
    std::ostringstream o;
    (o << ... << parts);
    r.failures.push_back(o.str());
}

template <class Scalar, class R>
routing<Scalar> route_once(const R& router, const matrix<Scalar>& logits, index experts) {
    auto st = make_router_state<Scalar>(router, experts);
    routing<Scalar> out;
    moe::route(router, logits, st, out);
    out.build_dispatch();
    return out;
}
}  // namespace detail

/// Routes `logits` (T x logit rows) with `router` for `experts` routed experts and checks:
/// the token side is well formed (T tokens, offsets increasing); ids are in range (a real expert,
/// a null expert below the logit rows, or `dropped_slot`) and distinct within a token; weights are
/// finite, and dropped or null slots weigh 0; routing twice gives bitwise the same result; for a
/// router that is not `batch_dependent`, each token routed alone gets exactly what it got in the
/// batch; and the declared `expectations`.
template <class Scalar, router<Scalar> R>
report check_router(const R& router, const matrix<Scalar>& logits, index experts, router_expectations expect = {}) {
    report rep;
    try {
        router.validate(experts);
    } catch (const std::exception& e) {
        detail::fail(rep, "validate(", experts, ") threw: ", e.what());
        return rep;
    }
    const index t = logits.rows(), rows = logits.cols();
    const routing<Scalar> r = detail::route_once<Scalar>(router, logits, experts);
    if (r.tokens != t) detail::fail(rep, "tokens = ", r.tokens, ", expected ", t);
    if (r.experts != experts) detail::fail(rep, "experts = ", r.experts, ", expected ", experts);
    if (static_cast<index>(r.token_offsets.size()) != t + 1 || r.token_offsets.front() != 0 ||
        r.token_offsets.back() != r.slots() || r.weights.size() != r.expert_ids.size()) {
        detail::fail(rep, "token_offsets, expert_ids and weights do not describe ", t, " tokens");
        return rep;
    }
    for (index i = 0; i < t; ++i) {
        if (r.end_slot(i) < r.first_slot(i)) detail::fail(rep, "token ", i, ": slot offsets decrease");
        std::set<std::int32_t> seen;
        double sum = 0;
        bool any_real = false;
        for (index s = r.first_slot(i); s < r.end_slot(i); ++s) {
            const auto id = r.expert_ids[static_cast<std::size_t>(s)];
            const double w = static_cast<double>(r.weights[static_cast<std::size_t>(s)]);
            if (id != dropped_slot && (id < 0 || id >= rows))
                detail::fail(rep, "token ", i, " slot ", s, ": expert id ", id, " out of range");
            if (id != dropped_slot && !seen.insert(id).second)
                detail::fail(rep, "token ", i, ": expert ", id, " chosen twice");
            if (!std::isfinite(w)) detail::fail(rep, "token ", i, " slot ", s, ": weight ", w, " is not finite");
            if ((id == dropped_slot || id >= experts) && w != 0)
                detail::fail(rep, "token ", i, " slot ", s, ": a dropped or null slot has weight ", w);
            if (id >= 0 && id < experts) {
                sum += w;
                any_real = true;
            }
        }
        if (expect.weight_sum && any_real && std::abs(sum - *expect.weight_sum) > expect.tolerance * std::abs(*expect.weight_sum))
            detail::fail(rep, "token ", i, ": weights sum to ", sum, ", expected ", *expect.weight_sum);
        if (expect.slots_per_token && r.slot_count(i) != *expect.slots_per_token)
            detail::fail(rep, "token ", i, ": ", r.slot_count(i), " slots, expected ", *expect.slots_per_token);
    }
    if (expect.rows_per_expert)
        for (index e = 0; e < experts; ++e) {
            const index n = r.expert_offsets[static_cast<std::size_t>(e) + 1] - r.expert_offsets[static_cast<std::size_t>(e)];
            if (n != *expect.rows_per_expert) detail::fail(rep, "expert ", e, ": ", n, " rows, expected ", *expect.rows_per_expert);
        }
    const routing<Scalar> again = detail::route_once<Scalar>(router, logits, experts);
    if (again.expert_ids != r.expert_ids || again.weights != r.weights || again.token_offsets != r.token_offsets)
        detail::fail(rep, "routing the same logits twice gave different results");
    if constexpr (!R::batch_dependent) {
        for (index i = 0; i < t; ++i) {
            const matrix<Scalar> one = logits.row(i);
            const routing<Scalar> alone = detail::route_once<Scalar>(router, one, experts);
            const auto b = r.expert_ids.begin() + r.first_slot(i), e = r.expert_ids.begin() + r.end_slot(i);
            const auto wb = r.weights.begin() + r.first_slot(i), we = r.weights.begin() + r.end_slot(i);
            if (!std::equal(b, e, alone.expert_ids.begin(), alone.expert_ids.end()) ||
                !std::equal(wb, we, alone.weights.begin(), alone.weights.end()))
                detail::fail(rep, "token ", i, " is routed differently alone than in its batch, but the router is not batch_dependent");
        }
    }
    return rep;
}

/// Runs `layer` on `x` at 1 and at 2 threads and checks that the outputs are bitwise identical.
template <class Layer>
report check_thread_invariance(Layer& layer, const matrix<typename Layer::scalar_type>& x) {
    report rep;
    using Scalar = typename Layer::scalar_type;
    matrix<Scalar> one(x.rows(), x.cols()), two(x.rows(), x.cols());
    const index threads = layer.threads();
    layer.set_threads(1);
    layer.forward(x, one);
    layer.set_threads(2);
    layer.forward(x, two);
    layer.set_threads(threads);
    for (index i = 0; i < one.size(); ++i)
        if (!(one.data()[i] == two.data()[i]) && !(std::isnan(one.data()[i]) && std::isnan(two.data()[i]))) {
            detail::fail(rep, "output element ", i, " differs between 1 and 2 threads: ", one.data()[i], " vs ", two.data()[i]);
            break;
        }
    return rep;
}

}  // namespace moe::testing
