// moe-run's layers whose expert weights are f32 (moe_run_layer.hpp).
#include "moe_run_layer.hpp"

MOE_RUN_LAYER(moe::experts::swiglu)
