// A program of a user of moe: one forward call through a small layer.
#include <moe/moe.hpp>

int main() {
    moe::mixtral_layer<float> layer({.d_model = 16, .d_ff = 32, .n_experts = 4}, {.k = 2, .normalize = true});
    layer.randomize(1);
    moe::matrix<float> x = moe::matrix<float>::Ones(3, 16), y(3, 16);
    layer.forward(x, y);
    return layer.statistics().assignments == 6 && y.allFinite() ? 0 : 1;
}
