#pragma once
/// \file
/// `moe::layer`: one sparse Mixture-of-Experts layer, generic over its router, expert FFN, shared
/// expert and loss policies, forward and backward.
///
/// forward: logits z = x W_r^T -> router -> routing -> dispatch (counting sort into per-expert row
/// blocks) -> experts over (expert, row-chunk) tasks -> combine in a fixed order -> y.
/// backward: the same path in reverse with the same routing (the selection is held constant).
/// The row chunks are the same at every thread count, and each output row is summed in slot order,
/// so the result is bitwise identical across runs and thread counts.
///
/// Expert parallelism: a layer built with a `parallel::placement` is one rank of a layer whose routed
/// experts are spread over the ranks of a communicator. Every rank calls forward (and backward) with
/// its own tokens; the rows of an expert go to its owner and come back (`parallel::expert_exchange`).
/// Router, shared experts and losses are replicated; their gradients are summed over the ranks.

#include "moe/concepts.hpp"
#include "moe/detail/thread_pool.hpp"
#include "moe/error.hpp"
#include "moe/experts/ffn.hpp"
#include "moe/kernels/linear.hpp"
#include "moe/kernels/multiply.hpp"
#include "moe/losses/losses.hpp"
#include "moe/parallel/exchange.hpp"
#include "moe/routing.hpp"
#include "moe/shared_experts.hpp"
#include "moe/statistics.hpp"

#include <array>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
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

/// A trainable tensor of a layer as views: its name (e.g. "experts.3.in.weight"), its values and its
/// gradient, of the same shape. The gradient view is empty until `layer::set_training(true)`.
template <class Scalar>
struct parameter {
    std::string name;
    Eigen::Map<matrix<Scalar>> value;
    Eigen::Map<matrix<Scalar>> grad;
};

namespace detail {
// Whether the shared expert's FFN policy (if any) names no weight type of its own or the routed
// experts' one: the layer stores both alike, as the routed policy says.
template <class Shared, class Scalar, class Weight>
constexpr bool shared_weight_type_agrees() {
    if constexpr (Shared::enabled) {
        using own = weight_type_t<std::remove_cvref_t<decltype(std::declval<Shared>().expert)>, Scalar>;
        return std::is_same_v<own, Scalar> || std::is_same_v<own, Weight>;
    } else {
        return true;
    }
}
}  // namespace detail

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert,
          shared_expert Shared = shared_experts::none, loss_term<Scalar>... Losses>
class layer {
public:
    using scalar_type = Scalar;
    using router_type = Router;
    using expert_type = Expert;
    using shared_type = Shared;
    /// What the expert weights (routed and shared) are stored as: Scalar, or bf16 with
    /// `experts::bf16_weights` (inference only: no training mode, backward or `parameters`).
    using weight_type = weight_type_t<Expert, Scalar>;
    static_assert(std::is_same_v<weight_type, Scalar> || (std::is_same_v<weight_type, bf16> && std::is_same_v<Scalar, float>),
                  "expert weights are stored as the layer's scalar type, or as bf16 in a float layer");
    static_assert(detail::shared_weight_type_agrees<Shared, Scalar, weight_type>(),
                  "the shared expert's weights are stored as the routed experts' are: name bf16_weights on the routed expert policy");
    /// Whether the layer can train (its weights are its scalar type).
    static constexpr bool trainable = std::is_same_v<weight_type, Scalar>;

    /// Tokens per task of the token-wise passes (logits, combine).
    static constexpr index chunk_rows = 64;
    /// An expert's block of n rows runs as ceil(n / max_task_rows) tasks of nearly equal size. The split
    /// depends on n alone, never on the thread count, so rounding (and the output) does not either.
    /// Large tasks keep the GEMMs efficient: a block of 70 rows is one GEMM, not 64 rows plus 6.
    static constexpr index max_task_rows = 256;

    /// Allocates zero weights of the given shape. Throws `value_error` when a size or a router
    /// hyper-parameter is out of range.
    explicit layer(layer_shape shape, Router router = {}, Expert expert = {}, Shared shared = {},
                   std::tuple<Losses...> losses = {})
        : layer(shape, parallel::placement{}, router, expert, shared, losses) {}

    /// One rank of an expert-parallel layer (see the file comment): allocates the router, the shared
    /// experts and only the routed experts that `where` gives this rank. With a null communicator it is
    /// the one-process layer. Also throws `value_error` on a placement that does not fit.
    layer(layer_shape shape, const parallel::placement& where, Router router = {}, Expert expert = {},
          Shared shared = {}, std::tuple<Losses...> losses = {})
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
        if (where.comm) exchange_ = std::make_unique<parallel::expert_exchange<Scalar>>(where, shape.n_experts);
        router_weight_ = matrix<Scalar>::Zero(logit_rows(router_, shape.n_experts), shape.d_model);
        experts_.resize(static_cast<std::size_t>(shape.n_experts));
        for (index e = 0; e < shape.n_experts; ++e)
            if (owns_expert(e)) zero(experts_[static_cast<std::size_t>(e)], shape.d_ff, ffn_in_rows<Expert>(shape.d_ff));
        if constexpr (Shared::enabled) {
            zero(shared_weights_, shape.d_shared, ffn_in_rows<decltype(shared_.expert)>(shape.d_shared));
            shared_gate_ = vector<Scalar>::Zero(shape.d_model);
        }
    }

    [[nodiscard]] const layer_shape& shape() const { return shape_; }
    [[nodiscard]] const Router& router() const { return router_; }
    [[nodiscard]] const Expert& expert() const { return expert_; }
    [[nodiscard]] const Shared& shared() const { return shared_; }

    /// Whether this rank holds routed expert e (always, without expert parallelism). The weights (and
    /// gradients) of an expert held elsewhere are empty.
    [[nodiscard]] bool owns_expert(index e) const { return !exchange_ || exchange_->owns(e); }
    /// The expert exchange of an expert-parallel layer, else null.
    [[nodiscard]] parallel::expert_exchange<Scalar>* exchange() { return exchange_.get(); }

    /// Router weight W_r, E x d (more rows for routers with null experts: see `logit_rows`).
    [[nodiscard]] matrix<Scalar>& router_weight() { return router_weight_; }
    [[nodiscard]] const matrix<Scalar>& router_weight() const { return router_weight_; }
    /// Router state (e.g. the correction bias of `sigmoid_topk`).
    [[nodiscard]] router_state_t<Router, Scalar>& router_state() { return router_state_; }
    /// Weights of routed expert e.
    [[nodiscard]] ffn_weights<weight_type>& expert_weights(index e) { return experts_.at(static_cast<std::size_t>(e)); }
    [[nodiscard]] const ffn_weights<weight_type>& expert_weights(index e) const {
        return experts_.at(static_cast<std::size_t>(e));
    }
    /// Weights of the shared FFN (only with a shared expert).
    [[nodiscard]] ffn_weights<weight_type>& shared_weights()
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

    /// Fills every weight with N(0, 1/fan_in) values from `seed` (examples and benchmarks). An
    /// expert-parallel rank draws the values of the experts it does not hold too, so every rank's
    /// weights are those of the one-process layer.
    void randomize(std::uint64_t seed) {
        std::mt19937_64 rng(seed);
        const auto draw = [&]<class T>(T* out, index rows, index cols) {
            std::normal_distribution<double> n(0.0, 1.0 / std::sqrt(static_cast<double>(cols)));
            for (index i = 0; i < rows * cols; ++i) {
                const double v = n(rng);
                if (out != nullptr) out[i] = static_cast<T>(v);
            }
        };
        const auto fill = [&](auto& m) { draw(m.data(), m.rows(), m.cols()); };
        fill(router_weight_);
        const index in_rows = ffn_in_rows<Expert>(shape_.d_ff), d = shape_.d_model;
        for (index e = 0; e < shape_.n_experts; ++e) {
            ffn_weights<weight_type>& w = experts_[static_cast<std::size_t>(e)];
            const bool held = owns_expert(e);
            draw(held ? w.in.data() : nullptr, in_rows, d);
            draw(held ? w.out.data() : nullptr, d, shape_.d_ff);
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

    /// Training mode: forward keeps what backward needs (each routed row's hidden activations) and the
    /// gradients are allocated. Off by default, so inference keeps nothing; turning it off keeps the
    /// buffers already allocated (for the next training phase).
    void set_training(bool on)
        requires trainable
    {
        training_ = on;
        saved_tokens_ = -1;
        if (!on) return;
        const auto same_shape = [](matrix<Scalar>& g, const auto& w) {
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
    [[nodiscard]] bool training() const { return training_; }

    /// Every trainable tensor with its gradient, by name: "router.weight", "experts.<e>.in.weight"
    /// (gated experts: the gate rows, then the up rows), "experts.<e>.out.weight", "shared.in.weight",
    /// "shared.out.weight", "shared.gate.weight" (a 1 x d row). The correction bias is not trained by
    /// gradient and is not listed; nor are the experts an expert-parallel rank does not hold. An
    /// optimiser steps `value` with `grad` in place.
    [[nodiscard]] std::vector<parameter<Scalar>> parameters()
        requires trainable
    {
        std::vector<parameter<Scalar>> out;
        const auto add = [&](std::string name, matrix<Scalar>& value, matrix<Scalar>* grad) {
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

    /// Gradients of the last `backward` call, shaped like the weights.
    [[nodiscard]] const matrix<Scalar>& grad_router_weight() const { return grad_router_weight_; }
    [[nodiscard]] const ffn_weights<Scalar>& grad_expert_weights(index e) const
        requires trainable
    {
        return grad_experts_.at(static_cast<std::size_t>(e));
    }
    [[nodiscard]] const ffn_weights<Scalar>& grad_shared_weights() const
        requires Shared::enabled && trainable
    {
        return grad_shared_weights_;
    }
    [[nodiscard]] const vector<Scalar>& grad_shared_gate() const
        requires Shared::gated
    {
        return grad_shared_gate_;
    }

    /// Worker threads for forward and backward (the calling thread included); results do not depend on it.
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
        saved_tokens_ = -1;  // set again only when this call completes
        logits_.resize(t, router_weight_.rows());
        compute_logits(x);
        moe::route(router_, logits_, router_state_, routing_);
        routing_.build_dispatch();
        if (exchange_) exchange_->share_totals(routing_, logits_.cols());
        compute_experts(x);
        combine(y);
        if constexpr (sizeof...(Losses) > 0) {
            const auto values = [&] {
                loss_values_ = std::apply([&](const auto&... l) { return std::array<Scalar, sizeof...(Losses)>{
                                              l.value(routing_, logits_)...}; },
                                          losses_);
            };
            if (exchange_) {
                exchange_->agree(values);  // a loss that fails on one rank (seq_balance) fails on all
                exchange_->comm().all_sum(std::span<Scalar>(loss_values_));  // each rank's share
            } else {
                values();
            }
        }
        saved_tokens_ = training_ ? t : -1;
    }

    /// Rows each rank's experts computed in the last forward, their imbalance and every rank's bytes
    /// of rows exchanged since (an expert-parallel layer; collective: every rank must call it). Throws
    /// `error` on a one-process layer.
    [[nodiscard]] parallel::load_statistics parallel_load() {
        if (!exchange_) throw error("layer::parallel_load: the layer is not expert-parallel");
        return exchange_->load();
    }

    /// Router logits of the last forward call, T x (router weight rows).
    [[nodiscard]] const matrix<Scalar>& logits() const { return logits_; }
    /// Routing of the last forward call.
    [[nodiscard]] const routing<Scalar>& last_routing() const { return routing_; }
    /// Routing statistics of the last forward call (expert-parallel: of every rank's tokens; collective).
    [[nodiscard]] routing_statistics statistics() const {
        routing_statistics s = compute_statistics(routing_);
        if (exchange_) s = combine_statistics(std::move(s), exchange_->comm());
        if constexpr (requires { router_state_.add_statistics(s); }) router_state_.add_statistics(s);
        return s;
    }
    /// Values of the loss terms for the last forward call, in the order of `Losses`.
    [[nodiscard]] const std::array<Scalar, sizeof...(Losses)>& loss_values() const { return loss_values_; }

    /// Backward of the last forward call, which must have run in training mode on the same `x`:
    /// given dL/dy, writes dL/dx into `grad_x` and sets the gradients of every parameter (see
    /// `parameters`) to those of L plus the layer's loss terms. The selection of the forward is held
    /// constant (SEMANTICS, "Backward"). One backward per forward: it consumes the saved activations.
    /// Throws `error` without a training forward, `shape_error` on shapes that do not match it.
    void backward(const_matrix_ref<Scalar> x, const_matrix_ref<Scalar> grad_y, matrix_ref<Scalar> grad_x)
        requires differentiable_router<Router, Scalar> && trainable
    {
        const index t = x.rows(), d = shape_.d_model;
        if (!training_ || saved_tokens_ < 0)
            throw error("layer::backward: no training forward to differentiate: call set_training(true), then forward, "
                        "then backward (once)");
        if (t != saved_tokens_ || x.cols() != d)
            throw shape_error("layer::backward: input is " + dims(x.rows(), x.cols()) + ", the forward's was " +
                              dims(saved_tokens_, d));
        if (grad_y.rows() != t || grad_y.cols() != d)
            throw shape_error("layer::backward: output gradient is " + dims(grad_y.rows(), grad_y.cols()) + ", expected " +
                              dims(t, d));
        if (grad_x.rows() != t || grad_x.cols() != d)
            throw shape_error("layer::backward: input gradient is " + dims(grad_x.rows(), grad_x.cols()) + ", expected " +
                              dims(t, d));
        const auto overlaps = [&](const Scalar* a, const Scalar* b) { return t > 0 && a < b + t * d && b < a + t * d; };
        if (overlaps(grad_x.data(), x.data()) || overlaps(grad_x.data(), grad_y.data()))
            throw value_error("layer::backward: the input gradient must not share memory with the input or the output "
                              "gradient (both are read after it is written)");
        check_weights();
        saved_tokens_ = -1;

        // dL/dw per slot, then dL/dz through the router and the loss terms.
        grad_weights_.assign(static_cast<std::size_t>(routing_.slots()), Scalar(0));
        for (index s = 0; s < routing_.slots(); ++s) {
            const index row = routing_.slot_rows[static_cast<std::size_t>(s)];
            if (row >= 0)
                grad_weights_[static_cast<std::size_t>(s)] =
                    grad_y.row(routing_.slot_tokens[static_cast<std::size_t>(s)]).dot(expert_out_.row(row));
        }
        grad_logits_.resize(logits_.rows(), logits_.cols());
        route_backward(router_, logits_, routing_, router_state_, std::span<const Scalar>(grad_weights_), grad_logits_);
        std::apply([&](const auto&... l) { (l.gradient(routing_, logits_, grad_logits_), ...); }, losses_);
        // dL/dW_router = dL/dz^T x and dL/dx = dL/dz W_router (then the experts' terms are added).
        const index e = logits_.cols();
        kernels::multiply(kernels::strided<Scalar>{grad_logits_.data(), 1, e}, x.data(), x.outerStride(),
                          grad_router_weight_.data(), d, e, d, t, false);
        kernels::multiply(kernels::strided<Scalar>{grad_logits_.data(), e, 1}, router_weight_.data(), d, grad_x.data(),
                          grad_x.outerStride(), t, d, e, false);
        if (exchange_) sum_over_ranks(grad_router_weight_);

        if constexpr (Shared::gated) {
            // y += sigma(g_t) * shared_t with g_t = w_g . x_t.
            shared_gate_grad_.resize(t);
            for (index i = 0; i < t; ++i) {
                const Scalar sg = shared_gate_values_[i];
                shared_gate_grad_[i] = grad_y.row(i).dot(shared_out_.row(i)) * sg * (Scalar(1) - sg);
            }
            grad_shared_gate_.noalias() = x.transpose() * shared_gate_grad_;
            if (exchange_) sum_over_ranks(grad_shared_gate_);
        }
        backward_experts(x, grad_y);
        if constexpr (Shared::enabled)
            if (exchange_) {
                sum_over_ranks(grad_shared_weights_.in);
                sum_over_ranks(grad_shared_weights_.out);
            }
        combine_backward(grad_x);
    }

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

    void zero(ffn_weights<weight_type>& w, index ff, index in_rows) const {
        w.in = matrix<weight_type>::Zero(in_rows, shape_.d_model);
        w.out = matrix<weight_type>::Zero(shape_.d_model, ff);
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
            kernels::linear(x.row(first).data(), x.outerStride(), router_weight_.data(), d, logits_.row(first).data(), e, rows,
                            e, d);
        };
        pool_->run((t + chunk_rows - 1) / chunk_rows, run);
    }

    // Calls f(first, rows) for the pieces of the n rows starting at `first` (see `max_task_rows`).
    template <class F>
    static void for_each_piece(index first, index n, F&& f) {
        const index pieces = (n + max_task_rows - 1) / max_task_rows;
        for (index p = 0; p < pieces; ++p) {
            const index begin = first + n * p / pieces, end = first + n * (p + 1) / pieces;
            f(begin, end - begin);
        }
    }

    // Tasks for `n` rows of expert `expert` starting at row `first`.
    void add_tasks(index expert, index first, index n) {
        for_each_piece(first, n, [&](index begin, index rows) { tasks_.push_back({expert, begin, rows}); });
    }

    // The token routed row `row` (of `routing_`) comes from.
    [[nodiscard]] index token_of(index row) const {
        return routing_.slot_tokens[static_cast<std::size_t>(routing_.row_slots[static_cast<std::size_t>(row)])];
    }

    // Routed rows run on this rank's experts: the routing's own, or (expert-parallel) those received
    // from every rank; results in `expert_out_` by routing row either way.
    void compute_experts(const const_matrix_ref<Scalar>& x) {
        const index d = shape_.d_model;
        if (!exchange_) {
            expert_out_.resize(routing_.rows(), d);
            run_experts(x, routing_.expert_offsets, expert_out_);
            return;
        }
        exchange_->plan(routing_);
        exchange_->send(d, [&](index row, Scalar* to) { row_map(to, d) = x.row(token_of(row)); }, received_x_);
        own_out_.resize(exchange_->own_offsets().back(), d);
        run_experts(x, exchange_->own_offsets(), own_out_);
        expert_out_.resize(routing_.rows(), d);
        exchange_->give_back(own_out_, expert_out_);
    }

    using row_vector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
    static Eigen::Map<row_vector> row_map(Scalar* p, index n) { return {p, n}; }
    static Eigen::Map<const row_vector> const_row(const Scalar* p, index n) { return {p, n}; }

    // Input row `row` of the routed rows this rank computes.
    [[nodiscard]] const Scalar* routed_input(const const_matrix_ref<Scalar>& x, index row) const {
        return exchange_ ? received_x_.row(exchange_->received_row(row)).data() : x.row(token_of(row)).data();
    }

    // The shared FFN over every token and the routed experts over the row blocks `offsets` (E + 1
    // entries) into `out`, as (expert, piece) tasks.
    void run_experts(const const_matrix_ref<Scalar>& x, const std::vector<index>& offsets, matrix<Scalar>& routed_out) {
        const index d = shape_.d_model, e = shape_.n_experts, t = x.rows();
        tasks_.clear();
        // Shared-expert tasks (every token) first: the largest tasks start first and the small
        // routed ones fill the gaps at the end.
        if constexpr (Shared::enabled) {
            shared_out_.resize(t, d);
            add_tasks(e, 0, t);
        }
        for (index x_ = 0; x_ < e; ++x_) {
            const index b = offsets[static_cast<std::size_t>(x_)];
            add_tasks(x_, b, offsets[static_cast<std::size_t>(x_) + 1] - b);
        }
        const index widest = std::max(shape_.d_ff, shape_.d_shared);
        const std::size_t per_thread = static_cast<std::size_t>(max_task_rows * (d + 3 * widest));
        if (training_) {
            hidden_.resize(offsets.back(), ffn_in_rows<Expert>(shape_.d_ff));
            if constexpr (Shared::enabled) shared_hidden_.resize(t, shared_weights_.in.rows());
        }
        if constexpr (Shared::gated) shared_gate_values_.resize(t);
        scratch_.resize(per_thread * static_cast<std::size_t>(pool_->size()));
        // bf16 weights: each projection's input rows rounded to bf16.
        const std::size_t rounded_per_thread = trainable ? 0 : static_cast<std::size_t>(max_task_rows * std::max(d, widest));
        rounded_.resize(rounded_per_thread * static_cast<std::size_t>(pool_->size()));
        auto run = [&](index i, index thread) {
            const task& tk = tasks_[static_cast<std::size_t>(i)];
            Scalar* base = scratch_.data() + per_thread * static_cast<std::size_t>(thread);
            const std::span<bf16> rounded(rounded_.data() + rounded_per_thread * static_cast<std::size_t>(thread), rounded_per_thread);
            const bool shared = tk.expert == e;
            const ffn_weights<weight_type>& w = shared ? shared_weights_ : experts_[static_cast<std::size_t>(tk.expert)];
            const index ff = w.out.cols();
            Eigen::Map<matrix<Scalar>> xin(base, tk.rows, d);
            for (index r = 0; r < tk.rows; ++r) {
                if (shared)
                    xin.row(r) = x.row(tk.first + r);
                else
                    xin.row(r) = const_row(routed_input(x, tk.first + r), d);
            }
            Scalar* h_data = base + max_task_rows * d;
            if (training_) h_data = shared ? shared_hidden_.row(tk.first).data() : hidden_.row(tk.first).data();
            Eigen::Map<matrix<Scalar>> h(h_data, tk.rows, w.in.rows());
            Eigen::Map<matrix<Scalar>> a(base + max_task_rows * (d + 2 * widest), tk.rows, ff);
            Eigen::Map<matrix<Scalar>> out = shared ? Eigen::Map<matrix<Scalar>>(shared_out_.row(tk.first).data(), tk.rows, d)
                                                    : Eigen::Map<matrix<Scalar>>(routed_out.row(tk.first).data(), tk.rows, d);
            const Eigen::Map<const matrix<Scalar>> xc(xin.data(), tk.rows, d);
            if (shared) {
                if constexpr (Shared::enabled) {
                    ffn_forward(shared_.expert, w, xc, h, a, out, rounded);
                    if constexpr (Shared::gated)
                        for (index r = 0; r < tk.rows; ++r) {
                            const Scalar g = xc.row(r).dot(shared_gate_);
                            shared_gate_values_[tk.first + r] = Scalar(1) / (Scalar(1) + std::exp(-g));
                        }
                }
            } else {
                ffn_forward(expert_, w, xc, h, a, out, rounded);
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
                if constexpr (Shared::gated)
                    yi += shared_gate_values_[i] * shared_out_.row(i);
                else if constexpr (Shared::enabled)
                    yi += shared_out_.row(i);
            }
        };
        pool_->run((t + chunk_rows - 1) / chunk_rows, run);
    }

    // One task per expert (the shared FFN first), each over its rows in the pieces of `max_task_rows` in
    // order, so every weight gradient is summed in the same order at any thread count. Expert-parallel:
    // dL/d(out) of every routed row goes to the row's owner, which returns dL/dx of the row.
    void backward_experts(const const_matrix_ref<Scalar>& x, const const_matrix_ref<Scalar>& grad_y) {
        const index d = shape_.d_model, e = shape_.n_experts, t = x.rows();
        const auto scaled_grad = [&](index row, Scalar* to) {
            const auto slot = static_cast<std::size_t>(routing_.row_slots[static_cast<std::size_t>(row)]);
            row_map(to, d) = routing_.weights[slot] * grad_y.row(routing_.slot_tokens[slot]);
        };
        if (exchange_) exchange_->send(d, scaled_grad, received_grad_);
        const std::vector<index>& offsets = exchange_ ? exchange_->own_offsets() : routing_.expert_offsets;
        matrix<Scalar>& routed_grad = exchange_ ? own_grad_ : row_grad_;
        routed_grad.resize(offsets.back(), d);
        if constexpr (Shared::enabled) shared_grad_.resize(t, d);
        const index widest = std::max(shape_.d_ff, shape_.d_shared);
        const std::size_t per_thread = static_cast<std::size_t>(max_task_rows * (2 * d + 2 * widest));
        scratch_.resize(per_thread * static_cast<std::size_t>(pool_->size()));
        const index first_task = Shared::enabled ? -1 : 0;
        auto run = [&](index i, index thread) {
            const index expert = i + first_task;  // -1: the shared FFN
            const bool shared = expert < 0;
            const ffn_weights<Scalar>& w = shared ? shared_weights_ : experts_[static_cast<std::size_t>(expert)];
            ffn_weights<Scalar>& grad = shared ? grad_shared_weights_ : grad_experts_[static_cast<std::size_t>(expert)];
            const index begin = shared ? 0 : offsets[static_cast<std::size_t>(expert)];
            const index end = shared ? t : offsets[static_cast<std::size_t>(expert) + 1];
            const index ff = w.out.cols();
            Scalar* base = scratch_.data() + per_thread * static_cast<std::size_t>(thread);
            if (end == begin) {
                grad.in.setZero();
                grad.out.setZero();
            }
            bool first_piece = true;  // writes the weight gradients, the later pieces add to them
            for_each_piece(begin, end - begin, [&](index first, index n) {
                Eigen::Map<matrix<Scalar>> xin(base, n, d), dout(base + max_task_rows * d, n, d);
                for (index r = 0; r < n; ++r) {
                    const index row = first + r;
                    if (shared) {
                        Scalar scale = 1;
                        if constexpr (Shared::gated) scale = shared_gate_values_[row];
                        xin.row(r) = x.row(row);
                        dout.row(r) = scale * grad_y.row(row);
                    } else if (exchange_) {
                        const index at = exchange_->received_row(row);
                        xin.row(r) = received_x_.row(at);
                        dout.row(r) = received_grad_.row(at);
                    } else {
                        xin.row(r) = x.row(token_of(row));
                        scaled_grad(row, dout.row(r).data());
                    }
                }
                Eigen::Map<matrix<Scalar>> h(shared ? shared_hidden_.row(first).data() : hidden_.row(first).data(), n,
                                             w.in.rows());
                Eigen::Map<matrix<Scalar>> a(base + 2 * max_task_rows * d, n, ff);
                Eigen::Map<matrix<Scalar>> da(base + 2 * max_task_rows * d + max_task_rows * widest, n, ff);
                Eigen::Map<matrix<Scalar>> dx(shared ? shared_grad_.row(first).data() : routed_grad.row(first).data(), n, d);
                const Eigen::Map<const matrix<Scalar>> xc(xin.data(), n, d), doc(dout.data(), n, d);
                if (shared) {
                    if constexpr (Shared::enabled) ffn_backward(shared_.expert, w, xc, h, doc, a, da, grad, !first_piece, dx);
                } else {
                    ffn_backward(expert_, w, xc, h, doc, a, da, grad, !first_piece, dx);
                }
                first_piece = false;
            });
        };
        // Experts held elsewhere have no rows and empty gradients: their tasks do nothing.
        pool_->run(e - first_task, run);
        if (exchange_) {
            row_grad_.resize(routing_.rows(), d);
            exchange_->give_back(own_grad_, row_grad_);
        }
    }

    template <class M>
    void sum_over_ranks(M& m) {
        exchange_->comm().all_sum(std::span<Scalar>(m.data(), static_cast<std::size_t>(m.size())));
    }

    // dL/dx_t += the rows of token t's slots in slot order, then the shared FFN's and its gate's terms.
    void combine_backward(matrix_ref<Scalar>& grad_x) {
        const index t = routing_.tokens;
        auto run = [&](index chunk, index) {
            const index end = std::min(t, (chunk + 1) * chunk_rows);
            for (index i = chunk * chunk_rows; i < end; ++i) {
                auto gi = grad_x.row(i);
                for (index s = routing_.begin(i); s < routing_.end(i); ++s) {
                    const index row = routing_.slot_rows[static_cast<std::size_t>(s)];
                    if (row >= 0) gi += row_grad_.row(row);
                }
                if constexpr (Shared::enabled) gi += shared_grad_.row(i);
                if constexpr (Shared::gated) gi += shared_gate_grad_[i] * shared_gate_.transpose();
            }
        };
        pool_->run((t + chunk_rows - 1) / chunk_rows, run);
    }

    static Eigen::Map<matrix<Scalar>> view(matrix<Scalar>* m, index rows, index cols) {
        if (m == nullptr || m->rows() != rows || m->cols() != cols) return {nullptr, 0, 0};
        return {m->data(), rows, cols};
    }

    layer_shape shape_;
    Router router_;
    Expert expert_;
    Shared shared_;
    std::tuple<Losses...> losses_;
    router_state_t<Router, Scalar> router_state_;
    std::unique_ptr<detail::thread_pool> pool_;

    matrix<Scalar> router_weight_;
    std::vector<ffn_weights<weight_type>> experts_;
    ffn_weights<weight_type> shared_weights_;
    vector<Scalar> shared_gate_;

    // Workspace, reused between calls.
    matrix<Scalar> logits_;
    routing<Scalar> routing_;
    std::vector<task> tasks_;
    matrix<Scalar> expert_out_;
    matrix<Scalar> shared_out_;
    std::vector<Scalar> scratch_;
    std::vector<bf16> rounded_;  // bf16 weights: projection inputs rounded to bf16
    vector<Scalar> shared_gate_values_;  // sigma(w_g . x_t) per token (gated shared expert)
    std::array<Scalar, sizeof...(Losses)> loss_values_{};

    // Training: what forward keeps for backward, the gradients, and backward's workspace.
    bool training_ = false;
    index saved_tokens_ = -1;            // T of the last training forward; -1 when there is none
    matrix<Scalar> hidden_;              // x W_in^T per routed row, overwritten by its gradient
    matrix<Scalar> shared_hidden_;       // the same for the shared FFN, per token
    matrix<Scalar> grad_router_weight_;
    std::vector<ffn_weights<Scalar>> grad_experts_;
    ffn_weights<Scalar> grad_shared_weights_;
    vector<Scalar> grad_shared_gate_;
    std::vector<Scalar> grad_weights_;   // dL/dw per slot
    matrix<Scalar> grad_logits_;
    matrix<Scalar> row_grad_;            // dL/dx per routed row
    matrix<Scalar> shared_grad_;         // dL/dx of the shared FFN per token
    vector<Scalar> shared_gate_grad_;    // dL/dg_t of the shared gate per token

    // Expert parallelism (null exchange: one process).
    std::unique_ptr<parallel::expert_exchange<Scalar>> exchange_;
    matrix<Scalar> received_x_;     // the input rows of the routed rows this rank computes
    matrix<Scalar> own_out_;        // their outputs
    matrix<Scalar> received_grad_;  // backward: their dL/d(output), scaled by the combine weight
    matrix<Scalar> own_grad_;       // backward: their dL/dx
};

}  // namespace moe
