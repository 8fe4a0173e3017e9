// The one Catch2 main of the test suite, compiled once.
#define CATCH_CONFIG_RUNNER
#include <moe/kernels/isa.hpp>

#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <optional>

int main(int argc, char* argv[]) {
    // The suites run once per instruction-set family (MOE_ISA); on a CPU without the family they are
    // skipped (CTest's SKIP_RETURN_CODE) rather than failed. An unknown name fails.
    if (const char* named = std::getenv("MOE_ISA"); named != nullptr && *named != '\0') {
        const std::optional<moe::kernels::isa> which = moe::kernels::find_isa(named);
        if (!which) {
            std::fprintf(stderr, "MOE_ISA=%s: unknown instruction set\n", named);
            return 2;
        }
        if (!moe::kernels::isa_supported(*which)) {
            std::printf("skipped: this CPU (or build) has no %s\n", named);
            return 77;
        }
    }
    return Catch::Session().run(argc, argv);
}
