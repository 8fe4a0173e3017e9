#pragma once
/// \file
/// Row kernels of the routers: softmax, sigmoid and a top-k selection whose ties go to the lower
/// index (SEMANTICS, "Ties"), so routing is deterministic.

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
