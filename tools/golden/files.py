"""Writing safetensors and JSON files, and rounding values to their storage dtype."""

import json
import struct

import torch


_TORCH_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def round_to(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round float64 `t` to storage dtype (via float32, round-to-nearest-even) and return
    the stored value as float64 -- the value a reader of the file sees."""
    return t.to(torch.float32).to(_TORCH_DTYPE[dtype]).to(torch.float64)


def encode(t: torch.Tensor, dtype: str) -> bytes:
    """Raw little-endian bytes of `t` in safetensors dtype F64 / F32 / F16 / BF16 / I64 / I8 / U8."""
    if dtype == "I64":
        arr = t.to(torch.int64).contiguous().numpy().astype("<i8")
    elif dtype in ("I8", "U8"):
        arr = t.to(torch.int64).contiguous().numpy().astype("i1" if dtype == "I8" else "u1")
    elif dtype == "F64":
        arr = t.to(torch.float64).contiguous().numpy().astype("<f8")
    elif dtype == "F32":
        arr = t.to(torch.float32).contiguous().numpy().astype("<f4")
    elif dtype == "F16":
        arr = t.to(torch.float32).to(torch.float16).contiguous().numpy().astype("<f2")
    elif dtype == "BF16":  # upper 16 bits of the float32, rounded to nearest even
        bf = t.to(torch.float32).to(torch.bfloat16).contiguous()
        arr = bf.view(torch.int16).numpy().astype("<i2")
    else:
        raise ValueError(dtype)
    return arr.tobytes()


def write_safetensors(path: str, tensors, metadata: dict) -> int:
    """Write [(name, dtype, tensor), ...] in the given order, contiguous, no gaps.

    Layout: u64 LE header length N, N bytes of JSON (padded with spaces to a multiple
    of 8), then the data section; data_offsets are relative to the data section.
    Returns the number of data bytes (used for an index's total_size)."""
    header, chunks, offset = {}, [], 0
    for name, dtype, t in tensors:
        data = encode(t, dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)))
        f.write(js)
        for c in chunks:
            f.write(c)
    return offset


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
