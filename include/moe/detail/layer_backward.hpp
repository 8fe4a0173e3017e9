#pragma once
// Internal: the definitions of `moe::layer`'s members for the backward path: the router's and the losses'
// gradients, the expert pass backward (expert-parallel: gradients of the rows to the ranks that computed
// them and back, re-balanced experts' weight gradients passed along their segments, replicated
// gradients summed over the ranks), combine backward.
// Included by moe/layer.hpp, after the class.

#if !defined(MOE_LAYER_DEFINITIONS)
#error "moe/detail/layer_backward.hpp is part of moe/layer.hpp: include that instead"
#endif

namespace moe {

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::backward(const_matrix_ref<Scalar> x,
    const_matrix_ref<Scalar> grad_y, matrix_ref<Scalar> grad_x)
    requires differentiable_router<Router, Scalar>
{
    static_assert(detail::trains<Scalar, Expert>, "this layer's expert weights are for inference (bf16 or quantized storage): "
                  "a layer trains on weights of its scalar type");
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

    // dL/dw per slot (by chunks of slots), then dL/dz through the router and the loss terms.
    grad_weights_.resize(static_cast<std::size_t>(routing_.slots()));
    for_row_chunks(routing_.slots(), [&](index begin, index end) {
        for (index s = begin; s < end; ++s) {
            const index row = routing_.slot_rows[static_cast<std::size_t>(s)];
            grad_weights_[static_cast<std::size_t>(s)] =
                row >= 0 ? grad_y.row(routing_.slot_tokens[static_cast<std::size_t>(s)]).dot(expert_out_.row(row))
                         : Scalar(0);
        }
    });
    grad_logits_.resize(logits_.rows(), logits_.cols());
    if (routed_batch_) {
        // The router differentiates the routing it made, of the whole batch; this rank keeps its tokens' rows.
        exchange_->gather_slots(std::span<const Scalar>(grad_weights_), batch_routing_, batch_grad_weights_);
        batch_grad_logits_.resize(batch_logits_.rows(), batch_logits_.cols());
        route_backward(router_, batch_logits_, batch_routing_, router_state_, std::span<const Scalar>(batch_grad_weights_),
                       batch_grad_logits_);
        const auto own = exchange_->own_tokens();
        grad_logits_ = batch_grad_logits_.middleRows(own.first, own.rows);
    } else {
        route_backward(router_, logits_, routing_, router_state_, std::span<const Scalar>(grad_weights_), grad_logits_);
    }
    std::apply([&](const auto&... l) { (l.gradient(routing_, logits_, grad_logits_), ...); }, losses_);
    // dL/dW_router = dL/dz^T x and dL/dx = dL/dz W_router (then the experts' terms are added), by blocks
    // of their outputs, each summed whole (over the tokens, over the experts) in order.
    const index e = logits_.cols();
    const detail::split_rules rules{
        .max_rows = 256, .row_unit = 16, .column_unit = kernels::multiply_panel_width<Scalar>()};
    if (t == 0) {
        grad_router_weight_.setZero();  // an empty batch has no rows to offset into
    } else {
        for_blocks(router_plans_[1], {e, d, t}, rules, [&](const detail::work_task& b) {
            kernels::multiply(kernels::strided<Scalar>{grad_logits_.data() + b.row_begin, 1, e}, x.data() + b.column_begin,
                              x.outerStride(), grad_router_weight_.data() + b.row_begin * d + b.column_begin, d,
                              b.row_end - b.row_begin, b.column_end - b.column_begin, t, false);
        });
    }
    for_blocks(router_plans_[2], {t, d, e}, rules, [&](const detail::work_task& b) {
        kernels::multiply(kernels::strided<Scalar>{grad_logits_.data() + b.row_begin * e, e, 1},
                          router_weight_.data() + b.column_begin, d,
                          grad_x.data() + b.row_begin * grad_x.outerStride() + b.column_begin, grad_x.outerStride(),
                          b.row_end - b.row_begin, b.column_end - b.column_begin, e, false);
    });
    if (exchange_) sum_over_ranks(grad_router_weight_);

    if constexpr (Shared::gated) {
        // y += sigma(g_t) * shared_t with g_t = w_g . x_t: dL/dg_t by chunks of tokens, then dL/dw_g = x^T dL/dg
        // by blocks of its values, each summed over the tokens in order.
        shared_gate_grad_.resize(t);
        for_row_chunks(t, [&](index begin, index end) {
            for (index i = begin; i < end; ++i) {
                const Scalar sg = shared_gate_values_[i];
                shared_gate_grad_[i] = grad_y.row(i).dot(shared_out_.row(i)) * sg * (Scalar(1) - sg);
            }
        });
        grad_shared_gate_.resize(d);
        if (t == 0) {
            grad_shared_gate_.setZero();
        } else {
            for_blocks(router_plans_[3], {1, d, t}, rules, [&](const detail::work_task& b) {
                kernels::multiply(kernels::strided<Scalar>{shared_gate_grad_.data(), 0, 1}, x.data() + b.column_begin,
                                  x.outerStride(), grad_shared_gate_.data() + b.column_begin, d, 1,
                                  b.column_end - b.column_begin, t, false);
            });
        }
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

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::backward_experts(const const_matrix_ref<Scalar>& x,
    const const_matrix_ref<Scalar>& grad_y) {
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
    if (exchange_) {
        helped_grad_.assign(experts_.size(), gradients_type{});  // the sums of the experts this rank helps with
        for (index ex = 0; ex < e; ++ex)
            if (exchange_->helps(ex)) {
                const weights_type& w = helped_[static_cast<std::size_t>(ex)];
                helped_grad_[static_cast<std::size_t>(ex)] = {matrix<Scalar>(w.in.rows(), w.in.cols()),
                                                              matrix<Scalar>(w.out.rows(), w.out.cols())};
            }
    }
    for (index ex = 0; ex < e; ++ex) {
        const index first = offsets[static_cast<std::size_t>(ex)];
        auto& b = blocks_[static_cast<std::size_t>(ex)];
        b.dout = dout_.data() + first * d;
        b.ldd = d;
        set_gradient_round(ex, 0);
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
    pass_.backward(expert_, shared_policy(), std::span<const block>(blocks_), *pool_, planned_threads());
    if (!exchange_) return;
    row_grad_.resize(routing_.rows(), d);
    exchange_->give_back(own_grad_, row_grad_);
    // Each helped expert's weight gradient, one sum over its block's rows in order: the rank of each
    // segment passes the sum on to the next, which continues it; the owner's segment is last.
    for (int round = 1; round <= exchange_->gradient_rounds(); ++round) {
        exchange_->pass_gradients(round, [&](index ex) -> gradients_type& { return gradient_of(ex); });
        for (index ex = 0; ex < e; ++ex) set_gradient_round(ex, round);
        blocks_.back().grad = nullptr;  // the shared FFN's are done
        pass_.weight_gradients(std::span<const block>(blocks_), *pool_, planned_threads());
    }
    helped_grad_.clear();  // passed on
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::set_gradient_round(index e, int round) {
    // Without expert parallelism every expert is one segment (position 0); an expert of which this
    // rank computes no rows has none here (-1).
    const int position = exchange_ ? exchange_->segment_position(e) : 0;
    auto& b = blocks_[static_cast<std::size_t>(e)];
    b.grad = position == round ? &gradient_of(e) : nullptr;
    b.grad_accumulate = round > 0;
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::combine_backward(matrix_ref<Scalar>& grad_x) {
    for_row_chunks(routing_.tokens, [&](index begin, index end) {
        for (index i = begin; i < end; ++i) {
            auto gi = grad_x.row(i);
            for (index s = routing_.first_slot(i); s < routing_.end_slot(i); ++s) {
                const index row = routing_.slot_rows[static_cast<std::size_t>(s)];
                if (row >= 0) gi += row_grad_.row(row);
            }
            if constexpr (Shared::enabled) gi += shared_grad_.row(i);
            if constexpr (Shared::gated) gi += shared_gate_grad_[i] * shared_gate_.transpose();
        }
    });
}

}  // namespace moe
