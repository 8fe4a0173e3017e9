#pragma once
/// \file
/// Aliases for the well-known MoE configurations. Hyper-parameters (k, normalisation, groups,
/// capacity) are run-time values of the router passed to the constructor; the comment of each alias
/// gives the values of the original model.

#include "moe/experts/ffn.hpp"
#include "moe/layer.hpp"
#include "moe/routers/capacity.hpp"
#include "moe/routers/expert_choice.hpp"
#include "moe/routers/null_experts.hpp"
#include "moe/routers/sigmoid_topk.hpp"
#include "moe/routers/sinkhorn.hpp"
#include "moe/routers/softmax_topk.hpp"
#include "moe/shared_experts.hpp"

namespace moe {

/// Switch Transformer: softmax top-1 with capacity (factor 1.0-1.25, `position` drops), ReLU MLP experts.
template <class Scalar, class... Losses>
using switch_layer = layer<Scalar, routers::capacity<routers::softmax_topk>, experts::mlp, shared_experts::none, Losses...>;

/// GShard: softmax top-2 with capacity, MLP experts (the same types as Switch with k = 2).
template <class Scalar, class... Losses>
using gshard_layer = switch_layer<Scalar, Losses...>;

/// Mixtral: softmax top-2, normalised, SwiGLU experts, no shared expert.
template <class Scalar, class... Losses>
using mixtral_layer = layer<Scalar, routers::softmax_topk, experts::swiglu, shared_experts::none, Losses...>;

/// Qwen3-MoE: softmax top-8 (`norm_topk_prob`), SwiGLU experts.
template <class Scalar, class... Losses>
using qwen3_moe_layer = mixtral_layer<Scalar, Losses...>;

/// OLMoE: softmax top-8, not normalised, SwiGLU experts.
template <class Scalar, class... Losses>
using olmoe_layer = mixtral_layer<Scalar, Losses...>;

/// Qwen2-MoE: softmax top-k (`norm_topk_prob`), SwiGLU experts, one sigmoid-gated shared expert.
template <class Scalar, class... Losses>
using qwen2_moe_layer =
    layer<Scalar, routers::softmax_topk, experts::swiglu, shared_experts::sigmoid_gated<experts::swiglu>, Losses...>;

/// DeepSeek-V3: sigmoid top-8 with correction bias, 8 groups of which 4 eligible, normalised and
/// scaled by 2.5, SwiGLU experts, one ungated shared FFN.
template <class Scalar, class... Losses>
using deepseek_v3_layer =
    layer<Scalar, routers::sigmoid_topk, experts::swiglu, shared_experts::ungated<experts::swiglu>, Losses...>;

/// AdaMoE: top-k over E real and N null experts (the router weight has E + N rows), SwiGLU experts.
template <class Scalar, class... Losses>
using adamoe_layer = layer<Scalar, routers::null_experts, experts::swiglu, shared_experts::none, Losses...>;

/// Expert choice (Zhou et al. 2022): each expert takes its top tokens; the original uses MLP experts.
template <class Scalar, class... Losses>
using expert_choice_layer = layer<Scalar, routers::expert_choice, experts::mlp, shared_experts::none, Losses...>;

/// S-BASE: Sinkhorn-balanced top-k routing, SwiGLU experts.
template <class Scalar, class... Losses>
using sbase_layer = layer<Scalar, routers::sinkhorn, experts::swiglu, shared_experts::none, Losses...>;

/// The float layers of the checkpoint families (Mixtral, Qwen3-MoE and OLMoE; Qwen2-MoE; DeepSeek-V3),
/// without losses, which a program may build once (`moe/compiled.hpp`): `EXTERN` is `extern` to declare
/// them, empty to define them.
#define MOE_CONFIGURATION_INSTANCES(EXTERN) \
    EXTERN template class layer<float, routers::softmax_topk, experts::swiglu, shared_experts::none>; \
    EXTERN template class layer<float, routers::softmax_topk, experts::swiglu, \
                                shared_experts::sigmoid_gated<experts::swiglu>>; \
    EXTERN template class layer<float, routers::sigmoid_topk, experts::swiglu, shared_experts::ungated<experts::swiglu>>;
#if defined(MOE_EXTERN_TEMPLATES)
MOE_CONFIGURATION_INSTANCES(extern)
#endif

}  // namespace moe
