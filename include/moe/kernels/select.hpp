#pragma once
/// \file
/// Row kernels of the routers: softmax, sigmoid and a top-k selection whose ties go to the lower
/// index (docs/semantics.md, "Ties"), so routing is deterministic; and the backward of the combine weights.

#include "moe/types.hpp"

#include <cmath>
#include <cstdint>

namespace moe::kernels {

/// p = softmax(z) over n entries (max-subtracted, so large logits do not overflow).
template <class Scalar>
void softmax(const Scalar* z, Scalar* p, index n) {
    if (n == 0) return;
    Scalar m = z[0];
    for (index i = 1; i < n; ++i) m = z[i] > m ? z[i] : m;
    Scalar sum = 0;
    for (index i = 0; i < n; ++i) {
        p[i] = std::exp(z[i] - m);
        sum += p[i];
    }
    const Scalar inv = Scalar(1) / sum;
    for (index i = 0; i < n; ++i) p[i] *= inv;
}

/// s = sigmoid(z) over n entries.
template <class Scalar>
void sigmoid(const Scalar* z, Scalar* s, index n) {
    for (index i = 0; i < n; ++i) s[i] = Scalar(1) / (Scalar(1) + std::exp(-z[i]));
}

/// dz = p * (dp - <dp, p>) over n entries: the backward of `softmax` (p its output). `dz` may alias `dp`.
template <class Scalar>
void softmax_backward(const Scalar* p, const Scalar* dp, Scalar* dz, index n) {
    Scalar dot = 0;
    for (index i = 0; i < n; ++i) dot += dp[i] * p[i];
    for (index i = 0; i < n; ++i) dz[i] = p[i] * (dp[i] - dot);
}

/// dz = ds * s * (1 - s) over n entries: the backward of `sigmoid` (s its output). `dz` may alias `ds`.
template <class Scalar>
void sigmoid_backward(const Scalar* s, const Scalar* ds, Scalar* dz, index n) {
    for (index i = 0; i < n; ++i) dz[i] = ds[i] * s[i] * (Scalar(1) - s[i]);
}

/// Backward of the combine weights of one token whose n slots chose experts `ids` with weights
/// w_j = scale * score[ids_j] / S, S = eps + sum of the chosen scores when `normalize` (else S = 1).
/// Slots with an id outside [0, limit) (dropped, null) have no weight and are left out of S. Adds
/// dL/dscore to `dscore` (a dense row) given dL/dw in `dw`. When S is not positive the forward kept
/// the weights at 0 (nothing to normalise), so no gradient flows.
template <class Scalar>
void gate_backward(const Scalar* score, const std::int32_t* ids, const Scalar* dw, index n, index limit,
                   bool normalize, Scalar eps, Scalar scale, Scalar* dscore) {
    const auto valid = [&](index j) { return ids[j] >= 0 && ids[j] < limit; };
    if (!normalize) {
        for (index j = 0; j < n; ++j)
            if (valid(j)) dscore[ids[j]] += scale * dw[j];
        return;
    }
    Scalar sum = eps, dot = 0;
    for (index j = 0; j < n; ++j)
        if (valid(j)) {
            sum += score[ids[j]];
            dot += dw[j] * score[ids[j]];
        }
    if (!(sum > 0)) return;
    const Scalar inv = Scalar(1) / sum;
    for (index j = 0; j < n; ++j)
        if (valid(j)) dscore[ids[j]] += scale * inv * (dw[j] - dot * inv);
}

/// Writes into `ids` the k largest entries of `score` among those with `eligible(i)`, in
/// descending order; equal scores keep the lower index first. Returns the number found (< k only
/// when fewer than k entries are eligible). O(n*k), fine for the k and n of routers.
template <class Scalar, class Eligible>
index top_k(const Scalar* score, index n, index k, std::int32_t* ids, Eligible&& eligible) {
    index found = 0;
    for (index i = 0; i < n; ++i) {
        if (!eligible(i)) continue;
        const Scalar v = score[i];
        // Strictly greater moves ahead, so among equals the earlier (lower) index stays first.
        index pos = found;
        while (pos > 0 && v > score[ids[pos - 1]]) --pos;
        if (pos >= k) continue;
        const index last = found < k ? found : k - 1;
        for (index j = last; j > pos; --j) ids[j] = ids[j - 1];
        ids[pos] = static_cast<std::int32_t>(i);
        if (found < k) ++found;
    }
    return found;
}

/// top_k over all n entries.
template <class Scalar>
index top_k(const Scalar* score, index n, index k, std::int32_t* ids) {
    return top_k(score, n, k, ids, [](index) { return true; });
}

}  // namespace moe::kernels
