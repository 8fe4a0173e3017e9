#pragma once
/// \file
/// `expert_exchange`: moves a rank's routed rows to the ranks that own their experts and the results
/// back, over a `communicator`: per forward one all-to-all of the row counts per expert, then one of
/// the rows each way (backward: one each way, with the forward's counts).
///
/// Rows leave a rank ordered by (owner, expert, token). An owner lays the rows it receives for one
/// expert end to end in rank order; with the tokens spread over the ranks in contiguous slices in rank
/// order (`token_slice`), that is the expert's one-process row block, so the expert computes the same
/// rows in the same pieces and its results are bitwise those of one process.
///
/// A batch-dependent router (capacity, expert choice, Sinkhorn) routes the whole batch on every rank:
/// `gather_tokens` shares the router logits (T x E, small next to the rows), every rank routes them the
/// same way, and `take_own` keeps its own tokens' slots; backward shares dL/dw per slot (`gather_slots`).

#include "moe/parallel/communicator.hpp"
#include "moe/routing.hpp"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <numeric>
#include <string>

namespace moe::parallel {

/// Per-rank load of the last exchange (`expert_exchange::load`), the same on every rank.
struct load_statistics {
    std::vector<index> rows;            ///< routed rows each rank's experts computed
    double imbalance = 0;               ///< max over ranks of rows / mean over ranks (1: even; 0 without rows)
    std::vector<index> bytes_sent;      ///< bytes of rows each rank sent to other ranks since the last forward
                                        ///< began (rows out, results back; the backward's too when it ran)
    std::vector<index> bytes_received;  ///< bytes of rows each rank received from other ranks in that time

    /// {"ranks": P, "rows": [...], "imbalance": x, "bytes_sent": [...], "bytes_received": [...]}
    [[nodiscard]] std::string to_json() const {
        const auto list = [](const std::vector<index>& v) {
            std::string s = "[";
            for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
            return s + "]";
        };
        char imb[32];
        std::snprintf(imb, sizeof imb, "%.6g", imbalance);
        return "{\"ranks\": " + std::to_string(rows.size()) + ", \"rows\": " + list(rows) + ", \"imbalance\": " + imb +
               ", \"bytes_sent\": " + list(bytes_sent) + ", \"bytes_received\": " + list(bytes_received) + "}";
    }
};

template <class Scalar>
class expert_exchange {
public:
    /// Throws `value_error` when the communicator is null or `p` names ranks outside it.
    expert_exchange(const placement& p, index experts)
        : comm_(p.comm), owners_(p.owners_of(experts)), experts_(experts) {
        if (!comm_) throw value_error("expert_exchange: the placement has no communicator");
        const int ranks = comm_->size();
        // Experts in send order: by owner, then by id.
        order_.resize(static_cast<std::size_t>(experts));
        std::iota(order_.begin(), order_.end(), index{0});
        std::stable_sort(order_.begin(), order_.end(), [&](index a, index b) { return owner(a) < owner(b); });
        owned_by_.assign(static_cast<std::size_t>(ranks), 0);
        for (const int o : owners_) ++owned_by_[static_cast<std::size_t>(o)];
        for (index e = 0; e < experts; ++e)
            if (owns(e)) mine_.push_back(e);
    }

    [[nodiscard]] const communicator& comm() const { return *comm_; }
    [[nodiscard]] communicator& comm() { return *comm_; }
    [[nodiscard]] int owner(index e) const { return owners_[static_cast<std::size_t>(e)]; }
    [[nodiscard]] bool owns(index e) const { return owner(e) == comm_->rank(); }

    /// Runs `f` on every rank; when it throws on any rank, it throws on every rank (the rank's own
    /// exception, else `error`), so that no rank is left waiting in a later collective. Collective.
    template <class F>
    void agree(F&& f) {
        std::exception_ptr failed;
        try {
            f();
        } catch (...) {
            failed = std::current_exception();
        }
        index failures = failed ? 1 : 0;
        comm_->all_sum(std::span<index>(&failures, 1));
        if (failed) std::rethrow_exception(failed);
        if (failures > 0)
            throw error("expert parallelism: " + std::to_string(failures) + " other rank(s) failed in the same call");
    }

    /// Sets `r.batch` to the totals of every rank's routing (`width` expert ids, null experts
    /// included). Collective.
    void share_totals(routing<Scalar>& r, index width) {
        totals_.resize(static_cast<std::size_t>(width) + 2);
        for (index id = 0; id < width; ++id) totals_[static_cast<std::size_t>(id)] = r.chosen_count(id, false);
        totals_[static_cast<std::size_t>(width)] = r.tokens;
        totals_[static_cast<std::size_t>(width) + 1] = r.slots();
        comm_->all_sum(std::span<index>(totals_));
        r.batch.tokens = totals_[static_cast<std::size_t>(width)];
        r.batch.slots = totals_[static_cast<std::size_t>(width) + 1];
        r.batch.chosen.assign(totals_.begin(), totals_.begin() + width);
    }

    /// A batch-dependent router routes the whole batch: every rank's rows of `mine` (router logits; the
    /// same columns on every rank) end to end in rank order into `batch`. Notes which rows are this
    /// rank's (`own_tokens`). Collective.
    void gather_tokens(const matrix<Scalar>& mine, matrix<Scalar>& batch) {
        const auto p = static_cast<std::size_t>(comm_->size()), me = static_cast<std::size_t>(comm_->rank());
        first_tokens_.assign(p + 1, 0);
        first_tokens_[me + 1] = mine.rows();
        comm_->all_sum(std::span<index>(first_tokens_));  // every rank's token count, then their sums
        std::partial_sum(first_tokens_.begin(), first_tokens_.end(), first_tokens_.begin());
        values_in_.resize(p);
        for (std::size_t q = 0; q < p; ++q) values_in_[q] = (first_tokens_[q + 1] - first_tokens_[q]) * mine.cols();
        batch.resize(first_tokens_.back(), mine.cols());
        comm_->all_gather(std::span<const Scalar>(mine.data(), static_cast<std::size_t>(mine.size())), values_in_,
                          std::span<Scalar>(batch.data(), static_cast<std::size_t>(batch.size())));
    }

    /// This rank's tokens of the last `gather_tokens`, as rows of the whole batch.
    [[nodiscard]] slice own_tokens() const {
        const auto me = static_cast<std::size_t>(comm_->rank());
        return {first_tokens_[me], first_tokens_[me + 1] - first_tokens_[me]};
    }

    /// The token side of this rank's tokens (`own_tokens`) in `batch`, a routing of the whole batch:
    /// what the router would have produced for them alone had it decided with every rank's tokens.
    void take_own(const routing<Scalar>& batch, routing<Scalar>& own) const {
        const slice mine = own_tokens();
        // The same on every rank (every rank routed the same logits), so no rank throws alone.
        if (batch.tokens != first_tokens_.back())
            throw value_error("expert parallelism: the router returned a routing of " + std::to_string(batch.tokens) +
                              " tokens for the batch's " + std::to_string(first_tokens_.back()));
        const auto first = static_cast<std::size_t>(mine.first), n = static_cast<std::size_t>(mine.rows);
        const index s0 = batch.token_offsets[first], s1 = batch.token_offsets[first + n];
        own.begin_tokens(batch.experts);
        own.tokens = mine.rows;
        own.score = batch.score;
        own.scores = batch.scores.middleRows(mine.first, mine.rows);
        own.token_offsets.resize(n + 1);
        for (std::size_t t = 0; t <= n; ++t) own.token_offsets[t] = batch.token_offsets[first + t] - s0;
        own.expert_ids.assign(batch.expert_ids.begin() + s0, batch.expert_ids.begin() + s1);
        own.weights.assign(batch.weights.begin() + s0, batch.weights.begin() + s1);
        if (!batch.undropped_ids.empty())
            own.undropped_ids.assign(batch.undropped_ids.begin() + s0, batch.undropped_ids.begin() + s1);
    }

    /// Every rank's values per slot of its tokens (`mine`, in the slot order `take_own` gave) end to end
    /// into `all`, one value per slot of `batch` (the routing `take_own` took from). Throws `error` on
    /// every rank when the ranks' routings of the batch differ (a router that did not route the same
    /// logits the same way everywhere). Collective.
    void gather_slots(std::span<const Scalar> mine, const routing<Scalar>& batch, std::vector<Scalar>& all) {
        const auto p = static_cast<std::size_t>(comm_->size()), me = static_cast<std::size_t>(comm_->rank());
        values_in_.assign(p, 0);
        values_in_[me] = static_cast<index>(mine.size());
        comm_->all_sum(std::span<index>(values_in_));
        agree([&] {  // every rank's slots where this rank's routing of the batch puts them
            for (std::size_t q = 0; q < p; ++q)
                if (values_in_[q] != batch.token_offsets[static_cast<std::size_t>(first_tokens_[q + 1])] -
                                         batch.token_offsets[static_cast<std::size_t>(first_tokens_[q])])
                    throw error("expert parallelism: the ranks' routings of the whole batch differ (a batch-dependent "
                                "router must route the same logits the same way on every rank)");
        });
        all.resize(static_cast<std::size_t>(batch.slots()));
        comm_->all_gather(mine, values_in_, std::span<Scalar>(all));
    }

    /// Plans the exchange of `r`'s routed rows (after `build_dispatch`) and exchanges the row counts
    /// per expert. Collective.
    void plan(const routing<Scalar>& r) {
        const int ranks = comm_->size();
        const auto nr = static_cast<std::size_t>(ranks);
        sent_bytes_ = received_bytes_ = 0;
        send_rows_.assign(nr, 0);
        send_order_.clear();
        expert_rows_.clear();
        for (const index e : order_) {
            const index first = r.expert_offsets[static_cast<std::size_t>(e)];
            const index n = r.expert_offsets[static_cast<std::size_t>(e) + 1] - first;
            expert_rows_.push_back(n);
            send_rows_[static_cast<std::size_t>(owner(e))] += n;
            for (index row = first; row < first + n; ++row) send_order_.push_back(row);
        }
        // Rows per expert to each owner: owner q receives one count per expert it owns.
        const auto mine = static_cast<index>(mine_.size());
        recv_expert_rows_.resize(nr * mine_.size());
        counts_out_.assign(owned_by_.begin(), owned_by_.end());
        counts_in_.assign(nr, mine);
        comm_->all_to_all(std::span<const index>(expert_rows_), counts_out_, std::span<index>(recv_expert_rows_), counts_in_);

        // Own blocks: expert mine_[j] gets the rows of every rank in rank order.
        recv_rows_.assign(nr, 0);
        own_offsets_.assign(static_cast<std::size_t>(experts_) + 1, 0);
        own_rows_.assign(mine_.size(), 0);
        for (std::size_t src = 0; src < nr; ++src)
            for (std::size_t j = 0; j < mine_.size(); ++j) {
                const index n = recv_expert_rows_[src * mine_.size() + j];
                own_rows_[j] += n;
                recv_rows_[src] += n;
            }
        for (index e = 0, j = 0; e < experts_; ++e) {
            const index n = owns(e) ? own_rows_[static_cast<std::size_t>(j++)] : 0;
            own_offsets_[static_cast<std::size_t>(e) + 1] = own_offsets_[static_cast<std::size_t>(e)] + n;
        }
        // Own row -> position in the receive buffer (blocks of rank 0, then rank 1, ...).
        received_at_.resize(static_cast<std::size_t>(own_offsets_.back()));
        next_own_row_.resize(mine_.size());
        for (std::size_t j = 0; j < mine_.size(); ++j) next_own_row_[j] = own_offsets_[static_cast<std::size_t>(mine_[j])];
        for (index src = 0, at = 0; src < ranks; ++src)
            for (std::size_t j = 0; j < mine_.size(); ++j)
                for (index n = recv_expert_rows_[static_cast<std::size_t>(src) * mine_.size() + j]; n > 0; --n)
                    received_at_[static_cast<std::size_t>(next_own_row_[j]++)] = at++;
    }

    /// Rows per expert this rank computes, as one-process expert offsets (E + 1 entries; the blocks of
    /// experts owned elsewhere are empty). Valid after `plan`.
    [[nodiscard]] const std::vector<index>& own_offsets() const { return own_offsets_; }
    /// Row of the receive buffer (`send`) that holds own row `row`.
    [[nodiscard]] index received_row(index row) const { return received_at_[static_cast<std::size_t>(row)]; }

    /// Sends `width` values for every routed row of the planned routing to the row's owner:
    /// `fill(routing row, destination)` writes them. `received` becomes the rows this rank receives
    /// (see `received_row`). Collective.
    template <class Fill>
    void send(index width, Fill&& fill, matrix<Scalar>& received) {
        buffer_.resize(static_cast<index>(send_order_.size()), width);
        for (std::size_t i = 0; i < send_order_.size(); ++i) fill(send_order_[i], buffer_.row(static_cast<index>(i)).data());
        received.resize(own_offsets_.back(), width);
        exchange(buffer_, send_rows_, received, recv_rows_, width);
        count_bytes(send_rows_, recv_rows_, width);
    }

    /// Returns the results of the own rows (`own`, rows in `own_offsets` order) to the ranks that sent
    /// them; writes each rank's rows into `out` at their routing row. Collective.
    void give_back(const matrix<Scalar>& own, matrix<Scalar>& out) {
        const index width = own.cols();
        back_.resize(own.rows(), width);
        for (index row = 0; row < own.rows(); ++row) back_.row(received_row(row)) = own.row(row);
        buffer_.resize(static_cast<index>(send_order_.size()), width);
        exchange(back_, recv_rows_, buffer_, send_rows_, width);
        for (std::size_t i = 0; i < send_order_.size(); ++i) out.row(send_order_[i]) = buffer_.row(static_cast<index>(i));
        count_bytes(recv_rows_, send_rows_, width);
    }

    /// Rows each rank computed in the last `plan`, their imbalance, and every rank's bytes of rows
    /// exchanged since that plan. Collective.
    [[nodiscard]] load_statistics load() {
        load_statistics s;
        const auto p = static_cast<std::size_t>(comm_->size()), me = static_cast<std::size_t>(comm_->rank());
        std::vector<index> all(3 * p, 0);  // rows, bytes sent, bytes received per rank
        all[me] = own_offsets_.empty() ? 0 : own_offsets_.back();
        all[p + me] = sent_bytes_;
        all[2 * p + me] = received_bytes_;
        comm_->all_sum(std::span<index>(all));
        s.rows.assign(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(p));
        s.bytes_sent.assign(all.begin() + static_cast<std::ptrdiff_t>(p), all.begin() + static_cast<std::ptrdiff_t>(2 * p));
        s.bytes_received.assign(all.begin() + static_cast<std::ptrdiff_t>(2 * p), all.end());
        const index total = std::accumulate(s.rows.begin(), s.rows.end(), index{0});
        if (total > 0)
            s.imbalance = static_cast<double>(*std::max_element(s.rows.begin(), s.rows.end())) * static_cast<double>(s.rows.size()) /
                          static_cast<double>(total);
        return s;
    }

private:
    // Bytes of the rows that crossed to or from other ranks (a rank's rows to itself stay in memory).
    void count_bytes(const std::vector<index>& out_rows, const std::vector<index>& in_rows, index width) {
        const auto me = static_cast<std::size_t>(comm_->rank());
        const auto bytes = [&](const std::vector<index>& rows) {
            return (std::accumulate(rows.begin(), rows.end(), index{0}) - rows[me]) * width * static_cast<index>(sizeof(Scalar));
        };
        sent_bytes_ += bytes(out_rows);
        received_bytes_ += bytes(in_rows);
    }

    // The rows of `from` go in consecutive blocks of from_rows[p] rows to rank p; `to` receives to_rows[p]
    // rows from rank p.
    void exchange(const matrix<Scalar>& from, const std::vector<index>& from_rows, matrix<Scalar>& to,
                  const std::vector<index>& to_rows, index width) {
        values_out_.resize(from_rows.size());
        values_in_.resize(to_rows.size());
        for (std::size_t p = 0; p < from_rows.size(); ++p) values_out_[p] = from_rows[p] * width;
        for (std::size_t p = 0; p < to_rows.size(); ++p) values_in_[p] = to_rows[p] * width;
        comm_->all_to_all(std::span<const Scalar>(from.data(), static_cast<std::size_t>(from.size())), values_out_,
                          std::span<Scalar>(to.data(), static_cast<std::size_t>(to.size())), values_in_);
    }

    std::shared_ptr<communicator> comm_;
    std::vector<int> owners_;
    index experts_;
    std::vector<index> order_;     // experts in send order (owner, id)
    std::vector<index> owned_by_;  // experts per rank
    std::vector<index> mine_;      // the experts this rank owns, ascending

    // Plan of the last routing.
    std::vector<index> send_order_;        // send position -> routing row
    std::vector<index> send_rows_;         // rows to each rank
    std::vector<index> recv_rows_;         // rows from each rank
    std::vector<index> expert_rows_;       // rows per expert in send order
    std::vector<index> recv_expert_rows_;  // [source rank][own expert] rows
    std::vector<index> own_offsets_;
    std::vector<index> received_at_;
    std::vector<index> own_rows_;      // rows per own expert (scratch of plan)
    std::vector<index> next_own_row_;  // next own row of each own expert (scratch of plan)
    std::vector<index> counts_out_, counts_in_, values_out_, values_in_, totals_;
    std::vector<index> first_tokens_;  // where each rank's tokens begin in the batch, and its end (gather_tokens)

    matrix<Scalar> buffer_, back_;
    index sent_bytes_ = 0, received_bytes_ = 0;
};

}  // namespace moe::parallel
