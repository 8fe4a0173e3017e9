"""tests/data/quant: quantized blocks and products against an independent implementation."""

import os
import zlib

import torch

from files import write_safetensors
from quant import (
    QBLOCK, q4_0_values, quant_rows, quant_special_blocks, quantize_q4_0, quantize_q8_0,
    quantized_dot)


def gen_quant_cases(root):
    folder = os.path.join(root, "quant")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(zlib.crc32(b"quant/formats"))
    special = quant_special_blocks()
    x = quant_rows(g, 4, 5, special)
    w = quant_rows(g, 6, 5, special[3:] + special[:3])
    tensors = [("x", "F32", x), ("w", "F32", w)]
    xq = [quantize_q8_0(r) for r in x.numpy()]
    w8 = [quantize_q8_0(r) for r in w.numpy()]
    w4 = [quantize_q4_0(r) for r in w.numpy()]

    def scales(q):
        return torch.tensor([[float(v) for v in s] for s, _ in q], dtype=torch.float64)

    def values(q):
        return torch.tensor([v for _, v in q], dtype=torch.int64)

    z8 = torch.tensor([[quantized_dot(xs, xv, ws, wv) for ws, wv in w8] for xs, xv in xq], dtype=torch.float64)
    z4 = torch.tensor([[quantized_dot(xs, xv, ws, q4_0_values(wb)) for ws, wb in w4] for xs, xv in xq],
                      dtype=torch.float64)
    tensors += [("x.q8_0.scale", "F16", scales(xq)), ("x.q8_0.values", "I8", values(xq)),
                ("w.q8_0.scale", "F16", scales(w8)), ("w.q8_0.values", "I8", values(w8)),
                ("w.q4_0.scale", "F16", scales(w4)), ("w.q4_0.bytes", "U8", values(w4)),
                ("z.q8_0", "F64", z8), ("z.q4_0", "F64", z4)]
    path = os.path.join(folder, "formats.safetensors")
    write_safetensors(path, tensors, {"block": QBLOCK})
    return [(path, f"q8_0 / q4_0 formats: x {list(x.shape)}, w {list(w.shape)}")]
