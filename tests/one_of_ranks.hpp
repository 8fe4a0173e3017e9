#pragma once
// A communicator for unit tests of one rank of several, without MPI: every collective fails the test
// unless the test overrides it to play the other ranks.
#include <catch2/catch.hpp>

#include <moe/parallel/communicator.hpp>

struct one_of_ranks : moe::parallel::communicator {
    one_of_ranks(int rank, int size) : rank_(rank), size_(size) {}
    [[nodiscard]] int rank() const override { return rank_; }
    [[nodiscard]] int size() const override { return size_; }
    void all_to_all(std::span<const float>, std::span<const moe::index>, std::span<float>,
                    std::span<const moe::index>) override { FAIL("unexpected all_to_all of float"); }
    void all_to_all(std::span<const double>, std::span<const moe::index>, std::span<double>,
                    std::span<const moe::index>) override { FAIL("unexpected all_to_all of double"); }
    void all_to_all(std::span<const moe::index>, std::span<const moe::index>, std::span<moe::index>,
                    std::span<const moe::index>) override { FAIL("unexpected all_to_all of index"); }
    void all_sum(std::span<float>) override { FAIL("unexpected all_sum of float"); }
    void all_sum(std::span<double>) override { FAIL("unexpected all_sum of double"); }
    void all_sum(std::span<moe::index>) override { FAIL("unexpected all_sum of index"); }

private:
    int rank_, size_;
};
