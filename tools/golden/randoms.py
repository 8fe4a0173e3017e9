"""Seeded random draws, and re-drawing a case until no decision is within a margin."""

import math
import zlib

import torch

from files import round_to
from decisions import Decisions, MAX_ATTEMPTS


def randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


def rand_linear(g, out_f, in_f, dtype="F32"):
    """nn.Linear-style weight [out, in], std 1/sqrt(in), rounded to `dtype`."""
    return round_to(randn(g, out_f, in_f, std=1.0 / math.sqrt(in_f)), dtype)


def rand_input(g, T, d):
    return round_to(randn(g, T, d), "F32")


def generate(name, build, accept=None):
    """Call build(generator) with seeds derived from `name` until its decisions are clean
    (and, if given, accept(result) holds: the draw exercises the case's feature)."""
    base = zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
    for attempt in range(MAX_ATTEMPTS):
        g = torch.Generator().manual_seed(base + attempt)
        dec = Decisions()
        result = build(g, dec)
        if dec.clean() and (accept is None or accept(result)):
            return result, dec, attempt
    raise RuntimeError(f"{name}: no clean draw in {MAX_ATTEMPTS} attempts")
