#pragma once
/// \file
/// Umbrella header: the whole library except checkpoint loading (`moe/io/...`, which needs nlohmann-json).

#include "moe/concepts.hpp"
#include "moe/configurations.hpp"
#include "moe/error.hpp"
#include "moe/experts/ffn.hpp"
#include "moe/layer.hpp"
#include "moe/losses/losses.hpp"
#include "moe/routers/any_router.hpp"
#include "moe/routers/capacity.hpp"
#include "moe/routers/expert_choice.hpp"
#include "moe/routers/null_experts.hpp"
#include "moe/routers/sigmoid_topk.hpp"
#include "moe/routers/sinkhorn.hpp"
#include "moe/routers/softmax_topk.hpp"
#include "moe/routers/top_p.hpp"
#include "moe/routing.hpp"
#include "moe/shared_experts.hpp"
#include "moe/statistics.hpp"
#include "moe/types.hpp"
