#include <moe/types.hpp>

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

TEST_CASE("matrices are row-major with one token per row, and views accept blocks of them", "[types]") {
    STATIC_REQUIRE(moe::matrix<float>::IsRowMajor);
    STATIC_REQUIRE(std::is_same_v<moe::index, Eigen::Index>);
    moe::matrix<double> m(4, 3);
    m << 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12;
    CHECK(m.data()[3] == 4);  // row 1 follows row 0 in memory
    const moe::const_matrix_ref<double> rows = m.middleRows(1, 2);
    CHECK(rows(0, 0) == 4);
    CHECK(rows.data() == m.data() + 3);  // a view, not a copy
    moe::matrix_ref<double> writable = m.topRows(1);
    writable.setZero();
    CHECK(m.row(0).isZero());
}

TEST_CASE("bf16 is the upper half of a float32; to_bf16 rounds to nearest even", "[types][bf16]") {
    STATIC_REQUIRE(sizeof(moe::bf16) == 2);
    const auto bits = [](float v) { return Eigen::numext::bit_cast<std::uint16_t>(moe::to_bf16(v)); };
    CHECK(bits(1.0f) == 0x3F80);
    CHECK(static_cast<float>(moe::to_bf16(1.0f + 0x1p-8f)) == 1.0f);              // halfway, to even (down)
    CHECK(static_cast<float>(moe::to_bf16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f);  // halfway, to even (up)
    CHECK(static_cast<float>(moe::to_bf16(1.0f + 0x1p-8f + 0x1p-20f)) == 1.0f + 0x1p-7f);  // past halfway
    CHECK(static_cast<float>(moe::to_bf16(-std::numeric_limits<float>::max())) == -std::numeric_limits<float>::infinity());
    CHECK(std::isinf(static_cast<float>(moe::to_bf16(std::numeric_limits<float>::infinity()))));
    CHECK(std::isnan(static_cast<float>(moe::to_bf16(std::bit_cast<float>(0x7F80'0001u)))));  // not infinity
    // Agrees with Eigen's conversion away from NaN.
    int differ = 0;
    for (std::uint32_t i = 0; i < 100000; ++i) {
        const float v = std::bit_cast<float>(i * 42949u + 12345u);
        if (!std::isnan(v)) differ += bits(v) != Eigen::numext::bit_cast<std::uint16_t>(moe::bf16(v));
    }
    CHECK(differ == 0);
}

TEST_CASE("aligned_matrix holds its values on a cache line and behaves as a matrix", "[types]") {
    const auto on_cache_line = [](const auto& m) { return reinterpret_cast<std::uintptr_t>(m.data()) % 64 == 0; };
    moe::aligned_matrix<float> zeros(3, 5);
    CHECK(zeros.rows() == 3);
    CHECK(zeros.cols() == 5);
    CHECK(on_cache_line(zeros));
    CHECK((zeros.array() == 0).all());
    // Every size, so that the allocator's own alignment cannot make it pass by chance.
    for (moe::index n = 1; n < 40; ++n) CHECK(on_cache_line(moe::aligned_matrix<moe::bf16>(n, 3)));

    const moe::matrix<float> value = moe::matrix<float>::Random(4, 6);
    moe::aligned_matrix<float> m = value;  // from any Eigen expression, resized to it
    CHECK(m == value);
    CHECK(on_cache_line(m));
    moe::aligned_matrix<float> copy = m;  // deep copies
    copy(0, 0) += 1;
    CHECK(m(0, 0) == value(0, 0));
    const float* storage = copy.data();
    const moe::aligned_matrix<float> moved = std::move(copy);  // moves keep the storage
    CHECK(moved.data() == storage);
    CHECK(copy.size() == 0);
    m = m.transpose();  // another shape, read from its own storage
    CHECK(m.rows() == 6);
    CHECK(m == value.transpose());
    m.row(2).setConstant(7);  // blocks write through
    CHECK(m(2, 3) == 7);
    m = moe::aligned_matrix<float>();
    CHECK(m.size() == 0);
}

TEST_CASE("aligned_rows holds rows of any element type on a cache line and grows only", "[types]") {
    moe::aligned_rows<std::uint16_t> a(3, 5);
    CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % 64 == 0);
    CHECK(a.size() == 15);
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(a.data()[i] == 0);
    a.row(2)[4] = 7;
    moe::aligned_rows<std::uint16_t> copy = a;
    CHECK(copy.row(2)[4] == 7);
    CHECK(copy.data() != a.data());
    const std::uint16_t* storage = a.data();
    a.resize(2, 4);  // smaller: the same storage
    CHECK(a.data() == storage);
    CHECK(a.rows() == 2);
    CHECK(a.cols() == 4);
    moe::aligned_rows<std::uint16_t> moved = std::move(a);
    CHECK(moved.data() == storage);
    CHECK(a.size() == 0);  // NOLINT: moved from, empty
    a.resize(1, 3);        // and usable again
    CHECK(a.data() != nullptr);
}
