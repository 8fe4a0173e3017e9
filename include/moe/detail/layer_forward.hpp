#pragma once
// Internal: the definitions of `moe::layer`'s members for the forward path: logits, routing (expert-parallel
// with a batch-dependent router: of the whole batch), the expert
// pass (routed rows gathered, per-FFN blocks for detail/expert_pass.hpp; expert-parallel: rows to their
// owners and back), combine.
// Included by moe/layer.hpp, after the class.

#if !defined(MOE_LAYER_DEFINITIONS)
#error "moe/detail/layer_forward.hpp is part of moe/layer.hpp: include that instead"
#endif

namespace moe {

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::forward(const_matrix_ref<Scalar> x, matrix_ref<Scalar> y) {
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
    route_tokens();
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

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::compute_logits(const const_matrix_ref<Scalar>& x) {
    const index e = router_weight_.rows(), d = shape_.d_model;
    // A batch's logits in blocks of 8 experts. A decoding step's (fewer rows than a row block) go one
    // router row a task: the router's weights, read cold after the experts' streamed through the
    // caches, were one task of some microseconds (E = 8, d = 1024) while the other threads waited.
    detail::split_rules rules{.max_rows = 256, .row_unit = 16, .column_unit = 8};
    if (x.rows() < rules.row_unit) {
        rules.column_unit = 1;
        rules.min_cost = detail::task_cost(x.rows(), 1, d);
    }
    for_blocks(router_plans_[0], {x.rows(), e, d}, rules, [&](const detail::work_task& b) {
        kernels::linear(x.row(b.row_begin).data(), x.outerStride(), router_weight_.row(b.column_begin).data(), d,
                        logits_.row(b.row_begin).data() + b.column_begin, e, b.row_end - b.row_begin,
                        b.column_end - b.column_begin, d);
    });
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::route_tokens() {
    routed_batch_ = exchange_ && is_batch_dependent(router_);
    if (!routed_batch_) {
        moe::route(router_, logits_, router_state_, routing_);
        return;
    }
    exchange_->gather_tokens(logits_, batch_logits_);
    moe::route(router_, batch_logits_, router_state_, batch_routing_);
    batch_routing_.build_dispatch();  // the router's backward gets the routing as one process's would
    exchange_->take_own(batch_routing_, routing_);
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::compute_experts(const const_matrix_ref<Scalar>& x) {
    const index d = shape_.d_model;
    if (!exchange_) {
        expert_out_.resize(routing_.rows(), d);
        run_experts(x, routing_.expert_offsets, expert_out_);
        return;
    }
    exchange_->plan(routing_, training_);  // backward runs on the same plan
    if (exchange_->last_plan().rows_moved > 0) {  // the same on every rank
        helped_.resize(experts_.size());
        for (index e = 0; e < shape_.n_experts; ++e) {
            weights_type& w = helped_[static_cast<std::size_t>(e)];
            if (!exchange_->helps(e))
                w = {};
            else if (w.in.rows() == 0)
                zero(w, shape_.d_ff, ffn_in_rows<Expert>(shape_.d_ff));
        }
        exchange_->move_weights(experts_, helped_, [](typename storage_type::matrix& m) { return storage_type::raw(m); });
    } else {
        helped_.clear();
    }
    exchange_->send(d, [&](index row, Scalar* to) { row_map(to, d) = x.row(token_of(row)); }, received_x_);
    own_out_.resize(exchange_->own_offsets().back(), d);
    run_experts(x, exchange_->own_offsets(), own_out_);
    expert_out_.resize(routing_.rows(), d);
    exchange_->give_back(own_out_, expert_out_);
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::run_experts(const const_matrix_ref<Scalar>& x,
    const std::vector<index>& offsets, matrix<Scalar>& routed_out) {
    const index d = shape_.d_model, e = shape_.n_experts, t = x.rows(), rows = offsets.back();
    const index dx = lanes(d), fx = lanes(shape_.d_ff);  // a row of x, of act(h), as the projections take it
    routed_in_.resize(rows, dx);
    for_row_chunks(rows, [&](index begin, index end) {
        for (index r = begin; r < end; ++r) storage_type::convert(routed_input(x, r), routed_in_.row(r), d);
    });
    const index in_rows = ffn_in_rows<Expert>(shape_.d_ff);
    act_.resize(rows, fx);
    if (training_) hidden_.resize(rows, in_rows);
    blocks_.resize(static_cast<std::size_t>(e) + 1);
    for (index ex = 0; ex < e; ++ex) {
        const index first = offsets[static_cast<std::size_t>(ex)];
        auto& b = blocks_[static_cast<std::size_t>(ex)];
        b.weights = &weights_of(ex);
        b.rows = offsets[static_cast<std::size_t>(ex) + 1] - first;
        b.x = routed_in_.row(first);
        b.ldx = dx;
        b.hidden = training_ ? hidden_.data() + first * in_rows : nullptr;
        b.ldh = in_rows;
        b.act = act_.row(first);
        b.lda = fx;
        b.out = routed_out.data() + first * d;
        b.ldo = d;
    }
    auto& sb = blocks_.back();  // the shared FFN (no rows without one)
    sb = {};
    sb.shared = true;
    if constexpr (Shared::enabled) {
        const index ds = shape_.d_shared, shared_in_rows = shared_weights_.in.rows();
        if constexpr (takes_rows) {
            sb.x = x.data();
            sb.ldx = x.outerStride();
        } else {
            shared_in_.resize(t, dx);
            for_row_chunks(t, [&](index begin, index end) {
                for (index r = begin; r < end; ++r) storage_type::convert(x.row(r).data(), shared_in_.row(r), d);
            });
            sb.x = shared_in_.data();
            sb.ldx = dx;
        }
        shared_out_.resize(t, d);
        shared_act_.resize(t, lanes(ds));
        if (training_) shared_hidden_.resize(t, shared_in_rows);
        sb.weights = &shared_weights_;
        sb.rows = t;
        sb.hidden = training_ ? shared_hidden_.data() : nullptr;
        sb.ldh = shared_in_rows;
        sb.act = shared_act_.data();
        sb.lda = lanes(ds);
        sb.out = shared_out_.data();
        sb.ldo = d;
    }
    pass_.forward(expert_, shared_policy(), std::span<const block>(blocks_), *pool_, planned_threads());
}

template <std::floating_point Scalar, router<Scalar> Router, expert_ffn Expert, shared_expert Shared,
          loss_term<Scalar>... Losses>
void layer<Scalar, Router, Expert, Shared, Losses...>::combine(const const_matrix_ref<Scalar>& x,
    matrix_ref<Scalar>& y) {
    if constexpr (Shared::gated) shared_gate_values_.resize(x.rows());
    for_row_chunks(routing_.tokens, [&](index begin, index end) {
        for (index i = begin; i < end; ++i) {
            auto yi = y.row(i);
            yi.setZero();
            for (index s = routing_.first_slot(i); s < routing_.end_slot(i); ++s) {
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

}  // namespace moe
