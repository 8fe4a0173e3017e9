#pragma once
/// \file
/// The backward pass shared by the routers whose combine weights are scores (softmax or sigmoid) of the
/// chosen experts, optionally normalised and scaled (R1, R2, R4, R5, R6 with softmax gates, R7).

#include "moe/kernels/select.hpp"
#include "moe/routing.hpp"

#include <span>

namespace moe::routers {

/// dL/dz of the logits into `grad_logits` (T x E', the shape of `r.scores`), given dL/dw per slot in
/// `grad_weights`, for weights w = scale * s[chosen] / (eps + sum of the chosen s) (`normalize`) or
/// scale * s[chosen], with s = softmax(z) or sigmoid(z) (as `r.score` says) stored in `r.scores`.
/// Slots that ran no routed expert (dropped, null) carry no weight. The selection is held constant
/// (docs/semantics.md, "Backward"). Each token's weights-to-scores step is `kernels::gate_backward`.
template <class Scalar>
void logits_backward(const routing<Scalar>& r, std::span<const Scalar> grad_weights, bool normalize, Scalar eps,
                     Scalar scale, matrix<Scalar>& grad_logits) {
    const index cols = r.scores.cols();
    grad_logits.setZero();
    for (index t = 0; t < r.tokens; ++t) {
        Scalar* g = grad_logits.row(t).data();
        const index b = r.first_slot(t);
        kernels::gate_backward(r.scores.row(t).data(), r.expert_ids.data() + b, grad_weights.data() + b, r.end_slot(t) - b,
                               r.experts, normalize, eps, scale, g);
        if (r.score == score_function::sigmoid)
            kernels::sigmoid_backward(r.scores.row(t).data(), g, g, cols);
        else
            kernels::softmax_backward(r.scores.row(t).data(), g, g, cols);
    }
}

}  // namespace moe::routers
