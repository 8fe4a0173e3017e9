#include "moe/io/safetensors.hpp"

#include "moe/error.hpp"

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using moe::io::dtype;
using moe::io::safetensors_file;
using moe::io::tensor_to_write;
using moe::io::write_safetensors;

/// A uniquely named directory under the system temporary directory, removed on destruction.
class temp_dir {
public:
    temp_dir() {
        std::random_device random;
        do {
            path_ = fs::temp_directory_path() / ("moe_test_safetensors_" +
                                                 std::to_string(::getpid()) + "_" +
                                                 std::to_string(random()));
        } while (!fs::create_directory(path_));
    }
    temp_dir(const temp_dir&) = delete;
    temp_dir& operator=(const temp_dir&) = delete;
    ~temp_dir() {
        std::error_code ignored;
        fs::remove_all(path_, ignored);
    }

    fs::path operator/(const std::string& name) const { return path_ / name; }

    /// Names of the entries in the directory, to check that nothing was left behind.
    std::vector<std::string> entries() const {
        std::vector<std::string> names;
        for (const auto& entry : fs::directory_iterator(path_)) {
            names.push_back(entry.path().filename().string());
        }
        std::sort(names.begin(), names.end());
        return names;
    }

private:
    fs::path path_;
};

std::string u64_le(std::uint64_t value) {
    std::string bytes(8, '\0');
    for (std::size_t i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xFF);
    return bytes;
}

/// The bytes of a safetensors file with the given header text and data section.
std::string file_bytes(const std::string& header, const std::string& data = {}) {
    return u64_le(header.size()) + header + data;
}

std::string u16_le(std::span<const std::uint16_t> values) {
    std::string bytes;
    for (const std::uint16_t value : values) {
        bytes += static_cast<char>(value & 0xFF);
        bytes += static_cast<char>(value >> 8);
    }
    return bytes;
}

void write_file(const fs::path& path, const std::string& contents) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    REQUIRE(out.good());
}

std::vector<std::uint16_t> as_u16(std::span<const std::byte> bytes) {
    std::vector<std::uint16_t> values(bytes.size() / 2);
    std::memcpy(values.data(), bytes.data(), values.size() * 2);
    return values;
}

float from_bits(std::uint32_t bits) { return std::bit_cast<float>(bits); }

}  // namespace

TEST_CASE("safetensors: round trip of F32, BF16, F16 and I64 tensors with metadata") {
    temp_dir dir;
    const fs::path path = dir / "model.safetensors";
    const std::vector<float> weight{1.0f, -2.5f, 3.25f, 0.0f, -0.125f, 1e-3f};
    const std::vector<float> bf_values{1.0f, -2.0f, 3.140625f, 0.5f};
    const std::vector<float> half_values{1.0f, -2.0f, 65504.0f, 0x1p-24f};
    const std::vector<std::int64_t> ids{std::numeric_limits<std::int64_t>::min(), -1, 0,
                                        std::numeric_limits<std::int64_t>::max()};
    const std::vector<float> scale{0.75f};
    const std::vector<tensor_to_write> tensors{
        {.name = "layer.weight", .shape = {2, 3}, .type = dtype::f32, .values = weight},
        {.name = "bf", .shape = {4}, .type = dtype::bf16, .values = bf_values},
        {.name = "half", .shape = {2, 2}, .type = dtype::f16, .values = half_values},
        {.name = "ids", .shape = {2, 2}, .type = dtype::i64, .integers = ids},
        {.name = "scale", .shape = {}, .type = dtype::f32, .values = scale},
    };
    const moe::io::metadata_map metadata{{"format", "pt"}, {"note", "caf\xc3\xa9"}};
    write_safetensors(path, tensors, metadata);
    REQUIRE(dir.entries() == std::vector<std::string>{"model.safetensors"});

    const safetensors_file file(path);
    CHECK(file.path() == path);
    CHECK(file.names() == std::vector<std::string>{"bf", "half", "ids", "layer.weight", "scale"});
    CHECK(file.metadata() == metadata);
    CHECK(file.contains("ids"));
    CHECK_FALSE(file.contains("missing"));

    const moe::io::tensor_info& info = file.info("layer.weight");
    CHECK(info.name == "layer.weight");
    CHECK(info.type == dtype::f32);
    CHECK(info.shape == std::vector<std::int64_t>{2, 3});
    CHECK(info.numel() == 6);
    CHECK(info.end - info.begin == 24);
    CHECK(file.info("bf").type == dtype::bf16);
    CHECK(file.info("half").type == dtype::f16);
    CHECK(file.info("ids").type == dtype::i64);
    CHECK(file.info("scale").numel() == 1);

    std::vector<float> out(6);
    file.read<float>("layer.weight", out, std::vector<std::int64_t>{2, 3});
    CHECK(out == weight);
    std::vector<double> out_double(6);
    file.read<double>("layer.weight", out_double);
    for (std::size_t i = 0; i < weight.size(); ++i) CHECK(out_double[i] == double{weight[i]});

    std::vector<float> bf_out(4);
    file.read<float>("bf", bf_out);
    CHECK(bf_out == bf_values);
    std::vector<float> half_out(4);
    file.read<float>("half", half_out, std::vector<std::int64_t>{2, 2});
    CHECK(half_out == half_values);
    CHECK(file.read_integers("ids") == ids);
    std::vector<float> scale_out(1);
    file.read<float>("scale", scale_out, std::span<const std::int64_t>{});
    CHECK(scale_out == scale);

    // The header is space-padded so that the data section starts 8-byte aligned.
    std::uint64_t header_size = 0;
    std::ifstream raw(path, std::ios::binary);
    raw.read(reinterpret_cast<char*>(&header_size), 8);
    CHECK((8 + header_size) % 8 == 0);
    CHECK(fs::file_size(path) == 8 + header_size + 24 + 8 + 8 + 32 + 4);
}

TEST_CASE("safetensors: a hand-written file with unaligned tensors and header padding") {
    temp_dir dir;
    const fs::path path = dir / "a.safetensors";
    const float b_values[2] = {1.5f, -2.25f};
    std::string data = "\x07";
    data.append(reinterpret_cast<const char*>(b_values), sizeof b_values);
    data += std::string("\xfe\xff", 2);  // I16 -2
    write_file(path, file_bytes(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                                R"("b":{"dtype":"F32","shape":[2,1],"data_offsets":[1,9]},)"
                                R"("c":{"dtype":"I16","shape":[1],"data_offsets":[9,11]}}   )",
                                data));
    const safetensors_file file(path);
    CHECK(file.metadata().empty());
    CHECK(file.read_integers("a") == std::vector<std::int64_t>{7});
    CHECK(file.read_integers("c") == std::vector<std::int64_t>{-2});
    std::vector<float> b(2);
    file.read<float>("b", b);
    CHECK(b == std::vector<float>{1.5f, -2.25f});
    std::vector<double> b_double(2);
    file.read<double>("b", b_double, std::vector<std::int64_t>{2, 1});
    CHECK(b_double == std::vector<double>{1.5, -2.25});
    const std::span<const std::byte> bytes = file.bytes("b");
    REQUIRE(bytes.size() == 8);
    CHECK(std::memcmp(bytes.data(), b_values, 8) == 0);
}

TEST_CASE("safetensors: F16 and BF16 decoding") {
    temp_dir dir;
    const fs::path path = dir / "half.safetensors";
    const std::vector<std::uint16_t> f16_bits{0x3C00, 0xC000, 0x7BFF, 0x0001, 0x03FF,
                                              0x0400, 0x7C00, 0xFC00, 0x7E00, 0x8000};
    const std::vector<std::uint16_t> bf16_bits{0x3F80, 0x4049, 0xFF80, 0x7FC0, 0x0001};
    write_file(path, file_bytes(R"({"f16":{"dtype":"F16","shape":[10],"data_offsets":[0,20]},)"
                                R"("bf16":{"dtype":"BF16","shape":[5],"data_offsets":[20,30]}})",
                                u16_le(f16_bits) + u16_le(bf16_bits)));
    const safetensors_file file(path);

    std::vector<float> f16(10);
    file.read<float>("f16", f16);
    CHECK(f16[0] == 1.0f);
    CHECK(f16[1] == -2.0f);
    CHECK(f16[2] == 65504.0f);
    CHECK(f16[3] == 0x1p-24f);
    CHECK(f16[4] == 1023 * 0x1p-24f);
    CHECK(f16[5] == 0x1p-14f);
    CHECK(f16[6] == std::numeric_limits<float>::infinity());
    CHECK(f16[7] == -std::numeric_limits<float>::infinity());
    CHECK(std::isnan(f16[8]));
    CHECK(f16[9] == 0.0f);
    CHECK(std::signbit(f16[9]));

    std::vector<double> bf16(5);
    file.read<double>("bf16", bf16);
    CHECK(bf16[0] == 1.0);
    CHECK(bf16[1] == 3.140625);
    CHECK(bf16[2] == -std::numeric_limits<double>::infinity());
    CHECK(std::isnan(bf16[3]));
    CHECK(bf16[4] == double{from_bits(0x0001'0000)});
}

TEST_CASE("safetensors: reading into bf16 keeps BF16 bits and rounds the other dtypes to nearest even", "[bf16]") {
    temp_dir dir;
    const fs::path path = dir / "to_bf16.safetensors";
    // 1 + 2^-8 (halfway: to even, 1), 1 + 3 * 2^-8 (halfway: up, 1 + 2^-6), a NaN with payload.
    const std::vector<float> f32{1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -2.5f, from_bits(0x7FC1'2345)};
    const std::vector<std::uint16_t> bf16_bits{0x3F80, 0x4049, 0xFF80, 0x7FC1, 0x0001};
    const std::vector<std::uint16_t> f16_bits{0x3C01};  // 1 + 2^-10: rounds to 1
    std::string f32_bytes(f32.size() * 4, '\0');
    std::memcpy(f32_bytes.data(), f32.data(), f32_bytes.size());
    write_file(path, file_bytes(R"({"f32":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                R"("bf16":{"dtype":"BF16","shape":[5],"data_offsets":[16,26]},)"
                                R"("f16":{"dtype":"F16","shape":[1],"data_offsets":[26,28]}})",
                                f32_bytes + u16_le(bf16_bits) + u16_le(f16_bits)));
    const safetensors_file file(path);
    const auto bits = [](moe::bf16 v) { return Eigen::numext::bit_cast<std::uint16_t>(v); };
    std::vector<moe::bf16> from_f32(4), from_bf16(5), from_f16(1);
    file.read<moe::bf16>("f32", from_f32);
    file.read<moe::bf16>("bf16", from_bf16);
    file.read<moe::bf16>("f16", from_f16);
    CHECK(bits(from_f32[0]) == 0x3F80);
    CHECK(bits(from_f32[1]) == 0x3F82);
    CHECK(bits(from_f32[2]) == 0xC020);
    CHECK(bits(from_f32[3]) == 0x7FC1);  // still a NaN, payload's upper half kept
    for (std::size_t i = 0; i < bf16_bits.size(); ++i) CHECK(bits(from_bf16[i]) == bf16_bits[i]);
    CHECK(bits(from_f16[0]) == 0x3F80);
}

TEST_CASE("safetensors: every F16 value survives decoding and re-encoding") {
    temp_dir dir;
    std::vector<std::uint16_t> all(65536);
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
    write_file(dir / "all.safetensors",
               file_bytes(R"({"all":{"dtype":"F16","shape":[65536],"data_offsets":[0,131072]}})",
                          u16_le(all)));
    std::vector<float> decoded(all.size());
    safetensors_file(dir / "all.safetensors").read<float>("all", decoded);

    const std::vector<tensor_to_write> tensors{
        {.name = "all", .shape = {65536}, .type = dtype::f16, .values = decoded}};
    write_safetensors(dir / "again.safetensors", tensors);
    const safetensors_file again(dir / "again.safetensors");
    const std::vector<std::uint16_t> encoded = as_u16(again.bytes("all"));
    REQUIRE(encoded.size() == all.size());
    for (std::size_t i = 0; i < all.size(); ++i) {
        const bool is_nan = (all[i] & 0x7C00) == 0x7C00 && (all[i] & 0x03FF) != 0;
        INFO("bits " << all[i]);
        if (is_nan) {
            CHECK(std::isnan(decoded[i]));
            CHECK((encoded[i] & 0x7C00) == 0x7C00);
            CHECK((encoded[i] & 0x03FF) != 0);
        } else {
            CHECK(encoded[i] == all[i]);
        }
    }
}

TEST_CASE("safetensors: BF16 and F16 encoding rounds to nearest even") {
    temp_dir dir;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    const std::vector<float> bf_in{1.0f,
                                   3.140625f,
                                   from_bits(0x3F80'8000),  // halfway, 0x3F80 is even
                                   from_bits(0x3F81'8000),  // halfway, 0x3F82 is even
                                   from_bits(0x3F80'8001),  // just above halfway
                                   from_bits(0x3F80'7FFF),  // just below halfway
                                   std::numeric_limits<float>::max(),
                                   -0.0f,
                                   -inf,
                                   nan};
    const std::vector<float> f16_in{1.0f,
                                    -2.0f,
                                    65504.0f,
                                    65519.0f,  // below the halfway point to 65536
                                    65520.0f,  // halfway; the "even" neighbour is infinity
                                    0x1p-24f,
                                    0x1p-25f,         // halfway between 0 and 2^-24, to 0
                                    1.5f * 0x1p-25f,  // above halfway, to 2^-24
                                    3.0f * 0x1p-25f,  // halfway between 1 and 2 units, to 2
                                    1023.5f * 0x1p-24f,  // halfway, to the smallest normal
                                    1.0f + 0x1p-11f,      // halfway, to 1.0
                                    1.0f + 3 * 0x1p-11f,  // halfway, to 1 + 2^-9
                                    1e-10f,
                                    -1e10f,
                                    inf,
                                    nan};
    const std::vector<tensor_to_write> tensors{
        {.name = "bf", .shape = {10}, .type = dtype::bf16, .values = bf_in},
        {.name = "half", .shape = {16}, .type = dtype::f16, .values = f16_in}};
    write_safetensors(dir / "r.safetensors", tensors);
    const safetensors_file file(dir / "r.safetensors");

    const std::vector<std::uint16_t> bf = as_u16(file.bytes("bf"));
    REQUIRE(bf.size() == 10);
    CHECK(bf[0] == 0x3F80);
    CHECK(bf[1] == 0x4049);
    CHECK(bf[2] == 0x3F80);
    CHECK(bf[3] == 0x3F82);
    CHECK(bf[4] == 0x3F81);
    CHECK(bf[5] == 0x3F80);
    CHECK(bf[6] == 0x7F80);
    CHECK(bf[7] == 0x8000);
    CHECK(bf[8] == 0xFF80);
    CHECK((bf[9] & 0x7F80) == 0x7F80);
    CHECK((bf[9] & 0x007F) != 0);

    const std::vector<std::uint16_t> half = as_u16(file.bytes("half"));
    REQUIRE(half.size() == 16);
    CHECK(half[0] == 0x3C00);
    CHECK(half[1] == 0xC000);
    CHECK(half[2] == 0x7BFF);
    CHECK(half[3] == 0x7BFF);
    CHECK(half[4] == 0x7C00);
    CHECK(half[5] == 0x0001);
    CHECK(half[6] == 0x0000);
    CHECK(half[7] == 0x0001);
    CHECK(half[8] == 0x0002);
    CHECK(half[9] == 0x0400);
    CHECK(half[10] == 0x3C00);
    CHECK(half[11] == 0x3C02);
    CHECK(half[12] == 0x0000);
    CHECK(half[13] == 0xFC00);
    CHECK(half[14] == 0x7C00);
    CHECK((half[15] & 0x7C00) == 0x7C00);
    CHECK((half[15] & 0x03FF) != 0);
}

TEST_CASE("safetensors: zero-element tensors and an empty data section") {
    temp_dir dir;
    const fs::path path = dir / "empty.safetensors";
    const std::vector<tensor_to_write> tensors{
        {.name = "rows", .shape = {0, 4}, .type = dtype::f32},
        {.name = "ids", .shape = {3, 0}, .type = dtype::i64},
        {.name = "halves", .shape = {0}, .type = dtype::f16},
    };
    write_safetensors(path, tensors);
    const safetensors_file file(path);
    CHECK(file.names() == std::vector<std::string>{"halves", "ids", "rows"});
    CHECK(file.info("rows").numel() == 0);
    CHECK(file.info("rows").shape == std::vector<std::int64_t>{0, 4});
    CHECK(file.bytes("rows").empty());
    std::vector<float> none;
    file.read<float>("rows", none, std::vector<std::int64_t>{0, 4});
    file.read<float>("halves", none);
    CHECK(file.read_integers("ids").empty());

    // With nothing but empty tensors, the file ends right after the header.
    std::ifstream raw(path, std::ios::binary);
    std::uint64_t header_size = 0;
    raw.read(reinterpret_cast<char*>(&header_size), 8);
    CHECK(fs::file_size(path) == 8 + header_size);

    write_safetensors(dir / "nothing.safetensors", {});
    CHECK(safetensors_file(dir / "nothing.safetensors").names().empty());
}

TEST_CASE("safetensors: read errors") {
    temp_dir dir;
    const fs::path path = dir / "m.safetensors";
    const std::vector<float> weight(6, 1.0f);
    const std::vector<std::int64_t> ids{1, 2};
    const std::vector<tensor_to_write> tensors{
        {.name = "weight", .shape = {2, 3}, .type = dtype::f32, .values = weight},
        {.name = "ids", .shape = {2}, .type = dtype::i64, .integers = ids}};
    write_safetensors(path, tensors);
    const safetensors_file file(path);
    std::vector<float> out(6);

    SECTION("wrong expected shape") {
        const std::vector<std::int64_t> expected{3, 2};
        REQUIRE_THROWS_AS(file.read<float>("weight", out, expected), moe::shape_error);
        REQUIRE_THROWS_WITH(file.read<float>("weight", out, expected),
                            Catch::Contains("weight") && Catch::Contains("[2, 3]") &&
                                Catch::Contains("[3, 2]") && Catch::Contains(path.string()));
        REQUIRE_THROWS_AS(file.read<float>("weight", out, std::vector<std::int64_t>{2, 3, 1}),
                          moe::shape_error);
    }
    SECTION("output of the wrong size") {
        std::vector<float> small(5);
        REQUIRE_THROWS_AS(file.read<float>("weight", small), moe::shape_error);
        REQUIRE_THROWS_WITH(file.read<float>("weight", small), Catch::Contains("weight"));
    }
    SECTION("integer tensor read as floats") {
        std::vector<float> two(2);
        REQUIRE_THROWS_AS(file.read<float>("ids", two), moe::io_error);
        REQUIRE_THROWS_WITH(file.read<float>("ids", two),
                            Catch::Contains("ids") && Catch::Contains("I64") &&
                                Catch::Contains("integer") && Catch::Contains(path.string()));
    }
    SECTION("float tensor read as integers") {
        REQUIRE_THROWS_AS(file.read_integers("weight"), moe::io_error);
        REQUIRE_THROWS_WITH(file.read_integers("weight"),
                            Catch::Contains("weight") && Catch::Contains("F32"));
    }
    SECTION("missing tensor") {
        REQUIRE_THROWS_AS(file.info("missing"), moe::io_error);
        REQUIRE_THROWS_WITH(file.bytes("missing"),
                            Catch::Contains(path.string() + ": no tensor 'missing'"));
        REQUIRE_THROWS_AS(file.read<float>("missing", out), moe::io_error);
    }
}

TEST_CASE("safetensors: a file is move-only and stays usable after moves") {
    temp_dir dir;
    const std::vector<float> values{4.0f, 5.0f};
    const std::vector<tensor_to_write> tensors{
        {.name = "v", .shape = {2}, .type = dtype::f32, .values = values}};
    write_safetensors(dir / "a.safetensors", tensors);
    write_safetensors(dir / "b.safetensors", tensors);
    static_assert(!std::is_copy_constructible_v<safetensors_file>);
    static_assert(std::is_nothrow_move_constructible_v<safetensors_file>);

    safetensors_file first(dir / "a.safetensors");
    safetensors_file second(std::move(first));
    safetensors_file third(dir / "b.safetensors");
    third = std::move(second);
    std::vector<float> out(2);
    third.read<float>("v", out);
    CHECK(out == values);
    CHECK(third.path() == dir / "a.safetensors");
}

TEST_CASE("safetensors: write validation leaves no file behind") {
    temp_dir dir;
    const fs::path path = dir / "out.safetensors";
    const std::vector<float> six(6, 1.0f);
    const std::vector<std::int64_t> two{1, 2};

    SECTION("value count does not match the shape") {
        const std::vector<tensor_to_write> tensors{
            {.name = "w", .shape = {2, 2}, .type = dtype::f32, .values = six}};
        REQUIRE_THROWS_AS(write_safetensors(path, tensors), moe::shape_error);
        REQUIRE_THROWS_WITH(write_safetensors(path, tensors),
                            Catch::Contains("'w'") && Catch::Contains("[2, 2]"));
    }
    SECTION("negative dimension") {
        const std::vector<tensor_to_write> tensors{
            {.name = "w", .shape = {-2, -3}, .type = dtype::f32, .values = six}};
        REQUIRE_THROWS_AS(write_safetensors(path, tensors), moe::shape_error);
    }
    SECTION("the second tensor is bad after a good first one") {
        const std::vector<tensor_to_write> tensors{
            {.name = "good", .shape = {6}, .type = dtype::f32, .values = six},
            {.name = "bad", .shape = {3}, .type = dtype::i64, .integers = two}};
        REQUIRE_THROWS_WITH(write_safetensors(path, tensors), Catch::Contains("'bad'"));
    }
    SECTION("duplicate name") {
        const std::vector<tensor_to_write> tensors{
            {.name = "w", .shape = {6}, .type = dtype::f32, .values = six},
            {.name = "w", .shape = {2}, .type = dtype::i64, .integers = two}};
        REQUIRE_THROWS_AS(write_safetensors(path, tensors), moe::value_error);
        REQUIRE_THROWS_WITH(write_safetensors(path, tensors), Catch::Contains("duplicate"));
    }
    SECTION("empty name") {
        const std::vector<tensor_to_write> tensors{
            {.name = "", .shape = {6}, .type = dtype::f32, .values = six}};
        REQUIRE_THROWS_AS(write_safetensors(path, tensors), moe::value_error);
    }
    SECTION("reserved name") {
        const std::vector<tensor_to_write> tensors{
            {.name = "__metadata__", .shape = {6}, .type = dtype::f32, .values = six}};
        REQUIRE_THROWS_AS(write_safetensors(path, tensors), moe::value_error);
    }
    SECTION("name that is not UTF-8") {
        const std::vector<tensor_to_write> tensors{
            {.name = "w\xff", .shape = {6}, .type = dtype::f32, .values = six}};
        REQUIRE_THROWS_AS(write_safetensors(path, tensors), moe::value_error);
    }
    SECTION("values given for an integer dtype") {
        const std::vector<tensor_to_write> tensors{
            {.name = "w", .shape = {6}, .type = dtype::i64, .values = six}};
        REQUIRE_THROWS_AS(write_safetensors(path, tensors), moe::value_error);
    }
    SECTION("dtype that cannot be written") {
        const std::vector<tensor_to_write> tensors{
            {.name = "w", .shape = {6}, .type = dtype::f64, .values = six}};
        REQUIRE_THROWS_AS(write_safetensors(path, tensors), moe::value_error);
        REQUIRE_THROWS_WITH(write_safetensors(path, tensors), Catch::Contains("F64"));
    }
    CHECK(dir.entries().empty());
}

TEST_CASE("safetensors: a failed write keeps the previous file and removes its temporary") {
    temp_dir dir;
    const fs::path path = dir / "out.safetensors";
    const std::vector<float> old_values{1.0f, 2.0f};
    const std::vector<float> new_values{3.0f, 4.0f, 5.0f};
    const std::vector<tensor_to_write> old_tensors{
        {.name = "v", .shape = {2}, .type = dtype::f32, .values = old_values}};
    write_safetensors(path, old_tensors);

    const std::vector<tensor_to_write> bad{
        {.name = "v", .shape = {2}, .type = dtype::f32, .values = new_values}};
    REQUIRE_THROWS_AS(write_safetensors(path, bad), moe::shape_error);
    CHECK(dir.entries() == std::vector<std::string>{"out.safetensors"});
    CHECK(safetensors_file(path).info("v").shape == std::vector<std::int64_t>{2});

    // Overwriting replaces the file as a whole.
    const std::vector<tensor_to_write> good{
        {.name = "v", .shape = {3}, .type = dtype::f32, .values = new_values}};
    write_safetensors(path, good);
    std::vector<float> out(3);
    safetensors_file(path).read<float>("v", out);
    CHECK(out == new_values);
    CHECK(dir.entries() == std::vector<std::string>{"out.safetensors"});

    // A destination that is a directory makes the final rename fail after the data was written.
    fs::create_directory(dir / "taken");
    REQUIRE_THROWS_AS(write_safetensors(dir / "taken", good), moe::io_error);
    CHECK(dir.entries() == std::vector<std::string>{"out.safetensors", "taken"});

    REQUIRE_THROWS_AS(write_safetensors(dir / "no_such_dir" / "x.safetensors", good),
                      moe::io_error);
}

TEST_CASE("safetensors: unopenable files") {
    temp_dir dir;
    const fs::path missing = dir / "missing.safetensors";
    REQUIRE_THROWS_AS(safetensors_file{missing}, moe::io_error);
    REQUIRE_THROWS_WITH(safetensors_file{missing}, Catch::Contains(missing.string()));

    const fs::path directory = dir / "directory.safetensors";
    fs::create_directory(directory);
    REQUIRE_THROWS_AS(safetensors_file{directory}, moe::io_error);
    REQUIRE_THROWS_WITH(safetensors_file{directory}, Catch::Contains("regular file"));
}

TEST_CASE("safetensors: a header length past the 100 MB limit is rejected before parsing") {
    temp_dir dir;
    const fs::path path = dir / "big.safetensors";
    write_file(path, u64_le(150u << 20) + "{}");
    fs::resize_file(path, 200u << 20);  // sparse, so the test stays cheap
    REQUIRE_THROWS_AS(safetensors_file{path}, moe::io_error);
    REQUIRE_THROWS_WITH(safetensors_file{path},
                        Catch::Contains("header length") && Catch::Contains("limit"));
}

TEST_CASE("safetensors: malformed files are rejected with a message naming the problem") {
    struct malformed {
        std::string what;
        std::string contents;
        std::vector<std::string> words;  // each must appear in the message
    };
    const std::string four_bytes(4, '\0');
    const std::vector<malformed> cases{
        {"empty file", "", {"shorter"}},
        {"truncated length field", std::string("\x02\x00\x00", 3), {"shorter"}},
        {"absurd header length", u64_le(std::uint64_t{1} << 60) + "{}", {"header length"}},
        {"header length one past the end", u64_le(3) + "{}", {"header length"}},
        {"largest header length", u64_le(~std::uint64_t{0}) + "{}", {"header length"}},
        {"empty header", u64_le(0), {"JSON"}},
        {"header not JSON", file_bytes(R"({"w": )"), {"JSON"}},
        {"trailing garbage after the JSON", file_bytes("{} x"), {"JSON"}},
        {"header not UTF-8", file_bytes("{\"w\xff\": 1}"), {"JSON"}},
        {"header a JSON array", file_bytes("[1, 2]"), {"object"}},
        {"header a JSON string", file_bytes(R"("w")"), {"object"}},
        {"entry not an object", file_bytes(R"({"w": [1, 2]})"), {"'w'", "object"}},
        {"missing dtype",
         file_bytes(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", four_bytes),
         {"'w'", "dtype"}},
        {"dtype not a string",
         file_bytes(R"({"w": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}})", four_bytes),
         {"'w'", "dtype"}},
        {"unknown dtype",
         file_bytes(R"({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}})",
                    four_bytes),
         {"'w'", "dtype", "F8_E4M3"}},
        {"lower-case dtype",
         file_bytes(R"({"w": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}})",
                    four_bytes),
         {"'w'", "dtype"}},
        {"missing shape",
         file_bytes(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", four_bytes),
         {"'w'", "shape"}},
        {"shape not an array",
         file_bytes(R"({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}})", four_bytes),
         {"'w'", "shape"}},
        {"negative shape",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}})",
                    four_bytes),
         {"'w'", "shape"}},
        {"fractional shape",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}})",
                    four_bytes),
         {"'w'", "shape"}},
        {"shape beyond int64",
         file_bytes(R"({"w": {"dtype": "U8", "shape": [18446744073709551615, 0],)"
                    R"( "data_offsets": [0, 0]}})"),
         {"'w'", "shape"}},
        {"missing data_offsets",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [1]}})", four_bytes),
         {"'w'", "data_offsets"}},
        {"data_offsets with one element",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}})", four_bytes),
         {"'w'", "data_offsets"}},
        {"negative data_offsets",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})",
                    four_bytes),
         {"'w'", "data_offsets"}},
        {"fractional data_offsets",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}})",
                    four_bytes),
         {"'w'", "data_offsets"}},
        {"reversed data_offsets",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})",
                    four_bytes),
         {"'w'", "data_offsets", "reversed"}},
        {"data_offsets past the data section",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                    four_bytes),
         {"'w'", "data_offsets", "data section"}},
        {"data_offsets far past the data section",
         file_bytes(R"({"w": {"dtype": "U8", "shape": [1],)"
                    R"( "data_offsets": [18446744073709551614, 18446744073709551615]}})",
                    four_bytes),
         {"'w'", "data section"}},
        {"byte length does not match the shape",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})",
                    four_bytes),
         {"'w'", "shape", "[2]", "F32"}},
        {"element count overflows",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4611686018427387904,)"
                    R"( 4], "data_offsets": [0, 0]}})"),
         {"'w'", "shape"}},
        {"zero-element shape with bytes",
         file_bytes(R"({"w": {"dtype": "F32", "shape": [0, 1], "data_offsets": [0, 4]}})",
                    four_bytes),
         {"'w'", "shape"}},
        {"overlapping tensors",
         file_bytes(R"({"alpha": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                    R"( "beta": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                    std::string(12, '\0')),
         {"'alpha'", "'beta'", "overlap"}},
        {"identical tensors",
         file_bytes(R"({"alpha": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                    R"( "beta": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}})",
                    four_bytes),
         {"'alpha'", "'beta'", "overlap"}},
        {"metadata not an object", file_bytes(R"({"__metadata__": ["pt"]})"), {"__metadata__"}},
        {"metadata value not a string",
         file_bytes(R"({"__metadata__": {"format": "pt", "step": 3}})"),
         {"__metadata__", "step"}},
    };

    temp_dir dir;
    for (std::size_t i = 0; i < cases.size(); ++i) {
        const malformed& bad = cases[i];
        INFO(bad.what);
        const fs::path path = dir / ("bad" + std::to_string(i) + ".safetensors");
        write_file(path, bad.contents);
        REQUIRE_THROWS_AS(safetensors_file{path}, moe::io_error);
        try {
            const safetensors_file file(path);
        } catch (const moe::io_error& e) {
            const std::string message = e.what();
            INFO(message);
            CHECK(message.find(path.string()) != std::string::npos);
            for (const std::string& word : bad.words) {
                INFO(word);
                CHECK(message.find(word) != std::string::npos);
            }
        }
    }
}
