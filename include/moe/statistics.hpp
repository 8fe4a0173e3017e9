#pragma once
/// \file
/// Routing statistics of one forward call (docs/semantics.md, "Routing statistics").

#include "moe/parallel/communicator.hpp"
#include "moe/routing.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace moe {

struct routing_statistics {
    index tokens = 0;
    index experts = 0;
    std::vector<index> load;               ///< c_e: assignments per expert (after drops)
    index assignments = 0;                 ///< sum of the load
    index dropped = 0;                     ///< slots dropped by capacity
    index null_slots = 0;                  ///< slots that chose a null expert
    std::vector<index> experts_per_token;  ///< histogram: [n] = tokens that ran n experts
    double imbalance = 0;                  ///< max_e c_e / mean_e c_e (0 without assignments)
    double max_vio = 0;                    ///< (max_e c_e - mean c) / mean c (0 without assignments)
    double mean_entropy = 0;               ///< mean over tokens of the entropy (nats) of the row-normalised scores
    double null_fraction = 0;              ///< null slots / all slots
    index idle_experts = 0;                ///< experts with no assignment
    std::optional<index> sinkhorn_iterations;        ///< Sinkhorn routers: iterations run
    std::optional<double> sinkhorn_marginal_error;   ///< Sinkhorn routers: the plan's largest marginal deviation

    /// The statistics as one JSON object.
    [[nodiscard]] std::string to_json() const {
        std::ostringstream o;
        o.precision(9);
        const auto list = [&](const std::vector<index>& v) {
            o << '[';
            for (std::size_t i = 0; i < v.size(); ++i) o << (i ? "," : "") << v[i];
            o << ']';
        };
        o << "{\"tokens\":" << tokens << ",\"experts\":" << experts << ",\"load\":";
        list(load);
        o << ",\"assignments\":" << assignments << ",\"dropped\":" << dropped << ",\"null_slots\":" << null_slots
          << ",\"experts_per_token\":";
        list(experts_per_token);
        o << ",\"imbalance\":" << imbalance << ",\"max_vio\":" << max_vio << ",\"mean_entropy\":" << mean_entropy
          << ",\"null_fraction\":" << null_fraction << ",\"idle_experts\":" << idle_experts;
        if (sinkhorn_iterations) o << ",\"sinkhorn_iterations\":" << *sinkhorn_iterations;
        if (sinkhorn_marginal_error) o << ",\"sinkhorn_marginal_error\":" << *sinkhorn_marginal_error;
        o << '}';
        return o.str();
    }
};

namespace detail {
// The ratios of `s` from its counts and the entropy summed over its tokens.
inline void derive_ratios(routing_statistics& s, double entropy_sum) {
    s.assignments = 0;
    s.idle_experts = 0;
    for (auto c : s.load) {
        s.assignments += c;
        s.idle_experts += c == 0;
    }
    s.imbalance = s.max_vio = 0;
    if (s.assignments > 0) {
        const double mean = static_cast<double>(s.assignments) / static_cast<double>(s.experts);
        const double max = static_cast<double>(*std::max_element(s.load.begin(), s.load.end()));
        s.imbalance = max / mean;
        s.max_vio = (max - mean) / mean;
    }
    const index slots = s.assignments + s.dropped + s.null_slots;
    s.null_fraction = slots > 0 ? static_cast<double>(s.null_slots) / static_cast<double>(slots) : 0.0;
    s.mean_entropy = s.tokens > 0 ? entropy_sum / static_cast<double>(s.tokens) : 0.0;
}
}  // namespace detail

/// Computes the statistics of a routing whose expert side is built.
template <class Scalar>
routing_statistics compute_statistics(const routing<Scalar>& r) {
    routing_statistics s;
    s.tokens = r.tokens;
    s.experts = r.experts;
    s.load.assign(static_cast<std::size_t>(r.experts), 0);
    index most = 0;
    for (index t = 0; t < r.tokens; ++t) most = std::max(most, r.slot_count(t));
    s.experts_per_token.assign(static_cast<std::size_t>(most) + 1, 0);
    for (index t = 0; t < r.tokens; ++t) {
        index ran = 0;
        for (index slot = r.first_slot(t); slot < r.end_slot(t); ++slot) {
            const auto id = r.expert_ids[static_cast<std::size_t>(slot)];
            if (id == dropped_slot) {
                ++s.dropped;
            } else if (id >= r.experts) {
                ++s.null_slots;
            } else {
                ++s.load[static_cast<std::size_t>(id)];
                ++ran;
            }
        }
        ++s.experts_per_token[static_cast<std::size_t>(ran)];
    }
    double entropy = 0;
    for (index t = 0; t < r.scores.rows(); ++t) {
        double sum = 0, h = 0;
        for (index e = 0; e < r.scores.cols(); ++e) sum += static_cast<double>(r.scores(t, e));
        for (index e = 0; e < r.scores.cols(); ++e) {
            const double q = static_cast<double>(r.scores(t, e)) / sum;
            if (q > 0) h -= q * std::log(q);
        }
        entropy += h;
    }
    detail::derive_ratios(s, entropy);
    return s;
}

/// The statistics of a batch held in parts (expert parallelism: each rank's routing of its own tokens)
/// from this rank's part: counts are summed over the ranks and the ratios derived again. Collective.
/// Router-specific fields (Sinkhorn's) are left as they are: the layer adds them from its router's
/// state, which is of the whole batch when a batch-dependent router routed it.
inline routing_statistics combine_statistics(routing_statistics s, parallel::communicator& comm) {
    // The histogram runs to the largest slot count of a token in any part: agree on its length first.
    const auto ranks = static_cast<std::size_t>(comm.size());
    std::vector<index> lengths(ranks, 0);
    lengths[static_cast<std::size_t>(comm.rank())] = static_cast<index>(s.experts_per_token.size());
    comm.all_sum(std::span<index>(lengths));
    const std::size_t width = static_cast<std::size_t>(*std::max_element(lengths.begin(), lengths.end()));
    s.experts_per_token.resize(width, 0);
    std::vector<index> counts{s.tokens, s.dropped, s.null_slots};
    counts.insert(counts.end(), s.load.begin(), s.load.end());
    counts.insert(counts.end(), s.experts_per_token.begin(), s.experts_per_token.end());
    comm.all_sum(std::span<index>(counts));
    double entropy = s.mean_entropy * static_cast<double>(s.tokens);
    comm.all_sum(std::span<double>(&entropy, 1));
    s.tokens = counts[0];
    s.dropped = counts[1];
    s.null_slots = counts[2];
    const auto load = counts.begin() + 3;
    std::copy(load, load + static_cast<std::ptrdiff_t>(s.load.size()), s.load.begin());
    std::copy(load + static_cast<std::ptrdiff_t>(s.load.size()), counts.end(), s.experts_per_token.begin());
    detail::derive_ratios(s, entropy);
    return s;
}

}  // namespace moe
