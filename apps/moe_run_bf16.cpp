// moe-run's layers whose expert weights are bf16 (moe_run_layer.hpp).
#include "moe_run_layer.hpp"

MOE_RUN_LAYER(moe::experts::bf16_weights<moe::experts::swiglu>)
