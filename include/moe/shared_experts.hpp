#pragma once
/// \file
/// Shared-expert policies: always-on FFNs added to every token (DeepSeekMoE, DeepSeek-V2/V3, stored
/// as one FFN of width n_shared * moe_intermediate_size), optionally behind a sigmoid gate (Qwen2-MoE).

#include "moe/experts/ffn.hpp"

#include <concepts>

namespace moe {

/// A shared-expert policy: the FFN every token goes through besides its routed experts. It must provide
/// `static constexpr bool enabled` and `static constexpr bool gated`, and, when enabled, a member
/// `expert` of an `expert_ffn` type.
///
/// The layer then holds one more FFN of `expert`'s layout and storage, of width `layer_shape::d_shared`
/// (DeepSeek's n_shared experts stored as one), runs it on every token in the same task list as the
/// routed experts, and adds its output to the combined routed output, times `sigmoid(w_g . x)` with a
/// gate vector w_g (d values, a layer parameter) when `gated`. Backward differentiates the FFN, the
/// gate and w_g. See docs/semantics.md, "Shared experts".
template <class S>
concept shared_expert = std::copy_constructible<S> && requires {
    { S::enabled } -> std::convertible_to<bool>;
    { S::gated } -> std::convertible_to<bool>;
} && (!S::enabled || requires(const S& s) { requires expert_ffn<std::remove_cvref_t<decltype(s.expert)>>; });

namespace shared_experts {

/// No shared expert.
struct none {
    static constexpr bool enabled = false;
    static constexpr bool gated = false;
};

/// A shared FFN added to every token (DeepSeek).
template <expert_ffn X = experts::swiglu>
struct ungated {
    static constexpr bool enabled = true;
    static constexpr bool gated = false;
    X expert{};
};

/// A shared FFN scaled by `sigmoid(w_g . x)` (Qwen2-MoE's `shared_expert_gate`).
template <expert_ffn X = experts::swiglu>
struct sigmoid_gated {
    static constexpr bool enabled = true;
    static constexpr bool gated = true;
    X expert{};
};

static_assert(shared_expert<none> && shared_expert<ungated<>> && shared_expert<sigmoid_gated<>>);

}  // namespace shared_experts
}  // namespace moe
