#pragma once
/// \file
/// Basic types shared by every part of the library.

#include <Eigen/Core>

#include <cstddef>

namespace moe {

/// Signed index type used for sizes and positions (Eigen's).
using index = Eigen::Index;

/// bfloat16 (Eigen's): the upper half of a float32, as checkpoints store weights. Converting from float
/// rounds to nearest even; converting to float is exact.
using bf16 = Eigen::bfloat16;

/// Row-major dense matrix: one token (or one output feature) per row, as checkpoints store them.
template <class Scalar>
using matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dense column vector.
template <class Scalar>
using vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// A writable view of a row-major matrix (a `matrix`, a block of one, or a `Map` over user memory).
template <class Scalar>
using matrix_ref = Eigen::Ref<matrix<Scalar>>;

/// A read-only view of a row-major matrix.
template <class Scalar>
using const_matrix_ref = Eigen::Ref<const matrix<Scalar>>;

}  // namespace moe
