#pragma once
/// \file
/// The contracts of the layer's policies, as C++20 concepts with their rules in words.

#include "moe/routing.hpp"
#include "moe/types.hpp"

#include <concepts>
#include <span>

namespace moe {

/// Router state for routers that keep none.
struct no_router_state {
    explicit no_router_state(index /*experts*/) {}
};

namespace detail {
template <class R, class Scalar>
struct router_state {
    using type = no_router_state;
};
template <class R, class Scalar>
    requires requires { typename R::template state<Scalar>; }
struct router_state<R, Scalar> {
    using type = typename R::template state<Scalar>;
};
}  // namespace detail

/// The state a layer keeps for router `R` (e.g. a correction bias): `R::state<Scalar>` when the
/// router declares one, else `no_router_state`. It is constructed from the number of experts.
template <class R, class Scalar>
using router_state_t = typename detail::router_state<R, Scalar>::type;

/// A router turns router logits into a `routing`.
///
/// It must provide:
/// - `static constexpr bool batch_dependent`: whether one token's choice can depend on the other
///   tokens of the batch (capacity, Sinkhorn, expert choice). Such routing lets one request of a
///   shared batch influence another; serve separate requests in separate batches when that matters.
///   Under expert parallelism every rank routes the whole batch, so such a router must route the same
///   logits (and state) the same way on every rank: deterministically, with no per-rank randomness.
/// - `void validate(index experts) const`: throws `moe::value_error` naming the field and its value
///   when its hyper-parameters do not fit `experts` routed experts. The layer calls it once.
/// - `void route(const matrix<Scalar>& logits, routing<Scalar>& out) const`, or, with a nested
///   `template <class Scalar> struct state` (constructible from the expert count),
///   `void route(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const`.
///   `logits` is T x E. The router fills the token side of `out`: `tokens`, `experts`, `scores`,
///   `token_offsets`, `expert_ids` and `weights` (see `routing`); the layer derives the expert side.
///   It may assume `out` keeps its buffers from the previous call (reuse them: no allocation in the
///   steady state). Ties must go to the lower index so results are deterministic.
///
/// Optional: `index logit_rows(index experts) const` when the router weight has more rows than there
/// are experts (null experts); on the state, `vector<Scalar>* correction_bias()` (a selection bias
/// loaded from checkpoints) and `void add_statistics(routing_statistics&) const` (router diagnostics
/// such as Sinkhorn's marginal error); a state constructor taking `(const R&, index experts)`.
template <class R, class Scalar>
concept router = std::copy_constructible<R> &&
    requires(const R& r, const matrix<Scalar>& logits, router_state_t<R, Scalar>& st, routing<Scalar>& out,
             index experts) {
        { R::batch_dependent } -> std::convertible_to<bool>;
        r.validate(experts);
    } &&
    (requires(const R& r, const matrix<Scalar>& logits, routing<Scalar>& out) { r.route(logits, out); } ||
     requires(const R& r, const matrix<Scalar>& logits, router_state_t<R, Scalar>& st, routing<Scalar>& out) {
         r.route(logits, st, out);
     });

/// A router with a backward pass (docs/semantics.md, "Backward"): besides `route`, it provides
/// `void backward(const matrix<Scalar>& logits, const routing<Scalar>& r, std::span<const Scalar> grad_weights,
/// matrix<Scalar>& grad_logits) const` (with `state<Scalar>&` after `r` when it keeps state). `r` is the
/// routing its last `route` call produced for `logits` (the state is as that call left it),
/// `grad_weights` holds dL/dw per slot of `r`. It must overwrite every entry of `grad_logits`
/// (already shaped like `logits`) with dL/dz, holding the selection constant: only the weights of
/// the chosen experts are differentiated.
template <class R, class Scalar>
concept differentiable_router = router<R, Scalar> &&
    (requires(const R& r, const matrix<Scalar>& z, const routing<Scalar>& rt, std::span<const Scalar> gw,
              matrix<Scalar>& gz) { r.backward(z, rt, gw, gz); } ||
     requires(const R& r, const matrix<Scalar>& z, const routing<Scalar>& rt, router_state_t<R, Scalar>& st,
              std::span<const Scalar> gw, matrix<Scalar>& gz) { r.backward(z, rt, st, gw, gz); });

/// Whether router `r` decides a token's slots with the other tokens of the batch: `r.is_batch_dependent()`
/// when the router tells it at run time (`routers::any_router`), else `R::batch_dependent`.
template <class R>
bool is_batch_dependent(const R& r) {
    if constexpr (requires { { r.is_batch_dependent() } -> std::convertible_to<bool>; })
        return r.is_batch_dependent();
    else
        return R::batch_dependent;
}

/// Constructs the state of router `r` for `experts` experts: from (r, experts) when the state takes the
/// router (e.g. `routers::any_router`), else from the expert count alone.
template <class Scalar, class R>
router_state_t<R, Scalar> make_router_state(const R& r, index experts) {
    if constexpr (std::is_constructible_v<router_state_t<R, Scalar>, const R&, index>)
        return router_state_t<R, Scalar>(r, experts);
    else
        return router_state_t<R, Scalar>(experts);
}

/// Rows of the router weight: `r.logit_rows(experts)` when the router has extra rows (null experts),
/// else `experts`.
template <class R>
index logit_rows(const R& r, index experts) {
    if constexpr (requires { r.logit_rows(experts); })
        return r.logit_rows(experts);
    else
        return experts;
}

/// The correction bias of a router state (`sigmoid_topk`'s `e_score_correction_bias`), or nullptr when
/// the router has none. A state exposes it with `vector<Scalar>* correction_bias()`.
template <class Scalar, class State>
vector<Scalar>* correction_bias(State& st) {
    if constexpr (requires { { st.correction_bias() } -> std::same_as<vector<Scalar>*>; })
        return st.correction_bias();
    else
        return nullptr;
}

/// Whether router `r` keeps a correction bias in its state (`correction_bias`), which a layer's loader
/// then reads from the checkpoint (and checks for before allocating the layer).
template <class R>
bool reads_correction_bias(const R& r) {
    auto st = make_router_state<float>(r, 1);
    return correction_bias<float>(st) != nullptr;
}

/// Calls the router with its state when it has one.
template <class Scalar, router<Scalar> R>
void route(const R& r, const matrix<Scalar>& logits, router_state_t<R, Scalar>& st, routing<Scalar>& out) {
    if constexpr (requires { r.route(logits, st, out); })
        r.route(logits, st, out);
    else
        r.route(logits, out);
}

/// Calls the router's backward with its state when it has one.
template <class Scalar, differentiable_router<Scalar> R>
void route_backward(const R& r, const matrix<Scalar>& logits, const routing<Scalar>& rt,
                    router_state_t<R, Scalar>& st, std::span<const Scalar> grad_weights, matrix<Scalar>& grad_logits) {
    if constexpr (requires { r.backward(logits, rt, st, grad_weights, grad_logits); })
        r.backward(logits, rt, st, grad_weights, grad_logits);
    else
        r.backward(logits, rt, grad_weights, grad_logits);
}

}  // namespace moe
