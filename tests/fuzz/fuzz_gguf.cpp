// libFuzzer target: any bytes as a GGUF file. Opening it, reading its metadata and every tensor must
// either succeed or throw moe::error; ASan/UBSan catch everything else. Build and run with scripts/fuzz.
#include <moe/io/gguf.hpp>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    // The reader memory-maps a path, so each input goes through a file (in memory on Linux).
    static const std::string path = "/dev/shm/moe_fuzz_gguf_" + std::to_string(::getpid());
    {
        std::ofstream out(path, std::ios::binary | std::ios::trunc);
        out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    }
    try {
        const moe::io::gguf_file file(path);
        for (const auto& [key, value] : file.metadata()) {
            try {
                (void)file.number(key);
            } catch (const moe::error&) {
            }
        }
        for (const auto& tensor : file.tensors()) {
            if (file.bytes(tensor.name).size() != tensor.bytes) __builtin_trap();
            if (tensor.numel() > (1u << 20)) continue;  // keep each input fast
            try {
                std::vector<float> values(static_cast<std::size_t>(tensor.numel()));
                file.read(tensor.name, values);
            } catch (const moe::error&) {
            }
        }
    } catch (const moe::error&) {
    }
    return 0;
}
