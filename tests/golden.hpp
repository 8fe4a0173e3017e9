#pragma once
// Test helpers: reading the golden files that tools/golden writes (an independent float64
// PyTorch implementation of docs/semantics.md) and comparing the library with them.

#include <moe/io/safetensors.hpp>
#include <moe/moe.hpp>

#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

namespace golden {

inline const std::filesystem::path data_dir = MOE_TEST_DATA;

/// Normalised error: max |a - b| / max |b| (max |a - b| when b is all zero).
template <class A, class B>
double relative_error(const A& a, const B& b) {
    REQUIRE(a.rows() == b.rows());
    REQUIRE(a.cols() == b.cols());
    if (a.size() == 0) return 0;
    const double diff = (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff();
    const double scale = b.template cast<double>().cwiseAbs().maxCoeff();
    return scale > 0 ? diff / scale : diff;
}

/// Reads a floating-point tensor of a safetensors file as a row-major matrix (rank 1 -> one column).
template <class Scalar = float>
moe::matrix<Scalar> read_matrix(const moe::io::safetensors_file& f, const std::string& name) {
    const auto& info = f.info(name);
    const moe::index cols = info.shape.size() >= 2 ? info.shape.back() : 1;
    const moe::index rows = cols == 0 ? 0 : info.numel() / cols;
    moe::matrix<Scalar> m(rows, cols);
    f.read(name, std::span<Scalar>(m.data(), static_cast<std::size_t>(m.size())));
    return m;
}

/// The output of `layer` (loaded) on the input of checkpoint case `name` (tests/data/ckpt), T x d.
template <class Layer>
moe::matrix<float> forward_ckpt_case(const std::string& name, Layer& layer) {
    const moe::io::safetensors_file in(data_dir / "ckpt" / name / "input.safetensors");
    const moe::index d = layer.shape().d_model;
    const auto raw = read_matrix(in, "hidden_states");
    const Eigen::Map<const moe::matrix<float>> x(raw.data(), raw.size() / d, d);
    moe::matrix<float> y(x.rows(), d);
    layer.forward(x, y);
    return y;
}

/// One layer case of tests/data/layer: its file and its options (the file's metadata).
struct layer_case {
    explicit layer_case(const std::string& name) : name(name), file(data_dir / "layer" / (name + ".safetensors")) {}

    [[nodiscard]] std::string option(const std::string& key) const { return file.metadata().at(key); }
    [[nodiscard]] moe::index integer(const std::string& key) const { return std::stol(option(key)); }

    [[nodiscard]] moe::layer_shape shape() const {
        return {.d_model = integer("d"), .d_ff = integer("ff"), .n_experts = integer("E"), .d_shared = integer("shared_ff")};
    }
    /// The case's router (any of the built-in ones, routers/registry.hpp) from its metadata: its
    /// settings by key, capacity where capacity_factor is given to a top-k router.
    [[nodiscard]] moe::routers::any_router router() const {
        for (const moe::routers::setting& s : moe::routers::builtin_routers::settings_of(option("router"))) {
            INFO("metadata '" << s.key << "' (the generator writes every setting, empty when not set)");
            REQUIRE(file.metadata().count(std::string(s.key)) == 1);
        }
        return moe::routers::make_router(option("router"), moe::routers::setting_values(
                                                              {file.metadata().begin(), file.metadata().end()}));
    }
    /// The case's router as type R (which it must be).
    template <class R>
    [[nodiscard]] R router_as() const {
        const moe::routers::any_router r = router();
        REQUIRE(std::holds_alternative<R>(r.get()));
        return std::get<R>(r.get());
    }

    /// Copies the case's weights into `layer`.
    template <class Layer>
    void load(Layer& layer) const {
        using Scalar = typename Layer::scalar_type;
        layer.router_weight() = read_matrix<Scalar>(file, "router.weight");
        for (moe::index e = 0; e < shape().n_experts; ++e) {
            const std::string p = "experts." + std::to_string(e) + ".";
            layer.expert_weights(e).in = read_matrix<Scalar>(file, p + "in.weight");
            layer.expert_weights(e).out = read_matrix<Scalar>(file, p + "out.weight");
        }
        if constexpr (Layer::shared_type::enabled) {
            layer.shared_weights().in = read_matrix<Scalar>(file, "shared.in.weight");
            layer.shared_weights().out = read_matrix<Scalar>(file, "shared.out.weight");
        }
        if constexpr (Layer::shared_type::gated) layer.shared_gate() = read_matrix<Scalar>(file, "shared.gate.weight").transpose();
        if (auto* bias = moe::correction_bias<Scalar>(layer.router_state())) *bias = read_matrix<Scalar>(file, "router.bias");
    }

    /// Runs `layer` (loaded with this case) on the case's input and checks output, logits, chosen
    /// experts, weights and loads against the reference.
    template <class Layer>
    void check(Layer& layer) const {
        using Scalar = typename Layer::scalar_type;
        INFO("layer case " << name);
        const moe::matrix<Scalar> x = read_matrix<Scalar>(file, "x");
        moe::matrix<Scalar> y(x.rows(), x.cols());
        layer.set_training(true);
        layer.forward(x, y);
        CHECK(relative_error(y, read_matrix(file, "expected.y")) <= 2e-5);
        CHECK(relative_error(layer.logits(), read_matrix(file, "expected.logits")) <= 2e-5);

        // Expected slots are [T, S] in selection order; routers with a variable number of slots per
        // token pad with id -1 after `expected.slots` of them.
        const auto ids = file.read_integers("expected.ids");
        const auto weights = read_matrix(file, "expected.weights");
        const auto& r = layer.last_routing();
        const moe::index width = weights.cols();
        REQUIRE(r.tokens == weights.rows());
        std::vector<std::int64_t> slots(static_cast<std::size_t>(r.tokens), width);
        if (file.contains("expected.slots")) slots = file.read_integers("expected.slots");
        moe::matrix<Scalar> got_weights = moe::matrix<Scalar>::Zero(weights.rows(), width);
        for (moe::index t = 0; t < r.tokens; ++t) {
            INFO("token " << t);
            REQUIRE(r.slot_count(t) == slots[static_cast<std::size_t>(t)]);
            for (moe::index j = 0; j < r.slot_count(t); ++j) {
                const auto s = static_cast<std::size_t>(r.first_slot(t) + j);
                CHECK(r.expert_ids[s] == ids[static_cast<std::size_t>(t * width + j)]);
                got_weights(t, j) = r.weights[s];
            }
        }
        CHECK(relative_error(got_weights, weights) <= 2e-5);
        const auto load = file.read_integers("expected.load");
        CHECK(layer.statistics().load == std::vector<moe::index>(load.begin(), load.end()));
        check_backward(layer, x);
    }

    /// The gradients of sum(y * grad_output) with respect to the input and every parameter of the
    /// layer (after a training forward on `x`), against PyTorch autograd.
    template <class Layer>
    void check_backward(Layer& layer, const moe::matrix<typename Layer::scalar_type>& x) const {
        using Scalar = typename Layer::scalar_type;
        const moe::matrix<Scalar> g = read_matrix<Scalar>(file, "grad_output");
        moe::matrix<Scalar> grad_x(x.rows(), x.cols());
        layer.backward(x, g, grad_x);
        CHECK(relative_error(grad_x, read_matrix(file, "grad.x")) <= 1e-4);
        const auto params = layer.parameters();
        REQUIRE(!params.empty());
        for (const auto& p : params) {
            INFO("gradient of " << p.name);
            CHECK(relative_error(p.grad, read_matrix(file, "grad." + p.name)) <= 1e-4);
        }
    }

    std::string name;
    moe::io::safetensors_file file;
};

}  // namespace golden
