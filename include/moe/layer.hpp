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
/// The class below states the API and the state; its members are defined by responsibility in
/// detail/layer_weights.hpp (weights, training state, checks), detail/layer_forward.hpp (logits, expert
/// pass, combine, the expert-parallel exchange of rows) and detail/layer_backward.hpp.
///
/// Expert parallelism: a layer built with a `parallel::placement` is one rank of a layer whose routed
/// experts are spread over the ranks of a communicator. Every rank calls forward (and backward) with
/// its own tokens; the rows of an expert go to its owner and come back (`parallel::expert_exchange`).
/// With `placement::rebalance` on, a forward lets the least-loaded ranks compute the first rows of an
/// overloaded rank's experts with a copy of their weights (`parallel/rebalance.hpp`), and backward
/// their gradients, each expert's weight gradient summed along its segments in row order; the outputs
/// and gradients are the same bits.
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
// Whether the shared expert's FFN policy (if any) names no storage of its own or the routed experts'
// one: the layer stores both alike, as the routed policy says.
template <class Shared, class Scalar, class Storage>
constexpr bool shared_storage_agrees() {
    if constexpr (Shared::enabled) {
        using own = storage_t<std::remove_cvref_t<decltype(std::declval<Shared>().expert)>, Scalar>;
        return std::is_same_v<own, storages::scalar<Scalar>> || std::is_same_v<own, Storage>;
    } else {
        return true;
    }
}

// Whether a layer of Scalar with expert policy X can train: its storage says so. A name outside the
// class, so that the constraints of the members defined out of line name no member of it (clang 14
// does not find one there).
template <class Scalar, class X>
inline constexpr bool trains = storage_t<X, Scalar>::trainable;
}  // namespace detail

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert,
          shared_expert Shared = shared_experts::none, loss_term<Scalar>... Losses>
class layer {
public:
    using scalar_type = Scalar;
    using router_type = Router;
    using expert_type = Expert;
    using shared_type = Shared;
    /// How the expert weights (routed and shared) are held (experts/storage.hpp): the layer's scalar
    /// type, or what the expert policy names (`experts::bf16_weights`, `q8_0_weights`, `q4_0_weights`:
    /// inference only, no training mode, backward or `parameters`).
    using storage_type = storage_t<Expert, Scalar>;
    static_assert(weight_storage<storage_type, Scalar>,
                  "the expert policy's weight storage does not fit the layer's scalar type (bf16 and quantized "
                  "weights are for float layers)");
    static_assert(detail::shared_storage_agrees<Shared, Scalar, storage_type>(),
                  "the shared expert's weights are stored as the routed experts' are: name the storage on the routed expert policy");
    /// Weights of one FFN of this layer.
    using weights_type = ffn_weights<storage_type>;
    /// Gradients of one FFN's weights.
    using gradients_type = ffn_weights<storages::scalar<Scalar>>;
    /// Whether the layer can train (its storage can).
    static constexpr bool trainable = detail::trains<Scalar, Expert>;


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
        if constexpr (storage_type::unit > 1)
            for (const auto& [size, field] : {std::pair{shape.d_model, "d_model"}, {shape.d_ff, "d_ff"}, {shape.d_shared, "d_shared"}})
                if (size % storage_type::unit != 0)
                    throw shape_error("layer: " + std::string(field) + " = " + std::to_string(size) + " is not a multiple of " +
                                      std::to_string(storage_type::unit) + ", as " + std::string(storage_type::name) +
                                      " weights need (rows of blocks of " + std::to_string(storage_type::unit) + " values)");
        if (where.comm) {
            std::size_t expert_bytes = 0;  // what a rank helping another with one expert takes in (re-balancing)
            if (where.rebalance.enabled) {
                weights_type one;
                zero(one, shape.d_ff, ffn_in_rows<Expert>(shape.d_ff));
                expert_bytes = storage_type::bytes(one.in) + storage_type::bytes(one.out);
            }
            exchange_ = std::make_unique<parallel::expert_exchange<Scalar>>(where, shape.n_experts, expert_bytes);
        }
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
    [[nodiscard]] weights_type& expert_weights(index e) { return experts_.at(static_cast<std::size_t>(e)); }
    [[nodiscard]] const weights_type& expert_weights(index e) const {
        return experts_.at(static_cast<std::size_t>(e));
    }
    /// Weights of the shared FFN (only with a shared expert).
    [[nodiscard]] weights_type& shared_weights()
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
    void randomize(std::uint64_t seed);

    /// Training mode: forward keeps what backward needs (each routed row's hidden activations) and the
    /// gradients are allocated. Off by default, so inference keeps nothing; turning it off keeps the
    /// buffers already allocated (for the next training phase).
    void set_training(bool on);
    [[nodiscard]] bool training() const { return training_; }

    /// Every trainable tensor with its gradient, by name: "router.weight", "experts.<e>.in.weight"
    /// (gated experts: the gate rows, then the up rows), "experts.<e>.out.weight", "shared.in.weight",
    /// "shared.out.weight", "shared.gate.weight" (a 1 x d row). The correction bias is not trained by
    /// gradient and is not listed; nor are the experts an expert-parallel rank does not hold. An
    /// optimiser steps `value` with `grad` in place.
    [[nodiscard]] std::vector<parameter<Scalar>> parameters();

    /// Gradients of the last `backward` call, shaped like the weights.
    [[nodiscard]] const matrix<Scalar>& grad_router_weight() const { return grad_router_weight_; }
    [[nodiscard]] const gradients_type& grad_expert_weights(index e) const
        requires detail::trains<Scalar, Expert>
    {
        return grad_experts_.at(static_cast<std::size_t>(e));
    }
    [[nodiscard]] const gradients_type& grad_shared_weights() const
        requires Shared::enabled && detail::trains<Scalar, Expert>
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
        // bf16 weights: each thread's scratch for the products that widen them, now (kernels/linear.hpp).
        constexpr bool bf16_products = std::is_same_v<typename storage_type::input, bf16>;
        if constexpr (bf16_products) kernels::reserve_bf16_scratch();
        pool_ = std::make_unique<detail::thread_pool>(threads, bf16_products ? &kernels::reserve_bf16_scratch : nullptr);
        pool_->set_trace(trace_);
    }
    [[nodiscard]] index threads() const { return pool_->size(); }

    /// Benchmarks: cut the work into the tasks planned for `threads` threads (0: the pool's own size),
    /// whatever runs them, and (with `trace` set) record each pool run's task times: so one thread can
    /// time the task list of a larger machine. Results do not depend on either.
    void plan_for_threads(index threads, detail::run_trace* trace = nullptr) {
        if (threads < 0 || threads > max_threads)
            throw value_error("layer: planned threads = " + std::to_string(threads) + " must be in [0, " +
                              std::to_string(max_threads) + "]");
        plan_threads_ = threads;
        trace_ = trace;
        pool_->set_trace(trace);
    }

    /// y = MoE(x) for x of shape T x d; y must be T x d too. Throws `shape_error` otherwise.
    void forward(const_matrix_ref<Scalar> x, matrix_ref<Scalar> y);

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
    /// constant (docs/semantics.md, "Backward"). One backward per forward: it consumes the saved activations.
    /// Throws `error` without a training forward, `shape_error` on shapes that do not match it.
    void backward(const_matrix_ref<Scalar> x, const_matrix_ref<Scalar> grad_y, matrix_ref<Scalar> grad_x)
        requires differentiable_router<Router, Scalar>;

    /// Bytes of the expert weights (routed and shared) this rank holds, as its storage holds them.
    [[nodiscard]] std::size_t expert_weight_bytes() const {
        std::size_t bytes = 0;
        const auto add = [&](const weights_type& w) { bytes += storage_type::bytes(w.in) + storage_type::bytes(w.out); };
        for (const weights_type& w : experts_) add(w);  // empty for experts held elsewhere
        if constexpr (Shared::enabled) add(shared_weights_);
        return bytes;
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
    void check_weights();

    void zero(weights_type& w, index ff, index in_rows) const {
        w.in = typename storage_type::matrix(in_rows, shape_.d_model);
        w.out = typename storage_type::matrix(shape_.d_model, ff);
    }

    // The threads the work is cut for: plan_for_threads's, or the pool's own.
    [[nodiscard]] index planned_threads() const { return plan_threads_ > 0 ? plan_threads_ : pool_->size(); }

    // Calls f(begin, end) for chunks of the n rows (`detail::chunk_rows`) on the pool. Each row's result
    // is computed by itself, so the chunking does not change it.
    template <class F>
    void for_row_chunks(index n, F&& f) {
        const index chunk = detail::chunk_rows(n, planned_threads());
        auto run = [&](index c, index) { f(c * chunk, std::min(n, (c + 1) * chunk)); };
        pool_->run((n + chunk - 1) / chunk, run);
    }

    // Calls f(task) on the pool for every block of `item` cut by `rules` for the planned threads
    // (`detail::plan_tasks`; `plan` keeps the cut between calls). For the router's products, whose
    // every output is one whole sum (kernels/linear.hpp, kernels/multiply.hpp): the cut changes no bit.
    template <class F>
    void for_blocks(detail::stage_plan& plan, const detail::work_item& item, const detail::split_rules& rules, F&& f) {
        const std::vector<detail::work_task>& tasks =
            plan.update(std::span(&item, 1), planned_threads(), rules);
        auto run = [&](index i, index) { f(tasks[static_cast<std::size_t>(i)]); };
        pool_->run(static_cast<index>(tasks.size()), run);
    }

    // Logits by blocks of tokens and of experts (a decoding step's router is cut along its rows, as the
    // experts' weights are); each is a fixed-order dot product (see kernels/linear.hpp).
    void compute_logits(const const_matrix_ref<Scalar>& x);

    // `routing_` from `logits_`; expert-parallel with a batch-dependent router, this rank's part of the
    // routing of every rank's tokens (`routed_batch_`), so that the result does not depend on the ranks.
    void route_tokens();

    // The token routed row `row` (of `routing_`) comes from.
    [[nodiscard]] index token_of(index row) const {
        return routing_.slot_tokens[static_cast<std::size_t>(routing_.row_slots[static_cast<std::size_t>(row)])];
    }

    // Routed rows run on this rank's experts: the routing's own, or (expert-parallel) those received
    // from every rank, with the weights of the experts it helps (re-balancing) received from their
    // owners; results in `expert_out_` by routing row either way.
    void compute_experts(const const_matrix_ref<Scalar>& x);

    using row_vector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
    static Eigen::Map<row_vector> row_map(Scalar* p, index n) { return {p, n}; }

    // The weights routed expert e's rows run with here: the rank's own, or a copy of the owner's when it
    // helps another rank with e (re-balancing).
    [[nodiscard]] const weights_type& weights_of(index e) const {
        const auto i = static_cast<std::size_t>(e);
        return exchange_ && exchange_->helps(e) ? helped_[i] : experts_[i];
    }

    // Where the weight gradient of routed expert e's rows goes here: the rank's own, or the sum it
    // passes on when it helps another rank with e; empty for an expert held elsewhere.
    [[nodiscard]] gradients_type& gradient_of(index e) {
        const auto i = static_cast<std::size_t>(e);
        return exchange_ && exchange_->helps(e) ? helped_grad_[i] : grad_experts_[i];
    }

    // Input row `row` of the routed rows this rank computes.
    [[nodiscard]] const Scalar* routed_input(const const_matrix_ref<Scalar>& x, index row) const {
        return exchange_ ? received_x_.row(exchange_->received_row(row)).data() : x.row(token_of(row)).data();
    }

    // What the projections take: a row of d values is `lanes(d)` of them.
    using input_type = typename storage_type::input;
    static index lanes(index values) { return values / storage_type::unit; }
    // Whether the projections take the float rows themselves (else converted rows).
    static constexpr bool takes_rows = std::is_same_v<input_type, Scalar>;

    // The policy of the shared FFN (the routed one's when there is none: it then has no rows).
    [[nodiscard]] const auto& shared_policy() const {
        if constexpr (Shared::enabled)
            return shared_.expert;
        else
            return expert_;
    }

    // The routed experts over the row blocks `offsets` (E + 1 entries) into `routed_out`, and the shared
    // FFN over every token, as the tasks of `detail::expert_pass`: the routed rows' inputs are gathered
    // (and converted, where the storage converts them) first.
    void run_experts(const const_matrix_ref<Scalar>& x, const std::vector<index>& offsets, matrix<Scalar>& routed_out);

    // y_t = the weighted rows of token t's slots in slot order, plus the shared FFN's (gated: times
    // sigma(w_g . x_t), kept for backward).
    void combine(const const_matrix_ref<Scalar>& x, matrix_ref<Scalar>& y);

    // The expert pass backward over the blocks of the forward: each routed row's dL/d(out) (its combine
    // weight times dL/dy of its token) is gathered first. Expert-parallel: dL/d(out) of every routed row
    // goes to the row's owner, which returns dL/dx of the row.
    void backward_experts(const const_matrix_ref<Scalar>& x, const const_matrix_ref<Scalar>& grad_y);
    // Routed expert e's block computes its weight gradient in round `round` of the chain along its
    // segments (0: the pass itself, from zero; later: continuing the sum passed on).
    void set_gradient_round(index e, int round);

    template <class M>
    void sum_over_ranks(M& m) {
        exchange_->comm().all_sum(std::span<Scalar>(m.data(), static_cast<std::size_t>(m.size())));
    }

    // dL/dx_t += the rows of token t's slots in slot order, then the shared FFN's and its gate's terms.
    void combine_backward(matrix_ref<Scalar>& grad_x);

    template <class M>
    static Eigen::Map<matrix<Scalar>> view(M* m, index rows, index cols) {
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
    std::vector<weights_type> experts_;
    weights_type shared_weights_;
    vector<Scalar> shared_gate_;

    // Workspace, reused between calls.
    matrix<Scalar> logits_;
    routing<Scalar> routing_;
    // The router's products (logits, dW_router, its dL/dx term) and the shared gate's dL/dw_g.
    std::array<detail::stage_plan, 4> router_plans_;
    index plan_threads_ = 0;                          // see plan_for_threads
    detail::run_trace* trace_ = nullptr;  // see plan_for_threads
    using block = detail::ffn_block<Scalar, storage_type>;
    std::vector<block> blocks_;    // routed experts, then the shared FFN (see detail/expert_pass.hpp)
    detail::expert_pass<Scalar, storage_type> pass_;
    // The left operands of the projections as the storage takes them, on cache lines.
    aligned_rows<input_type> routed_in_;   // input of each routed row this rank computes
    aligned_rows<input_type> shared_in_;   // converting storages: the tokens converted for the shared FFN
    aligned_rows<input_type> act_;         // act(h) per routed row
    aligned_rows<input_type> shared_act_;  // act(h) of the shared FFN per token
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
    std::vector<gradients_type> grad_experts_;
    gradients_type grad_shared_weights_;
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
    std::vector<weights_type> helped_;  // copies of the experts this rank helps with in the last forward; empty when none
    std::vector<gradients_type> helped_grad_;  // during backward: their weight-gradient sums, passed on
    matrix<Scalar> received_x_;     // the input rows of the routed rows this rank computes
    matrix<Scalar> own_out_;        // their outputs
    matrix<Scalar> received_grad_;  // backward: their dL/d(output), scaled by the combine weight
    matrix<Scalar> own_grad_;       // backward: their dL/dx
    // A batch-dependent router's routing of the whole batch (`route_tokens`), and its backward.
    bool routed_batch_ = false;
    matrix<Scalar> batch_logits_;
    routing<Scalar> batch_routing_;
    std::vector<Scalar> batch_grad_weights_;
    matrix<Scalar> batch_grad_logits_;
};

}  // namespace moe

// The members' definitions, by responsibility.
#define MOE_LAYER_DEFINITIONS
#include "moe/detail/layer_weights.hpp"
#include "moe/detail/layer_forward.hpp"
#include "moe/detail/layer_backward.hpp"
#undef MOE_LAYER_DEFINITIONS
