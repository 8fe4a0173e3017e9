#pragma once
/// \file
/// Basic types shared by every part of the library.

#include <Eigen/Core>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

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

/// rows x cols values of a trivially copyable `T` (any element type: numbers, quantized blocks), row
/// major, on a 64-byte boundary: the layer's buffers of projection inputs and the storage of quantized
/// matrices. `resize` allocates only when the values outgrow what it holds, so a buffer reused across
/// calls stops allocating; after a resize its values are unspecified.
template <class T>
    requires std::is_trivially_copyable_v<T>
class aligned_rows {
public:
    static constexpr std::size_t alignment = 64;

    aligned_rows() = default;
    /// rows x cols, zero bytes.
    aligned_rows(index rows, index cols) {
        resize(rows, cols);
        if (size() > 0) std::fill_n(reinterpret_cast<unsigned char*>(data()), size() * sizeof(T), 0);
    }
    aligned_rows(const aligned_rows& other) { *this = other; }
    aligned_rows(aligned_rows&& other) noexcept { *this = std::move(other); }
    aligned_rows& operator=(const aligned_rows& other) {
        if (this != &other) {
            resize(other.rows_, other.cols_);
            std::copy_n(other.data(), other.size(), data());
        }
        return *this;
    }
    aligned_rows& operator=(aligned_rows&& other) noexcept {
        storage_ = std::move(other.storage_);
        capacity_ = std::exchange(other.capacity_, 0);
        rows_ = std::exchange(other.rows_, 0);
        cols_ = std::exchange(other.cols_, 0);
        return *this;
    }
    ~aligned_rows() = default;

    void resize(index rows, index cols) {
        const auto n = static_cast<std::size_t>(rows * cols);
        if (n > capacity_) {
            storage_.reset(static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{alignment})));
            capacity_ = n;
        }
        rows_ = rows;
        cols_ = cols;
    }

    [[nodiscard]] index rows() const { return rows_; }
    [[nodiscard]] index cols() const { return cols_; }
    [[nodiscard]] std::size_t size() const { return static_cast<std::size_t>(rows_ * cols_); }
    [[nodiscard]] T* data() { return storage_.get(); }
    [[nodiscard]] const T* data() const { return storage_.get(); }
    [[nodiscard]] T* row(index r) { return data() + r * cols_; }
    [[nodiscard]] const T* row(index r) const { return data() + r * cols_; }

private:
    struct release {
        void operator()(T* p) const { ::operator delete(p, std::align_val_t{alignment}); }
    };
    std::unique_ptr<T, release> storage_;
    std::size_t capacity_ = 0;
    index rows_ = 0;
    index cols_ = 0;
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
