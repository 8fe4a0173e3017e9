// libFuzzer target: any bytes as a config.json. Parsing must either succeed with sizes in range or
// throw moe::error; ASan/UBSan catch everything else. Build and run with scripts/fuzz.
#include <moe/io/config.hpp>

#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const auto j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return 0;
    try {
        const moe::io::model_config c = moe::io::parse_config(j, "fuzz");
        if (c.top_k < 1 || c.top_k > c.n_experts || c.hidden_size < 1 || c.expert_size < 1) __builtin_trap();
        for (moe::index layer = -1; layer <= 4; ++layer) (void)c.is_moe_layer(layer);
    } catch (const moe::error&) {
    }
    return 0;
}
