#pragma once
// Internal: the compiler attributes the kernels share (macros, all prefixed MOE_).

// Inlined even where the compiler would not: a tile's accumulators whose address escaped into an
// out-of-line reduction would live in memory (stored every step, zeroed by `rep stos`).
#define MOE_ALWAYS_INLINE __attribute__((always_inline)) inline
// Loops over a tile's registers unrolled at every optimisation level: GCC 12 unrolls them completely at
// -O3 only, and at -O2 (CMake's RelWithDebInfo, most distributions) kept a tile's accumulators in
// memory, stored every step: 3 to 4 times slower.
#define MOE_UNROLL _Pragma("GCC unroll 32")

// Everything from MOE_TARGET_BEGIN("avx2,fma") to the matching MOE_TARGET_END is compiled for the named
// x86 extensions, whatever the program's flags (only called where the CPU has them).
#if defined(__clang__)
#define MOE_TARGET_BEGIN(features) _Pragma(MOE_TARGET_STRING(clang attribute push(__attribute__((target(features))), apply_to = function)))
#define MOE_TARGET_END _Pragma("clang attribute pop")
#else
#define MOE_TARGET_BEGIN(features) _Pragma("GCC push_options") _Pragma(MOE_TARGET_STRING(GCC target(features)))
#define MOE_TARGET_END _Pragma("GCC pop_options")
#endif
#define MOE_TARGET_STRING(...) #__VA_ARGS__
