#pragma once
/// \file
/// `moe::layer`: one sparse Mixture-of-Experts layer, generic over its router, expert FFN, shared
/// expert and loss policies, forward and backward.
///
/// forward: logits z = x W_r^T -> router -> routing -> dispatch (counting sort into per-expert row
/// blocks) -> the expert FFNs, shared FFN included, as tasks of (FFN, row block, column block) for
/// each projection (detail/expert_pass.hpp, cut for the pool's threads by detail/expert_schedule.hpp)
/// -> combine in a fixed order -> y.
/// backward: the same path in reverse with the same routing (the selection is held constant); weight
/// gradients by blocks of their rows and columns, each value summed over all of its FFN's rows.
/// Every value is one whole sum in an order that no block or thread changes, and each output row is
/// summed in slot order, so the result is bitwise identical across runs and thread counts.
///
/// Expert parallelism: a layer built with a `parallel::placement` is one rank of a layer whose routed
/// experts are spread over the ranks of a communicator. Every rank calls forward (and backward) with
/// its own tokens; the rows of an expert go to its owner and come back (`parallel::expert_exchange`).
/// Router, shared experts and losses are replicated; their gradients are summed over the ranks.

#include "moe/concepts.hpp"
#include "moe/detail/expert_pass.hpp"
#include "moe/detail/expert_schedule.hpp"
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
        if (threads == pool_->size()) return;
        pool_ = std::make_unique<detail::thread_pool>(threads);
        pool_->set_trace(trace_);
    }
    [[nodiscard]] index threads() const { return pool_->size(); }

    /// Benchmarks: cut the work into the tasks planned for `threads` threads (0: the pool's own size),
    /// whatever runs them, and (with `trace` set) record each pool run's task times: so one thread can
    /// time the task list of a larger machine. Results do not depend on either.
    void plan_for_threads(index threads, std::vector<std::vector<double>>* trace = nullptr) {
        if (threads < 0 || threads > max_threads)
            throw value_error("layer: planned threads = " + std::to_string(threads) + " must be in [0, " +
                              std::to_string(max_threads) + "]");
        plan_threads_ = threads;
        trace_ = trace;
        pool_->set_trace(trace);
    }

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
        combine(x, y);
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

    // Calls f(begin, end) for chunks of the n rows (`detail::chunk_rows`) on the pool. Each row's result
    // is computed by itself, so the chunking does not change it.
    template <class F>
    void for_row_chunks(index n, F&& f) {
        const index chunk = detail::chunk_rows(n, plan_threads_ > 0 ? plan_threads_ : pool_->size());
        auto run = [&](index c, index) { f(c * chunk, std::min(n, (c + 1) * chunk)); };
        pool_->run((n + chunk - 1) / chunk, run);
    }

    // Logits per token chunk; each is a fixed-order dot product (see kernels/linear.hpp).
    void compute_logits(const const_matrix_ref<Scalar>& x) {
        const index e = router_weight_.rows(), d = shape_.d_model;
        for_row_chunks(x.rows(), [&](index begin, index end) {
            kernels::linear(x.row(begin).data(), x.outerStride(), router_weight_.data(), d, logits_.row(begin).data(), e,
                            end - begin, e, d);
        });
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

    // Input row `row` of the routed rows this rank computes.
    [[nodiscard]] const Scalar* routed_input(const const_matrix_ref<Scalar>& x, index row) const {
        return exchange_ ? received_x_.row(exchange_->received_row(row)).data() : x.row(token_of(row)).data();
    }

    // n values from `from` as the weight type (bf16 weights: rounded, as their projections take them).
    static void store_input(const Scalar* from, weight_type* to, index n) {
        if constexpr (trainable)
            std::copy(from, from + n, to);
        else
            kernels::round_to_bf16(from, to, n);
    }

    // The policy of the shared FFN (the routed one's when there is none: it then has no rows).
    [[nodiscard]] const auto& shared_policy() const {
        if constexpr (Shared::enabled)
            return shared_.expert;
        else
            return expert_;
    }

    // The routed experts over the row blocks `offsets` (E + 1 entries) into `routed_out`, and the shared
    // FFN over every token, as the tasks of `detail::expert_pass`: the routed rows' inputs are gathered
    // (and, for bf16 weights, rounded) first.
    void run_experts(const const_matrix_ref<Scalar>& x, const std::vector<index>& offsets, matrix<Scalar>& routed_out) {
        const index d = shape_.d_model, e = shape_.n_experts, t = x.rows(), rows = offsets.back();
        routed_in_.resize(rows, d);
        for_row_chunks(rows, [&](index begin, index end) {
            for (index r = begin; r < end; ++r) store_input(routed_input(x, r), routed_in_.data() + r * d, d);
        });
        const index in_rows = ffn_in_rows<Expert>(shape_.d_ff);
        act_.resize(rows, shape_.d_ff);
        if (training_) hidden_.resize(rows, in_rows);
        blocks_.resize(static_cast<std::size_t>(e) + 1);
        for (index ex = 0; ex < e; ++ex) {
            const index first = offsets[static_cast<std::size_t>(ex)];
            auto& b = blocks_[static_cast<std::size_t>(ex)];
            b.weights = &experts_[static_cast<std::size_t>(ex)];
            b.rows = offsets[static_cast<std::size_t>(ex) + 1] - first;
            b.x = routed_in_.data() + first * d;
            b.ldx = d;
            b.hidden = training_ ? hidden_.data() + first * in_rows : nullptr;
            b.ldh = in_rows;
            b.act = act_.data() + first * shape_.d_ff;
            b.lda = shape_.d_ff;
            b.out = routed_out.data() + first * d;
            b.ldo = d;
        }
        auto& sb = blocks_.back();  // the shared FFN (no rows without one)
        sb = {};
        sb.shared = true;
        if constexpr (Shared::enabled) {
            const index ds = shape_.d_shared, shared_in_rows = shared_weights_.in.rows();
            if constexpr (trainable) {
                sb.x = x.data();
                sb.ldx = x.outerStride();
            } else {
                shared_in_.resize(t, d);
                for_row_chunks(t, [&](index begin, index end) {
                    for (index r = begin; r < end; ++r) store_input(x.row(r).data(), shared_in_.data() + r * d, d);
                });
                sb.x = shared_in_.data();
                sb.ldx = d;
            }
            shared_out_.resize(t, d);
            shared_act_.resize(t, ds);
            if (training_) shared_hidden_.resize(t, shared_in_rows);
            sb.weights = &shared_weights_;
            sb.rows = t;
            sb.hidden = training_ ? shared_hidden_.data() : nullptr;
            sb.ldh = shared_in_rows;
            sb.act = shared_act_.data();
            sb.lda = ds;
            sb.out = shared_out_.data();
            sb.ldo = d;
        }
        pass_.forward(expert_, shared_policy(), std::span<const block>(blocks_), *pool_, plan_threads_);
    }

    // y_t = the weighted rows of token t's slots in slot order, plus the shared FFN's (gated: times
    // sigma(w_g . x_t), kept for backward).
    void combine(const const_matrix_ref<Scalar>& x, matrix_ref<Scalar>& y) {
        if constexpr (Shared::gated) shared_gate_values_.resize(x.rows());
        for_row_chunks(routing_.tokens, [&](index begin, index end) {
            for (index i = begin; i < end; ++i) {
                auto yi = y.row(i);
                yi.setZero();
                for (index s = routing_.begin(i); s < routing_.end(i); ++s) {
                    const index row = routing_.slot_rows[static_cast<std::size_t>(s)];
                    if (row >= 0) yi += routing_.weights[static_cast<std::size_t>(s)] * expert_out_.row(row);
                }
                if constexpr (Shared::gated) {
                    const Scalar g = x.row(i).dot(shared_gate_);
                    shared_gate_values_[i] = Scalar(1) / (Scalar(1) + std::exp(-g));
                    yi += shared_gate_values_[i] * shared_out_.row(i);
                } else if constexpr (Shared::enabled) {
                    yi += shared_out_.row(i);
                }
            }
        });
    }

    // The expert pass backward over the blocks of the forward: each routed row's dL/d(out) (its combine
    // weight times dL/dy of its token) is gathered first. Expert-parallel: dL/d(out) of every routed row
    // goes to the row's owner, which returns dL/dx of the row.
    void backward_experts(const const_matrix_ref<Scalar>& x, const const_matrix_ref<Scalar>& grad_y) {
        const index d = shape_.d_model, e = shape_.n_experts, t = x.rows();
        const auto scaled_grad = [&](index row, Scalar* to) {
            const auto slot = static_cast<std::size_t>(routing_.row_slots[static_cast<std::size_t>(row)]);
            row_map(to, d) = routing_.weights[slot] * grad_y.row(routing_.slot_tokens[slot]);
        };
        if (exchange_) exchange_->send(d, scaled_grad, received_grad_);
        const std::vector<index>& offsets = exchange_ ? exchange_->own_offsets() : routing_.expert_offsets;
        const index rows = offsets.back();
        dout_.resize(rows, d);
        for_row_chunks(rows, [&](index begin, index end) {
            for (index r = begin; r < end; ++r) {
                if (exchange_)
                    row_map(dout_.data() + r * d, d) = received_grad_.row(exchange_->received_row(r));
                else
                    scaled_grad(r, dout_.data() + r * d);
            }
        });
        matrix<Scalar>& routed_grad = exchange_ ? own_grad_ : row_grad_;
        routed_grad.resize(rows, d);
        for (index ex = 0; ex < e; ++ex) {
            const index first = offsets[static_cast<std::size_t>(ex)];
            auto& b = blocks_[static_cast<std::size_t>(ex)];
            b.dout = dout_.data() + first * d;
            b.ldd = d;
            b.grad = &grad_experts_[static_cast<std::size_t>(ex)];
            b.dx = routed_grad.data() + first * d;
            b.lddx = d;
        }
        if constexpr (Shared::enabled) {
            auto& sb = blocks_.back();
            sb.x = x.data();  // the forward's x may live elsewhere now
            sb.ldx = x.outerStride();
            if constexpr (Shared::gated) {
                shared_dout_.resize(t, d);
                for_row_chunks(t, [&](index begin, index end) {
                    for (index i = begin; i < end; ++i) shared_dout_.row(i) = shared_gate_values_[i] * grad_y.row(i);
                });
                sb.dout = shared_dout_.data();
                sb.ldd = d;
            } else {
                sb.dout = grad_y.data();
                sb.ldd = grad_y.outerStride();
            }
            shared_grad_.resize(t, d);
            sb.grad = &grad_shared_weights_;
            sb.dx = shared_grad_.data();
            sb.lddx = d;
        }
        pass_.backward(expert_, shared_policy(), std::span<const block>(blocks_), *pool_, plan_threads_);
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
        for_row_chunks(routing_.tokens, [&](index begin, index end) {
            for (index i = begin; i < end; ++i) {
                auto gi = grad_x.row(i);
                for (index s = routing_.begin(i); s < routing_.end(i); ++s) {
                    const index row = routing_.slot_rows[static_cast<std::size_t>(s)];
                    if (row >= 0) gi += row_grad_.row(row);
                }
                if constexpr (Shared::enabled) gi += shared_grad_.row(i);
                if constexpr (Shared::gated) gi += shared_gate_grad_[i] * shared_gate_.transpose();
            }
        });
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
    index plan_threads_ = 0;                          // see plan_for_threads
    std::vector<std::vector<double>>* trace_ = nullptr;  // see plan_for_threads
    using block = detail::ffn_block<Scalar, weight_type>;
    std::vector<block> blocks_;    // routed experts, then the shared FFN (see detail/expert_pass.hpp)
    detail::expert_pass<Scalar, weight_type> pass_;
    matrix<weight_type> routed_in_;   // input of each routed row this rank computes (bf16: rounded)
    matrix<weight_type> shared_in_;   // bf16 weights: the tokens rounded for the shared FFN
    matrix<weight_type> act_;         // act(h) per routed row
    matrix<weight_type> shared_act_;  // act(h) of the shared FFN per token
    matrix<Scalar> expert_out_;
    matrix<Scalar> shared_out_;
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
    matrix<Scalar> dout_;                // dL/d(out) per routed row this rank computes
    matrix<Scalar> shared_dout_;         // gated shared FFN: dL/d(out) per token
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
