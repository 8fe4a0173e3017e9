#pragma once
/// \file
/// Reading and writing HuggingFace safetensors files: an 8-byte little-endian header length N, N
/// bytes of JSON describing every tensor (dtype, shape, byte offsets) plus optional string
/// metadata, then the raw little-endian tensor data.

#include "moe/error.hpp"
#include "moe/types.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

namespace moe::io {

// Tensor bytes are copied straight between memory and the file, which is little-endian by spec.
static_assert(std::endian::native == std::endian::little,
              "moe/io/safetensors.hpp requires a little-endian target");

/// Element types of a safetensors tensor (the subset this library understands).
enum class dtype { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };

/// String->string metadata stored under "__metadata__"; the same type is read and written so a
/// file's metadata can be passed straight back to `write_safetensors`.
using metadata_map = std::map<std::string, std::string, std::less<>>;

namespace detail {

struct dtype_entry {
    dtype type;
    std::string_view name;
    std::size_t size;
};

// Indexed by the enumerator's value, so the order must follow `enum class dtype`.
inline constexpr std::array<dtype_entry, 10> dtype_table{{
    {dtype::f64, "F64", 8},
    {dtype::f32, "F32", 4},
    {dtype::f16, "F16", 2},
    {dtype::bf16, "BF16", 2},
    {dtype::i64, "I64", 8},
    {dtype::i32, "I32", 4},
    {dtype::i16, "I16", 2},
    {dtype::i8, "I8", 1},
    {dtype::u8, "U8", 1},
    {dtype::boolean, "BOOL", 1},
}};

inline std::optional<dtype> parse_dtype(std::string_view name) {
    for (const dtype_entry& entry : dtype_table) {
        if (entry.name == name) return entry.type;
    }
    return std::nullopt;
}

inline bool is_floating(dtype type) {
    return type == dtype::f64 || type == dtype::f32 || type == dtype::f16 || type == dtype::bf16;
}

inline bool is_integer(dtype type) {
    return type == dtype::i64 || type == dtype::i32 || type == dtype::i16 || type == dtype::i8 ||
           type == dtype::u8;
}

inline float bf16_to_float(std::uint16_t bits) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

inline std::uint16_t float_to_bf16(float value) {
    return Eigen::numext::bit_cast<std::uint16_t>(to_bf16(value));
}

inline float f16_to_float(std::uint16_t bits) {
    const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
    const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
    const std::uint32_t mantissa = bits & 0x3FFu;
    if (exponent == 0) {
        // Zero and subnormals are mantissa * 2^-24, which float represents exactly.
        const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
        return sign != 0 ? -magnitude : magnitude;
    }
    if (exponent == 0x1F) return std::bit_cast<float>(sign | 0x7F80'0000u | (mantissa << 13));
    return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Shifts right by `shift` (1..31) bits, rounding to nearest with ties to even.
inline std::uint32_t shift_round_even(std::uint32_t value, unsigned shift) {
    const std::uint32_t half_minus_one = (1u << (shift - 1)) - 1u;
    return (value + half_minus_one + ((value >> shift) & 1u)) >> shift;
}

inline std::uint16_t float_to_f16(float value) {
    const auto bits = std::bit_cast<std::uint32_t>(value);
    const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
    const std::uint32_t magnitude = bits & 0x7FFF'FFFFu;
    if (magnitude > 0x7F80'0000u) return static_cast<std::uint16_t>(sign | 0x7E00u);
    if (magnitude >= 0x4780'0000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 2^16
    if (magnitude >= 0x3880'0000u) {
        // Normal half: rebias the exponent from 127 to 15; a rounding carry that reaches
        // exponent 31 yields exactly the infinity encoding.
        return static_cast<std::uint16_t>(sign | shift_round_even(magnitude - 0x3800'0000u, 13));
    }
    const std::uint32_t exponent = magnitude >> 23;
    if (exponent < 102) return sign;  // below 2^-25, which rounds to zero
    // Subnormal half: count units of 2^-24; rounding up to 0x400 gives the smallest normal.
    const std::uint32_t mantissa = (magnitude & 0x7F'FFFFu) | 0x80'0000u;
    return static_cast<std::uint16_t>(sign | shift_round_even(mantissa, 126u - exponent));
}

// "[a, b, c]" for a shape (a range of integers).
template <class Shape>
std::string format_shape(const Shape& shape) {
    std::string text = "[";
    for (const auto extent : shape) {
        if (text.size() > 1) text += ", ";
        text += std::to_string(extent);
    }
    return text + "]";
}

inline std::string errno_message(int error_number) {
    return std::error_code(error_number, std::generic_category()).message();
}

/// Owns a file descriptor and closes it on destruction.
class unique_fd {
public:
    explicit unique_fd(int fd) : fd_(fd) {}
    unique_fd(const unique_fd&) = delete;
    unique_fd& operator=(const unique_fd&) = delete;
    ~unique_fd() {
        if (fd_ >= 0) ::close(fd_);
    }

    int get() const { return fd_; }

    /// Closes now and returns close()'s result, so a writer can detect a failed final flush.
    int close() { return ::close(std::exchange(fd_, -1)); }

private:
    int fd_;
};

/// Owns a read-only memory mapping and unmaps it on destruction; a member of
/// `safetensors_file` so a constructor that throws after mapping still unmaps.
class mapping {
public:
    mapping() = default;
    mapping(const void* address, std::size_t size) : address_(address), size_(size) {}
    mapping(const mapping&) = delete;
    mapping& operator=(const mapping&) = delete;
    mapping(mapping&& other) noexcept
        : address_(std::exchange(other.address_, nullptr)), size_(std::exchange(other.size_, 0)) {}
    mapping& operator=(mapping&& other) noexcept {
        if (this != &other) {
            unmap();
            address_ = std::exchange(other.address_, nullptr);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }
    ~mapping() { unmap(); }

    const std::byte* data() const { return static_cast<const std::byte*>(address_); }
    std::size_t size() const { return size_; }

private:
    void unmap() noexcept {
        if (address_ != nullptr) ::munmap(const_cast<void*>(address_), size_);
        address_ = nullptr;
        size_ = 0;
    }

    const void* address_ = nullptr;
    std::size_t size_ = 0;
};

/// Maps `path` read-only (the whole file, PROT_READ, MAP_PRIVATE): a regular file of at least
/// `min_size` bytes ("file is N bytes, shorter than <min_what>" otherwise); `fail(problem)` throws.
template <class Fail>
mapping map_readonly(const std::filesystem::path& path, std::uint64_t min_size, const std::string& min_what, Fail fail) {
    unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) fail("cannot open: " + errno_message(errno));
    struct stat status {};
    if (::fstat(fd.get(), &status) != 0) fail("cannot stat: " + errno_message(errno));
    if (!S_ISREG(status.st_mode)) fail("not a regular file");
    const auto size = static_cast<std::uint64_t>(status.st_size);
    // Checked before mapping, which also keeps mmap from seeing an invalid length of 0.
    if (size < min_size) fail("file is " + std::to_string(size) + " bytes, shorter than " + min_what);
    void* address = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (address == MAP_FAILED) fail("cannot mmap: " + errno_message(errno));
    return mapping(address, size);
}

// Decodes `out.size()` elements stored as `Stored` at the possibly unaligned `source`.
template <class Stored, class T, class Convert>
void decode(const std::byte* source, std::span<T> out, Convert convert) {
    for (std::size_t i = 0; i < out.size(); ++i) {
        Stored stored;
        std::memcpy(&stored, source + i * sizeof(Stored), sizeof(Stored));
        out[i] = convert(stored);
    }
}

}  // namespace detail

/// The name safetensors uses for a dtype: "F64", "F32", "F16", "BF16", "I64", ..., "BOOL".
inline std::string_view dtype_name(dtype type) {
    return detail::dtype_table[static_cast<std::size_t>(type)].name;
}

/// Bytes per element of a dtype.
inline std::size_t dtype_size(dtype type) {
    return detail::dtype_table[static_cast<std::size_t>(type)].size;
}

/// One tensor's entry in a safetensors header.
struct tensor_info {
    std::string name;
    dtype type = dtype::f32;
    std::vector<std::int64_t> shape;
    std::size_t begin = 0;  ///< byte offset of the first element, relative to the data section
    std::size_t end = 0;    ///< byte offset one past the last element, relative to the data section

    /// Number of elements (1 for a scalar with an empty shape); `safetensors_file` guarantees
    /// it does not overflow for the entries it returns.
    std::int64_t numel() const {
        std::int64_t count = 1;
        for (const std::int64_t dim : shape) count *= dim;
        return count;
    }
};

/// A read-only, memory-mapped safetensors file (mmap, PROT_READ, MAP_PRIVATE): only the pages of
/// tensors actually read are touched, so opening a 10 GB shard to read one tensor costs one
/// tensor. The whole header is validated on open, so no later access can go out of bounds; the
/// file must not be truncated while open. Move-only; unmaps in the destructor.
class safetensors_file {
public:
    /// Maps and validates `path`; throws io_error naming the file and the problem (and the
    /// tensor, where there is one) if it is unreadable or malformed.
    explicit safetensors_file(const std::filesystem::path& path) : path_(path) {
        map_file();
        parse_header();
    }

    /// The path the file was opened with.
    const std::filesystem::path& path() const { return path_; }

    /// Whether the file holds a tensor called `name`.
    bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }

    /// The header entry of tensor `name`; io_error "<file>: no tensor '<name>'" if absent.
    const tensor_info& info(std::string_view name) const {
        const auto found = tensors_.find(name);
        if (found == tensors_.end()) fail("no tensor '" + std::string(name) + "'");
        return found->second;
    }

    /// All tensor names, sorted.
    std::vector<std::string> names() const {
        std::vector<std::string> result;
        result.reserve(tensors_.size());
        for (const auto& [name, entry] : tensors_) result.push_back(name);
        return result;
    }

    /// The "__metadata__" strings (empty if the file has none).
    const metadata_map& metadata() const { return metadata_; }

    /// The raw little-endian bytes of tensor `name`, which may be unaligned.
    std::span<const std::byte> bytes(std::string_view name) const {
        const tensor_info& entry = info(name);
        return {data_section() + entry.begin, entry.end - entry.begin};
    }

    /// Reads a floating-point tensor (F64, F32, F16, BF16) converted to T (float, double or bf16: BF16
    /// values as stored, others by `to_bf16`, F64 through float) into `out`, which must hold exactly numel()
    /// elements (else shape_error); integer and boolean tensors are rejected with io_error naming the
    /// tensor, the file and the dtype.
    template <class T>
    void read(std::string_view name, std::span<T> out) const {
        static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16>,
                      "safetensors_file::read converts to float, double or bf16");
        const tensor_info& entry = info(name);
        if (!detail::is_floating(entry.type)) {
            fail("tensor '" + entry.name + "' has dtype " + std::string(dtype_name(entry.type)) +
                 "; integer and boolean weights are not supported (expected F64, F32, F16 or "
                 "BF16)");
        }
        check_output_size(entry, out.size());
        const std::byte* source = data_section() + entry.begin;
        // A stored value as T: bf16 by `to_bf16` (exact for BF16), float and double by conversion.
        const auto as_t = [](auto v) {
            if constexpr (std::is_same_v<T, bf16>)
                return to_bf16(static_cast<float>(v));
            else
                return static_cast<T>(v);
        };
        switch (entry.type) {
            case dtype::f64:
                detail::decode<double>(source, out, as_t);
                break;
            case dtype::f32:
                detail::decode<float>(source, out, as_t);
                break;
            case dtype::f16:
                detail::decode<std::uint16_t>(source, out, [&](std::uint16_t v) { return as_t(detail::f16_to_float(v)); });
                break;
            default:  // bf16, the only floating-point dtype left
                detail::decode<std::uint16_t>(source, out, [&](std::uint16_t v) { return as_t(detail::bf16_to_float(v)); });
                break;
        }
    }

    /// Same as `read(name, out)`, after checking that the tensor's shape equals `expected_shape`
    /// (else shape_error naming the tensor, the file and both shapes).
    template <class T>
    void read(std::string_view name, std::span<T> out,
              std::span<const std::int64_t> expected_shape) const {
        const tensor_info& entry = info(name);
        if (!std::equal(entry.shape.begin(), entry.shape.end(), expected_shape.begin(),
                        expected_shape.end())) {
            throw shape_error(path_.string() + ": tensor '" + entry.name + "' has shape " +
                              detail::format_shape(entry.shape) + ", expected " +
                              detail::format_shape(expected_shape));
        }
        read(name, out);
    }

    /// Reads an integer tensor (I64, I32, I16, I8, U8) widened to int64; other dtypes are
    /// rejected with io_error naming the tensor, the file and the dtype.
    std::vector<std::int64_t> read_integers(std::string_view name) const {
        const tensor_info& entry = info(name);
        if (!detail::is_integer(entry.type)) {
            fail("tensor '" + entry.name + "' has dtype " + std::string(dtype_name(entry.type)) +
                 "; expected an integer dtype (I64, I32, I16, I8 or U8)");
        }
        std::vector<std::int64_t> values(static_cast<std::size_t>(entry.numel()));
        const std::byte* source = data_section() + entry.begin;
        const std::span<std::int64_t> out(values);
        const auto widen = [](auto v) { return static_cast<std::int64_t>(v); };
        switch (entry.type) {
            case dtype::i64: detail::decode<std::int64_t>(source, out, widen); break;
            case dtype::i32: detail::decode<std::int32_t>(source, out, widen); break;
            case dtype::i16: detail::decode<std::int16_t>(source, out, widen); break;
            case dtype::i8: detail::decode<std::int8_t>(source, out, widen); break;
            default: detail::decode<std::uint8_t>(source, out, widen); break;  // u8
        }
        return values;
    }

private:
    // Headers are small (kilobytes to a few megabytes); the cap stops a corrupt length from
    // making the JSON parser chew through a whole multi-gigabyte shard.
    static constexpr std::uint64_t max_header_size = 100u * 1024u * 1024u;

    [[noreturn]] void fail(const std::string& problem) const {
        throw io_error(path_.string() + ": " + problem);
    }

    const std::byte* data_section() const { return mapping_.data() + data_offset_; }

    void check_output_size(const tensor_info& entry, std::size_t size) const {
        const auto count = static_cast<std::size_t>(entry.numel());
        if (size != count) {
            throw shape_error(path_.string() + ": tensor '" + entry.name + "' of shape " +
                              detail::format_shape(entry.shape) + " has " + std::to_string(count) +
                              " elements but the output holds " + std::to_string(size));
        }
    }

    void map_file() {
        mapping_ = detail::map_readonly(path_, 8, "the 8-byte header length", [&](const std::string& problem) { fail(problem); });
    }

    void parse_header() {
        std::uint64_t header_size = 0;
        for (int i = 7; i >= 0; --i) {
            header_size = (header_size << 8) | std::to_integer<std::uint64_t>(mapping_.data()[i]);
        }
        const std::uint64_t file_size = mapping_.size();
        if (header_size > file_size - 8) {
            fail("header length " + std::to_string(header_size) + " exceeds the " +
                 std::to_string(file_size - 8) + " bytes after the length field");
        }
        if (header_size > max_header_size) {
            fail("header length " + std::to_string(header_size) + " exceeds the limit of " +
                 std::to_string(max_header_size) + " bytes");
        }
        data_offset_ = 8 + static_cast<std::size_t>(header_size);

        const auto* text = reinterpret_cast<const char*>(mapping_.data() + 8);
        nlohmann::json header;
        try {
            header = nlohmann::json::parse(text, text + header_size);
        } catch (const nlohmann::json::exception& e) {
            fail(std::string("header is not valid JSON: ") + e.what());
        }
        if (!header.is_object()) fail("header is not a JSON object");

        const std::uint64_t data_size = file_size - data_offset_;
        for (const auto& [key, value] : header.items()) {
            if (key == "__metadata__") {
                parse_metadata(value);
            } else {
                tensor_info entry = parse_tensor(key, value, data_size);
                tensors_.emplace(key, std::move(entry));
            }
        }
        check_overlaps();
    }

    void parse_metadata(const nlohmann::json& value) {
        if (!value.is_object()) fail("__metadata__ is not a JSON object");
        for (const auto& [key, item] : value.items()) {
            if (!item.is_string()) fail("__metadata__ value of '" + key + "' is not a string");
            metadata_.emplace(key, item.get<std::string>());
        }
    }

    tensor_info parse_tensor(const std::string& name, const nlohmann::json& value,
                             std::uint64_t data_size) const {
        const std::string where = "tensor '" + name + "': ";
        if (!value.is_object()) fail(where + "entry is not a JSON object");

        tensor_info entry;
        entry.name = name;

        const auto type_field = value.find("dtype");
        if (type_field == value.end()) fail(where + "missing dtype");
        if (!type_field->is_string()) fail(where + "dtype is not a string");
        const auto type = detail::parse_dtype(type_field->get_ref<const std::string&>());
        if (!type) fail(where + "unknown dtype '" + type_field->get<std::string>() + "'");
        entry.type = *type;

        const auto shape_field = value.find("shape");
        if (shape_field == value.end()) fail(where + "missing shape");
        if (!shape_field->is_array()) fail(where + "shape is not an array");
        for (const nlohmann::json& dim : *shape_field) {
            if (!dim.is_number_unsigned()) {
                fail(where + "shape " + shape_field->dump() +
                     " has a dimension that is not a non-negative integer");
            }
            const auto extent = dim.get<std::uint64_t>();
            if (extent > static_cast<std::uint64_t>(INT64_MAX)) {
                fail(where + "shape " + shape_field->dump() + " has a dimension too large");
            }
            entry.shape.push_back(static_cast<std::int64_t>(extent));
        }

        const auto offsets_field = value.find("data_offsets");
        if (offsets_field == value.end()) fail(where + "missing data_offsets");
        const nlohmann::json& offsets = *offsets_field;
        if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
            !offsets[1].is_number_unsigned()) {
            fail(where + "data_offsets " + offsets.dump() +
                 " is not two non-negative integers");
        }
        const auto begin = offsets[0].get<std::uint64_t>();
        const auto end = offsets[1].get<std::uint64_t>();
        if (begin > end) fail(where + "data_offsets " + offsets.dump() + " are reversed");
        if (end > data_size) {
            fail(where + "data_offsets " + offsets.dump() + " exceed the data section of " +
                 std::to_string(data_size) + " bytes");
        }
        entry.begin = static_cast<std::size_t>(begin);
        entry.end = static_cast<std::size_t>(end);

        if (!size_matches(entry)) {
            fail(where + "shape " + detail::format_shape(entry.shape) + " of dtype " +
                 std::string(dtype_name(entry.type)) + " does not fit the " +
                 std::to_string(end - begin) + " bytes of data_offsets " + offsets.dump());
        }
        return entry;
    }

    // Compares numel * dtype_size with the byte length without overflowing: the running product
    // is never allowed past the element count the byte length can hold.
    static bool size_matches(const tensor_info& entry) {
        const std::size_t length = entry.end - entry.begin;
        const std::size_t element_size = dtype_size(entry.type);
        if (std::find(entry.shape.begin(), entry.shape.end(), 0) != entry.shape.end()) {
            return length == 0;
        }
        const std::uint64_t capacity = length / element_size;
        std::uint64_t count = 1;
        for (const std::int64_t dim : entry.shape) {
            const auto extent = static_cast<std::uint64_t>(dim);
            if (count > capacity / extent) return false;
            count *= extent;
        }
        return count * element_size == length;
    }

    void check_overlaps() const {
        std::vector<const tensor_info*> by_offset;
        for (const auto& [name, entry] : tensors_) {
            // Empty tensors occupy no bytes, so they cannot overlap anything.
            if (entry.begin != entry.end) by_offset.push_back(&entry);
        }
        std::sort(by_offset.begin(), by_offset.end(),
                  [](const tensor_info* a, const tensor_info* b) { return a->begin < b->begin; });
        for (std::size_t i = 1; i < by_offset.size(); ++i) {
            if (by_offset[i]->begin < by_offset[i - 1]->end) {
                fail("tensors '" + by_offset[i - 1]->name + "' and '" + by_offset[i]->name +
                     "' overlap in the data section");
            }
        }
    }

    std::filesystem::path path_;
    detail::mapping mapping_;
    std::size_t data_offset_ = 0;
    std::map<std::string, tensor_info, std::less<>> tensors_;
    metadata_map metadata_;
};

/// One tensor to write. Float dtypes (F32, F16, BF16, the last two rounded to nearest even) take
/// their values from `values`; I64 takes them from `integers`; the other span must be empty.
struct tensor_to_write {
    std::string name;
    std::vector<std::int64_t> shape;
    dtype type = dtype::f32;
    std::span<const float> values{};
    std::span<const std::int64_t> integers{};
};

namespace detail {

inline void write_all(int fd, const void* data, std::size_t size, const std::string& file) {
    const auto* cursor = static_cast<const char*>(data);
    while (size > 0) {
        const ::ssize_t written = ::write(fd, cursor, size);
        if (written < 0) {
            if (errno == EINTR) continue;
            throw io_error(file + ": cannot write: " + errno_message(errno));
        }
        cursor += written;
        size -= static_cast<std::size_t>(written);
    }
}

// Converts in fixed-size chunks so writing a large tensor needs no second full-size buffer.
template <class Convert>
void write_converted(int fd, std::span<const float> values, Convert convert,
                     const std::string& file) {
    std::array<std::uint16_t, 8192> chunk{};
    for (std::size_t start = 0; start < values.size(); start += chunk.size()) {
        const std::size_t count = std::min(chunk.size(), values.size() - start);
        for (std::size_t i = 0; i < count; ++i) chunk[i] = convert(values[start + i]);
        write_all(fd, chunk.data(), count * sizeof(std::uint16_t), file);
    }
}

/// Removes a temporary file on destruction unless `keep()` was called.
class temporary_file_guard {
public:
    explicit temporary_file_guard(std::filesystem::path path) : path_(std::move(path)) {}
    temporary_file_guard(const temporary_file_guard&) = delete;
    temporary_file_guard& operator=(const temporary_file_guard&) = delete;
    ~temporary_file_guard() {
        if (armed_) ::unlink(path_.c_str());
    }

    void keep() { armed_ = false; }

private:
    std::filesystem::path path_;
    bool armed_ = true;
};

// Validates `tensor` and returns its byte length.
inline std::uint64_t checked_byte_length(const tensor_to_write& tensor, const std::string& file) {
    const std::string where = file + ": tensor '" + tensor.name + "': ";
    const bool is_float =
        tensor.type == dtype::f32 || tensor.type == dtype::f16 || tensor.type == dtype::bf16;
    if (!is_float && tensor.type != dtype::i64) {
        throw value_error(where + "writing dtype " + std::string(dtype_name(tensor.type)) +
                          " is not supported (F32, BF16, F16 or I64)");
    }
    if (is_float ? !tensor.integers.empty() : !tensor.values.empty()) {
        throw value_error(where + "dtype " + std::string(dtype_name(tensor.type)) + " takes its " +
                          (is_float ? "values from `values`" : "values from `integers`") +
                          " but the other span is not empty");
    }
    std::uint64_t count = 1;
    for (const std::int64_t dim : tensor.shape) {
        if (dim < 0) {
            throw shape_error(where + "negative dimension in shape " + format_shape(tensor.shape));
        }
        // Caps the product so it cannot overflow; no tensor in memory comes near 2^62 elements.
        if (dim != 0 && count > (std::uint64_t{1} << 62) / static_cast<std::uint64_t>(dim)) {
            throw shape_error(where + "shape " + format_shape(tensor.shape) + " is too large");
        }
        count *= static_cast<std::uint64_t>(dim);
    }
    const std::size_t given = is_float ? tensor.values.size() : tensor.integers.size();
    if (given != count) {
        throw shape_error(where + "shape " + format_shape(tensor.shape) + " has " +
                          std::to_string(count) + " elements but " + std::to_string(given) +
                          " values were given");
    }
    return count * dtype_size(tensor.type);
}

}  // namespace detail

/// Writes a safetensors file atomically: to "<path>.tmp.<pid>", fsynced, then renamed, so the
/// destination exists only when complete; the temporary file is removed on any error. Throws
/// shape_error if a tensor's value count does not match its shape (or a dimension is negative),
/// value_error for an empty, duplicate or reserved ("__metadata__") name, an unsupported dtype,
/// or a name or metadata string that is not valid UTF-8, and io_error if the file cannot be
/// written. The header is padded with spaces so the data section starts 8-byte aligned.
inline void write_safetensors(const std::filesystem::path& path,
                              std::span<const tensor_to_write> tensors,
                              const metadata_map& metadata = {}) {
    const std::string file = path.string();
    nlohmann::json header = nlohmann::json::object();
    std::set<std::string_view> seen;
    std::uint64_t offset = 0;
    for (const tensor_to_write& tensor : tensors) {
        if (tensor.name.empty()) throw value_error(file + ": a tensor has an empty name");
        if (tensor.name == "__metadata__") {
            throw value_error(file + ": '__metadata__' is reserved and cannot name a tensor");
        }
        if (!seen.insert(tensor.name).second) {
            throw value_error(file + ": duplicate tensor name '" + tensor.name + "'");
        }
        const std::uint64_t length = detail::checked_byte_length(tensor, file);
        header[tensor.name] = {{"dtype", dtype_name(tensor.type)},
                               {"shape", tensor.shape},
                               {"data_offsets", {offset, offset + length}}};
        offset += length;
    }
    if (!metadata.empty()) {
        nlohmann::json& strings = header["__metadata__"] = nlohmann::json::object();
        for (const auto& [key, value] : metadata) strings[key] = value;
    }
    std::string text;
    try {
        text = header.dump();
    } catch (const nlohmann::json::exception& e) {
        throw value_error(file + ": tensor names and metadata must be valid UTF-8: " + e.what());
    }
    text.append((8 - text.size() % 8) % 8, ' ');
    const std::uint64_t header_size = text.size();
    std::array<unsigned char, 8> length_field{};
    for (std::size_t i = 0; i < 8; ++i) {
        length_field[i] = static_cast<unsigned char>(header_size >> (8 * i));
    }

    std::filesystem::path temporary = path;
    temporary += ".tmp." + std::to_string(::getpid());
    const std::string temporary_name = temporary.string();
    detail::unique_fd fd(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) {
        throw io_error(temporary_name + ": cannot create: " + detail::errno_message(errno));
    }
    detail::temporary_file_guard guard(temporary);

    detail::write_all(fd.get(), length_field.data(), length_field.size(), temporary_name);
    detail::write_all(fd.get(), text.data(), text.size(), temporary_name);
    for (const tensor_to_write& tensor : tensors) {
        switch (tensor.type) {
            case dtype::f32:
                detail::write_all(fd.get(), tensor.values.data(), tensor.values.size_bytes(),
                                  temporary_name);
                break;
            case dtype::f16:
                detail::write_converted(fd.get(), tensor.values, detail::float_to_f16,
                                        temporary_name);
                break;
            case dtype::bf16:
                detail::write_converted(fd.get(), tensor.values, detail::float_to_bf16,
                                        temporary_name);
                break;
            default:  // i64, the only other dtype validation lets through
                detail::write_all(fd.get(), tensor.integers.data(), tensor.integers.size_bytes(),
                                  temporary_name);
                break;
        }
    }
    if (::fsync(fd.get()) != 0) {
        throw io_error(temporary_name + ": cannot fsync: " + detail::errno_message(errno));
    }
    if (fd.close() != 0) {
        throw io_error(temporary_name + ": cannot close: " + detail::errno_message(errno));
    }
    if (::rename(temporary.c_str(), path.c_str()) != 0) {
        throw io_error(file + ": cannot rename " + temporary_name + " into place: " +
                       detail::errno_message(errno));
    }
    guard.keep();
}

}  // namespace moe::io
