// moe-run's layers whose expert weights are q8_0 (moe_run_layer.hpp).
#include "moe_run_layer.hpp"

MOE_RUN_LAYER(moe::experts::q8_0_weights<moe::experts::swiglu>)
