// What the programs that link the CMake target moe::compiled take from it (moe/compiled.hpp).
#include <moe/compiled.hpp>
