#pragma once
/// \file
/// The `loss_term` contract of the layer's balancing losses (one header per loss in this folder;
/// `moe/losses/losses.hpp` includes them all).

#include "moe/routing.hpp"
#include "moe/types.hpp"

#include <concepts>
#include <string_view>
#include <vector>

namespace moe {

/// A balancing loss, a policy of the layer (`moe::layer<..., Losses...>`). It must provide:
///
/// - `static constexpr std::string_view name`: the loss's name, as reports spell it (moe-run writes
///   `loss.load_balance`).
/// - `Scalar value(const routing<Scalar>& r, const matrix<Scalar>& z) const`: the loss of one forward
///   call from its routing `r` (chosen experts, scores, counts before drops) and its T x E' router
///   logits `z`. The layer calls it after every forward and reports it (`loss_values()`); the loss is
///   not added to the output.
/// - `void gradient(const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& grad_logits) const`:
///   *adds* dL/dz to `grad_logits` (shaped like `z`; the router's and the other losses' terms are
///   already there or follow), holding the selection constant (docs/semantics.md, "Backward"). It must
///   be the derivative of `value` (the library's losses are checked against PyTorch and by finite
///   differences; `moe::testing::loss_gradient_check` checks a loss of your own the same way).
///
/// And guarantee:
///
/// - **Deterministic**: both functions depend only on their arguments and the loss's settings, in a
///   fixed order of summation (no dependence on threads).
/// - **Parts sum to the whole**: when the routing is one part of a batch routed in parts
///   (`routing::batch`, expert parallelism), the loss returns this part's share of the whole batch's
///   loss and gradient: it normalises by `batch_tokens()`, `batch_slots()` and `chosen_count()`, so
///   that the parts' values sum to the loss of the whole batch.
/// - **Errors are typed and early**: a setting or batch that does not fit (`seq_balance`'s whole
///   sequences) throws `value_error` or `shape_error` from `value`, naming the setting and the value.
/// - **No allocation in the steady state**: buffers reused between calls live in a
///   `losses::detail::scratch` member, which a copy does not share; one loss object is not for
///   concurrent calls (a layer calls its losses from one thread).
template <class L, class Scalar>
concept loss_term = std::copy_constructible<L> &&
    requires(const L& l, const routing<Scalar>& r, const matrix<Scalar>& z, matrix<Scalar>& gz) {
        { L::name } -> std::convertible_to<std::string_view>;
        { l.value(r, z) } -> std::convertible_to<Scalar>;
        l.gradient(r, z, gz);
    };

namespace losses::detail {
/// A buffer a loss's const functions reuse between calls, so that a steady state allocates nothing.
/// Not part of the loss's value: a copy starts empty. One loss object is not for concurrent calls.
template <class T>
struct scratch {
    mutable std::vector<T> values;
    scratch() = default;
    scratch(const scratch&) {}
    scratch& operator=(const scratch&) { return *this; }
};
}  // namespace losses::detail
}  // namespace moe
