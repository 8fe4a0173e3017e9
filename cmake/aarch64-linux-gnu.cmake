# Cross-compiles for aarch64 Linux with Debian's g++-aarch64-linux-gnu; CTest and the test discovery
# run the programs under qemu-user (Debian's qemu-user) with the cross toolchain's libraries.
# usage: cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
# The header-only dependencies (Eigen, xsimd, nlohmann-json, Catch2) are the build machine's; MPI and
# Google Benchmark are libraries of the build machine's architecture, so they are not used.
set(CMAKE_DISABLE_FIND_PACKAGE_MPI ON)
set(MOE_BUILD_BENCHMARKS OFF CACHE BOOL "")
# Debian's header-only xsimd keeps its package config under the build machine's architecture.
set(xsimd_DIR /usr/lib/${CMAKE_HOST_SYSTEM_PROCESSOR}-linux-gnu/cmake/xsimd CACHE PATH "")
