// Training: an MoE layer (8 SwiGLU experts, sigmoid top-2 as DeepSeek-V3) learns a regression task
// whose inputs come from latent clusters, each with its own target function (the setting of "Mixture
// of Experts Provably Detect and Learn the Latent Cluster Structure in Gradient-Based Learning").
// Adam is written here, stepping the layer's parameters in place through their named views.
// Three runs from the same start: no balancing, the load-balancing loss L1, and the auxiliary-loss-free
// bias update U1. The router starts out favouring two experts (every input shares a common direction
// that two router rows read), so without balancing those experts keep most of the tokens.
// Exits with status 1 if training does not lower the loss or balancing does not lower the imbalance.
#include <moe/moe.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr moe::index d = 32, ff = 32, experts = 8, clusters = 8, batch = 256, steps = 400;

// Inputs x = shared + centre_c + noise for a latent cluster c; target y = B_c tanh(A_c x).
struct task {
    explicit task(std::uint64_t seed) : rng(seed) {
        std::normal_distribution<float> n;
        shared = moe::vector<float>::NullaryExpr(d, [&] { return n(rng); }).normalized() * 2.0f;
        for (moe::index c = 0; c < clusters; ++c) {
            centres.push_back(moe::vector<float>::NullaryExpr(d, [&] { return n(rng); }).normalized() * 3.0f);
            a.push_back(moe::matrix<float>::NullaryExpr(d, d, [&] { return n(rng) / std::sqrt(float(d)); }));
            b.push_back(moe::matrix<float>::NullaryExpr(d, d, [&] { return n(rng) / std::sqrt(float(d)); }));
        }
    }
    void sample(moe::matrix<float>& x, moe::matrix<float>& y) {
        std::normal_distribution<float> n(0.0f, 0.3f);
        std::uniform_int_distribution<moe::index> pick(0, clusters - 1);
        for (moe::index i = 0; i < x.rows(); ++i) {
            const moe::index c = pick(rng);
            const moe::vector<float> xi = shared + centres[c] + moe::vector<float>::NullaryExpr(d, [&] { return n(rng); });
            x.row(i) = xi.transpose();
            y.row(i) = (b[c] * (a[c] * xi).array().tanh().matrix()).transpose();
        }
    }
    std::mt19937_64 rng;
    moe::vector<float> shared;
    std::vector<moe::vector<float>> centres;
    std::vector<moe::matrix<float>> a, b;
};

// Adam (Kingma & Ba 2015) over the layer's parameters, in place.
struct adam {
    float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
    std::vector<moe::matrix<float>> m, v;
    int t = 0;
    template <class Params>
    void step(Params& params) {
        if (m.empty())
            for (const auto& p : params) {
                m.push_back(moe::matrix<float>::Zero(p.value.rows(), p.value.cols()));
                v.push_back(moe::matrix<float>::Zero(p.value.rows(), p.value.cols()));
            }
        ++t;
        const float c1 = 1 - std::pow(beta1, float(t)), c2 = 1 - std::pow(beta2, float(t));
        for (std::size_t i = 0; i < params.size(); ++i) {
            m[i] = beta1 * m[i] + (1 - beta1) * params[i].grad;
            v[i] = beta2 * v[i] + (1 - beta2) * params[i].grad.cwiseAbs2();
            params[i].value.array() -= lr * (m[i].array() / c1) / ((v[i].array() / c2).sqrt() + eps);
        }
    }
};

enum class balancing { none, load_balance_loss, bias_update };

struct outcome {
    float first_loss = 0, last_loss = 0;
    double imbalance = 0;  // mean over the last 50 steps
    double idle = 0;       // experts without tokens, mean over the last 50 steps
};

using layer_type = moe::layer<float, moe::routers::sigmoid_topk, moe::experts::swiglu, moe::shared_experts::none,
                              moe::losses::load_balance>;

outcome train(balancing mode, const char* name) {
    layer_type layer({.d_model = d, .d_ff = ff, .n_experts = experts}, {.k = 2, .normalize = true, .n_group = 1}, {}, {},
                     {{.alpha = mode == balancing::load_balance_loss ? 0.05 : 0.0}});
    layer.randomize(1);
    // The router's start: experts 0 and 1 read the direction every input shares.
    task data(7);
    layer.router_weight().row(0) += 0.5f * data.shared.transpose();
    layer.router_weight().row(1) += 0.5f * data.shared.transpose();
    layer.set_training(true);
    auto params = layer.parameters();
    adam opt;
    moe::losses::bias_update update(0.01);
    moe::vector<float>& bias = layer.router_state().bias;

    moe::matrix<float> x(batch, d), target(batch, d), y(batch, d), grad_y(batch, d), grad_x(batch, d);
    outcome out;
    std::printf("%s\n", name);
    for (moe::index step = 1; step <= steps; ++step) {
        data.sample(x, target);
        layer.forward(x, y);
        grad_y = (y - target) / float(batch);  // L = sum |y - target|^2 / (2 batch)
        const float loss = 0.5f * (y - target).squaredNorm() / float(batch);
        layer.backward(x, grad_y, grad_x);
        opt.step(params);
        if (mode == balancing::bias_update) {
            update.observe(layer.last_routing());
            update.apply(bias);
        }
        const auto stats = layer.statistics();
        if (step == 1) out.first_loss = loss;
        out.last_loss = loss;
        if (step > steps - 50) {
            out.imbalance += stats.imbalance / 50;
            out.idle += static_cast<double>(stats.idle_experts) / 50;
        }
        if (step == 1 || step % 50 == 0) {
            std::printf("  step %4ld  loss %.4f  load", static_cast<long>(step), loss);
            for (const auto c : stats.load) std::printf(" %4ld", static_cast<long>(c));
            std::printf("  imbalance %.2f\n", stats.imbalance);
        }
    }
    return out;
}

}  // namespace

int main() {
    const outcome none = train(balancing::none, "no balancing");
    const outcome l1 = train(balancing::load_balance_loss, "load-balancing loss L1 (alpha = 0.05)");
    const outcome u1 = train(balancing::bias_update, "bias update U1 (gamma = 0.01)");
    std::printf("\nsummary (imbalance = max_e c_e / mean_e c_e, mean over the last 50 steps; 1 is perfect)\n");
    std::printf("  %-14s  first loss  last loss  imbalance  idle experts\n", "");
    const std::pair<const char*, outcome> rows[] = {{"no balancing", none}, {"L1", l1}, {"U1", u1}};
    for (const auto& [name, o] : rows)
        std::printf("  %-14s  %10.4f  %9.4f  %9.2f  %12.1f\n", name, o.first_loss, o.last_loss, o.imbalance, o.idle);
    bool ok = true;
    for (const auto& [name, o] : rows)
        if (!(o.last_loss < 0.5f * o.first_loss)) {
            std::printf("FAILED: %s did not halve the loss\n", name);
            ok = false;
        }
    if (!(l1.imbalance < 0.8 * none.imbalance && u1.imbalance < 0.8 * none.imbalance)) {
        std::printf("FAILED: balancing did not lower the imbalance by a fifth\n");
        ok = false;
    }
    return ok ? 0 : 1;
}
