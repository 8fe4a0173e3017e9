#pragma once
// Internal: the definitions of `moe::layer`'s members for the weights and the training state: `randomize`,
// `set_training`, `parameters` and the shape checks that run before every call.
// Included by moe/layer.hpp, after the class.

#if !defined(MOE_LAYER_DEFINITIONS)
#error "moe/detail/layer_weights.hpp is part of moe/layer.hpp: include that instead"
#endif

namespace moe {

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::randomize(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const auto draw = [&]<class T>(T* out, index rows, index cols) {
        std::normal_distribution<double> n(0.0, 1.0 / std::sqrt(static_cast<double>(cols)));
        for (index i = 0; i < rows * cols; ++i) {
            const double v = n(rng);
            if (out != nullptr) out[i] = static_cast<T>(v);
        }
    };
    // A weight matrix (null: drawn and dropped), in place or, for storages of blocks, row by row.
    std::vector<float> row;
    const auto draw_weights = [&](typename storage_type::matrix* m, index rows, index cols) {
        if constexpr (detail::holds_numbers<storage_type>) {
            draw(m != nullptr ? m->data() : nullptr, rows, cols);
        } else {
            row.resize(static_cast<std::size_t>(cols));
            for (index r = 0; r < rows; ++r) {
                draw(row.data(), 1, cols);
                if (m != nullptr) storage_type::assign(*m, r, row.data(), 1);
            }
        }
    };
    draw(router_weight_.data(), router_weight_.rows(), router_weight_.cols());
    const index in_rows = ffn_in_rows<Expert>(shape_.d_ff), d = shape_.d_model;
    for (index e = 0; e < shape_.n_experts; ++e) {
        weights_type& w = experts_[static_cast<std::size_t>(e)];
        const bool held = owns_expert(e);
        draw_weights(held ? &w.in : nullptr, in_rows, d);
        draw_weights(held ? &w.out : nullptr, d, shape_.d_ff);
    }
    if constexpr (Shared::enabled) {
        draw_weights(&shared_weights_.in, shared_weights_.in.rows(), d);
        draw_weights(&shared_weights_.out, d, shape_.d_shared);
        if constexpr (Shared::gated) {
            std::normal_distribution<double> n(0.0, 1.0 / std::sqrt(static_cast<double>(shape_.d_model)));
            for (index i = 0; i < shared_gate_.size(); ++i) shared_gate_[i] = static_cast<Scalar>(n(rng));
        }
    }
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::set_training(bool on) {
    static_assert(detail::trains<Scalar, Expert>, "this layer's expert weights are for inference (bf16 or quantized storage): "
                  "a layer trains on weights of its scalar type");
    training_ = on;
    saved_tokens_ = -1;
    if (!on) return;
    const auto same_shape = [](auto& g, const auto& w) {
        if (g.rows() != w.rows() || g.cols() != w.cols()) g = matrix<Scalar>::Zero(w.rows(), w.cols());
    };
    same_shape(grad_router_weight_, router_weight_);
    grad_experts_.resize(experts_.size());
    for (std::size_t e = 0; e < experts_.size(); ++e) {  // empty for experts held elsewhere
        same_shape(grad_experts_[e].in, experts_[e].in);
        same_shape(grad_experts_[e].out, experts_[e].out);
    }
    if constexpr (Shared::enabled) {
        same_shape(grad_shared_weights_.in, shared_weights_.in);
        same_shape(grad_shared_weights_.out, shared_weights_.out);
        if (grad_shared_gate_.size() != shared_gate_.size()) grad_shared_gate_ = vector<Scalar>::Zero(shared_gate_.size());
    }
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
std::vector<parameter<Scalar>> layer<Scalar, Router, Expert, Shared, Losses...>::parameters() {
    static_assert(detail::trains<Scalar, Expert>, "this layer's expert weights are for inference (bf16 or quantized storage): "
                  "a layer trains on weights of its scalar type");
    std::vector<parameter<Scalar>> out;
    const auto add = [&](std::string name, auto& value, auto* grad) {
        out.push_back({std::move(name), Eigen::Map<matrix<Scalar>>(value.data(), value.rows(), value.cols()),
                       view(grad, value.rows(), value.cols())});
    };
    add("router.weight", router_weight_, &grad_router_weight_);
    for (std::size_t e = 0; e < experts_.size(); ++e) {
        if (!owns_expert(static_cast<index>(e))) continue;
        const std::string prefix = "experts." + std::to_string(e) + ".";
        add(prefix + "in.weight", experts_[e].in, e < grad_experts_.size() ? &grad_experts_[e].in : nullptr);
        add(prefix + "out.weight", experts_[e].out, e < grad_experts_.size() ? &grad_experts_[e].out : nullptr);
    }
    if constexpr (Shared::enabled) {
        add("shared.in.weight", shared_weights_.in, &grad_shared_weights_.in);
        add("shared.out.weight", shared_weights_.out, &grad_shared_weights_.out);
        if constexpr (Shared::gated)
            out.push_back({"shared.gate.weight", Eigen::Map<matrix<Scalar>>(shared_gate_.data(), 1, shared_gate_.size()),
                           Eigen::Map<matrix<Scalar>>(grad_shared_gate_.data(), grad_shared_gate_.size() ? 1 : 0,
                                                      grad_shared_gate_.size())});
    }
    return out;
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::check_weights() {
    const index d = shape_.d_model;
    // `what` names the tensor; with `expert` >= 0 it is that expert's, else the layer's (the
    // message is formed only for a wrong shape: this runs on every call).
    const auto check = [&](const auto& m, index rows, index cols, const char* what, index expert = -1) {
        if (m.rows() != rows || m.cols() != cols)
            throw shape_error("layer: " + (expert >= 0 ? "expert " + std::to_string(expert) + "'s " : std::string("the ")) +
                              what + " is " + dims(m.rows(), m.cols()) + ", expected " + dims(rows, cols));
    };
    check(router_weight_, logit_rows(router_, shape_.n_experts), d, "router weight");
    for (index e = 0; e < shape_.n_experts; ++e) {
        if (!owns_expert(e)) continue;
        const auto& w = experts_[static_cast<std::size_t>(e)];
        check(w.in, ffn_in_rows<Expert>(shape_.d_ff), d, "input weight", e);
        check(w.out, d, shape_.d_ff, "output weight", e);
    }
    if constexpr (Shared::enabled) {
        check(shared_weights_.in, ffn_in_rows<decltype(shared_.expert)>(shape_.d_shared), d, "shared expert's input weight");
        check(shared_weights_.out, d, shape_.d_shared, "shared expert's output weight");
        if constexpr (Shared::gated) check(shared_gate_, d, 1, "shared-expert gate");
    }
    if (const vector<Scalar>* bias = correction_bias<Scalar>(router_state_))
        check(*bias, shape_.n_experts, 1, "correction bias");
}

}  // namespace moe
