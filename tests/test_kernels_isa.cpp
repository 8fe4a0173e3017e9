#include <moe/kernels/isa.hpp>
#include <moe/kernels/linear.hpp>
#include <moe/kernels/multiply.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

namespace {


using moe::kernels::isa;

constexpr auto& families = moe::kernels::all_isas;

// Runs the kernels on `which` until the end of the scope, then on the family they ran on before.
struct on_family {
    isa before = moe::kernels::active_isa();
    explicit on_family(isa which) { moe::kernels::set_active_isa(which); }
    ~on_family() { moe::kernels::set_active_isa(before); }
};

}  // namespace

TEST_CASE("the kernels run on the best family, or on the one MOE_ISA names", "[kernels][isa]") {
    const char* named = std::getenv("MOE_ISA");
    const isa want = named != nullptr && *named != '\0' ? moe::kernels::parse_isa(named) : moe::kernels::best_isa();
    CHECK(moe::kernels::active_isa() == want);
    CHECK(moe::kernels::isa_supported(isa::portable));
    const isa best = moe::kernels::best_isa();
    CHECK(moe::kernels::isa_supported(best));
    // The highest family this CPU runs, but avx512_bf16 only where its dot product pays.
    const double ratio = moe::kernels::bf16_dot_ratio();
    CHECK((ratio > 0) == moe::kernels::isa_supported(isa::avx512_bf16));
    // A timing that went wrong (a loop the compiler dropped, a clock that did not move) reads far off:
    // the CPUs we know run vdpbf16ps at 0.4-2.5 of the FMA's rate.
    if (ratio > 0) CHECK((ratio > 0.1 && ratio < 10));
    for (const isa which : families) {
        if (!moe::kernels::isa_supported(which)) continue;
        CHECK(moe::kernels::parse_isa(moe::kernels::isa_name(which)) == which);
        if (which == isa::avx512_bf16)
            CHECK((best == which) == (ratio >= 0.75));
        else
            CHECK(static_cast<int>(which) <= static_cast<int>(best));
    }
    WARN("best instruction set: " << moe::kernels::isa_name(best) << "; portable vectors: " << moe::kernels::portable_vectors()
                                  << "; bf16 dot products against float FMAs: " << ratio);
}

TEST_CASE("an unknown or unavailable instruction set is a value_error naming it", "[kernels][isa]") {
    CHECK_THROWS_WITH(moe::kernels::parse_isa("avx1024"), Catch::Contains("'avx1024'") && Catch::Contains("avx2"));
    for (const isa which : families)
        if (!moe::kernels::isa_supported(which)) {
            CHECK_THROWS_AS(moe::kernels::set_active_isa(which), moe::value_error);
            CHECK_THROWS_WITH(moe::kernels::parse_isa(moe::kernels::isa_name(which)),
                              Catch::Contains(std::string(moe::kernels::isa_name(which))) && Catch::Contains("not available"));
        }
}

TEST_CASE("every family this CPU runs computes the same products within float32 rounding", "[kernels][isa]") {
    const moe::index n = 9, m = 21, d = 301, k = 150;
    std::vector<float> x(n * d), w(m * d), b(k * m), a(n * k);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = std::cos(0.11f * static_cast<float>(i));
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = std::sin(0.23f * static_cast<float>(i) + 1);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = std::cos(0.19f * static_cast<float>(i) + 2);
    std::vector<moe::bf16> x16(x.size()), w16(w.size());
    moe::kernels::round_to_bf16(x.data(), x16.data(), static_cast<moe::index>(x.size()));
    moe::kernels::round_to_bf16(w.data(), w16.data(), static_cast<moe::index>(w.size()));
    std::vector<float> fused_product;  // `multiply` on the first family with fused multiply-adds
    for (const isa which : families) {
        if (!moe::kernels::isa_supported(which)) continue;
        INFO("instruction set: " << moe::kernels::isa_name(which));
        const on_family scope(which);
        std::vector<float> z(n * m), z16(n * m), c(n * m);
        moe::kernels::linear(x.data(), d, w.data(), d, z.data(), m, n, m, d);
        moe::kernels::linear(x16.data(), d, w16.data(), d, z16.data(), m, n, m, d);
        moe::kernels::multiply(moe::kernels::strided<float>{a.data(), k, 1}, b.data(), m, c.data(), m, n, m, k, false);
        int wrong = 0;
        for (moe::index r = 0; r < n; ++r)
            for (moe::index j = 0; j < m; ++j) {
                double want = 0, want16 = 0, magnitude = 0, want_c = 0, magnitude_c = 0;
                for (moe::index i = 0; i < d; ++i) {
                    want += static_cast<double>(x[r * d + i]) * w[j * d + i];
                    want16 += static_cast<double>(static_cast<float>(x16[r * d + i])) * static_cast<float>(w16[j * d + i]);
                    magnitude += std::abs(static_cast<double>(x[r * d + i]) * w[j * d + i]);
                }
                for (moe::index i = 0; i < k; ++i) {
                    want_c += static_cast<double>(a[r * k + i]) * b[i * m + j];
                    magnitude_c += std::abs(static_cast<double>(a[r * k + i]) * b[i * m + j]);
                }
                // float32 sums of d terms: within d ulps of the magnitude (far inside, in practice).
                const double tolerance = 1e-7 * static_cast<double>(d) * magnitude, tolerance_c = 1e-7 * static_cast<double>(k) * magnitude_c;
                wrong += std::abs(z[r * m + j] - want) > tolerance;
                wrong += std::abs(z16[r * m + j] - want16) > tolerance;
                wrong += std::abs(c[r * m + j] - want_c) > tolerance_c;
            }
        CHECK(wrong == 0);
        // `multiply` sums each output in k order, one fused multiply-add at a time: every family with
        // FMA gives the same bits (the x86-64 baseline's portable family rounds products separately).
        if (which != isa::portable) {
            if (fused_product.empty()) fused_product = c;
            CHECK(c == fused_product);
        }
    }
}
