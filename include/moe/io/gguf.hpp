#pragma once
/// \file
/// Reading GGUF files, the format llama.cpp and ggml keep models in (public specification: ggml's
/// `docs/gguf.md`, versions 2 and 3; both little-endian here). A file is: the magic "GGUF", a uint32
/// version, uint64 counts of tensors and of metadata key/values; the key/values (a string key, a uint32
/// value type, the value); the tensor infos (name, uint32 number of dimensions, uint64 dimensions with
/// the fastest-varying first, uint32 ggml type, uint64 offset); zero padding to the alignment
/// (`general.alignment`, default 32); the tensor data, each tensor at its offset from there (a multiple
/// of the alignment). Strings are a uint64 byte count and UTF-8 bytes; arrays a uint32 element type, a
/// uint64 count and the elements.
///
/// `gguf_file` maps the file read-only and validates all of it on open (counts against the bytes left,
/// string lengths, value types, booleans, nesting, dimensions and their product, tensor types, offsets
/// aligned and in the file, tensors not overlapping, names and keys unique), so no later access can go
/// out of bounds; every problem is an `io_error` naming the file and the key or tensor.

#include "moe/error.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/kernels/quantized.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace moe::io {

/// ggml's tensor types, by their numbers in GGUF files (ggml.h's `enum ggml_type`; 4, 5, 31-33 and 36-38
/// are retired there).
enum class ggml_type : std::uint32_t {
    f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9,
    q2_k = 10, q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, q8_k = 15,
    iq2_xxs = 16, iq2_xs = 17, iq3_xxs = 18, iq1_s = 19, iq4_nl = 20, iq3_s = 21, iq2_s = 22, iq4_xs = 23,
    i8 = 24, i16 = 25, i32 = 26, i64 = 27, f64 = 28, iq1_m = 29, bf16 = 30, tq1_0 = 34, tq2_0 = 35, mxfp4 = 39,
};

namespace detail {

/// A ggml type's name (as llama.cpp prints it), and its block: values per block, bytes per block
/// (ggml's `type_traits`: blck_size, type_size).
struct ggml_type_entry {
    ggml_type type;
    std::string_view name;
    std::uint64_t block_values, block_bytes;
};

inline constexpr std::array<ggml_type_entry, 32> ggml_types{{
    {ggml_type::f32, "F32", 1, 4},         {ggml_type::f16, "F16", 1, 2},          {ggml_type::q4_0, "Q4_0", 32, 18},
    {ggml_type::q4_1, "Q4_1", 32, 20},     {ggml_type::q5_0, "Q5_0", 32, 22},      {ggml_type::q5_1, "Q5_1", 32, 24},
    {ggml_type::q8_0, "Q8_0", 32, 34},     {ggml_type::q8_1, "Q8_1", 32, 36},      {ggml_type::q2_k, "Q2_K", 256, 84},
    {ggml_type::q3_k, "Q3_K", 256, 110},   {ggml_type::q4_k, "Q4_K", 256, 144},    {ggml_type::q5_k, "Q5_K", 256, 176},
    {ggml_type::q6_k, "Q6_K", 256, 210},   {ggml_type::q8_k, "Q8_K", 256, 292},    {ggml_type::iq2_xxs, "IQ2_XXS", 256, 66},
    {ggml_type::iq2_xs, "IQ2_XS", 256, 74}, {ggml_type::iq3_xxs, "IQ3_XXS", 256, 98}, {ggml_type::iq1_s, "IQ1_S", 256, 50},
    {ggml_type::iq4_nl, "IQ4_NL", 32, 18}, {ggml_type::iq3_s, "IQ3_S", 256, 110},  {ggml_type::iq2_s, "IQ2_S", 256, 82},
    {ggml_type::iq4_xs, "IQ4_XS", 256, 136}, {ggml_type::i8, "I8", 1, 1},          {ggml_type::i16, "I16", 1, 2},
    {ggml_type::i32, "I32", 1, 4},         {ggml_type::i64, "I64", 1, 8},          {ggml_type::f64, "F64", 1, 8},
    {ggml_type::iq1_m, "IQ1_M", 256, 56},  {ggml_type::bf16, "BF16", 1, 2},        {ggml_type::tq1_0, "TQ1_0", 256, 54},
    {ggml_type::tq2_0, "TQ2_0", 256, 66},  {ggml_type::mxfp4, "MXFP4", 32, 17},
}};

inline const ggml_type_entry* find_ggml_type(std::uint32_t number) {
    for (const auto& entry : ggml_types)
        if (static_cast<std::uint32_t>(entry.type) == number) return &entry;
    return nullptr;
}

}  // namespace detail

/// A ggml type's name: "F32", "Q4_0", "Q4_K", ...
inline std::string_view ggml_type_name(ggml_type type) {
    const auto* entry = detail::find_ggml_type(static_cast<std::uint32_t>(type));
    return entry != nullptr ? entry->name : "unknown";
}

/// Whether `gguf_file::read` takes tensors of this type (as float), and those types in words.
inline bool ggml_type_readable(ggml_type type) {
    return type == ggml_type::f32 || type == ggml_type::f16 || type == ggml_type::bf16 || type == ggml_type::f64 ||
           type == ggml_type::q8_0 || type == ggml_type::q4_0;
}
inline constexpr std::string_view ggml_readable_types = "F32, F16, BF16, F64, Q8_0 and Q4_0";

/// The types of GGUF metadata values, by their numbers in the file.
enum class gguf_value_type : std::uint32_t {
    u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8, array = 9,
    u64 = 10, i64 = 11, f64 = 12,
};

/// A metadata value: its type as stored and its value, integers widened (signed or unsigned), floats
/// as double, arrays as their elements (`element_type` then names their type).
struct gguf_value {
    gguf_value_type type{};
    gguf_value_type element_type{};  ///< arrays only
    std::variant<std::uint64_t, std::int64_t, double, bool, std::string, std::vector<gguf_value>> value;
};

/// A tensor of a GGUF file: its name, its dimensions as the file lists them (the fastest-varying
/// first: a [rows, cols] matrix is {cols, rows}), its type, and where its bytes lie.
struct gguf_tensor {
    std::string name;
    std::vector<std::uint64_t> dims;
    ggml_type type{};
    std::uint64_t offset = 0;  ///< from the start of the data section
    std::uint64_t bytes = 0;
    std::uint32_t part = 0;    ///< which file of a split model holds it (0: the first)

    [[nodiscard]] std::uint64_t numel() const {
        std::uint64_t n = 1;
        for (const auto d : dims) n *= d;
        return n;
    }
    /// Rows as a matrix: the product of every dimension but the first (1 for a scalar, of no dimension).
    [[nodiscard]] std::uint64_t rows() const { return numel() / cols(); }
    /// Values per row: the first dimension.
    [[nodiscard]] std::uint64_t cols() const { return dims.empty() ? 1 : dims[0]; }
};

/// A read-only, memory-mapped GGUF file, validated on open (see the top of this header). Move-only.
class gguf_file {
public:
    /// Maps and validates `path`; io_error naming the file and the problem (key, tensor, offset).
    explicit gguf_file(const std::filesystem::path& path) : gguf_file(path, 0) { open_parts(); }

    [[nodiscard]] const std::filesystem::path& path() const { return path_; }
    /// The files of a split model (`<name>-00001-of-0000N.gguf`, llama.cpp's gguf-split: the metadata in
    /// the first, `split.count` N, each file's tensors its own); 1 for a whole one.
    [[nodiscard]] std::size_t files() const { return parts_.size() + 1; }

    /// The GGUF version (2 or 3).
    [[nodiscard]] std::uint32_t version() const { return version_; }
    /// The alignment of the tensor data (`general.alignment`, default 32).
    [[nodiscard]] std::uint64_t alignment() const { return alignment_; }

    /// The metadata, by key.
    [[nodiscard]] const std::map<std::string, gguf_value, std::less<>>& metadata() const { return metadata_; }
    [[nodiscard]] bool contains_key(std::string_view key) const { return metadata_.find(key) != metadata_.end(); }
    /// The value of `key`; io_error naming the key when absent.
    [[nodiscard]] const gguf_value& value(std::string_view key) const {
        const auto found = metadata_.find(key);
        if (found == metadata_.end()) fail("no metadata key '" + std::string(key) + "'");
        return found->second;
    }
    /// An integer value (any of the integer types); io_error naming the key for another type, or for a
    /// value beyond int64.
    [[nodiscard]] std::int64_t integer(std::string_view key) const { return as_integer(key, value(key)); }
    /// A number (integer or float) as double.
    [[nodiscard]] double number(std::string_view key) const {
        const gguf_value& v = value(key);
        if (const auto* d = std::get_if<double>(&v.value)) return *d;
        return static_cast<double>(as_integer(key, v));
    }
    [[nodiscard]] bool boolean(std::string_view key) const { return get<bool>(key, "a boolean"); }
    [[nodiscard]] const std::string& string(std::string_view key) const { return get<std::string>(key, "a string"); }
    [[nodiscard]] const std::vector<gguf_value>& array(std::string_view key) const {
        return get<std::vector<gguf_value>>(key, "an array");
    }

    /// The tensors in the order the file lists them.
    [[nodiscard]] const std::vector<gguf_tensor>& tensors() const { return tensors_; }
    [[nodiscard]] bool contains(std::string_view name) const { return by_name_.find(name) != by_name_.end(); }
    /// Tensor `name`; io_error naming it when absent.
    [[nodiscard]] const gguf_tensor& tensor(std::string_view name) const {
        const auto found = by_name_.find(name);
        if (found == by_name_.end()) fail("no tensor '" + std::string(name) + "'");
        return tensors_[found->second];
    }
    /// The bytes of tensor `name` (aligned as the file's alignment, from a page-aligned mapping).
    [[nodiscard]] std::span<const std::byte> bytes(std::string_view name) const {
        const gguf_tensor& t = tensor(name);
        const gguf_file& holder = t.part == 0 ? *this : *parts_[t.part - 1];
        return {holder.mapping_.data() + holder.data_offset_ + t.offset, static_cast<std::size_t>(t.bytes)};
    }

    /// Tensor `name` as float values (F32, F16, BF16, F64; Q8_0 and Q4_0 dequantized: scale times value),
    /// into `out`, which must hold exactly its values (else shape_error); io_error naming the tensor and
    /// its type for another type.
    void read(std::string_view name, std::span<float> out) const { read_rows(name, 0, tensor(name).rows(), out); }

    /// Rows [first, first + rows) of tensor `name` seen as a matrix (`gguf_tensor::rows`, `cols`) as float
    /// values, as `read`; out must hold rows x cols values. shape_error for rows outside the tensor.
    void read_rows(std::string_view name, std::uint64_t first, std::uint64_t rows, std::span<float> out) const {
        const gguf_tensor& t = tensor(name);
        if (first > t.rows() || rows > t.rows() - first)
            throw shape_error(path_.string() + ": rows [" + std::to_string(first) + ", " + std::to_string(first + rows) +
                              ") of tensor '" + t.name + "', which has " + std::to_string(t.rows()));
        if (out.size() != rows * t.cols())
            throw shape_error(path_.string() + ": " + std::to_string(rows) + " rows of tensor '" + t.name + "' hold " +
                              std::to_string(rows * t.cols()) + " values but the output holds " + std::to_string(out.size()));
        const std::uint64_t row_bytes = t.bytes / std::max<std::uint64_t>(t.rows(), 1);
        const std::byte* source = bytes(name).data() + first * row_bytes;
        const auto each = [&](std::size_t size, auto convert) {
            for (std::size_t i = 0; i < out.size(); ++i) out[i] = convert(source + i * size);
        };
        const auto load = [](const std::byte* p, auto zero) {
            decltype(zero) v;
            std::memcpy(&v, p, sizeof v);
            return v;
        };
        switch (t.type) {
            case ggml_type::f32: return each(4, [&](const std::byte* p) { return load(p, 0.0f); });
            case ggml_type::f64: return each(8, [&](const std::byte* p) { return static_cast<float>(load(p, 0.0)); });
            case ggml_type::f16:
                return each(2, [&](const std::byte* p) { return detail::f16_to_float(load(p, std::uint16_t{})); });
            case ggml_type::bf16:
                return each(2, [&](const std::byte* p) { return detail::bf16_to_float(load(p, std::uint16_t{})); });
            case ggml_type::q8_0: return dequantize_blocks<q8_0_block>(source, out);
            case ggml_type::q4_0: return dequantize_blocks<q4_0_block>(source, out);
            default:
                fail("tensor '" + t.name + "' has type " + std::string(ggml_type_name(t.type)) + "; this library reads " +
                     std::string(ggml_readable_types) + " tensors");
        }
    }

    /// Whether tensor `name` holds blocks of `Block` (Q8_0 for q8_0_block, Q4_0 for q4_0_block).
    template <quantized_block Block>
    [[nodiscard]] bool holds(std::string_view name) const {
        return tensor(name).type == (std::is_same_v<Block, q8_0_block> ? ggml_type::q8_0 : ggml_type::q4_0);
    }
    /// Rows [first, first + rows) of tensor `name` as blocks (ggml's layout, row by row) into `out` (copied:
    /// a file's alignment may leave them at odd addresses); the tensor must hold them (`holds`), else
    /// io_error; shape_error for rows outside it or an output of another size.
    template <quantized_block Block>
    void read_blocks(std::string_view name, std::uint64_t first, std::uint64_t rows, std::span<Block> out) const {
        const gguf_tensor& t = tensor(name);
        if (!holds<Block>(name))
            fail("tensor '" + t.name + "' has type " + std::string(ggml_type_name(t.type)) + ", not " +
                 (std::is_same_v<Block, q8_0_block> ? "Q8_0" : "Q4_0"));
        const std::uint64_t per_row = t.cols() / quant_block;
        if (first > t.rows() || rows > t.rows() - first || out.size() != rows * per_row)
            throw shape_error(path_.string() + ": rows [" + std::to_string(first) + ", " + std::to_string(first + rows) +
                              ") of tensor '" + t.name + "' (" + std::to_string(t.rows()) + " rows of " + std::to_string(per_row) +
                              " blocks) into " + std::to_string(out.size()) + " blocks");
        std::memcpy(out.data(), bytes(name).data() + first * per_row * sizeof(Block), out.size() * sizeof(Block));
    }

private:
    // One file of a model, part `part` (0-based) of a split one.
    gguf_file(const std::filesystem::path& path, std::uint32_t part) : path_(path) {
        mapping_ = detail::map_readonly(path_, 24, "a GGUF header (24)", [&](const std::string& problem) { fail(problem); });
        parse(part);
    }

    // A split model's other files, named after the first; their tensors join this file's table.
    void open_parts() {
        if (!contains_key("split.count")) return;
        const std::int64_t count = integer("split.count"), no = contains_key("split.no") ? integer("split.no") : 0;
        if (count < 1 || count > 99999) fail("'split.count' is " + std::to_string(count) + " (1 to 99999 expected)");
        if (no != 0)
            fail("is file " + std::to_string(no + 1) + " of a split model of " + std::to_string(count) +
                 " files; open the first (-00001-of-...)");
        if (count == 1) return;
        const auto five = [](std::int64_t i) {
            const std::string digits = std::to_string(i);
            return std::string(5 - std::min<std::size_t>(5, digits.size()), '0') + digits;
        };
        const std::string file = path_.filename().string(), suffix = "-00001-of-" + five(count) + ".gguf";
        if (file.size() <= suffix.size() || file.compare(file.size() - suffix.size(), suffix.size(), suffix) != 0)
            fail("is the first of " + std::to_string(count) + " files of a split model but is not named <name>" + suffix);
        const std::string stem = file.substr(0, file.size() - suffix.size());
        for (std::int64_t i = 2; i <= count; ++i) {
            const auto next = path_.parent_path() / (stem + "-" + five(i) + "-of-" + five(count) + ".gguf");
            std::unique_ptr<gguf_file> part(new gguf_file(next, static_cast<std::uint32_t>(i - 1)));
            if (!part->contains_key("split.no") || part->integer("split.no") != i - 1 || !part->contains_key("split.count") ||
                part->integer("split.count") != count)
                part->fail("is not file " + std::to_string(i) + " of the " + std::to_string(count) + " of " + path_.string() +
                           " (its split.no and split.count say otherwise)");
            for (const gguf_tensor& t : part->tensors_) {
                if (!by_name_.emplace(t.name, tensors_.size()).second)
                    part->fail("tensor '" + t.name + "' is also in another file of the model");
                tensors_.push_back(t);
            }
            parts_.push_back(std::move(part));
        }
        if (contains_key("split.tensors.count") && integer("split.tensors.count") != static_cast<std::int64_t>(tensors_.size()))
            fail("'split.tensors.count' is " + std::to_string(integer("split.tensors.count")) + " but the " +
                 std::to_string(count) + " files hold " + std::to_string(tensors_.size()) + " tensors");
    }

    // Nested arrays deeper than this are refused (the specification allows nesting; real files use
    // none): keeps a crafted file from exhausting the stack.
    static constexpr std::size_t max_depth = 8;

    [[noreturn]] void fail(const std::string& problem) const { throw io_error(path_.string() + ": " + problem); }

    template <class T>
    const T& get(std::string_view key, const char* expected) const {
        const gguf_value& v = value(key);
        if (const auto* p = std::get_if<T>(&v.value)) return *p;
        fail("metadata key '" + std::string(key) + "' is not " + expected);
    }

    std::int64_t as_integer(std::string_view key, const gguf_value& v) const {
        if (const auto* i = std::get_if<std::int64_t>(&v.value)) return *i;
        if (const auto* u = std::get_if<std::uint64_t>(&v.value)) {
            if (*u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
                fail("metadata key '" + std::string(key) + "' holds " + std::to_string(*u) + ", beyond int64");
            return static_cast<std::int64_t>(*u);
        }
        fail("metadata key '" + std::string(key) + "' is not an integer");
    }

    template <class Block>
    static void dequantize_blocks(const std::byte* source, std::span<float> out) {
        std::vector<Block> blocks(out.size() / quant_block);
        std::memcpy(blocks.data(), source, blocks.size() * sizeof(Block));
        kernels::dequantize(blocks.data(), static_cast<index>(out.size()), out.data());
    }

    // The reader of the header: a cursor over the mapped bytes that fails, naming what it read, at the
    // end of the file.
    struct cursor {
        const gguf_file& file;
        std::uint64_t at = 0;

        [[nodiscard]] std::uint64_t left() const { return file.mapping_.size() - at; }
        // What is read, for an error: a string, or a function that makes one (built only on failure).
        template <class What>
        static std::string text(const What& what) {
            if constexpr (std::is_invocable_v<const What&>)
                return what();
            else
                return what;
        }
        template <class What>
        void need(std::uint64_t n, const What& what) const {
            if (n > left())
                file.fail(text(what) + " at byte " + std::to_string(at) + " needs " + std::to_string(n) + " bytes; " +
                          std::to_string(left()) + " are left");
        }
        template <class T, class What>
        T read(const What& what) {
            need(sizeof(T), what);
            T v;
            std::memcpy(&v, file.mapping_.data() + at, sizeof v);
            at += sizeof v;
            return v;
        }
        template <class What>
        std::string string(const What& what) {
            const auto length = read<std::uint64_t>([&] { return text(what) + " (its length)"; });
            need(length, what);
            std::string s(reinterpret_cast<const char*>(file.mapping_.data() + at), static_cast<std::size_t>(length));
            at += length;
            return s;
        }
    };

    // The smallest number of bytes a value of this type takes (a count of them must fit what is left).
    static std::uint64_t min_bytes(gguf_value_type type) {
        switch (type) {
            case gguf_value_type::u8: case gguf_value_type::i8: case gguf_value_type::boolean: return 1;
            case gguf_value_type::u16: case gguf_value_type::i16: return 2;
            case gguf_value_type::u32: case gguf_value_type::i32: case gguf_value_type::f32: return 4;
            case gguf_value_type::u64: case gguf_value_type::i64: case gguf_value_type::f64: return 8;
            case gguf_value_type::string: return 8;
            case gguf_value_type::array: return 12;
        }
        return 1;
    }

    // A value of `type` for metadata key `key` (`where`: "metadata key '<key>'"), inside arrays at the
    // indices `path` (named in an error only, so that an array of n elements costs O(n)).
    gguf_value read_value(cursor& c, std::uint32_t type, const std::string& where, std::vector<std::uint64_t>& path) const {
        const auto label = [&] {
            std::string s = where;
            for (const auto i : path) s += "[" + std::to_string(i) + "]";
            return s;
        };
        if (type > static_cast<std::uint32_t>(gguf_value_type::f64))
            fail(label() + " has value type " + std::to_string(type) + ", not one of GGUF's (0 to 12)");
        gguf_value v;
        v.type = static_cast<gguf_value_type>(type);
        switch (v.type) {
            case gguf_value_type::u8: v.value = std::uint64_t{c.read<std::uint8_t>(label)}; break;
            case gguf_value_type::u16: v.value = std::uint64_t{c.read<std::uint16_t>(label)}; break;
            case gguf_value_type::u32: v.value = std::uint64_t{c.read<std::uint32_t>(label)}; break;
            case gguf_value_type::u64: v.value = c.read<std::uint64_t>(label); break;
            case gguf_value_type::i8: v.value = std::int64_t{c.read<std::int8_t>(label)}; break;
            case gguf_value_type::i16: v.value = std::int64_t{c.read<std::int16_t>(label)}; break;
            case gguf_value_type::i32: v.value = std::int64_t{c.read<std::int32_t>(label)}; break;
            case gguf_value_type::i64: v.value = c.read<std::int64_t>(label); break;
            case gguf_value_type::f32: v.value = double{c.read<float>(label)}; break;
            case gguf_value_type::f64: v.value = c.read<double>(label); break;
            case gguf_value_type::boolean: {
                const auto b = c.read<std::uint8_t>(label);
                if (b > 1) fail(label() + " is a boolean stored as " + std::to_string(b) + " (0 or 1 expected)");
                v.value = b == 1;
                break;
            }
            case gguf_value_type::string: v.value = c.string(label); break;
            case gguf_value_type::array: {
                if (path.size() >= max_depth) fail(label() + " nests arrays deeper than " + std::to_string(max_depth));
                const auto element = c.read<std::uint32_t>([&] { return label() + " (its element type)"; });
                const auto count = c.read<std::uint64_t>([&] { return label() + " (its length)"; });
                if (element > static_cast<std::uint32_t>(gguf_value_type::f64))
                    fail(label() + " is an array of value type " + std::to_string(element) + ", not one of GGUF's (0 to 12)");
                v.element_type = static_cast<gguf_value_type>(element);
                if (count > c.left() / min_bytes(v.element_type))
                    fail(label() + " claims " + std::to_string(count) + " elements; the " + std::to_string(c.left()) +
                         " bytes left cannot hold them");
                std::vector<gguf_value> items;
                items.reserve(static_cast<std::size_t>(count));
                path.push_back(0);
                for (std::uint64_t i = 0; i < count; ++i) {
                    path.back() = i;
                    items.push_back(read_value(c, element, where, path));
                }
                path.pop_back();
                v.value = std::move(items);
                break;
            }
        }
        return v;
    }

    void parse(std::uint32_t part) {
        cursor c{*this};
        if (std::memcmp(mapping_.data(), "GGUF", 4) != 0) fail("not a GGUF file (its first bytes are not \"GGUF\")");
        c.at = 4;
        version_ = c.read<std::uint32_t>("the version");
        if (version_ != 2 && version_ != 3)
            fail("GGUF version " + std::to_string(version_) + " is not supported (2 and 3 are)");
        const auto tensor_count = c.read<std::uint64_t>("the tensor count");
        const auto key_count = c.read<std::uint64_t>("the metadata count");
        // A key/value takes at least 13 bytes (an empty key, a type, one byte), a tensor info 28.
        if (key_count > c.left() / 13) fail("the metadata count " + std::to_string(key_count) + " exceeds what the file can hold");
        if (tensor_count > c.left() / 28) fail("the tensor count " + std::to_string(tensor_count) + " exceeds what the file can hold");

        for (std::uint64_t k = 0; k < key_count; ++k) {
            std::string key = c.string("metadata key " + std::to_string(k));
            const std::string where = "metadata key '" + key + "'";
            const auto type = c.read<std::uint32_t>(where + " (its type)");
            std::vector<std::uint64_t> path;
            gguf_value v = read_value(c, type, where, path);
            if (!metadata_.emplace(std::move(key), std::move(v)).second) fail(where + " appears twice");
        }
        if (const auto found = metadata_.find("general.alignment"); found != metadata_.end()) {
            const auto* a = std::get_if<std::uint64_t>(&found->second.value);
            if (found->second.type != gguf_value_type::u32 || a == nullptr || *a == 0 || (*a & (*a - 1)) != 0)
                fail("metadata key 'general.alignment' must be a uint32 power of two");
            alignment_ = *a;
        }

        tensors_.reserve(static_cast<std::size_t>(tensor_count));
        for (std::uint64_t i = 0; i < tensor_count; ++i) {
            gguf_tensor t;
            t.part = part;
            t.name = c.string("the name of tensor " + std::to_string(i));
            const std::string where = "tensor '" + t.name + "'";
            if (t.name.empty()) fail("tensor " + std::to_string(i) + " has an empty name");
            const auto dims = c.read<std::uint32_t>(where + " (its number of dimensions)");
            if (dims > 4) fail(where + " has " + std::to_string(dims) + " dimensions (at most 4 expected)");
            std::uint64_t numel = 1;
            for (std::uint32_t d = 0; d < dims; ++d) {
                const auto n = c.read<std::uint64_t>(where + " (dimension " + std::to_string(d) + ")");
                if (n == 0 || n > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / numel)
                    fail(where + " has dimension " + std::to_string(d) + " = " + std::to_string(n) +
                         (n == 0 ? "" : ": the tensor's size overflows"));
                numel *= n;
                t.dims.push_back(n);
            }
            const auto type = c.read<std::uint32_t>(where + " (its type)");
            const auto* entry = detail::find_ggml_type(type);
            if (entry == nullptr) fail(where + " has ggml type " + std::to_string(type) + ", which this reader does not know");
            t.type = entry->type;
            if (t.cols() % entry->block_values != 0)
                fail(where + " of type " + std::string(entry->name) + " has rows of " + std::to_string(t.cols()) +
                     " values, not a multiple of its blocks' " + std::to_string(entry->block_values));
            if (numel / entry->block_values > std::numeric_limits<std::uint64_t>::max() / entry->block_bytes)
                fail(where + " of " + std::to_string(numel) + " values: its size in bytes overflows");
            t.bytes = numel / entry->block_values * entry->block_bytes;
            t.offset = c.read<std::uint64_t>(where + " (its offset)");
            if (!by_name_.emplace(t.name, tensors_.size()).second) fail(where + " appears twice");
            tensors_.push_back(std::move(t));
        }

        data_offset_ = (c.at + alignment_ - 1) / alignment_ * alignment_;
        if (data_offset_ > mapping_.size() && !tensors_.empty()) fail("the file ends before its tensor data");
        const std::uint64_t data_size = mapping_.size() - std::min<std::uint64_t>(data_offset_, mapping_.size());
        std::vector<const gguf_tensor*> order;
        for (const gguf_tensor& t : tensors_) {
            if (t.offset % alignment_ != 0)
                fail("tensor '" + t.name + "' starts at offset " + std::to_string(t.offset) + ", not a multiple of the alignment " +
                     std::to_string(alignment_));
            if (t.offset > data_size || t.bytes > data_size - t.offset)
                fail("tensor '" + t.name + "' (" + std::to_string(t.bytes) + " bytes at offset " + std::to_string(t.offset) +
                     ") extends past the end of the file (" + std::to_string(data_size) + " bytes of data)");
            order.push_back(&t);
        }
        std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) { return a->offset < b->offset; });
        for (std::size_t i = 1; i < order.size(); ++i)
            if (order[i - 1]->offset + order[i - 1]->bytes > order[i]->offset)
                fail("tensors '" + order[i - 1]->name + "' and '" + order[i]->name + "' overlap");
    }

    std::filesystem::path path_;
    detail::mapping mapping_;
    std::uint32_t version_ = 0;
    std::uint64_t alignment_ = 32;
    std::uint64_t data_offset_ = 0;
    std::map<std::string, gguf_value, std::less<>> metadata_;
    std::vector<gguf_tensor> tensors_;
    std::map<std::string, std::size_t, std::less<>> by_name_;
    std::vector<std::unique_ptr<gguf_file>> parts_;  // the other files of a split model
};

}  // namespace moe::io
