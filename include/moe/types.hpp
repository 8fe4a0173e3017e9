#pragma once
/// \file
/// Basic types shared by every part of the library.

#include <Eigen/Core>

#include <bit>
#include <cstddef>
#include <cstdint>

namespace moe {

/// Signed index type used for sizes and positions (Eigen's).
using index = Eigen::Index;

/// bfloat16 (Eigen's): the upper half of a float32, as checkpoints store weights. Converting to float
/// is exact; from float, use `to_bf16`.
using bf16 = Eigen::bfloat16;

/// The bf16 nearest to `value`, ties to even; a NaN stays a NaN (quiet, sign and upper payload kept),
/// infinities stay infinite. The one rounding the library uses: checkpoint files, bf16 weights and the
/// inputs of bf16 projections. Bit operations only, so that loops of it vectorise.
inline bf16 to_bf16(float value) {
    const auto bits = std::bit_cast<std::uint32_t>(value);
    const std::uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const std::uint32_t nan = (bits >> 16) | 0x40u;  // rounding could carry a NaN's payload into infinity
    return Eigen::numext::bit_cast<bf16>(static_cast<std::uint16_t>((bits & 0x7FFF'FFFFu) > 0x7F80'0000u ? nan : rounded));
}

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
