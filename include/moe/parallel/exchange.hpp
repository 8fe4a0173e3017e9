#pragma once
/// \file
/// `expert_exchange`: moves a rank's routed rows to the ranks that compute their experts and the
/// results back, over a `communicator`: per forward one sum of every rank's row counts per expert,
/// then one all-to-all of the rows each way (backward: one each way, with the forward's plan), and
/// one of the weights of the experts that helpers compute rows of when the plan re-balances; a
/// re-balanced backward then hands each expert's weight-gradient sum along its segments
/// (`pass_gradients`), one all-to-all per round.
///
/// Every rank makes the same plan from the counts: each expert's rows go to its owner, or, re-balanced
/// (`rebalance.hpp`), the first rows of an overloaded rank's expert to helpers, which receive the
/// expert's weights from the owner (`move_weights`). Rows leave a rank ordered by (destination, expert,
/// token). A rank lays the rows it receives for one expert end to end in rank order; with the tokens
/// spread over the ranks in contiguous slices in rank order (`token_slice`), that is (a segment of) the
/// expert's one-process row block, and a row's output does not depend on the rows computed beside it,
/// so the results are bitwise those of one process.
///
/// A batch-dependent router (capacity, expert choice, Sinkhorn) routes the whole batch on every rank:
/// `gather_tokens` shares the router logits (T x E, small next to the rows), every rank routes them the
/// same way, and `take_own` keeps its own tokens' slots; backward shares dL/dw per slot (`gather_slots`).

#include "moe/parallel/communicator.hpp"
#include "moe/parallel/rebalance.hpp"
#include "moe/routing.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>
#include <numeric>
#include <string>
#include <utility>

namespace moe::parallel {

/// Per-rank load of the last exchange (`expert_exchange::load`), the same on every rank.
struct load_statistics {
    std::vector<index> rows;            ///< routed rows each rank computed (its experts' and those it helped with)
    double imbalance = 0;               ///< max over ranks of rows / mean over ranks (1: even; 0 without rows)
    std::vector<index> bytes_sent;      ///< bytes of rows each rank sent to other ranks since the last forward
                                        ///< began (rows out, results back; the backward's too when it ran)
    std::vector<index> bytes_received;  ///< bytes of rows each rank received from other ranks in that time
    double imbalance_before = 0;        ///< `imbalance` had every expert's owner computed all of its rows
    index rows_moved = 0;               ///< rows computed by another rank than their expert's owner (re-balancing)
    std::vector<index> weight_bytes_sent;  ///< bytes of expert weights (as stored) each rank sent to the ranks helping it
    std::vector<index> gradient_bytes_sent;  ///< bytes of weight-gradient sums each rank passed on in backward
                                             ///< (re-balanced training: a helper's to the next rank of the expert)

    /// {"ranks": P, "rows": [...], "imbalance": x, "imbalance_before": x, "rows_moved": n,
    /// "bytes_sent": [...], "bytes_received": [...], "weight_bytes_sent": [...], "gradient_bytes_sent": [...]}
    [[nodiscard]] std::string to_json() const {
        const auto list = [](const std::vector<index>& v) {
            std::string s = "[";
            for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
            return s + "]";
        };
        const auto number = [](double v) {
            char s[32];
            std::snprintf(s, sizeof s, "%.6g", v);
            return std::string(s);
        };
        return "{\"ranks\": " + std::to_string(rows.size()) + ", \"rows\": " + list(rows) + ", \"imbalance\": " +
               number(imbalance) + ", \"imbalance_before\": " + number(imbalance_before) + ", \"rows_moved\": " +
               std::to_string(rows_moved) + ", \"bytes_sent\": " + list(bytes_sent) + ", \"bytes_received\": " +
               list(bytes_received) + ", \"weight_bytes_sent\": " + list(weight_bytes_sent) +
               ", \"gradient_bytes_sent\": " + list(gradient_bytes_sent) + "}";
    }
};

template <class Scalar>
class expert_exchange {
public:
    /// `expert_bytes`: the bytes of one routed expert's weights (what a helper takes in, against the
    /// cap of `p.rebalance`). Throws `value_error` when the communicator is null or `p` names ranks
    /// outside it.
    expert_exchange(const placement& p, index experts, std::size_t expert_bytes = 0)
        : comm_(p.comm), owners_(p.owners_of(experts)), experts_(experts), how_(p.rebalance), expert_bytes_(expert_bytes) {
        if (!comm_) throw value_error("expert_exchange: the placement has no communicator");
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

    /// Plans the exchange of `r`'s routed rows (after `build_dispatch`): every rank's rows per expert
    /// are shared (one sum of P x E counts), then every rank makes the same plan of who computes which
    /// rows (`rebalance.hpp`; re-balanced when the placement asks for it, else each expert's rows go to
    /// its owner). `training`: in backward a helper also holds the weight-gradient sum it passes on, so
    /// a helped expert costs twice its weights' bytes against the cap. Collective.
    void plan(const routing<Scalar>& r, bool training) {
        const int ranks = comm_->size(), me = comm_->rank();
        const auto nr = static_cast<std::size_t>(ranks), ne = static_cast<std::size_t>(experts_);
        sent_bytes_ = received_bytes_ = weight_bytes_sent_ = gradient_bytes_sent_ = 0;
        rows_of_.assign(nr * ne + 1, 0);  // [rank][expert], then the ranks that train
        for (std::size_t e = 0; e < ne; ++e)
            rows_of_[static_cast<std::size_t>(me) * ne + e] = r.expert_offsets[e + 1] - r.expert_offsets[e];
        rows_of_.back() = training ? 1 : 0;
        comm_->all_sum(std::span<index>(rows_of_));
        if (rows_of_.back() != 0 && rows_of_.back() != ranks)  // the same on every rank: all throw
            throw error("expert parallelism: " + std::to_string(rows_of_.back()) + " of " + std::to_string(ranks) +
                        " ranks train in this forward (every rank must train, or not, alike)");
        std::vector<index> rows(ne, 0);
        for (std::size_t q = 0; q < nr; ++q)
            for (std::size_t e = 0; e < ne; ++e) rows[e] += rows_of_[q * ne + e];
        plan_ = plan_rebalance(rows, owners_, ranks, how_, training ? 2 * expert_bytes_ : expert_bytes_);
        own_offsets_.assign(ne + 1, 0);
        positions_.assign(ne, -1);
        for (std::size_t e = 0; e < ne; ++e)
            for (std::size_t i = 0; i < plan_.experts[e].size(); ++i)
                if (plan_.experts[e][i].rank == me) positions_[e] = static_cast<int>(i);

        // The rows of rank `src` for expert e are [first_of(src, e), + rows_of) of the expert's block
        // (the sum of the earlier ranks' rows); those of them in rank q's segment go to q.
        firsts_.assign(nr * ne, 0);
        for (std::size_t q = 1; q < nr; ++q)
            for (std::size_t e = 0; e < ne; ++e) firsts_[q * ne + e] = firsts_[(q - 1) * ne + e] + rows_of_[(q - 1) * ne + e];
        const auto first_of = [&](std::size_t src, std::size_t e) { return firsts_[src * ne + e]; };
        const auto overlap = [&](std::size_t src, std::size_t e, int q) -> std::pair<index, index> {
            const segment* s = plan_.find(static_cast<index>(e), q);
            if (!s) return {0, 0};
            const index first = first_of(src, e), last = first + rows_of_[src * ne + e];
            const index lo = std::max(first, s->first), hi = std::min(last, s->first + s->rows);
            return lo < hi ? std::pair{lo, hi} : std::pair<index, index>{0, 0};
        };
        // Send: by destination, then expert, then the rows in routing order.
        const auto mine = static_cast<std::size_t>(me);
        send_rows_.assign(nr, 0);
        send_order_.clear();
        for (int q = 0; q < ranks; ++q)
            for (std::size_t e = 0; e < ne; ++e) {
                const auto [lo, hi] = overlap(mine, e, q);
                const index row0 = r.expert_offsets[e] - first_of(mine, e);
                for (index pos = lo; pos < hi; ++pos) send_order_.push_back(row0 + pos);
                send_rows_[static_cast<std::size_t>(q)] += hi - lo;
            }
        // Receive: the rows of this rank's segments, from every rank in rank order, then expert.
        for (std::size_t e = 0; e < ne; ++e) {
            const segment* s = plan_.find(static_cast<index>(e), me);
            own_offsets_[e + 1] = own_offsets_[e] + (s ? s->rows : 0);
        }
        recv_rows_.assign(nr, 0);
        received_at_.resize(static_cast<std::size_t>(own_offsets_.back()));
        index at = 0;
        for (std::size_t src = 0; src < nr; ++src)
            for (std::size_t e = 0; e < ne; ++e) {
                const auto [lo, hi] = overlap(src, e, me);
                const index own0 = own_offsets_[e] - (hi > lo ? plan_.find(static_cast<index>(e), me)->first : 0);
                for (index pos = lo; pos < hi; ++pos) received_at_[static_cast<std::size_t>(own0 + pos)] = at++;
                recv_rows_[src] += hi - lo;
            }
    }

    /// Whether this rank computes rows of expert e, held by another rank, under the last `plan`.
    [[nodiscard]] bool helps(index e) const {
        return !owns(e) && !own_offsets_.empty() &&
               own_offsets_[static_cast<std::size_t>(e) + 1] > own_offsets_[static_cast<std::size_t>(e)];
    }

    /// The plan of the last `plan`.
    [[nodiscard]] const rebalance_plan& last_plan() const { return plan_; }

    /// Where this rank's segment of expert e stands among the expert's segments under the last `plan`
    /// (0: the first rows of its block), or -1 when it has none (or before any plan). An expert's
    /// weight gradient is one sum over its block's rows in order (kernels/multiply.hpp), so the rank of
    /// segment 0 sums its rows from zero and each later one continues from the sum its predecessor
    /// passes on (`pass_gradients`): the owner, whose segment is last, ends with the bits of one process.
    [[nodiscard]] int segment_position(index e) const {
        return positions_.empty() ? -1 : positions_[static_cast<std::size_t>(e)];
    }

    /// Rounds of `pass_gradients` the last `plan` needs: the most segments of an expert, less one (the
    /// same on every rank).
    [[nodiscard]] int gradient_rounds() const {
        std::size_t most = 1;
        for (const auto& segments : plan_.experts) most = std::max(most, segments.size());
        return static_cast<int>(most) - 1;
    }

    /// Round `round` (1 to `gradient_rounds`) of the weight-gradient chain: for every expert with more
    /// segments, the rank of segment round - 1 sends the gradient it holds, `grad(e)` (a struct of `in`
    /// and `out` matrices), to the rank of segment `round`, whose `grad(e)` (allocated with the same
    /// shapes) it overwrites. Collective.
    template <class Grad>
    void pass_gradients(int round, Grad&& grad) {
        const int ranks = comm_->size(), me = comm_->rank();
        const auto nr = static_cast<std::size_t>(ranks);
        const auto link = [&](index e, std::size_t at) {  // the rank of segment `at` of e, or -1
            const auto& segments = plan_.experts[static_cast<std::size_t>(e)];
            return at < segments.size() ? segments[at].rank : -1;
        };
        const auto from = static_cast<std::size_t>(round - 1), to = static_cast<std::size_t>(round);
        // By (destination, expert) out, (source, expert) in: the in matrix, then the out matrix.
        values_out_.assign(nr, 0);
        values_in_.assign(nr, 0);
        gradients_.clear();
        for (int q = 0; q < ranks; ++q)
            for (index e = 0; e < experts_; ++e)
                if (link(e, from) == me && link(e, to) == q) {
                    auto& g = grad(e);
                    for (const auto* m : {&g.in, &g.out}) {
                        gradients_.insert(gradients_.end(), m->data(), m->data() + m->size());
                        values_out_[static_cast<std::size_t>(q)] += m->size();
                        if (q != me) gradient_bytes_sent_ += m->size() * static_cast<index>(sizeof(Scalar));
                    }
                }
        index incoming = 0;
        for (int q = 0; q < ranks; ++q)
            for (index e = 0; e < experts_; ++e)
                if (link(e, from) == q && link(e, to) == me) {
                    auto& g = grad(e);
                    values_in_[static_cast<std::size_t>(q)] += g.in.size() + g.out.size();
                    incoming += g.in.size() + g.out.size();
                }
        received_gradients_.resize(static_cast<std::size_t>(incoming));
        comm_->all_to_all(std::span<const Scalar>(gradients_), values_out_, std::span<Scalar>(received_gradients_), values_in_);
        std::size_t at = 0;
        for (int q = 0; q < ranks; ++q)
            for (index e = 0; e < experts_; ++e)
                if (link(e, from) == q && link(e, to) == me) {
                    auto& g = grad(e);
                    for (auto* m : {&g.in, &g.out}) {
                        std::copy_n(received_gradients_.data() + at, m->size(), m->data());
                        at += static_cast<std::size_t>(m->size());
                    }
                }
        if (round == gradient_rounds()) {  // kept between the rounds of one backward, transient beyond it
            std::vector<Scalar>().swap(gradients_);
            std::vector<Scalar>().swap(received_gradients_);
        }
    }

    /// Sends the weights of every expert this rank owns to the ranks that help it under the last
    /// `plan`, into their `helped[e]` (allocated with the owner's shapes by the caller: see `helps`);
    /// `raw(w)` gives the bytes of one weight matrix. Collective.
    template <class Weights, class Raw>
    void move_weights(std::vector<Weights>& owned, std::vector<Weights>& helped, Raw&& raw) {
        const int ranks = comm_->size(), me = comm_->rank();
        const auto nr = static_cast<std::size_t>(ranks);
        const auto words = [](std::span<std::byte> b) { return static_cast<index>((b.size() + sizeof(index) - 1) / sizeof(index)); };
        const auto helped_by = [&](index e, int q) { const segment* s = plan_.find(e, q); return q != owner(e) && s && s->rows > 0; };
        // Each matrix padded to whole words: in, then out, of each expert by (destination, id).
        values_out_.assign(nr, 0);
        values_in_.assign(nr, 0);
        words_out_.clear();
        for (int q = 0; q < ranks; ++q)
            for (index e = 0; e < experts_; ++e)
                if (owner(e) == me && helped_by(e, q))
                    for (const std::span<std::byte> b : {raw(owned[static_cast<std::size_t>(e)].in), raw(owned[static_cast<std::size_t>(e)].out)}) {
                        const std::size_t at = words_out_.size();
                        words_out_.resize(at + static_cast<std::size_t>(words(b)), 0);
                        std::memcpy(words_out_.data() + at, b.data(), b.size());
                        values_out_[static_cast<std::size_t>(q)] += words(b);
                        weight_bytes_sent_ += static_cast<index>(b.size());
                    }
        for (int src = 0; src < ranks; ++src)
            for (index e = 0; e < experts_; ++e)
                if (owner(e) == src && helped_by(e, me))
                    for (const std::span<std::byte> b : {raw(helped[static_cast<std::size_t>(e)].in), raw(helped[static_cast<std::size_t>(e)].out)})
                        values_in_[static_cast<std::size_t>(src)] += words(b);
        words_in_.resize(static_cast<std::size_t>(std::accumulate(values_in_.begin(), values_in_.end(), index{0})));
        comm_->all_to_all(std::span<const index>(words_out_), values_out_, std::span<index>(words_in_), values_in_);
        std::vector<index>().swap(words_out_);  // transient: the weights stay only in `helped`
        std::size_t at = 0;
        for (int src = 0; src < ranks; ++src)
            for (index e = 0; e < experts_; ++e)
                if (owner(e) == src && helped_by(e, me))
                    for (const std::span<std::byte> b : {raw(helped[static_cast<std::size_t>(e)].in), raw(helped[static_cast<std::size_t>(e)].out)}) {
                        std::memcpy(b.data(), words_in_.data() + at, b.size());
                        at += static_cast<std::size_t>(words(b));
                    }
        std::vector<index>().swap(words_in_);
    }

    /// Rows per expert this rank computes, as one-process expert offsets (E + 1 entries; the blocks of
    /// experts owned elsewhere are empty). Valid after `plan`.
    [[nodiscard]] const std::vector<index>& own_offsets() const { return own_offsets_; }
    /// Row of the receive buffer (`send`) that holds own row `row`.
    [[nodiscard]] index received_row(index row) const { return received_at_[static_cast<std::size_t>(row)]; }

    /// Sends `width` values for every routed row of the planned routing to the rank that computes it:
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
        std::vector<index> all(5 * p, 0);  // rows, bytes sent, bytes received, weight and gradient bytes sent per rank
        all[me] = own_offsets_.empty() ? 0 : own_offsets_.back();
        all[p + me] = sent_bytes_;
        all[2 * p + me] = received_bytes_;
        all[3 * p + me] = weight_bytes_sent_;
        all[4 * p + me] = gradient_bytes_sent_;
        comm_->all_sum(std::span<index>(all));
        const auto part = [&](std::size_t i) {
            return std::vector<index>(all.begin() + static_cast<std::ptrdiff_t>(i * p), all.begin() + static_cast<std::ptrdiff_t>((i + 1) * p));
        };
        s.rows = part(0);
        s.bytes_sent = part(1);
        s.bytes_received = part(2);
        s.weight_bytes_sent = part(3);
        s.gradient_bytes_sent = part(4);
        s.imbalance = imbalance(s.rows);
        s.imbalance_before = plan_.rows_before.empty() ? 0 : imbalance(plan_.rows_before);
        s.rows_moved = plan_.rows_moved;
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
    rebalancing how_;
    std::size_t expert_bytes_;

    // Plan of the last routing.
    std::vector<index> send_order_;        // send position -> routing row
    std::vector<index> send_rows_;         // rows to each rank
    std::vector<index> recv_rows_;         // rows from each rank
    std::vector<index> rows_of_;           // [rank][expert] rows, then the ranks that may re-balance
    std::vector<index> firsts_;            // [rank][expert] where the rank's rows begin in the expert's block
    rebalance_plan plan_;
    std::vector<index> own_offsets_;
    std::vector<int> positions_;           // per expert: this rank's segment among the expert's, or -1
    std::vector<index> received_at_;
    std::vector<index> values_out_, values_in_, totals_;
    std::vector<index> words_out_, words_in_;  // expert weights as words during move_weights, else empty
    std::vector<Scalar> gradients_, received_gradients_;  // weight gradients during a backward's rounds, else empty
    std::vector<index> first_tokens_;  // where each rank's tokens begin in the batch, and its end (gather_tokens)

    matrix<Scalar> buffer_, back_;
    index sent_bytes_ = 0, received_bytes_ = 0, weight_bytes_sent_ = 0, gradient_bytes_sent_ = 0;
};

}  // namespace moe::parallel
