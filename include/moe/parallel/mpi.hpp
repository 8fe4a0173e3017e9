#pragma once
/// \file
/// `mpi_communicator`: the `communicator` of expert parallelism over an MPI communicator (link the
/// CMake target `moe::mpi`, built when CMake finds MPI). The caller initialises and finalises MPI;
/// collectives are made from the thread that calls the layer (MPI_THREAD_FUNNELED suffices).

#include "moe/parallel/communicator.hpp"

#include <mpi.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace moe::parallel {

/// Thrown when an MPI call fails (the communicator's error handler must return errors for this to be
/// seen; under the default handler MPI aborts the job).
struct mpi_error : error {
    using error::error;
};

class mpi_communicator final : public communicator {
public:
    /// Uses `comm` (not duplicated, not freed). Throws `mpi_error` when MPI is not initialised.
    explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
        int initialised = 0;
        MPI_Initialized(&initialised);
        if (!initialised) throw mpi_error("mpi_communicator: MPI is not initialised (call MPI_Init first)");
        check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
        check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    }

    [[nodiscard]] int rank() const override { return rank_; }
    [[nodiscard]] int size() const override { return size_; }
    [[nodiscard]] MPI_Comm handle() const { return comm_; }

    void all_to_all(std::span<const float> send, std::span<const index> send_counts, std::span<float> recv,
                    std::span<const index> recv_counts) override {
        alltoallv(send.data(), send.size(), send_counts, recv.data(), recv.size(), recv_counts, MPI_FLOAT);
    }
    void all_to_all(std::span<const double> send, std::span<const index> send_counts, std::span<double> recv,
                    std::span<const index> recv_counts) override {
        alltoallv(send.data(), send.size(), send_counts, recv.data(), recv.size(), recv_counts, MPI_DOUBLE);
    }
    void all_to_all(std::span<const index> send, std::span<const index> send_counts, std::span<index> recv,
                    std::span<const index> recv_counts) override {
        alltoallv(send.data(), send.size(), send_counts, recv.data(), recv.size(), recv_counts, index_type());
    }

    void all_sum(std::span<float> v) override { allreduce(v.data(), v.size(), MPI_FLOAT); }
    void all_sum(std::span<double> v) override { allreduce(v.data(), v.size(), MPI_DOUBLE); }
    void all_sum(std::span<index> v) override { allreduce(v.data(), v.size(), index_type()); }

    void all_gather(std::span<const float> mine, std::span<const index> counts, std::span<float> all) override {
        allgatherv(mine.data(), mine.size(), counts, all.data(), all.size(), MPI_FLOAT);
    }
    void all_gather(std::span<const double> mine, std::span<const index> counts, std::span<double> all) override {
        allgatherv(mine.data(), mine.size(), counts, all.data(), all.size(), MPI_DOUBLE);
    }

private:
    static MPI_Datatype index_type() {
        static_assert(sizeof(index) == 8 && std::is_signed_v<index>);
        return MPI_INT64_T;
    }

    static void check(int code, const char* what) {
        if (code == MPI_SUCCESS) return;
        char text[MPI_MAX_ERROR_STRING];
        int length = 0;
        MPI_Error_string(code, text, &length);
        throw mpi_error(std::string(what) + " failed: " + std::string(text, static_cast<std::size_t>(length)));
    }

    // MPI counts are int: a larger sum (of the same size on every rank) is an error, not a truncation.
    static int to_int(index v, const char* what) {
        if (v < 0 || v > INT_MAX)
            throw mpi_error(std::string("mpi_communicator: ") + what + " of " + std::to_string(v) +
                            " values exceeds MPI's int counts");
        return static_cast<int>(v);
    }

    void alltoallv(const void* send, std::size_t send_size, std::span<const index> send_counts, void* recv,
                   std::size_t recv_size, std::span<const index> recv_counts, MPI_Datatype type) {
        const auto p = static_cast<std::size_t>(size_);
        if (send_counts.size() != p || recv_counts.size() != p)
            throw value_error("mpi_communicator: all_to_all needs one count per rank (" + std::to_string(p) + ")");
        sc_.resize(p), sd_.resize(p), rc_.resize(p), rd_.resize(p);
        index send_at = 0, recv_at = 0;
        for (std::size_t i = 0; i < p; ++i) {  // int ranges checked below
            sc_[i] = static_cast<int>(send_counts[i]);
            rc_[i] = static_cast<int>(recv_counts[i]);
            sd_[i] = static_cast<int>(send_at);
            rd_[i] = static_cast<int>(recv_at);
            send_at += send_counts[i];
            recv_at += recv_counts[i];
        }
        // Checked on every rank together, so that no rank throws while the others wait in the call.
        int ok[2] = {send_at <= INT_MAX && recv_at <= INT_MAX,
                     static_cast<std::size_t>(send_at) <= send_size && static_cast<std::size_t>(recv_at) <= recv_size};
        check(MPI_Allreduce(MPI_IN_PLACE, ok, 2, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
        if (!ok[0]) throw mpi_error("mpi_communicator: an all-to-all of more than INT_MAX values (MPI's counts are int)");
        if (!ok[1])
            throw value_error("mpi_communicator: all_to_all counts (on this rank " + std::to_string(send_at) + " sent, " +
                              std::to_string(recv_at) + " received) exceed the buffers of a rank (here " +
                              std::to_string(send_size) + ", " + std::to_string(recv_size) + ")");
        check(MPI_Alltoallv(send, sc_.data(), sd_.data(), type, recv, rc_.data(), rd_.data(), type, comm_), "MPI_Alltoallv");
    }

    void allgatherv(const void* mine, std::size_t mine_size, std::span<const index> counts, void* all,
                    std::size_t all_size, MPI_Datatype type) {
        const auto p = static_cast<std::size_t>(size_);
        if (counts.size() != p)
            throw value_error("mpi_communicator: all_gather needs one count per rank (" + std::to_string(p) + ")");
        rc_.resize(p), rd_.resize(p);
        index at = 0;
        for (std::size_t i = 0; i < p; ++i) {  // int ranges checked below
            rc_[i] = static_cast<int>(counts[i]);
            rd_[i] = static_cast<int>(at);
            at += counts[i];
        }
        const index own = counts[static_cast<std::size_t>(rank_)];
        // Checked on every rank together, as in alltoallv.
        int ok[2] = {at <= INT_MAX, static_cast<std::size_t>(own) == mine_size && static_cast<std::size_t>(at) <= all_size};
        check(MPI_Allreduce(MPI_IN_PLACE, ok, 2, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
        if (!ok[0]) throw mpi_error("mpi_communicator: an all-gather of more than INT_MAX values (MPI's counts are int)");
        if (!ok[1])
            throw value_error("mpi_communicator: all_gather counts (this rank's " + std::to_string(own) + " of " +
                              std::to_string(at) + ") do not fit the buffers of a rank (here " +
                              std::to_string(mine_size) + ", " + std::to_string(all_size) + ")");
        check(MPI_Allgatherv(mine, static_cast<int>(own), type, all, rc_.data(), rd_.data(), type, comm_), "MPI_Allgatherv");
    }

    void allreduce(void* data, std::size_t n, MPI_Datatype type) {
        if (n == 0) return;
        check(MPI_Allreduce(MPI_IN_PLACE, data, to_int(static_cast<index>(n), "a sum"), type, MPI_SUM, comm_),
              "MPI_Allreduce");
    }

    MPI_Comm comm_;
    int rank_ = 0, size_ = 1;
    std::vector<int> sc_, sd_, rc_, rd_;
};

}  // namespace moe::parallel
