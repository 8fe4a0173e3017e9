"""ggml's q8_0 and q4_0 block formats, from their reference quantizers' formulas, and exact quantized
projections."""

import math
import random
from dataclasses import replace
from fractions import Fraction

import numpy as np
import torch


QBLOCK = 32


def quant_inverse(d):
    """1 / d in float32; 0 where d is 0 or its reciprocal overflows (ggml's reference then casts
    +-inf or NaN to an integer, undefined in C; x86 gives 0)."""
    if d == 0:
        return np.float32(0)
    with np.errstate(over="ignore"):
        inv = np.float32(np.float32(1) / d)
    return inv if np.isfinite(inv) else np.float32(0)


def q4_0_rounding_block():
    """A q4_0 block (max 7, so 1 / d = -8/7 rounded) whose other values put v / d + 8.5 so near an
    integer that rounding the product first (ggml) or not (a fused multiply-add) truncates
    differently: found by a seeded search."""
    rng = random.Random(5)
    d = np.float32(np.float32(7) / np.float32(-8))
    inv = np.float32(np.float32(1) / d)
    found = []
    while len(found) < QBLOCK - 1:
        k = rng.randint(1, 15)
        v = np.float32((k - 8.5) / float(inv) * (1 + rng.uniform(-3e-7, 3e-7)))
        if abs(v) >= 7:
            continue
        fused = np.float32(float(Fraction(float(v)) * Fraction(float(inv)) + Fraction(17, 2)))
        unfused = np.float32(np.float32(v * inv) + np.float32(8.5))
        if int(fused) != int(unfused):
            found.append(float(v))
    return [7.0] + found


def quantize_q8_0(row):
    """(fp16 scales, int8 values) of a float32 row, per block of 32."""
    row = np.asarray(row, dtype=np.float32)
    scales, values = [], []
    for b in range(0, len(row), QBLOCK):
        block = row[b:b + QBLOCK]
        amax = np.float32(0)
        for v in block:
            amax = max(amax, np.float32(abs(v)))
        d = np.float32(amax / np.float32(127))
        inv = quant_inverse(d)
        for v in block:
            x0 = np.float32(v * inv)
            q = math.floor(abs(float(x0)) + 0.5)  # roundf: halves away from zero (exact in float64)
            values.append(int(q if x0 >= 0 else -q))
        scales.append(np.float16(d))
    return scales, values


def quantize_q4_0(row):
    """(fp16 scales, packed bytes) of a float32 row, per block of 32."""
    row = np.asarray(row, dtype=np.float32)
    scales, packed = [], []
    for b in range(0, len(row), QBLOCK):
        block = row[b:b + QBLOCK]
        amax, vmax = np.float32(0), np.float32(0)
        for v in block:
            if amax < np.float32(abs(v)):  # strictly larger: the first of equal magnitudes stays
                amax, vmax = np.float32(abs(v)), v
        d = np.float32(vmax / np.float32(-8))
        inv = quant_inverse(d)
        q = [min(15, math.trunc(float(np.float32(np.float32(v * inv) + np.float32(8.5))))) for v in block]
        packed += [q[j] | (q[j + QBLOCK // 2] << 4) for j in range(QBLOCK // 2)]
        scales.append(np.float16(d))
    return scales, packed


def q4_0_values(packed):
    """The quantized values (q - 8) of a row's packed q4_0 bytes, in element order."""
    out = []
    for b in range(0, len(packed), QBLOCK // 2):
        block = packed[b:b + QBLOCK // 2]
        out += [(v & 15) - 8 for v in block] + [(v >> 4) - 8 for v in block]
    return out


def quantized_dot(xs, xq, ws, wq):
    """sum over blocks of fp16(d_x) fp16(d_w) (integer sum of products), in float64 (exact
    integer sums, one rounding per block product and sum)."""
    total = 0.0
    for b in range(len(xs)):
        isum = sum(xq[b * QBLOCK + j] * wq[b * QBLOCK + j] for j in range(QBLOCK))
        total += float(xs[b]) * float(ws[b]) * isum
    return total


# The margins the layer's quantized golden cases keep from a rounding decision of an activation's
# quantization, where float32 sums and activations (the library) and float64 ones (here) could fall
# on either side: v / d from a .5 boundary (in units of the quantum, |v / d| <= 127), and d = amax /
# 127 from the midpoint of its two fp16 neighbours (in units of their spacing). The library's
# activations differ from these by about 1e-7 relative (measured: its outputs are 1-2e-7 from these),
# so v / d by about 1e-5 and d by 1e-4 of an fp16 spacing: the margins are 50 and 20 times that. A
# value quantized differently anyway would move an output by ~1e-3 relative, which the tests' 1e-6
# tolerance does not let pass.
QUANT_VALUE_MARGIN = 5e-4
QUANT_SCALE_MARGIN = 2e-3


def q8_0_dequantized(row, dec=None):
    """A float32 row quantized to q8_0 and back, in float64 (exact); with `dec`, the rounding
    decisions too close to a tie count as near bounds."""
    scales, values = quantize_q8_0(row)
    row = np.asarray(row, dtype=np.float32)
    out = []
    for b, d16 in enumerate(scales):
        out += [float(d16) * v for v in values[b * QBLOCK:(b + 1) * QBLOCK]]
        if dec is None:
            continue
        block = row[b * QBLOCK:(b + 1) * QBLOCK]
        d = np.float32(max(np.float32(abs(v)) for v in block) / np.float32(127))
        lo = np.float16(d)  # the fp16 neighbours of d (d >= 0), below and above
        if float(lo) > float(d):
            lo = np.nextafter(lo, np.float16(0))
        hi = np.nextafter(lo, np.float16(np.inf))
        midpoint = (float(lo) + float(hi)) / 2
        dec.bound((float(d) - midpoint) / (float(hi) - float(lo)), 0.0, QUANT_SCALE_MARGIN)
        inv = quant_inverse(d)
        for v in block:
            x0 = abs(float(np.float32(v * inv)))
            dec.bound(x0 - math.floor(x0), 0.5, QUANT_VALUE_MARGIN)
    return out


class QuantizedInputs:
    """The projection inputs of a layer with quantized experts: each row of a [T, n] tensor
    quantized to q8_0 and back. For the activations (any tensor but the layer's input x, which
    the library quantizes from the same float32 values) of the tokens in `rows`, rounding
    decisions near a tie are recorded in `dec`."""

    def __init__(self, x, dec):
        self.x, self.dec, self.rows = x, dec, []

    def __call__(self, t):
        track = t is not self.x
        rows = [q8_0_dequantized(r.numpy().astype(np.float32), self.dec if track and keep_row else None)
                for r, keep_row in zip(t, self.rows)]
        return torch.tensor(rows, dtype=torch.float64).reshape(t.shape)


def quantized_spec(spec, fmt):
    """`spec` with its expert weights quantized to `fmt` ("q8_0" or "q4_0") by ggml's reference
    quantizer from their float32 values, as dequantized float64 tensors, and its projection
    inputs quantized to q8_0."""
    def weight(w):
        rows = []
        for r in w.numpy().astype(np.float32):
            if fmt == "q8_0":
                scales, values = quantize_q8_0(r)
            else:
                scales, packed = quantize_q4_0(r)
                values = q4_0_values(packed)
            rows.append([float(scales[i // QBLOCK]) * v for i, v in enumerate(values)])
        return torch.tensor(rows, dtype=torch.float64)

    experts = [tuple(weight(w) for w in params) for params in spec.experts]
    shared = tuple(weight(w) for w in spec.shared) if spec.shared is not None else None
    return replace(spec, experts=experts, shared=shared, inputs="Q8_0")


def quant_rows(g, rows, blocks, special):
    """rows x (blocks * 32) float32 values: random normal, with the first rows' blocks
    replaced by `special` edge cases in turn."""
    t = torch.randn(rows, blocks * QBLOCK, generator=g, dtype=torch.float64).to(torch.float32)
    for i, block in enumerate(special):
        r, b = divmod(i, blocks)
        t[r, b * QBLOCK:(b + 1) * QBLOCK] = torch.tensor(block, dtype=torch.float32)
    return t


def quant_special_blocks():
    """Edge cases, each one block of 32 values."""
    ramp = [(j - 16) for j in range(QBLOCK)]
    return [
        [0.0] * QBLOCK,                                          # all zeros: d = 0
        [127.0] + [k + 0.5 for k in range(-15, 16)],             # d = 1: halves round away from zero
        [-8.0] + [k / 2 for k in range(-15, 16)],                # q4_0 d = 1: v + 8.5 truncated, 16 -> 15
        [3.0, -3.0] + [0.1 * v for v in ramp[2:]],              # q4_0: the first of equal magnitudes (+3)
        [-3.0, 3.0] + [0.1 * v for v in ramp[2:]],              # ... (-3)
        [1e5 * (j % 7 - 3) for j in range(QBLOCK)],              # large: q4_0 d = 37500, near the fp16 limit
        [1e-6 * (j % 5 - 2) for j in range(QBLOCK)],             # tiny: q4_0's fp16 scale subnormal, q8_0's 0
        [5.0] * QBLOCK,                                          # constant
        [1e-38 * (j % 3 - 1) for j in range(QBLOCK)],            # 1 / d overflows: all values 0
        q4_0_rounding_block(),                                   # q4_0: the product rounded before + 8.5
    ]
