"""A GGUF writer of our own, from ggml's docs/gguf.md (version 3)."""

import struct

import numpy as np

from quant import QBLOCK, q4_0_values, quantize_q4_0, quantize_q8_0


GGUF_VALUE_TYPES = {"u8": (0, "<B"), "i8": (1, "<b"), "u16": (2, "<H"), "i16": (3, "<h"), "u32": (4, "<I"),
                    "i32": (5, "<i"), "f32": (6, "<f"), "bool": (7, "<B"), "string": (8, None), "array": (9, None),
                    "u64": (10, "<Q"), "i64": (11, "<q"), "f64": (12, "<d")}
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "BF16": 30}


def gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(vtype, value) -> bytes:
    """A value of type vtype: a name of GGUF_VALUE_TYPES, or ("array", element vtype)."""
    if isinstance(vtype, tuple):
        element = vtype[1]
        number = GGUF_VALUE_TYPES[element[0] if isinstance(element, tuple) else element][0]
        return struct.pack("<IQ", number, len(value)) + b"".join(gguf_value(element, v) for v in value)
    if vtype == "string":
        return gguf_string(value)
    return struct.pack(GGUF_VALUE_TYPES[vtype][1], value)


def write_gguf(path: str, metadata, tensors, alignment: int = 32) -> None:
    """metadata [(key, vtype, value)]; tensors [(name, ggml type name, dims fastest first, bytes)],
    laid out in order, each at a multiple of `alignment` from the start of the data section."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, vtype, value in metadata:
        number = GGUF_VALUE_TYPES[vtype[0] if isinstance(vtype, tuple) else vtype][0]
        out += gguf_string(key) + struct.pack("<I", number) + gguf_value(vtype, value)
    data, offset = b"", 0
    for name, type_name, dims, raw in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", GGML_TYPES[type_name], offset)
        padded = raw + b"\0" * (-len(raw) % alignment)
        data += padded
        offset += len(padded)
    out += b"\0" * (-len(out) % alignment)
    with open(path, "wb") as f:
        f.write(out + data)


def q8_0_bytes(rows):
    """ggml's q8_0 blocks of float32 rows, and their values dequantized (float32, exact)."""
    raw, values = b"", []
    for row in rows:
        scales, q = quantize_q8_0(row)
        for b, d in enumerate(scales):
            raw += np.float16(d).tobytes() + np.array(q[b * QBLOCK:(b + 1) * QBLOCK], dtype=np.int8).tobytes()
            values += [np.float32(d) * np.float32(v) for v in q[b * QBLOCK:(b + 1) * QBLOCK]]
    return raw, np.array(values, dtype=np.float32).reshape(len(rows), -1)


def q4_0_bytes(rows):
    """ggml's q4_0 blocks of float32 rows, and their values dequantized (float32, exact)."""
    raw, values = b"", []
    for row in rows:
        scales, packed = quantize_q4_0(row)
        q = q4_0_values(packed)
        for b, d in enumerate(scales):
            raw += np.float16(d).tobytes() + bytes(packed[b * QBLOCK // 2:(b + 1) * QBLOCK // 2])
            values += [np.float32(d) * np.float32(v) for v in q[b * QBLOCK:(b + 1) * QBLOCK]]
    return raw, np.array(values, dtype=np.float32).reshape(len(rows), -1)


# llama.cpp's architecture names of the checkpoint families (general.architecture).
