#pragma once
/// \file
/// `moe::layer`: one sparse Mixture-of-Experts layer, generic over its router, expert FFN, shared
/// expert and loss policies.
///
/// forward: logits z = x W_r^T -> router -> routing -> dispatch (counting sort into per-expert row
/// blocks) -> experts over (expert, row-chunk) tasks -> combine in a fixed order -> y.
/// The row chunks are the same at every thread count, and each output row is summed in slot order,
/// so the result is bitwise identical across runs and thread counts.

#include "moe/concepts.hpp"
#include "moe/detail/thread_pool.hpp"
#include "moe/error.hpp"
#include "moe/experts/ffn.hpp"
#include "moe/kernels/linear.hpp"
#include "moe/losses/losses.hpp"
#include "moe/routing.hpp"
#include "moe/shared_experts.hpp"
#include "moe/statistics.hpp"

#include <array>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace moe {

/// Upper bound of `layer::set_threads`.
inline constexpr index max_threads = 1024;

/// Sizes of a layer.
struct layer_shape {
    index d_model = 0;    ///< hidden size d
    index d_ff = 0;       ///< width of each routed expert
    index n_experts = 0;  ///< routed experts E
    index d_shared = 0;   ///< width of the shared FFN (all shared experts together); 0 without
};

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert,
          shared_expert Shared = shared_experts::none, loss_term<Scalar>... Losses>
class layer {
public:
    using scalar_type = Scalar;
    using router_type = Router;
    using expert_type = Expert;
    using shared_type = Shared;

    /// Rows per expert task; fixed, so chunking (and hence rounding) never depends on the thread count.
    static constexpr index chunk_rows = 64;

    /// Allocates zero weights of the given shape. Throws `value_error` when a size or a router
    /// hyper-parameter is out of range.
    explicit layer(layer_shape shape, Router router = {}, Expert expert = {}, Shared shared = {},
                   std::tuple<Losses...> losses = {})
        : shape_(shape), router_(router), expert_(expert), shared_(shared), losses_(losses),
          router_state_(make_router_state<Scalar>(router, shape.n_experts > 0 ? shape.n_experts : 1)), pool_(std::make_unique<detail::thread_pool>(1)) {
        const auto check = [](index v, const char* field, index min) {
            if (v < min)
                throw value_error(std::string("layer: ") + field + " = " + std::to_string(v) + " must be >= " +
                                  std::to_string(min));
        };
        check(shape.d_model, "d_model", 1);
        check(shape.d_ff, "d_ff", 1);
        check(shape.n_experts, "n_experts", 1);
        check(shape.d_shared, "d_shared", Shared::enabled ? 1 : 0);
        if (!Shared::enabled && shape.d_shared != 0)
            throw value_error("layer: d_shared = " + std::to_string(shape.d_shared) +
                              " but the layer has no shared expert");
        router_.validate(shape.n_experts);
        router_weight_ = matrix<Scalar>::Zero(logit_rows(router_, shape.n_experts), shape.d_model);
        experts_.resize(static_cast<std::size_t>(shape.n_experts));
        for (auto& w : experts_) zero(w, shape.d_ff, ffn_in_rows<Expert>(shape.d_ff));
        if constexpr (Shared::enabled) {
            zero(shared_weights_, shape.d_shared, ffn_in_rows<decltype(shared_.expert)>(shape.d_shared));
            shared_gate_ = vector<Scalar>::Zero(shape.d_model);
        }
    }

    [[nodiscard]] const layer_shape& shape() const { return shape_; }
    [[nodiscard]] const Router& router() const { return router_; }
    [[nodiscard]] const Expert& expert() const { return expert_; }
    [[nodiscard]] const Shared& shared() const { return shared_; }

    /// Router weight W_r, E x d (more rows for routers with null experts: see `logit_rows`).
    [[nodiscard]] matrix<Scalar>& router_weight() { return router_weight_; }
    [[nodiscard]] const matrix<Scalar>& router_weight() const { return router_weight_; }
    /// Router state (e.g. the correction bias of `sigmoid_topk`).
    [[nodiscard]] router_state_t<Router, Scalar>& router_state() { return router_state_; }
    /// Weights of routed expert e.
    [[nodiscard]] ffn_weights<Scalar>& expert_weights(index e) { return experts_.at(static_cast<std::size_t>(e)); }
    [[nodiscard]] const ffn_weights<Scalar>& expert_weights(index e) const {
        return experts_.at(static_cast<std::size_t>(e));
    }
    /// Weights of the shared FFN (only with a shared expert).
    [[nodiscard]] ffn_weights<Scalar>& shared_weights()
        requires Shared::enabled
    {
        return shared_weights_;
    }
    /// Shared-expert gate w_g, length d (only with a gated shared expert).
    [[nodiscard]] vector<Scalar>& shared_gate()
        requires Shared::gated
    {
        return shared_gate_;
    }

    /// Fills every weight with N(0, 1/fan_in) values from `seed` (examples and benchmarks).
    void randomize(std::uint64_t seed) {
        std::mt19937_64 rng(seed);
        const auto fill = [&](auto& m) {
            std::normal_distribution<double> n(0.0, 1.0 / std::sqrt(static_cast<double>(m.cols())));
            for (index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(n(rng));
        };
        fill(router_weight_);
        for (auto& w : experts_) {
            fill(w.in);
            fill(w.out);
        }
        if constexpr (Shared::enabled) {
            fill(shared_weights_.in);
            fill(shared_weights_.out);
            if constexpr (Shared::gated) {
                std::normal_distribution<double> n(0.0, 1.0 / std::sqrt(static_cast<double>(shape_.d_model)));
                for (index i = 0; i < shared_gate_.size(); ++i) shared_gate_[i] = static_cast<Scalar>(n(rng));
            }
        }
    }

    /// Worker threads for forward (the calling thread included); results do not depend on it.
    void set_threads(index threads) {
        if (threads < 1 || threads > max_threads)
            throw value_error("layer: threads = " + std::to_string(threads) + " must be in [1, " +
                              std::to_string(max_threads) + "]");
        if (threads != pool_->size()) pool_ = std::make_unique<detail::thread_pool>(threads);
    }
    [[nodiscard]] index threads() const { return pool_->size(); }

    /// y = MoE(x) for x of shape T x d; y must be T x d too. Throws `shape_error` otherwise.
    void forward(const_matrix_ref<Scalar> x, matrix_ref<Scalar> y) {
        const index t = x.rows(), d = shape_.d_model;
        if (x.cols() != d)
            throw shape_error("layer::forward: input is " + dims(x.rows(), x.cols()) + ", expected [T, " +
                              std::to_string(d) + "]");
        if (y.rows() != t || y.cols() != d)
            throw shape_error("layer::forward: output is " + dims(y.rows(), y.cols()) + ", expected " + dims(t, d));
        check_weights();
        logits_.resize(t, router_weight_.rows());
        compute_logits(x);
        moe::route(router_, logits_, router_state_, routing_);
        routing_.build_dispatch();
        compute_experts(x);
        combine(y);
        if constexpr (sizeof...(Losses) > 0)
            loss_values_ = std::apply([&](const auto&... l) { return std::array<Scalar, sizeof...(Losses)>{
                                          l.value(routing_, logits_)...}; },
                                      losses_);
    }

    /// Router logits of the last forward call, T x (router weight rows).
    [[nodiscard]] const matrix<Scalar>& logits() const { return logits_; }
    /// Routing of the last forward call.
    [[nodiscard]] const routing<Scalar>& last_routing() const { return routing_; }
    /// Routing statistics of the last forward call.
    [[nodiscard]] routing_statistics statistics() const {
        routing_statistics s = compute_statistics(routing_);
        if constexpr (requires { router_state_.add_statistics(s); }) router_state_.add_statistics(s);
        return s;
    }
    /// Values of the loss terms for the last forward call, in the order of `Losses`.
    [[nodiscard]] const std::array<Scalar, sizeof...(Losses)>& loss_values() const { return loss_values_; }

    /// FLOPs of the last forward call's expert work (2 per multiply-add of the projections that ran).
    [[nodiscard]] double active_flops() const {
        const double d = static_cast<double>(shape_.d_model);
        const double routed = static_cast<double>(routing_.rows()) * 2.0 * d *
                              static_cast<double>(ffn_in_rows<Expert>(shape_.d_ff) + shape_.d_ff);
        double shared = 0;
        if constexpr (Shared::enabled)
            shared = static_cast<double>(routing_.tokens) * 2.0 * d *
                     static_cast<double>(ffn_in_rows<decltype(shared_.expert)>(shape_.d_shared) + shape_.d_shared);
        return routed + shared;
    }

private:
    static std::string dims(index r, index c) { return "[" + std::to_string(r) + ", " + std::to_string(c) + "]"; }

    // The weights are public members a user may replace; a wrong shape must not reach the kernels.
    void check_weights() {
        const index d = shape_.d_model;
        const auto check = [&](const auto& m, index rows, index cols, const std::string& what) {
            if (m.rows() != rows || m.cols() != cols)
                throw shape_error("layer: " + what + " is " + dims(m.rows(), m.cols()) + ", expected " + dims(rows, cols));
        };
        check(router_weight_, logit_rows(router_, shape_.n_experts), d, "the router weight");
        for (index e = 0; e < shape_.n_experts; ++e) {
            const auto& w = experts_[static_cast<std::size_t>(e)];
            check(w.in, ffn_in_rows<Expert>(shape_.d_ff), d, "expert " + std::to_string(e) + "'s input weight");
            check(w.out, d, shape_.d_ff, "expert " + std::to_string(e) + "'s output weight");
        }
        if constexpr (Shared::enabled) {
            check(shared_weights_.in, ffn_in_rows<decltype(shared_.expert)>(shape_.d_shared), d,
                  "the shared expert's input weight");
            check(shared_weights_.out, d, shape_.d_shared, "the shared expert's output weight");
            if constexpr (Shared::gated) check(shared_gate_, d, 1, "the shared-expert gate");
        }
        if (const vector<Scalar>* bias = correction_bias<Scalar>(router_state_))
            check(*bias, shape_.n_experts, 1, "the correction bias");
    }

    void zero(ffn_weights<Scalar>& w, index ff, index in_rows) const {
        w.in = matrix<Scalar>::Zero(in_rows, shape_.d_model);
        w.out = matrix<Scalar>::Zero(shape_.d_model, ff);
    }

    // One task: `rows` rows starting at `first` of expert `expert` (shared FFN when expert == E).
    struct task {
        index expert;
        index first;
        index rows;
    };

    // Logits per token chunk; each is a fixed-order dot product (see kernels/linear.hpp).
    void compute_logits(const const_matrix_ref<Scalar>& x) {
        const index t = x.rows(), e = router_weight_.rows(), d = shape_.d_model;
        auto run = [&](index chunk, index) {
            const index first = chunk * chunk_rows, rows = std::min(chunk_rows, t - first);
            for (index i = first; i < first + rows; ++i)
                kernels::linear_rows(x.row(i).data(), router_weight_.data(), logits_.row(i).data(), 1, e, d);
        };
        pool_->run((t + chunk_rows - 1) / chunk_rows, run);
    }

    void compute_experts(const const_matrix_ref<Scalar>& x) {
        const index d = shape_.d_model, e = shape_.n_experts, t = x.rows();
        expert_out_.resize(routing_.rows(), d);
        tasks_.clear();
        // Shared-expert tasks (every token) first: the largest tasks start first and the small
        // routed ones fill the gaps at the end.
        if constexpr (Shared::enabled) {
            shared_out_.resize(t, d);
            for (index r = 0; r < t; r += chunk_rows) tasks_.push_back({e, r, std::min(chunk_rows, t - r)});
        }
        for (index x_ = 0; x_ < e; ++x_) {
            const index b = routing_.expert_offsets[static_cast<std::size_t>(x_)];
            const index n = routing_.expert_offsets[static_cast<std::size_t>(x_) + 1] - b;
            for (index r = 0; r < n; r += chunk_rows) tasks_.push_back({x_, b + r, std::min(chunk_rows, n - r)});
        }
        const index widest = std::max(shape_.d_ff, shape_.d_shared);
        const std::size_t per_thread = static_cast<std::size_t>(chunk_rows * (d + 3 * widest));
        scratch_.resize(per_thread * static_cast<std::size_t>(pool_->size()));
        auto run = [&](index i, index thread) {
            const task& tk = tasks_[static_cast<std::size_t>(i)];
            Scalar* base = scratch_.data() + per_thread * static_cast<std::size_t>(thread);
            const bool shared = tk.expert == e;
            const ffn_weights<Scalar>& w = shared ? shared_weights_ : experts_[static_cast<std::size_t>(tk.expert)];
            const index ff = w.out.cols();
            Eigen::Map<matrix<Scalar>> xin(base, tk.rows, d);
            for (index r = 0; r < tk.rows; ++r) {
                const index token = shared ? tk.first + r
                                           : routing_.slot_tokens[static_cast<std::size_t>(
                                                 routing_.row_slots[static_cast<std::size_t>(tk.first + r)])];
                xin.row(r) = x.row(token);
            }
            Eigen::Map<matrix<Scalar>> h(base + chunk_rows * d, tk.rows, w.in.rows());
            Eigen::Map<matrix<Scalar>> a(base + chunk_rows * (d + 2 * widest), tk.rows, ff);
            Eigen::Map<matrix<Scalar>> out = shared ? Eigen::Map<matrix<Scalar>>(shared_out_.row(tk.first).data(), tk.rows, d)
                                                    : Eigen::Map<matrix<Scalar>>(expert_out_.row(tk.first).data(), tk.rows, d);
            const Eigen::Map<const matrix<Scalar>> xc(xin.data(), tk.rows, d);
            if (shared) {
                if constexpr (Shared::enabled) {
                    ffn_forward(shared_.expert, w, xc, h, a, out);
                    if constexpr (Shared::gated)
                        for (index r = 0; r < tk.rows; ++r) {
                            const Scalar g = xc.row(r).dot(shared_gate_);
                            out.row(r) *= Scalar(1) / (Scalar(1) + std::exp(-g));
                        }
                }
            } else {
                ffn_forward(expert_, w, xc, h, a, out);
            }
        };
        pool_->run(static_cast<index>(tasks_.size()), run);
    }

    void combine(matrix_ref<Scalar>& y) {
        const index t = routing_.tokens;
        auto run = [&](index chunk, index) {
            const index end = std::min(t, (chunk + 1) * chunk_rows);
            for (index i = chunk * chunk_rows; i < end; ++i) {
                auto yi = y.row(i);
                yi.setZero();
                for (index s = routing_.begin(i); s < routing_.end(i); ++s) {
                    const index row = routing_.slot_rows[static_cast<std::size_t>(s)];
                    if (row >= 0) yi += routing_.weights[static_cast<std::size_t>(s)] * expert_out_.row(row);
                }
                if constexpr (Shared::enabled) yi += shared_out_.row(i);
            }
        };
        pool_->run((t + chunk_rows - 1) / chunk_rows, run);
    }

    layer_shape shape_;
    Router router_;
    Expert expert_;
    Shared shared_;
    std::tuple<Losses...> losses_;
    router_state_t<Router, Scalar> router_state_;
    std::unique_ptr<detail::thread_pool> pool_;

    matrix<Scalar> router_weight_;
    std::vector<ffn_weights<Scalar>> experts_;
    ffn_weights<Scalar> shared_weights_;
    vector<Scalar> shared_gate_;

    // Workspace, reused between calls.
    matrix<Scalar> logits_;
    routing<Scalar> routing_;
    std::vector<task> tasks_;
    matrix<Scalar> expert_out_;
    matrix<Scalar> shared_out_;
    std::vector<Scalar> scratch_;
    std::array<Scalar, sizeof...(Losses)> loss_values_{};
};

}  // namespace moe
