#pragma once
/// \file
/// Expert parallelism without a transport of its own: `communicator`, the few collective operations a
/// layer needs to spread its routed experts over processes ("ranks"), and `placement`, which rank owns
/// which expert. `moe/parallel/mpi.hpp` implements the communicator over MPI; this header needs no MPI.

#include "moe/error.hpp"
#include "moe/parallel/rebalance.hpp"
#include "moe/types.hpp"

#include <memory>
#include <span>
#include <string>
#include <vector>

namespace moe::parallel {

/// Collective operations over a fixed group of ranks. Every rank must make the same calls in the same
/// order (as with MPI collectives); the counts of an all-to-all must agree between sender and receiver.
class communicator {
public:
    virtual ~communicator() = default;
    [[nodiscard]] virtual int rank() const = 0;
    [[nodiscard]] virtual int size() const = 0;

    /// Sends `send_counts[p]` consecutive values of `send` to every rank p (in rank order) and receives
    /// `recv_counts[p]` values from every rank p into consecutive blocks of `recv`.
    virtual void all_to_all(std::span<const float> send, std::span<const index> send_counts, std::span<float> recv,
                            std::span<const index> recv_counts) = 0;
    virtual void all_to_all(std::span<const double> send, std::span<const index> send_counts, std::span<double> recv,
                            std::span<const index> recv_counts) = 0;
    virtual void all_to_all(std::span<const index> send, std::span<const index> send_counts, std::span<index> recv,
                            std::span<const index> recv_counts) = 0;

    /// Element-wise sum over all ranks, in place, the same on every rank.
    virtual void all_sum(std::span<float> values) = 0;
    virtual void all_sum(std::span<double> values) = 0;
    virtual void all_sum(std::span<index> values) = 0;

    /// Every rank's `mine` (`counts[p]` values from rank p) end to end in rank order in `all`, the same
    /// on every rank. The default sends `mine` to every rank with `all_to_all`; a transport with a
    /// gather of its own (MPI_Allgatherv) overrides it.
    virtual void all_gather(std::span<const float> mine, std::span<const index> counts, std::span<float> all) {
        gather_by_all_to_all(mine, counts, all);
    }
    virtual void all_gather(std::span<const double> mine, std::span<const index> counts, std::span<double> all) {
        gather_by_all_to_all(mine, counts, all);
    }

private:
    template <class T>
    void gather_by_all_to_all(std::span<const T> mine, std::span<const index> counts, std::span<T> all) {
        const auto ranks = static_cast<std::size_t>(size());
        if (counts.size() != ranks)
            throw value_error("communicator: all_gather needs one count per rank (" + std::to_string(ranks) + ")");
        std::vector<T> copies;
        copies.reserve(ranks * mine.size());
        for (std::size_t p = 0; p < ranks; ++p) copies.insert(copies.end(), mine.begin(), mine.end());
        const std::vector<index> sent(ranks, static_cast<index>(mine.size()));
        all_to_all(std::span<const T>(copies), sent, all, counts);
    }
};

/// Which rank holds each routed expert: `owners[e]` for expert e. A layer given a placement with a
/// communicator holds (and allocates) only the weights of the experts its rank owns; with `rebalance`
/// on, a forward (and its backward) may have other ranks compute some of an overloaded rank's rows,
/// with a copy of the expert's weights for that call (`rebalance.hpp`).
struct placement {
    std::shared_ptr<communicator> comm = nullptr;  ///< null: one process, every expert local
    std::vector<int> owners = {};                 ///< per routed expert; empty: `blocks` of the experts
    rebalancing rebalance = {};                   ///< off: every expert's rows are computed by its owner

    /// Rank r owns experts [E r / P, E (r + 1) / P): nearly equal contiguous blocks, in rank order.
    [[nodiscard]] static std::vector<int> blocks(index experts, int ranks) {
        std::vector<int> owners(static_cast<std::size_t>(experts > 0 ? experts : 0));
        for (int r = 0; r < ranks; ++r)
            for (index e = experts * r / ranks; e < experts * (r + 1) / ranks; ++e) owners[static_cast<std::size_t>(e)] = r;
        return owners;
    }

    /// The owner of every expert of a layer with `experts` routed experts: `owners`, or `blocks`.
    /// Throws `value_error` when `owners` has another length or names a rank outside the communicator.
    [[nodiscard]] std::vector<int> owners_of(index experts) const {
        const int ranks = comm ? comm->size() : 1;
        if (owners.empty()) return blocks(experts, ranks);
        if (static_cast<index>(owners.size()) != experts)
            throw value_error("placement: " + std::to_string(owners.size()) + " owners given for " +
                              std::to_string(experts) + " experts");
        for (std::size_t e = 0; e < owners.size(); ++e)
            if (owners[e] < 0 || owners[e] >= ranks)
                throw value_error("placement: expert " + std::to_string(e) + " is owned by rank " +
                                  std::to_string(owners[e]) + ", outside [0, " + std::to_string(ranks) + ")");
        return owners;
    }
};

/// Token rows [T r / P, T (r + 1) / P) of a batch of T tokens fall to rank r of P: how `moe-run
/// --expert-parallel` spreads a batch (contiguous slices, so a token-choice router's results are the
/// one-process results bit for bit).
struct slice {
    index first = 0;
    index rows = 0;
};
[[nodiscard]] inline slice token_slice(index tokens, int rank, int ranks) {
    const index first = tokens * rank / ranks;
    return {first, tokens * (rank + 1) / ranks - first};
}

}  // namespace moe::parallel
