#pragma once
/// \file
/// Shared-expert policies: always-on FFNs added to every token (DeepSeekMoE, DeepSeek-V2/V3, stored
/// as one FFN of width n_shared * moe_intermediate_size), optionally behind a sigmoid gate (Qwen2-MoE).

#include "moe/experts/ffn.hpp"

#include <concepts>

namespace moe {

/// A shared-expert policy: `static constexpr bool enabled`, `static constexpr bool gated` (output
/// `sigmoid(w_g . x) * FFN(x)` when true), and, when enabled, a member `expert` of an `expert_ffn` type.
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
