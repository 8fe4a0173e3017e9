// The q8_0 and q4_0 block formats and the quantized projection, against tools/golden's
// independent implementation of ggml's reference quantizers (tests/data/quant/formats.safetensors).
#include "golden.hpp"

#include <moe/kernels/quantized.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

namespace {


using moe::q4_0_block;
using moe::q8_0_block;

struct formats {
    moe::io::safetensors_file file{golden::data_dir / "quant" / "formats.safetensors"};
    moe::matrix<float> x = golden::read_matrix(file, "x"), w = golden::read_matrix(file, "w");
    moe::index d = x.cols(), blocks = d / moe::quant_block;
};

template <class Block>
std::vector<Block> quantize_rows(const moe::matrix<float>& m) {
    const moe::index blocks = m.cols() / moe::quant_block;
    std::vector<Block> out(static_cast<std::size_t>(m.rows() * blocks));
    for (moe::index r = 0; r < m.rows(); ++r) moe::kernels::quantize(m.row(r).data(), m.cols(), out.data() + r * blocks);
    return out;
}

// The scales as the file holds them (fp16 values, exactly representable in float), sign of zero included.
template <class Block>
void check_scales(const std::vector<Block>& q, const moe::matrix<float>& expected) {
    REQUIRE(static_cast<moe::index>(q.size()) == expected.size());
    for (moe::index i = 0; i < expected.size(); ++i) {
        INFO("block " << i);
        const float got = moe::fp16_to_float(q[static_cast<std::size_t>(i)].scale);
        CHECK(got == expected.data()[i]);
        CHECK(std::signbit(got) == std::signbit(expected.data()[i]));
    }
}

}  // namespace

TEST_CASE("q8_0 quantization is ggml's reference quantizer", "[kernels][quantized]") {
    const formats f;
    for (const auto* name : {"x", "w"}) {
        INFO(name);
        const auto q = quantize_rows<q8_0_block>(std::string(name) == "x" ? f.x : f.w);
        check_scales(q, golden::read_matrix(f.file, std::string(name) + ".q8_0.scale"));
        const std::vector<std::int64_t> values = f.file.read_integers(std::string(name) + ".q8_0.values");
        REQUIRE(values.size() == q.size() * moe::quant_block);
        for (std::size_t i = 0; i < values.size(); ++i) {
            INFO("value " << i);
            CHECK(q[i / moe::quant_block].values[i % moe::quant_block] == values[i]);
        }
    }
}

TEST_CASE("q4_0 quantization is ggml's reference quantizer, byte for byte", "[kernels][quantized]") {
    const formats f;
    const auto q = quantize_rows<q4_0_block>(f.w);
    check_scales(q, golden::read_matrix(f.file, "w.q4_0.scale"));
    const std::vector<std::int64_t> bytes = f.file.read_integers("w.q4_0.bytes");
    REQUIRE(bytes.size() == q.size() * moe::quant_block / 2);
    for (std::size_t i = 0; i < bytes.size(); ++i) {
        INFO("byte " << i);
        CHECK(q[i / (moe::quant_block / 2)].values[i % (moe::quant_block / 2)] == bytes[i]);
    }
}

TEST_CASE("dequantize gives scale times value", "[kernels][quantized]") {
    const formats f;
    const auto q8 = quantize_rows<q8_0_block>(f.w);
    const auto q4 = quantize_rows<q4_0_block>(f.w);
    std::vector<float> v8(static_cast<std::size_t>(f.d)), v4(static_cast<std::size_t>(f.d));
    for (moe::index r = 0; r < f.w.rows(); ++r) {
        moe::kernels::dequantize(q8.data() + r * f.blocks, f.d, v8.data());
        moe::kernels::dequantize(q4.data() + r * f.blocks, f.d, v4.data());
        for (moe::index i = 0; i < f.d; ++i) {
            const auto& b8 = q8[static_cast<std::size_t>(r * f.blocks + i / 32)];
            const auto& b4 = q4[static_cast<std::size_t>(r * f.blocks + i / 32)];
            const int nibble = i % 32 < 16 ? b4.values[i % 16] & 15 : b4.values[i % 16] >> 4;
            CHECK(v8[static_cast<std::size_t>(i)] == moe::fp16_to_float(b8.scale) * static_cast<float>(b8.values[i % 32]));
            CHECK(v4[static_cast<std::size_t>(i)] == moe::fp16_to_float(b4.scale) * static_cast<float>(nibble - 8));
        }
    }
}

namespace {

// x's rows as a projection's input (`quantize_input`).
std::vector<moe::q8_0_input> input_rows(const moe::matrix<float>& x) {
    std::vector<moe::q8_0_input> out(static_cast<std::size_t>(x.size() / moe::quant_block));
    moe::kernels::quantize_input(x.data(), x.size(), out.data());
    return out;
}

template <class Block>
moe::quantized_matrix<Block> quantized(const moe::matrix<float>& w) {
    moe::quantized_matrix<Block> out(w.rows(), w.cols());
    out.assign(0, w.data(), w.rows());
    return out;
}

// Value i of a block as a signed integer (q4_0: nibble - 8).
int value_of(const q8_0_block& b, moe::index i) { return b.values[i]; }
int value_of(const q4_0_block& b, moe::index i) {
    const int v = b.values[i % (moe::quant_block / 2)];
    return (i < moe::quant_block / 2 ? v & 15 : v >> 4) - 8;
}

// sum over blocks of |d_x d_w| times the sum of the 32 |products|: what bounds a float sum's error.
template <class Block>
double magnitude(const moe::q8_0_input* x, const moe::quantized_matrix<Block>& w, moe::index row) {
    double total = 0;
    for (moe::index b = 0; b < w.blocks_per_row(); ++b) {
        const Block wb = w.block(row, b);
        double products = 0;
        for (moe::index i = 0; i < moe::quant_block; ++i) products += std::abs(x[b].values[i] * value_of(wb, i));
        total += std::abs(double(x[b].scale) * moe::fp16_to_float(wb.scale)) * products;
    }
    return total;
}

}  // namespace

TEST_CASE("a projection's input is q8_0 by the same quantizer, with its scale's value and its values' sum",
          "[kernels][quantized]") {
    const formats f;
    const auto blocks = quantize_rows<q8_0_block>(f.x);
    const auto input = input_rows(f.x);
    REQUIRE(input.size() == blocks.size());
    for (std::size_t i = 0; i < input.size(); ++i) {
        INFO("block " << i);
        int sum = 0;
        for (moe::index v = 0; v < moe::quant_block; ++v) {
            CHECK(input[i].values[v] == blocks[i].values[v]);
            sum += blocks[i].values[v];
        }
        CHECK(input[i].scale == moe::fp16_to_float(blocks[i].scale));
        CHECK(input[i].sum == sum);
    }
    std::vector<float> bad(64, 1.0f);
    bad[33] = std::numeric_limits<float>::infinity();
    std::vector<moe::q8_0_input> out(2);
    moe::kernels::quantize_input(bad.data(), 64, out.data());
    CHECK(out[0].scale == moe::fp16_to_float(moe::float_to_fp16(1.0f / 127)));
    CHECK(std::isnan(out[1].scale));
    CHECK(out[1].sum == 0);
}

TEMPLATE_TEST_CASE("quantized_matrix holds ggml's blocks: back as they went in, zeros where none went, its bytes",
                   "[kernels][quantized]", q8_0_block, q4_0_block) {
    std::mt19937 gen(3);
    std::uniform_int_distribution<int> byte(0, 255);
    const moe::index rows = 21, blocks = 3;  // a group of 16 and one of 5 rows (11 rows of zeros)
    std::vector<TestType> in(static_cast<std::size_t>(rows * blocks));
    for (TestType& b : in) {
        b.scale = static_cast<std::uint16_t>(byte(gen) | byte(gen) << 8);
        for (auto& v : b.values) v = static_cast<std::remove_reference_t<decltype(v)>>(byte(gen));
    }
    moe::quantized_matrix<TestType> w(rows + 2, blocks * moe::quant_block);
    w.assign(1, in.data(), rows);
    for (moe::index r = 0; r < rows; ++r)
        for (moe::index b = 0; b < blocks; ++b) {
            const TestType got = w.block(r + 1, b);
            CHECK(std::memcmp(&got, &in[static_cast<std::size_t>(r * blocks + b)], sizeof got) == 0);
        }
    const moe::matrix<float> zeros = w.dequantized().bottomRows(1);
    CHECK((zeros.array() == 0).all());
    CHECK_FALSE(std::signbit(zeros(0, 0)));
    CHECK_THROWS_AS(w.assign(rows, in.data(), 3), moe::shape_error);
    // Two groups: 3 blocks of 16 rows' values, 3 x 16 fp16 scales padded to a cache line; an even
    // number of blocks needs no padding: exactly the blocks' bytes.
    CHECK(w.bytes() == 2 * (3 * 16 * sizeof(TestType::values) + 128));
    CHECK(moe::quantized_matrix<TestType>(32, 128).bytes() == 32 * 4 * sizeof(TestType));
}

TEST_CASE("the quantized projection sums the blocks as the reference does", "[kernels][quantized]") {
    INFO("instruction set: " << moe::kernels::isa_name(moe::kernels::active_isa()));
    const formats f;
    const auto x = input_rows(f.x);
    const auto run = [&](const auto& w, const char* expected) {
        moe::matrix<float> z(f.x.rows(), f.w.rows());
        moe::kernels::linear(x.data(), f.blocks, w, 0, z.cols(), z.data(), z.cols(), z.rows());
        const moe::matrix<double> reference = golden::read_matrix<double>(f.file, expected);
        INFO(expected);
        // Each output against its own bound: float32 sums of f.blocks scaled blocks, a few roundings each.
        for (moe::index r = 0; r < z.rows(); ++r)
            for (moe::index j = 0; j < z.cols(); ++j) {
                INFO("output " << r << ", " << j << ": " << z(r, j) << " against " << reference(r, j));
                const double bound = 1e-6 * magnitude(x.data() + r * f.blocks, w, j);
                CHECK(std::abs(z(r, j) - reference(r, j)) <= bound);
            }
    };
    run(quantized<q8_0_block>(f.w), "z.q8_0");
    run(quantized<q4_0_block>(f.w), "z.q4_0");
}

namespace {
// Weights as a file may hold them: every byte value, scales of both signs.
template <class Block>
std::vector<Block> random_blocks(std::mt19937& gen, std::size_t count) {
    std::uniform_int_distribution<int> byte(0, 255);
    std::normal_distribution<float> normal;
    std::vector<Block> out(count);
    for (Block& b : out) {
        b.scale = moe::float_to_fp16(0.01f * normal(gen));
        for (auto& v : b.values) v = static_cast<std::remove_reference_t<decltype(v)>>(byte(gen));
    }
    return out;
}
}  // namespace

TEMPLATE_TEST_CASE("a quantized output's bits depend only on its two rows, on every family", "[kernels][quantized]",
                   q8_0_block, q4_0_block) {
    // 11 rows of x against 150 rows of W (every tile and edge of every family: 9 groups of 16 and 6 rows),
    // 33 blocks a row, outputs 161 apart; the whole product, ranges of rows that cut groups, and each
    // output computed alone, on every family this CPU runs. x as `quantize_input` makes it, W any bytes.
    std::mt19937 gen(7);
    std::normal_distribution<float> normal;
    const moe::index n = 11, m = 150, blocks = 33, d = blocks * moe::quant_block, ldz = 161;
    moe::matrix<float> xf(n, d);
    for (moe::index i = 0; i < xf.size(); ++i) xf.data()[i] = normal(gen);
    const auto x = input_rows(xf);
    const auto raw = random_blocks<TestType>(gen, static_cast<std::size_t>(m * blocks));
    moe::quantized_matrix<TestType> w(m, d);
    w.assign(0, raw.data(), m);
    const moe::kernels::isa before = moe::kernels::active_isa();
    moe::kernels::set_active_isa(moe::kernels::isa::portable);
    moe::matrix<float> reference = moe::matrix<float>::Constant(n, ldz, -1.0f);
    moe::kernels::linear(x.data(), blocks, w, 0, m, reference.data(), ldz, n);
    for (const moe::kernels::isa family : moe::kernels::all_isas) {
        if (!moe::kernels::isa_supported(family)) continue;
        INFO("instruction set: " << moe::kernels::isa_name(family));
        moe::kernels::set_active_isa(family);
        moe::matrix<float> z = moe::matrix<float>::Constant(n, ldz, -1.0f);
        moe::kernels::linear(x.data(), blocks, w, 0, m, z.data(), ldz, n);
        CHECK(z == reference);  // the columns past m untouched too
        for (const auto& [row, count] : {std::pair<moe::index, moe::index>{5, 40}, {16, 32}, {37, 3}, {140, 10}}) {
            INFO("rows " << row << " to " << row + count);
            moe::matrix<float> part = moe::matrix<float>::Constant(n, count + 1, -1.0f);
            moe::kernels::linear(x.data(), blocks, w, row, count, part.data(), count + 1, n);
            CHECK(part.leftCols(count) == reference.middleCols(row, count));
            CHECK((part.col(count).array() == -1.0f).all());
        }
        for (moe::index r = 0; r < n; ++r)
            for (moe::index j = 0; j < m; ++j) {
                float alone;
                moe::kernels::linear(x.data() + r * blocks, blocks, w, j, 1, &alone, 1, 1);
                CHECK(alone == z(r, j));
            }
    }
    moe::kernels::set_active_isa(before);
    // The portable family against the documented order, computed here in scalar code from ggml's blocks.
    for (moe::index r = 0; r < n; ++r)
        for (moe::index j = 0; j < m; ++j) {
            float acc = 0;
            for (moe::index b = 0; b < blocks; ++b) {
                const moe::q8_0_input& xb = x[static_cast<std::size_t>(r * blocks + b)];
                const TestType& wb = raw[static_cast<std::size_t>(j * blocks + b)];
                int sum = 0;
                for (moe::index i = 0; i < moe::quant_block; ++i) sum += xb.values[i] * value_of(wb, i);
                acc = std::fma(static_cast<float>(sum), xb.scale * moe::fp16_to_float(wb.scale), acc);
            }
            CHECK(reference(r, j) == acc);
        }
}

TEST_CASE("quantization rejects rows it cannot hold, naming the problem", "[kernels][quantized]") {
    std::vector<float> v(64, 1.0f);
    std::vector<q8_0_block> q8(2);
    std::vector<q4_0_block> q4(2);
    CHECK_THROWS_WITH(moe::kernels::quantize(v.data(), 48, q8.data()),
                      Catch::Contains("48 values") && Catch::Contains("multiple of 32"));
    CHECK_THROWS_AS(moe::kernels::quantize(v.data(), 48, q4.data()), moe::shape_error);
    std::vector<float> z(4);
    std::vector<moe::q8_0_input> x(2);
    const moe::quantized_matrix<q8_0_block> w(3, 64);
    CHECK_THROWS_WITH(moe::kernels::linear(x.data(), 2, w, 2, 2, z.data(), 2, 1), Catch::Contains("rows [2, 4)"));
    CHECK_THROWS_AS(moe::quantized_matrix<q4_0_block>(3, 40), moe::shape_error);
    v[37] = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH(moe::kernels::quantize(v.data(), 64, q8.data()), Catch::Contains("value 37") && Catch::Contains("finite"));
    v[37] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_AS(moe::kernels::quantize(v.data(), 64, q4.data()), moe::value_error);
    v[37] = 1.0f;
    v[40] = 1e6f;  // q4_0's scale 1e6 / 8 is beyond fp16; q8_0's 1e6 / 127 is not
    CHECK_THROWS_WITH(moe::kernels::quantize(v.data(), 64, q4.data()), Catch::Contains("block 1") && Catch::Contains("65504"));
    CHECK_NOTHROW(moe::kernels::quantize(v.data(), 64, q8.data()));
}
