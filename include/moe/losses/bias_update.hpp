#pragma once
/// \file
/// U1, the auxiliary-loss-free bias update (docs/semantics.md, "Balancing losses"): not a loss term,
/// a step applied to a router's correction bias between training steps.

#include "moe/error.hpp"
#include "moe/routing.hpp"
#include "moe/types.hpp"

#include <string>
#include <vector>

namespace moe::losses {

/// U1, the auxiliary-loss-free bias update (DeepSeek-V3): after a training step,
/// `b_e += gamma * sign(mean_j c_j - c_e)`, with c_e the assignments to expert e accumulated over the
/// step (`observe` each forward call's routing, then `apply` once). It changes the selection of a
/// router with a correction bias (R2) and never its weights.
class bias_update {
public:
    explicit bias_update(double gamma = 1e-3) : gamma(gamma) {}

    double gamma;  ///< step of the bias per update

    /// Adds the assignments of one forward call (before capacity drops, as L1 counts them).
    template <class Scalar>
    void observe(const routing<Scalar>& r) {
        if (counts_.size() != static_cast<std::size_t>(r.experts)) counts_.assign(static_cast<std::size_t>(r.experts), 0);
        for (std::size_t e = 0; e < counts_.size(); ++e) counts_[e] += r.chosen_count(static_cast<index>(e));  // of the whole batch
    }

    /// Updates `bias` from the counts observed since the last call, then clears them. Throws
    /// `shape_error` when the bias does not have one entry per observed expert.
    template <class Scalar>
    void apply(vector<Scalar>& bias) {
        if (counts_.empty()) return;
        if (bias.size() != static_cast<index>(counts_.size()))
            throw shape_error("bias_update: the bias has " + std::to_string(bias.size()) + " entries, the routing " +
                              std::to_string(counts_.size()) + " experts");
        double mean = 0;
        for (const index c : counts_) mean += static_cast<double>(c);
        mean /= static_cast<double>(counts_.size());
        for (std::size_t e = 0; e < counts_.size(); ++e) {
            const double c = static_cast<double>(counts_[e]);
            const double sign = c < mean ? 1.0 : (c > mean ? -1.0 : 0.0);
            bias[static_cast<index>(e)] += static_cast<Scalar>(gamma * sign);
        }
        counts_.clear();
    }

    /// Counts observed since the last `apply`.
    [[nodiscard]] const std::vector<index>& counts() const { return counts_; }

private:
    std::vector<index> counts_;
};

}  // namespace moe::losses
