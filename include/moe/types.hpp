#pragma once
/// \file
/// Basic types shared by every part of the library.

#include <Eigen/Core>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

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

/// A row-major matrix whose storage starts on a 64-byte boundary (a cache line) whatever Eigen's own
/// alignment in this build (16 bytes at the x86-64 baseline, where large blocks from malloc start 16
/// bytes past a page): the kernels' 512-bit loads of its rows then split no cache line when a row's
/// length is a multiple of 64 bytes, which is worth 10-40% of a projection (weights held this way by
/// the layer). An `Eigen::Map` over storage it owns: every Eigen expression reads and writes it;
/// assigning a value of another shape reallocates, as a `matrix` would.
template <class Scalar>
class aligned_matrix : public Eigen::Map<matrix<Scalar>> {
public:
    using map = Eigen::Map<matrix<Scalar>>;
    static constexpr std::size_t alignment = 64;

    aligned_matrix() : map(nullptr, 0, 0) {}
    /// rows x cols, zeros.
    aligned_matrix(index rows, index cols) : map(nullptr, 0, 0) {
        resize(rows, cols);
        this->setZero();
    }
    aligned_matrix(const aligned_matrix& other) : map(nullptr, 0, 0) { *this = other; }
    aligned_matrix(aligned_matrix&& other) noexcept : map(nullptr, 0, 0) { *this = std::move(other); }
    template <class Derived>
    aligned_matrix(const Eigen::DenseBase<Derived>& value) : map(nullptr, 0, 0) {  // NOLINT: as matrix's
        *this = value;
    }
    ~aligned_matrix() = default;

    aligned_matrix& operator=(const aligned_matrix& other) {
        if (this != &other) {
            resize(other.rows(), other.cols());
            map::operator=(other);
        }
        return *this;
    }
    aligned_matrix& operator=(aligned_matrix&& other) noexcept {
        if (this != &other) {
            storage_ = std::move(other.storage_);
            seat(storage_.get(), other.rows(), other.cols());
            other.seat(nullptr, 0, 0);
        }
        return *this;
    }
    template <class Derived>
    aligned_matrix& operator=(const Eigen::DenseBase<Derived>& value) {
        if (value.rows() == this->rows() && value.cols() == this->cols()) {
            map::operator=(value);
            return *this;
        }
        const matrix<Scalar> evaluated = value;  // it may read this matrix's storage
        resize(evaluated.rows(), evaluated.cols());
        map::operator=(evaluated);
        return *this;
    }

    /// rows x cols; the values are kept only where the size does not change (else unspecified).
    void resize(index rows, index cols) {
        if (rows * cols != this->size()) {
            storage_.reset();
            if (rows * cols > 0)
                storage_.reset(static_cast<Scalar*>(
                    ::operator new(static_cast<std::size_t>(rows * cols) * sizeof(Scalar), std::align_val_t{alignment})));
        }
        seat(storage_.get(), rows, cols);
    }

private:
    struct release {
        void operator()(Scalar* p) const { ::operator delete(p, std::align_val_t{alignment}); }
    };
    // A Map's array is changed by constructing it again in place (Eigen's documented way).
    void seat(Scalar* data, index rows, index cols) { new (static_cast<map*>(this)) map(data, rows, cols); }

    std::unique_ptr<Scalar, release> storage_;
};

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
