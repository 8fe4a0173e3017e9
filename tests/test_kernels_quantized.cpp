// The q8_0 and q4_0 block formats and the quantized projection, against tools/gen_golden.py's
// independent implementation of ggml's reference quantizers (tests/data/quant/formats.safetensors).
#include "golden.hpp"

#include <moe/kernels/quantized.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <type_traits>
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

// sum over blocks of |d_x d_w| times the sum of the 32 |products|: what bounds a float sum's error.
template <class Block>
double magnitude(const q8_0_block* x, const Block* w, moe::index blocks) {
    double total = 0;
    for (moe::index b = 0; b < blocks; ++b) {
        double products = 0;
        for (moe::index i = 0; i < moe::quant_block; ++i)
            products += std::abs(moe::kernels::detail::quant_value(x[b], i) * moe::kernels::detail::quant_value(w[b], i));
        total += std::abs(double(moe::fp16_to_float(x[b].scale)) * moe::fp16_to_float(w[b].scale)) * products;
    }
    return total;
}

TEST_CASE("the quantized projection sums the blocks as the reference does", "[kernels][quantized]") {
    INFO("instruction set: " << moe::kernels::isa_name(moe::kernels::active_isa()));
    const formats f;
    const auto x = quantize_rows<q8_0_block>(f.x);
    const auto run = [&](const auto& w, const char* expected) {
        moe::matrix<float> z(f.x.rows(), f.w.rows());
        moe::kernels::linear(x.data(), f.blocks, w.data(), f.blocks, z.data(), z.cols(), z.rows(), z.cols(), f.d);
        const moe::matrix<double> reference = golden::read_matrix<double>(f.file, expected);
        INFO(expected);
        // Each output against its own bound: float32 sums of f.blocks scaled blocks, a few roundings each.
        for (moe::index r = 0; r < z.rows(); ++r)
            for (moe::index j = 0; j < z.cols(); ++j) {
                INFO("output " << r << ", " << j << ": " << z(r, j) << " against " << reference(r, j));
                const double bound = 1e-6 * magnitude(x.data() + r * f.blocks, w.data() + j * f.blocks, f.blocks);
                CHECK(std::abs(z(r, j) - reference(r, j)) <= bound);
            }
    };
    run(quantize_rows<q8_0_block>(f.w), "z.q8_0");
    run(quantize_rows<q4_0_block>(f.w), "z.q4_0");
}

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

TEMPLATE_TEST_CASE("a quantized output's bits depend only on its two rows, on every family", "[kernels][quantized]",
                   q8_0_block, q4_0_block) {
    // 11 rows of x against 38 rows of W (every tile and edge of every family), 33 blocks a row (the last
    // block odd), outputs 41 apart; each output computed alone (`dot`) and within the whole product,
    // on every family this CPU runs. x as `quantize` makes it, W any bytes.
    std::mt19937 gen(7);
    std::normal_distribution<float> normal;
    const moe::index n = 11, m = 38, blocks = 33, d = blocks * moe::quant_block, ldz = 41;
    moe::matrix<float> xf(n, d);
    for (moe::index i = 0; i < xf.size(); ++i) xf.data()[i] = normal(gen);
    const auto x = quantize_rows<q8_0_block>(xf);
    const auto w = random_blocks<TestType>(gen, static_cast<std::size_t>(m * blocks));
    const moe::kernels::isa before = moe::kernels::active_isa();
    moe::kernels::set_active_isa(moe::kernels::isa::portable);
    moe::matrix<float> reference = moe::matrix<float>::Constant(n, ldz, -1.0f);
    moe::kernels::linear(x.data(), blocks, w.data(), blocks, reference.data(), ldz, n, m, d);
    for (const moe::kernels::isa family : moe::kernels::all_isas) {
        if (!moe::kernels::isa_supported(family)) continue;
        INFO("instruction set: " << moe::kernels::isa_name(family));
        moe::kernels::set_active_isa(family);
        moe::matrix<float> z = moe::matrix<float>::Constant(n, ldz, -1.0f);
        moe::kernels::linear(x.data(), blocks, w.data(), blocks, z.data(), ldz, n, m, d);
        CHECK(z == reference);  // the columns past m untouched too
        for (moe::index r = 0; r < n; ++r)
            for (moe::index j = 0; j < m; ++j) CHECK(moe::kernels::dot(x.data() + r * blocks, w.data() + j * blocks, d) == z(r, j));
    }
    moe::kernels::set_active_isa(before);
    // The portable family against the documented order, computed here in scalar code.
    for (moe::index r = 0; r < n; ++r)
        for (moe::index j = 0; j < m; ++j) {
            float lanes[2][8] = {};
            for (moe::index b = 0; b < blocks; ++b) {
                const q8_0_block& xb = x[static_cast<std::size_t>(r * blocks + b)];
                const TestType& wb = w[static_cast<std::size_t>(j * blocks + b)];
                const float scale = moe::fp16_to_float(xb.scale) * moe::fp16_to_float(wb.scale);
                for (int l = 0; l < 8; ++l) {
                    int sum = 0;
                    for (int i = 4 * l; i < 4 * l + 4; ++i)
                        sum += moe::kernels::detail::quant_value(xb, i) * moe::kernels::detail::quant_value(wb, i);
                    lanes[b % 2][l] = std::fma(static_cast<float>(sum), scale, lanes[b % 2][l]);
                }
            }
            float l[8];
            for (int i = 0; i < 8; ++i) l[i] = lanes[0][i] + lanes[1][i];
            CHECK(reference(r, j) == ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])));
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
    CHECK_THROWS_AS(moe::kernels::linear(q8.data(), 1, q8.data(), 1, z.data(), 1, 1, 1, 40), moe::shape_error);
    v[37] = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH(moe::kernels::quantize(v.data(), 64, q8.data()), Catch::Contains("value 37") && Catch::Contains("finite"));
    v[37] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_AS(moe::kernels::quantize(v.data(), 64, q4.data()), moe::value_error);
    v[37] = 1.0f;
    v[40] = 1e6f;  // q4_0's scale 1e6 / 8 is beyond fp16; q8_0's 1e6 / 127 is not
    CHECK_THROWS_WITH(moe::kernels::quantize(v.data(), 64, q4.data()), Catch::Contains("block 1") && Catch::Contains("65504"));
    CHECK_NOTHROW(moe::kernels::quantize(v.data(), 64, q8.data()));
}
