// libFuzzer target: any bytes as a safetensors file. Opening and reading every tensor must either
// succeed or throw moe::error; ASan/UBSan catch everything else. Build and run with scripts/fuzz.
#include <moe/io/safetensors.hpp>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    // The reader memory-maps a path, so each input goes through a file (in memory on Linux).
    static const std::string path = "/dev/shm/moe_fuzz_safetensors_" + std::to_string(::getpid());
    {
        std::ofstream out(path, std::ios::binary | std::ios::trunc);
        out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    }
    try {
        const moe::io::safetensors_file file(path);
        for (const auto& name : file.names()) {
            const auto& info = file.info(name);
            const auto bytes = file.bytes(name);
            if (bytes.size() != info.end - info.begin) __builtin_trap();
            try {
                std::vector<float> values(static_cast<std::size_t>(info.numel()));
                file.read<float>(name, values);
            } catch (const moe::error&) {
                (void)file.read_integers(name);  // integer tensors read this way instead
            }
        }
        (void)file.metadata();
    } catch (const moe::error&) {
    }
    return 0;
}
