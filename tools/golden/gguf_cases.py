"""tests/data/gguf: GGUF files of every value and tensor type, and malformed ones."""

import os
import random

import torch

from files import encode, write_safetensors
from gguf_io import q4_0_bytes, q8_0_bytes, write_gguf
from ckpt_cases import gguf_model_metadata


def gen_gguf_cases(root):
    """tests/data/gguf/reader.gguf: metadata of every value type (general.alignment 64) and tensors of
    types F32, F16, BF16, Q8_0, Q4_0 (one of three dimensions, as llama.cpp stores experts) and Q4_K
    (random bytes: a type the library does not read); reader_expected.safetensors: each readable
    tensor's values as float32 [rows, cols] and the float rows its blocks were quantized from."""
    out = os.path.join(root, "gguf")
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(61)
    metadata = [
        ("general.architecture", "string", "llama"), ("general.alignment", "u32", 64),
        ("test.u8", "u8", 200), ("test.i8", "i8", -100), ("test.u16", "u16", 60000), ("test.i16", "i16", -30000),
        ("test.u32", "u32", 4000000000), ("test.i32", "i32", -2000000000), ("test.f32", "f32", 0.5),
        ("test.bool", "bool", 1), ("test.u64", "u64", 2**63 + 5), ("test.i64", "i64", -2**62), ("test.f64", "f64", -1.25),
        ("test.strings", ("array", "string"), ["a", "", "expert"]), ("test.i32s", ("array", "i32"), [1, -2, 3]),
        ("test.nested", ("array", ("array", "u8")), [[1, 2], [], [3]]),
    ]
    f32 = torch.randn(3, 5, generator=g)
    f16 = torch.randn(2, 32, generator=g).to(torch.float16).to(torch.float32)
    bf16 = torch.randn(2, 32, generator=g).to(torch.bfloat16).to(torch.float32)
    q8_src = torch.randn(6, 64, generator=g).to(torch.float32)
    q4_src = torch.randn(3, 64, generator=g).to(torch.float32)
    q8_raw, q8_values = q8_0_bytes(q8_src.numpy())
    q4_raw, q4_values = q4_0_bytes(q4_src.numpy())
    k_raw = bytes(random.Random(3).randrange(256) for _ in range(144))
    tensors = [
        ("f32", "F32", [5, 3], encode(f32, "F32")),
        ("f16", "F16", [32, 2], encode(f16, "F16")),
        ("bf16", "BF16", [32, 2], encode(bf16, "BF16")),
        ("blk.0.ffn_gate_exps.weight", "Q8_0", [64, 3, 2], q8_raw),  # 2 experts of 3 rows of 64
        ("q4_0", "Q4_0", [64, 3], q4_raw),
        ("q4_k", "Q4_K", [256, 1], k_raw),
    ]
    write_gguf(os.path.join(out, "reader.gguf"), metadata, tensors, alignment=64)
    write_safetensors(os.path.join(out, "reader_expected.safetensors"), [
        ("f32", "F32", f32), ("f16", "F32", f16), ("bf16", "F32", bf16),
        ("blk.0.ffn_gate_exps.weight", "F32", torch.from_numpy(q8_values)), ("q4_0", "F32", torch.from_numpy(q4_values)),
        ("blk.0.ffn_gate_exps.weight.source", "F32", q8_src), ("q4_0.source", "F32", q4_src),
    ], {})
    yield out, "GGUF reader: metadata of every type, F32/F16/BF16/Q8_0/Q4_0/Q4_K tensors, alignment 64"
    # An OLMoE layer whose experts are Q4_K (random bytes): a K-quant model, which the library refuses.
    d = ff = 256
    config = {"model_type": "olmoe", "num_hidden_layers": 1, "hidden_size": d, "num_experts": 2,
              "num_experts_per_tok": 1, "intermediate_size": ff}
    rng = random.Random(4)
    k_quant = lambda n: bytes(rng.randrange(256) for _ in range(n // 256 * 144))
    write_gguf(os.path.join(out, "olmoe_q4_k.gguf"), gguf_model_metadata(config), [
        ("blk.0.ffn_gate_inp.weight", "F32", [d, 2], encode(torch.randn(2, d, generator=g), "F32")),
        ("blk.0.ffn_gate_exps.weight", "Q4_K", [d, ff, 2], k_quant(d * ff * 2)),
        ("blk.0.ffn_up_exps.weight", "Q4_K", [d, ff, 2], k_quant(d * ff * 2)),
        ("blk.0.ffn_down_exps.weight", "Q4_K", [ff, d, 2], k_quant(d * ff * 2)),
    ])
    yield os.path.join(out, "olmoe_q4_k.gguf"), "an OLMoE layer with Q4_K experts (random bytes): refused"
