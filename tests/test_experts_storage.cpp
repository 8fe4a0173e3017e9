#include <moe/experts/storage.hpp>

#include <catch2/catch.hpp>

#include <cstring>
#include <type_traits>
#include <vector>

namespace {
// A storage that names a matrix it cannot train on: the contract ties `trainable` to aligned_matrix of
// the layer's scalar, so this is not a weight storage.
struct trains_on_blocks : moe::storages::q8_0 {
    static constexpr bool trainable = true;
};

// `project` on rows [row, row + m) of a matrix filled by `assign` writes exactly those outputs, each as
// the projection of the whole matrix has it.
template <class S>
void check_storage() {
    const moe::index rows = 5, cols = 64, n = 3;
    const moe::matrix<float> w = moe::matrix<float>::Random(rows, cols), x = moe::matrix<float>::Random(n, cols);
    typename S::matrix m(rows, cols);
    CHECK(m.rows() == rows);
    CHECK(m.cols() == cols);
    S::assign(m, 0, w.data(), rows);
    std::vector<typename S::input> in(static_cast<std::size_t>(n * cols / S::unit));
    S::convert(x.data(), in.data(), n * cols);
    moe::matrix<float> all(n, rows), part = moe::matrix<float>::Constant(n, rows, -1.0f);
    S::project(in.data(), cols / S::unit, m, 0, rows, all.data(), rows, n);
    S::project(in.data(), cols / S::unit, m, 2, 3, part.data() + 2, rows, n);  // rows 2..4 into columns 2..4
    CHECK((part.rightCols(3).array() == all.rightCols(3).array()).all());
    CHECK((part.leftCols(2).array() == -1.0f).all());  // nothing else written

    // raw: its bytes, copied into a matrix of the same shape, give the same projections.
    typename S::matrix copy(rows, cols);
    CHECK(S::raw(m).size() == S::bytes(m));
    std::memcpy(S::raw(copy).data(), S::raw(m).data(), S::bytes(m));
    moe::matrix<float> again(n, rows);
    S::project(in.data(), cols / S::unit, copy, 0, rows, again.data(), rows, n);
    CHECK((again.array() == all.array()).all());
}
}  // namespace

TEST_CASE("the four storages meet the weight-storage contract; a mismatched one does not", "[experts][storage]") {
    STATIC_REQUIRE(moe::weight_storage<moe::storages::scalar<float>, float>);
    STATIC_REQUIRE(moe::weight_storage<moe::storages::scalar<double>, double>);
    STATIC_REQUIRE(moe::weight_storage<moe::storages::bfloat16, float>);
    STATIC_REQUIRE(moe::weight_storage<moe::storages::q8_0, float>);
    STATIC_REQUIRE(moe::weight_storage<moe::storages::q4_0, float>);
    STATIC_REQUIRE_FALSE(moe::weight_storage<moe::storages::bfloat16, double>);  // bf16 weights: float layers
    STATIC_REQUIRE_FALSE(moe::weight_storage<moe::storages::scalar<float>, double>);
    STATIC_REQUIRE_FALSE(moe::weight_storage<trains_on_blocks, float>);
    STATIC_REQUIRE(moe::storages::scalar<float>::trainable);
    STATIC_REQUIRE_FALSE(moe::storages::bfloat16::trainable);
    STATIC_REQUIRE(moe::storages::q4_0::unit == 32);
    STATIC_REQUIRE(moe::detail::holds_numbers<moe::storages::bfloat16>);
    STATIC_REQUIRE_FALSE(moe::detail::holds_numbers<moe::storages::q8_0>);
}

TEST_CASE("each storage assigns, converts and projects a range of weight rows as it holds them", "[experts][storage]") {
    check_storage<moe::storages::scalar<float>>();
    check_storage<moe::storages::bfloat16>();
    check_storage<moe::storages::q8_0>();
    check_storage<moe::storages::q4_0>();
}

TEST_CASE("storages hold what they say: values as assigned, bytes as counted", "[experts][storage]") {
    const moe::matrix<float> w = moe::matrix<float>::Random(4, 96);
    moe::storages::scalar<float>::matrix f(4, 96);
    moe::storages::scalar<float>::assign(f, 1, w.data(), 3);  // rows 1..3 from the first three of w
    CHECK(f.bottomRows(3) == w.topRows(3));
    CHECK(f.row(0).isZero());
    CHECK(moe::storages::scalar<float>::bytes(f) == 4 * 96 * sizeof(float));
    moe::storages::bfloat16::matrix b(4, 96);
    moe::storages::bfloat16::assign(b, 0, w.data(), 4);
    CHECK(b == w.unaryExpr([](float v) { return moe::to_bf16(v); }));
    CHECK(moe::storages::bfloat16::bytes(b) == 4 * 96 * 2);
    moe::storages::q4_0::matrix q(4, 96);
    moe::storages::q4_0::assign(q, 0, w.data(), 4);
    std::vector<moe::q4_0_block> want(4 * 3);
    moe::kernels::quantize(w.data(), w.size(), want.data());
    for (moe::index r = 0; r < 4; ++r)
        for (moe::index b = 0; b < 3; ++b) {
            const moe::q4_0_block got = q.block(r, b);
            CHECK(std::memcmp(&got, &want[static_cast<std::size_t>(r * 3 + b)], sizeof got) == 0);
        }
    // One group of 16 rows (4 of them zeros), 3 blocks of 16 rows' values, 3 x 16 scales padded to 128 bytes.
    CHECK(moe::storages::q4_0::bytes(q) == 3 * 16 * 16 + 128);
}
