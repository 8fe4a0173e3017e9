#include <moe/kernels/select.hpp>

#include <catch2/catch.hpp>

#include <vector>

TEST_CASE("softmax is stable for huge logits and top_k prefers lower indices on ties", "[kernels]") {
    const double z[3] = {1000.0, 1000.0, -1000.0};
    double p[3];
    moe::kernels::softmax(z, p, 3);
    CHECK(p[0] == Approx(0.5));
    CHECK(p[2] == 0.0);
    const float score[6] = {1, 3, 3, 2, 3, 0};
    std::int32_t ids[4];
    CHECK(moe::kernels::top_k(score, 6, 4, ids) == 4);
    CHECK(std::vector<std::int32_t>(ids, ids + 4) == std::vector<std::int32_t>{1, 2, 4, 3});
    CHECK(moe::kernels::top_k(score, 6, 2, ids, [](moe::index i) { return i % 2 == 0; }) == 2);
    CHECK(std::vector<std::int32_t>(ids, ids + 2) == std::vector<std::int32_t>{2, 4});
}
