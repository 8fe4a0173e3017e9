#pragma once
/// \file
/// The instruction sets the kernels are built for, and the one they run on.
///
/// The headers build the products (`linear`, `dot`, `multiply`) once per instruction-set family, each
/// in functions of its own compiled for that family whatever the program's flags, and pick one on
/// first use: the best this CPU runs, or another one named by the environment variable `MOE_ISA` (for
/// tests and comparisons, or to pin the family, and so the bits, across machines and processes) or by
/// `set_active_isa`. A program built without `-march` thus runs the
/// AVX-512 or AVX2 products where the CPU has them.
///
/// | isa           | vectors                                      | built where                 |
/// |---------------|----------------------------------------------|-----------------------------|
/// | `portable`    | xsimd's, for the program's own flags         | everywhere (NEON on aarch64)|
/// | `avx2`        | 256-bit AVX2 + FMA                           | x86-64 with GCC >= 12/clang |
/// | `avx512`      | 512-bit AVX-512 F/BW/DQ/VL                   | x86-64 with GCC >= 12/clang |
/// | `avx512_bf16` | `avx512`, and AVX-512 BF16 dot products for bf16 operands | as `avx512`    |
///
/// The best family is the highest the CPU runs, except that `avx512_bf16` is best only where its dot
/// product pays (`bf16_dot_ratio`): on AMD Zen 4 `vdpbf16ps` does about twice the float FMA's work per
/// second, on an Intel Xeon of the Emerald Rapids generation half of it, and there `avx512`'s widened
/// bf16 ran a bf16-weight layer 1.35-1.45x faster. (The timing is its own assembly, not the benchmarks'
/// `fma_peak`, so that it reads the same at -O0.)
///
/// Every family keeps the products' guarantees (an output's bits depend only on its two rows, or on
/// its k terms in order), so results are bitwise identical at any thread count on one family. Two
/// families sum in other orders (vector widths, reduction trees, fused or separate multiply-adds on
/// the x86-64 baseline), so their float32 results differ in the last bits; the tests bound the
/// difference against a float64 reference.

#include "moe/error.hpp"

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && defined(__x86_64__)
/// Defined where the AVX2 and AVX-512 families are built (functions with target attributes, asked of
/// the CPU at run time).
#define MOE_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace moe::kernels {

/// An instruction-set family of the kernels, lowest first.
enum class isa { portable = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

/// The name `MOE_ISA` takes: "portable", "avx2", "avx512", "avx512_bf16".
constexpr std::string_view isa_name(isa which) {
    switch (which) {
        case isa::avx2: return "avx2";
        case isa::avx512: return "avx512";
        case isa::avx512_bf16: return "avx512_bf16";
        default: return "portable";
    }
}

/// The vectors of the `portable` family: xsimd's architecture for the program's flags ("sse2" at the
/// x86-64 baseline, "neon64" on aarch64, ...).
inline std::string portable_vectors() { return xsimd::default_arch::name(); }

/// Whether this build has the family's kernels and this CPU (and its operating system) runs them.
inline bool isa_supported(isa which) {
    if (which == isa::portable) return true;
#if defined(MOE_X86_DISPATCH)
    __builtin_cpu_init();  // this may run before the constructor that would call it
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    switch (which) {
        case isa::avx2: return avx2;
        case isa::avx512: return avx512;
        case isa::avx512_bf16: return avx512 && __builtin_cpu_supports("avx512bf16");
        default: return false;
    }
#else
    return false;
#endif
}

#if defined(MOE_X86_DISPATCH)
namespace detail {
/// Seconds of `rounds` steps of 12 independent AVX-512 BF16 dot products (`Dot`) or float fused
/// multiply-adds, 16 lanes each (enough in flight to cover either's latency). The loop is assembly so
/// that it measures the instructions at any optimisation level (at -O0 C++ would keep the sums in
/// memory); each step is written in both of the compilers' assembly dialects.
#define MOE_STEP(op, c) "{" op " %[b], %[a], %[" c "]|" op " %[" c "], %[a], %[b]}\n\t"
#define MOE_STEPS(op)                                                                                                \
    MOE_STEP(op, "c0") MOE_STEP(op, "c1") MOE_STEP(op, "c2") MOE_STEP(op, "c3") MOE_STEP(op, "c4") MOE_STEP(op, "c5") \
    MOE_STEP(op, "c6") MOE_STEP(op, "c7") MOE_STEP(op, "c8") MOE_STEP(op, "c9") MOE_STEP(op, "c10") MOE_STEP(op, "c11")
#define MOE_LOOP(op)                                                                                                  \
    asm volatile("moe_steps%=:\n\t" MOE_STEPS(op) "dec %[n]\n\tjnz moe_steps%="                                       \
                 : [n] "+r"(rounds), [c0] "+&v"(c0), [c1] "+&v"(c1), [c2] "+&v"(c2), [c3] "+&v"(c3), [c4] "+&v"(c4), \
                   [c5] "+&v"(c5), [c6] "+&v"(c6), [c7] "+&v"(c7), [c8] "+&v"(c8), [c9] "+&v"(c9),                  \
                   [c10] "+&v"(c10), [c11] "+&v"(c11)                                                                 \
                 : [a] "v"(a), [b] "v"(b)                                                                             \
                 : "cc")
template <bool Dot>
__attribute__((target("avx512f,avx512bf16"), noinline)) inline double avx512_steps(long rounds) {
    // 1 and 2^-20 as bf16 pairs, or as floats: the sums grow slowly, never denormal nor infinite.
    const __m512 a = Dot ? _mm512_castsi512_ps(_mm512_set1_epi32(0x3F803F80)) : _mm512_set1_ps(1.0f);
    const __m512 b = Dot ? _mm512_castsi512_ps(_mm512_set1_epi32(0x35803580)) : _mm512_set1_ps(0x1p-20f);
    __m512 c0 = a, c1 = a, c2 = a, c3 = a, c4 = a, c5 = a, c6 = a, c7 = a, c8 = a, c9 = a, c10 = a, c11 = a;
    if (rounds <= 0) return 0;  // the loop runs at least once
    const auto start = std::chrono::steady_clock::now();
    if constexpr (Dot)
        MOE_LOOP("vdpbf16ps");
    else
        MOE_LOOP("vfmadd231ps");
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
#undef MOE_LOOP
#undef MOE_STEPS
#undef MOE_STEP
}  // namespace detail
#endif

/// The FLOPs per second of AVX-512 BF16 dot products (`vdpbf16ps`: 64 a step) over those of float
/// fused multiply-adds (32 a step) on this CPU: measured once, on first use (about 0.3 ms: the
/// fastest of 5 alternating timings of each, after a warm-up); 0 where the CPU or the build lacks them.
inline double bf16_dot_ratio() {
    static const double ratio = [] {
        if (!isa_supported(isa::avx512_bf16)) return 0.0;
#if defined(MOE_X86_DISPATCH)
        constexpr int rounds = 4096;
        detail::avx512_steps<false>(rounds);
        detail::avx512_steps<true>(rounds);
        double dot = 1e30, fma = 1e30;
        for (int trial = 0; trial < 5; ++trial) {
            dot = std::min(dot, detail::avx512_steps<true>(rounds));
            fma = std::min(fma, detail::avx512_steps<false>(rounds));
        }
        return 2 * fma / dot;
#else
        return 0.0;
#endif
    }();
    return ratio;
}

/// The fastest family this CPU runs: the highest, except `avx512_bf16` where its dot product does
/// less than 3/4 of the float FMA's FLOPs per second (`bf16_dot_ratio`; widening bf16 into float
/// FMAs is then faster).
inline isa best_isa() {
    if (isa_supported(isa::avx512_bf16) && bf16_dot_ratio() >= 0.75) return isa::avx512_bf16;
    for (const isa which : {isa::avx512, isa::avx2})
        if (isa_supported(which)) return which;
    return isa::portable;
}

/// Every family, lowest first.
constexpr isa all_isas[] = {isa::portable, isa::avx2, isa::avx512, isa::avx512_bf16};

/// The family whose `isa_name` is `name`, if any.
inline std::optional<isa> find_isa(std::string_view name) {
    for (const isa which : all_isas)
        if (name == isa_name(which)) return which;
    return std::nullopt;
}

/// The family named `name`; value_error for an unknown name or a family this CPU does not run.
inline isa parse_isa(std::string_view name) {
    const std::optional<isa> which = find_isa(name);
    if (!which)
        throw value_error("unknown instruction set '" + std::string(name) + "' (expected portable, avx2, avx512 or avx512_bf16)");
    if (!isa_supported(*which))
        throw value_error("instruction set '" + std::string(name) + "' is not available on this CPU or build (best: " +
                          std::string(isa_name(best_isa())) + ")");
    return *which;
}

namespace detail {
/// The family the kernels run on: `MOE_ISA` if set, else the best (read on first use).
inline std::atomic<isa>& isa_setting() {
    static std::atomic<isa> setting{[] {
        const char* name = std::getenv("MOE_ISA");
        return name != nullptr && *name != '\0' ? parse_isa(name) : best_isa();
    }()};
    return setting;
}
}  // namespace detail

/// The family the kernels run on now. The first call reads `MOE_ISA` and throws value_error if it
/// names an unknown family or one this CPU lacks.
inline isa active_isa() { return detail::isa_setting().load(std::memory_order_relaxed); }

/// Runs the kernels on `which` from now on (for the whole process; not while kernels run on other
/// threads). Throws value_error if the CPU or the build lacks it.
inline void set_active_isa(isa which) {
    if (!isa_supported(which)) throw value_error("instruction set '" + std::string(isa_name(which)) + "' is not available on this CPU or build");
    detail::isa_setting().store(which, std::memory_order_relaxed);
}

}  // namespace moe::kernels
