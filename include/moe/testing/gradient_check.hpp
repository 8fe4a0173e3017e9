#pragma once
/// \file
/// A numerical gradient check: compares an analytic gradient with central finite differences, for
/// checking the backward of a router, expert or loss (the library's or a user's) in double precision.

#include "moe/types.hpp"
#include "moe/testing/conformance.hpp"

#include <cmath>

namespace moe::testing {

/// Checks `gradient` (same shape as `x`) against the central differences (f(x + h e_i) - f(x - h e_i)) / 2h
/// of the scalar function `f` at `x`, for every element i. An element fails when
/// |analytic - numeric| > tolerance * max(1, |analytic|, |numeric|). `x` is restored afterwards.
/// `f` must be smooth around `x`: for routers, hold the selection fixed or keep x away from ties.
template <class F>
report gradient_check(F&& f, matrix<double>& x, const matrix<double>& gradient, double step = 1e-6,
                      double tolerance = 1e-5) {
    report rep;
    if (gradient.rows() != x.rows() || gradient.cols() != x.cols()) {
        detail::fail(rep, "gradient is [", gradient.rows(), ", ", gradient.cols(), "], x is [", x.rows(), ", ", x.cols(), "]");
        return rep;
    }
    for (index i = 0; i < x.size(); ++i) {
        const double saved = x.data()[i];
        x.data()[i] = saved + step;
        const double up = f(static_cast<const matrix<double>&>(x));
        x.data()[i] = saved - step;
        const double down = f(static_cast<const matrix<double>&>(x));
        x.data()[i] = saved;
        const double numeric = (up - down) / (2 * step), analytic = gradient.data()[i];
        const double scale = std::max({1.0, std::abs(analytic), std::abs(numeric)});
        if (!(std::abs(analytic - numeric) <= tolerance * scale))
            detail::fail(rep, "element ", i, " (row ", i / x.cols(), ", column ", i % x.cols(), "): analytic ", analytic,
                         ", numeric ", numeric);
    }
    return rep;
}

}  // namespace moe::testing
