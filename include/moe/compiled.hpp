#pragma once
/// \file
/// The instantiations that cost most to compile, defined for a program that builds them once: the
/// products of float, double and bf16 rows for every instruction-set family, the quantized products,
/// `any_router`'s routing for float and double (none of which depend on a program's layer types), and
/// the float layers of the checkpoint families (`configurations.hpp`: `mixtral_layer<float>`,
/// `qwen2_moe_layer<float>`, `deepseek_v3_layer<float>` and their aliases).
///
/// Include this header in exactly one translation unit and define `MOE_EXTERN_TEMPLATES` in every unit
/// (this one may have it too): the headers then declare these instantiations `extern` instead of
/// building them in each unit. The CMake target `moe::compiled` is that unit. Compile it with the
/// program's flags: the `portable` family is built for them (`kernels/isa.hpp`).

#include "moe/configurations.hpp"
#include "moe/kernels/linear.hpp"
#include "moe/kernels/multiply.hpp"
#include "moe/kernels/quantized.hpp"
#include "moe/routers/any_router.hpp"

namespace moe::kernels {
MOE_LINEAR_INSTANCES()
MOE_MULTIPLY_INSTANCES()
MOE_QUANTIZED_INSTANCES()
}  // namespace moe::kernels

namespace moe::routers {
MOE_ANY_ROUTER_INSTANCES()
}  // namespace moe::routers

namespace moe {
MOE_CONFIGURATION_INSTANCES()
}  // namespace moe
