// Must not compile: a layer with quantized expert weights is for inference. The compile_fail test
// (tests/CMakeLists.txt) builds this file and expects layer.hpp's message.
#include <moe/layer.hpp>
#include <moe/routers/softmax_topk.hpp>

int main() {
    moe::layer<float, moe::routers::softmax_topk, moe::experts::q4_0_weights<moe::experts::swiglu>> layer(
        {.d_model = 64, .d_ff = 64, .n_experts = 4}, {.k = 2});
    layer.set_training(true);
}
