#include <moe/types.hpp>

#include <catch2/catch.hpp>

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
