#!/usr/bin/python3
"""Golden test data for the MoE library: an independent float64 PyTorch reference.

Run with Debian's PyTorch (the ``python3`` on PATH may lack torch)::

    /usr/bin/python3 tools/gen_golden.py   # writes tests/data/{ckpt,layer,overrides,quant,gguf}
    /usr/bin/python3 tools/gen_golden.py --check   # compares a fresh run with tests/data
    /usr/bin/python3 tools/gen_golden.py --only layer [--check]   # one set

Everything is computed in float64 from the values *as stored* (weights are rounded
to their storage dtype F32/BF16/F16 first, inputs to F32); expected values are written
as F32 (ids/loads as I64). The output is deterministic: fixed torch seeds, no
wall-clock or environment-dependent content, so two runs give byte-identical files.

What is implemented (the spec the C++ library is tested against):

* R1 ``softmax_topk``: p = softmax(z), z = x W_r^T; I = top-k of p; w = p[I];
  optionally w /= sum(w); then w *= scale.
* R2 ``sigmoid_topk`` (DeepSeek-V3 "noaux_tc"): s = sigmoid(z), c = s + b. With
  n_group > 1 the experts form n_group contiguous groups, group score = sum of the
  two largest c in the group, only the topk_group best groups stay eligible;
  I = top-k of c over the eligible experts; w = s[I]; optionally
  w /= (sum(w) + 1e-20); then w *= routed_scaling_factor.
* R3 capacity (after R1/R2): C = ceil(capacity_factor * T * k / E); an expert with
  more than C assignments keeps C of them: policy ``position`` keeps the lowest token
  indices, ``probs`` the largest final weights (ties -> lower token index). Dropped
  slots get id -1 / weight 0; kept weights are not renormalised.
* R4 ``top_p`` ("Harder Tasks Need More Experts"): sort p descending; take the shortest
  prefix with cumsum >= threshold, at least 1 and at most max_k experts; w = p of the
  chosen, / their sum if normalize. Slots in selection order, padded with -1 / 0.
* R5 ``null_experts`` (AdaMoE): the router has E + N rows, p = softmax over E + N,
  I = top-k over E + N; a slot with id >= E is null (weight 0, computes nothing, id
  kept); real weights w = p, / (sum of the real chosen p) if normalize (all-null: 0).
* R6 ``sinkhorn`` (S-BASE / Megatron-LM, Selective Sinkhorn): K = exp(z - max z),
  d1 = 1; per iteration d0 = 1 / (T (K d1 + 1e-8)), d1' = 1 / (E (d0^T K + 1e-8)),
  err = mean|d1' - d1|, stop early if tolerance > 0 and err < tolerance;
  P = diag(d0) K diag(d1); I = top-k of P_t; gates ``softmax``: w = p[I] (/ sum if
  normalize), ``plan``: w = P_t[I] / sum P_t[I]. Also marginal_error = the largest
  relative deviation of P's marginals from the balanced ones, max(max_e |T sum_t P_te -
  T/E| / (T/E), max_t |T sum_e P_te - 1|), and the iteration count. ``inference_topk``: R1.
* R7 ``expert_choice`` (Zhou et al. 2022): expert e takes its
  C = min(T, ceil(capacity_factor T / E)) highest p[:, e] tokens; w_te = p_te; a token's
  slots (0..E) are ordered by expert index, padded with -1 / 0.
* Ties are broken by the lower index everywhere (experts, groups, tokens); this is
  done explicitly with a sort on (-score, index), never via torch.topk.
* Experts: SwiGLU  W_down(silu(W_gate x) * W_up x); GeGLU the same with erf-GELU;
  MLP W_down act(W_up x) with act in relu / gelu (erf) / silu. With bf16 weights kept as
  bf16 (the library's ``experts::bf16_weights``) the input of each projection, x and the
  activation, is rounded to bfloat16 (torch's float32 -> bfloat16, ties to even) first.
  With q8_0 / q4_0 weights (``experts::q8_0_weights`` / ``q4_0_weights``) the weights are
  ggml's blocks quantized from the stored float values, and the input of each projection is
  quantized to q8_0 rows first; the products of the dequantized values are then exact in
  float64, so the projection is the sum over blocks of d_x d_w (integer sum).
* Layer: y_t = sum over kept slots (t, e) of w_te * Expert_e(x_t) + shared(x_t),
  where shared is ungated, or gated by sigmoid(x . w_g) (Qwen2-MoE).
* Losses, for every router (alpha = beta = 1): L1 = E * sum_e (routed_e / slots) * P_e,
  routed_e = assignments to real expert e before capacity drops, slots = T * k for
  R1/R2 (with or without R3) else the slots filled (null slots included),
  P_e = mean_t softmax(z_t[:E])_e; L2 = mean_t logsumexp(z_t)^2 over all columns;
  L3 (sequence-wise, DeepSeek-V2/V3): consecutive sequences of S = T / 2 tokens (T even,
  T >= 2) else S = T; per sequence f_e = E * c_e(seq) / n(seq) with c_e(seq) the routed_e
  and n(seq) the L1 slots of the sequence's tokens, P'_e = mean over the sequence of
  s'_te, s'_t = score_t / sum(score_t) over all columns (score = sigmoid(z) for
  sigmoid_topk, else softmax over all columns), e < E; L3 = mean_seq sum_e f_e P'_e;
  L4 (AdaMoE, null_experts only) = (E+N) sum_{e < E+N} (c'_e / (T k)) P_e with P_e =
  mean_t softmax(z_t)_e over all E + N columns, c'_e = slots choosing e, each null
  expert's replaced by the mean of the N null counts. All 0 when T == 0.
* Backward: torch.autograd in float64 through the functions above, with the selection
  (ids, capacity drops, top-p / expert-choice sets, Sinkhorn's d0 / d1) constant. With
  grad_output g (its own generator, seeded from "grad/" + case), L_y = sum(y * g);
  gradients of L_y, L1, L2, L3 and L4 (their counts constant) with respect to the input
  and every trainable tensor (not the correction bias). Null slots and dropped
  assignments pass no gradient; with R3 and normalize the kept weight's denominator
  still holds the dropped p.

Outputs:

* ``tests/data/ckpt/<case>/``: a HuggingFace-style model folder (config.json,
  model.safetensors or an index + 2 shards) for the mixtral / qwen2_moe / qwen3_moe /
  olmoe / deepseek_v3 families, plus input.safetensors (hidden_states, grad_output),
  expected.safetensors (for BF16 checkpoints also hidden_states_bf16_weights: the output
  with bf16-rounded projection inputs; for the QUANT_CASES hidden_states_q8_0_weights and
  hidden_states_q4_0_weights), args.json ({"layer": 1, "backward_flags": [...]}) and
  expected_backward.safetensors: hidden_states, router_logits, grad_hidden_states and
  grad.<checkpoint name> of every trainable layer-1 tensor for the loss
  L_y + A L1 + B L2 (A, B = BACKWARD_COEFS, the run's --load-balance-coef and
  --z-loss-coef), plus the scalars loss.load_balance = A L1, loss.z_loss = B L2.
* ``tests/data/layer/<case>.safetensors``: library-API layer cases; options in
  ``__metadata__``, weights, input and expected results in one file. Cases of the
  routers R4-R7 carry the extra options and expected.slots (+ Sinkhorn statistics).
  Backward: grad_output, grad.x and grad.<parameter> of L_y (gated in.weight: [gate;
  up] gradients), grad_load_balance.{x, router.weight} of L1, grad_z_loss.{...} of L2;
  then expected.seq_balance (L3), seq_balance.seq_len (S), grad_seq_balance.{...} of L3
  and, for the null-experts cases, expected.null_balance (L4), grad_null_balance.{...}.
* ``tests/data/quant/formats.safetensors``: the ggml block formats q8_0 and q4_0 (see
  "Quantized formats" below) of rows with chosen edge cases (zero blocks, ties at .5, the
  first of two equal magnitudes, values near the fp16 limits) and random ones: x, w (F32),
  their quantized scales (F16) and values (q8_0: I8 per value; q4_0: U8, the packed bytes
  as ggml stores them), and z.q8_0 / z.q4_0 (F64): the quantized projection x_q w_q^T.
* ``tests/data/overrides/<case>/``: moe-run runs with router flags on one of the
  checkpoints above (args.json {"model", "layer", "flags", "backward_flags"},
  input.safetensors, expected.safetensors, expected_backward.safetensors as for
  ckpt); ``ckpt/mixtral_null`` (E = 4 + N = 2 gate rows) only serves
  the null-experts override and has no input/expected/args of its own.

Quantized formats (ggml's block formats, from its reference quantizers
``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``; written here from the formulas in
float32 with numpy, element by element): blocks of 32 consecutive values of a row.
q8_0: amax = max |v|, d = amax / 127, id = 1 / d (0 if d = 0), q = roundf(v id) (halves
away from zero), d stored as fp16 (round to nearest even). q4_0: m = the value of
largest |v| (the first on ties), d = m / -8, id as above, q = min(15, trunc(v id + 8.5))
(float32 sum), byte j of the block = q_j | q_{j+16} << 4, d as fp16; value = d (q - 8).
A projection quantizes its input rows to q8_0 and sums per block
fp16(d_w) fp16(d_x) (sum of the 32 integer products), here exactly in float64.

Robustness: the C++ side computes in float32, so every random case is re-drawn
(seed + 1, ...) until no discrete decision (top-k membership and order, group
choice, capacity cut) is decided by a margin below MARGIN; exact ties (from
duplicated router rows) are intended and are resolved by the lower index. Threshold
decisions are guarded too: a top-p cumsum within MARGIN of the threshold, or a Sinkhorn
error within SINKHORN_STOP_MARGIN (relative) of the tolerance, also forces a redraw.
Sinkhorn's top-k is guarded on the row-normalised plan P_t / sum(P_t) (scale-free).
"""

import argparse
import json
import math
import os
import random
import struct
import zlib
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import List, Optional

import numpy as np
import torch

MARGIN = 1e-4  # smallest accepted non-zero gap between scores at a discrete decision
SINKHORN_STOP_MARGIN = 1e-2  # smallest accepted relative gap |err - tolerance| / tolerance
MAX_ATTEMPTS = 64

# --------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Decision bookkeeping (robustness margins, tie counts)
# --------------------------------------------------------------------------------------

class Decisions:
    """Collects the smallest non-zero score gap at any discrete decision and counts ties."""

    def __init__(self):
        self.min_gap = math.inf
        self.ties_select = 0  # tokens where an exact tie straddled the top-k boundary
        self.ties_order = 0   # tokens where an exact tie decided the order of chosen ids
        self.dropped = 0
        self.near_bounds = 0  # threshold decisions (top-p cumsum, Sinkhorn stop) too close

    def bound(self, value: float, limit: float, margin: float = MARGIN) -> None:
        """A `value >= limit` / `value < limit` decision; |value - limit| < margin
        (equality included) counts as a near tie."""
        if abs(value - limit) < margin:
            self.near_bounds += 1

    def gap(self, a: float, b: float) -> None:
        if a != b:
            self.min_gap = min(self.min_gap, abs(a - b))

    def rank(self, scores: List[float], k: int, candidates=None, ordered=True,
             count_ties=False) -> List[int]:
        """Top-k of `candidates` (default: all) by descending score, ties -> lower index.

        Records the gaps that decide the result: the boundary gap (k-th vs (k+1)-th)
        and, if `ordered`, the gaps between consecutive chosen entries."""
        cand = range(len(scores)) if candidates is None else candidates
        order = sorted(cand, key=lambda i: (-scores[i], i))
        top = [scores[i] for i in order[:k + 1]]
        if len(top) > k:
            self.gap(top[k - 1], top[k])
        if ordered:
            for a, b in zip(top[:k], top[1:k]):
                self.gap(a, b)
        if count_ties:
            if len(top) > k and top[k - 1] == top[k]:
                self.ties_select += 1
            if any(a == b for a, b in zip(top[:k], top[1:k])):
                self.ties_order += 1
        return order[:k]

    def clean(self) -> bool:
        return self.min_gap >= MARGIN and self.near_bounds == 0


# --------------------------------------------------------------------------------------
# Routers
#
# Every router returns weights that are torch functions of the logits, so autograd
# differentiates them as docs/semantics.md "Backward" says: the selection (ids, drops, Sinkhorn's
# d0 / d1) is computed from plain Python floats or detached values and is a constant; the
# gradient flows through p (or s) of the chosen experts, the normalisation and the scale.
# --------------------------------------------------------------------------------------

def stack_rows(rows, width):
    """[T, width] f64 weights from per-token rows (1-D tensors of length <= width, padded
    with 0 on the right), assembled with torch ops so autograd sees through them."""
    if not rows:
        return torch.zeros((0, width), dtype=torch.float64)
    return torch.stack([torch.cat([r, r.new_zeros(width - r.shape[0])]) for r in rows])


def route_softmax_topk(logits, k, normalize, scale, dec):
    """R1: p = softmax(z); I = top-k(p) (ties -> lower index); w = p[I];
    if normalize: w /= sum(w); w *= scale. Returns ids [T,k] int64, weights [T,k] f64."""
    T = logits.shape[0]
    probs = torch.softmax(logits, dim=-1)
    ids = torch.zeros((T, k), dtype=torch.int64)
    rows = []
    for t in range(T):
        chosen = dec.rank(probs[t].tolist(), k, count_ties=True)
        w = probs[t, chosen]
        if normalize:
            w = w / w.sum()
        ids[t] = torch.tensor(chosen)
        rows.append(w * scale)
    return ids, stack_rows(rows, k)


def route_sigmoid_topk(logits, bias, k, n_group, topk_group, normalize, scale, dec):
    """R2 (DeepSeek-V3 noaux_tc): s = sigmoid(z), c = s + b; with n_group > 1 keep the
    topk_group groups (contiguous, score = sum of the two largest c) with the best
    scores (ties -> lower group); I = top-k of c over experts of kept groups only
    (ties -> lower index); w = s[I]; if normalize: w /= (sum(w) + 1e-20);
    w *= scale (routed_scaling_factor)."""
    T, E = logits.shape
    s_all = torch.sigmoid(logits)
    c_all = s_all + bias
    ids = torch.zeros((T, k), dtype=torch.int64)
    rows = []
    assert E % n_group == 0
    gsize = E // n_group
    for t in range(T):
        c = c_all[t].tolist()
        if n_group > 1:
            assert gsize >= 2 and k <= topk_group * gsize
            gscore = []
            for g in range(n_group):
                best = sorted(c[g * gsize:(g + 1) * gsize], reverse=True)
                gscore.append(best[0] + best[1])
            kept = dec.rank(gscore, topk_group, ordered=False)
            eligible = [e for g in sorted(kept) for e in range(g * gsize, (g + 1) * gsize)]
        else:
            eligible = list(range(E))
        chosen = dec.rank(c, k, candidates=eligible, count_ties=True)
        w = s_all[t, chosen]
        if normalize:
            w = w / (w.sum() + 1e-20)
        ids[t] = torch.tensor(chosen)
        rows.append(w * scale)
    return ids, stack_rows(rows, k)


def apply_capacity(ids, weights, E, capacity_factor, policy, dec):
    """R3: C = ceil(capacity_factor * T * k / E) (exact rational arithmetic). An expert
    with more than C assignments keeps C: `position` keeps the lowest token indices,
    `probs` the largest final weights (ties -> lower token index). Dropped slots become
    id -1 / weight 0 (written into a clone: no gradient reaches them); kept weights are
    not renormalised, so with normalize their denominator still holds the dropped p."""
    T, k = ids.shape
    C = math.ceil(Fraction(capacity_factor) * T * k / E)
    ids, weights = ids.clone(), weights.clone()
    for e in range(E):
        slots = [(t, s) for t in range(T) for s in range(k) if ids[t, s].item() == e]
        if len(slots) <= C:
            continue
        if policy == "position":
            slots.sort(key=lambda ts: ts[0])
        elif policy == "probs":
            slots.sort(key=lambda ts: (-weights[ts].item(), ts[0]))
            dec.gap(weights[slots[C - 1]].item(), weights[slots[C]].item())
        else:
            raise ValueError(policy)
        for t, s in slots[C:]:
            ids[t, s] = -1
            weights[t, s] = 0.0
            dec.dropped += 1
    return ids, weights


def route_top_p(logits, threshold, max_k, normalize, dec):
    """R4 top-p ("Harder Tasks Need More Experts"): p = softmax(z); sort p descending
    (ties -> lower index); n = length of the shortest prefix whose cumulative sum
    reaches `threshold` (cumsum >= threshold), clamped to 1 <= n <= max_k; w = p of the
    chosen, / sum(w) if normalize. Slots in selection order (descending p), padded with
    id -1 / weight 0 up to max_k. Returns ids [T,max_k], weights [T,max_k], capped [T]
    (True where max_k stopped the token before the threshold was reached)."""
    T, E = logits.shape
    probs = torch.softmax(logits, dim=-1)
    ids = torch.full((T, max_k), -1, dtype=torch.int64)
    rows = []
    capped = torch.zeros(T, dtype=torch.bool)
    for t in range(T):
        p = probs[t].tolist()
        order = sorted(range(E), key=lambda i: (-p[i], i))
        total, n = 0.0, 0
        for j in range(min(max_k, E)):
            total += p[order[j]]
            n = j + 1
            if n == max_k:  # the cap decides; the comparison no longer matters
                capped[t] = total < threshold
                break
            dec.bound(total, threshold)
            if total >= threshold:
                break
        chosen = dec.rank(p, n, count_ties=True)  # == order[:n]; records its gaps
        w = probs[t, chosen]
        if normalize:
            w = w / w.sum()
        ids[t, :n] = torch.tensor(chosen)
        rows.append(w)
    return ids, stack_rows(rows, max_k), capped


def route_null_experts(logits, k, E, normalize, dec):
    """R5 null experts (AdaMoE): logits has E + N columns, p = softmax over all of them;
    I = top-k over E + N (ties -> lower index), slots in selection order. A slot with
    id >= E is null: id kept, weight 0 (it computes nothing). Real weights w = p; if
    normalize they are divided by the sum of the real chosen p (all-null token: all 0)."""
    T = logits.shape[0]
    probs = torch.softmax(logits, dim=-1)
    ids = torch.zeros((T, k), dtype=torch.int64)
    rows = []
    for t in range(T):
        chosen = dec.rank(probs[t].tolist(), k, count_ties=True)
        real = torch.tensor([i < E for i in chosen])
        w = torch.where(real, probs[t, chosen], torch.zeros((), dtype=torch.float64))
        if normalize and w.sum() > 0:
            w = w / w.sum()
        ids[t] = torch.tensor(chosen)
        rows.append(w)
    return ids, stack_rows(rows, k)


def sinkhorn_plan(logits, iterations, tolerance, dec):
    """Sinkhorn-Knopp balancing of R6 (Megatron-LM `sinkhorn`): K = exp(z - max(z)), max
    over the whole T x E matrix; d1 = ones(E); for i = 1..iterations:
    d0 = 1 / (T (K d1 + 1e-8)); d1' = 1 / (E (d0^T K + 1e-8)); err = mean|d1' - d1|;
    d1 = d1'; stop if tolerance > 0 and err < tolerance. Returns P = diag(d0) K diag(d1)
    and the number of iterations run. Each stop test is guarded (relative margin).
    Backward: d0, d1 (and the shift max(z), which cancels in every ratio of P's entries)
    are constants, computed from detached values as Megatron-LM does; only K carries a
    gradient, so P_t[I] / sum(P_t[I]) = softmax over I of (z_t + log d1)."""
    T, E = logits.shape
    K = torch.exp(logits - logits.max().detach())
    Kc = K.detach()
    d0 = torch.ones(T, dtype=torch.float64)
    d1 = torch.ones(E, dtype=torch.float64)
    run = 0
    for i in range(1, iterations + 1):
        d0 = 1.0 / (T * (Kc @ d1 + 1e-8))
        d1_new = 1.0 / (E * (d0 @ Kc + 1e-8))
        err = (d1_new - d1).abs().mean().item()
        d1 = d1_new
        run = i
        if tolerance > 0:
            dec.bound(err / tolerance, 1.0, SINKHORN_STOP_MARGIN)
            if err < tolerance:
                break
    return d0[:, None] * K * d1[None, :], run


def route_sinkhorn(logits, k, iterations, tolerance, gates, normalize, dec):
    """R6 Sinkhorn (S-BASE / Megatron-LM; Selective Sinkhorn): P = sinkhorn_plan(z);
    I_t = top-k of P_t (ties -> lower index) in descending P order; gates `softmax`:
    w = p[I_t] with p = softmax(z_t), / sum(w) if normalize; gates `plan`:
    w = P_t[I_t] / sum(P_t[I_t]). marginal_error = max(max_e |T sum_t P_te - T/E| / (T/E),
    max_t |T sum_e P_te - 1|): after the last column update the expert marginals are exact
    up to eps, so the token marginals carry the remaining error. The top-k gaps are measured on P_t / sum(P_t). Returns ids, weights, stats."""
    T, E = logits.shape
    P, run = sinkhorn_plan(logits, iterations, tolerance, dec)
    probs = torch.softmax(logits, dim=-1)
    ids = torch.zeros((T, k), dtype=torch.int64)
    rows = []
    for t in range(T):
        row = P[t] / P[t].sum()
        chosen = dec.rank(row.tolist(), k, count_ties=True)
        if gates == "softmax":
            w = probs[t, chosen]
            if normalize:
                w = w / w.sum()
        elif gates == "plan":
            w = P[t, chosen] / P[t, chosen].sum()
        else:
            raise ValueError(gates)
        ids[t] = torch.tensor(chosen)
        rows.append(w)
    weights = stack_rows(rows, k)
    target = T / E
    column_error = ((T * P.sum(dim=0) - target).abs() / target).max()
    row_error = (T * P.sum(dim=1) - 1.0).abs().max()
    marginal_error = torch.maximum(column_error, row_error)
    return ids, weights, {"marginal_error": marginal_error, "iterations": run,
                          "row_error": row_error.item()}


def route_expert_choice(logits, capacity_factor, dec):
    """R7 expert choice (Zhou et al. 2022): p = softmax(z); every expert e takes the
    C = min(T, ceil(capacity_factor * T / E)) tokens with the highest p[:, e] (ties ->
    lower token index); w_te = p_te (no normalisation, no scale). A token gets 0..E
    slots, ordered by expert index ascending, padded with id -1 / weight 0 up to E."""
    T, E = logits.shape
    probs = torch.softmax(logits, dim=-1)
    C = min(T, math.ceil(Fraction(capacity_factor) * T / E))
    chosen = [[] for _ in range(T)]
    for e in range(E):  # ascending e, so each token's list is ordered by expert index
        for t in dec.rank(probs[:, e].tolist(), C, ordered=False):
            chosen[t].append(e)
    ids = torch.full((T, E), -1, dtype=torch.int64)
    for t, experts in enumerate(chosen):
        ids[t, :len(experts)] = torch.tensor(experts, dtype=torch.int64)
    rows = [probs[t, torch.tensor(experts, dtype=torch.int64)] for t, experts in enumerate(chosen)]
    return ids, stack_rows(rows, E)


# --------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------

def silu(x):
    return x * torch.sigmoid(x)


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def relu(x):
    return torch.clamp_min(x, 0.0)


ACTIVATIONS = {"silu": silu, "gelu": gelu_erf, "relu": relu}


def keep(t):
    return t


def expert_swiglu(x, w_gate, w_up, w_down, r=keep):
    """SwiGLU: W_down (silu(W_gate x) * (W_up x)); weights are [out, in]. `r` rounds the input of
    each projection (to bf16 for the library's bf16-weight experts)."""
    return r(silu(r(x) @ w_gate.T) * (r(x) @ w_up.T)) @ w_down.T


def expert_geglu(x, w_gate, w_up, w_down, r=keep):
    """GeGLU: W_down (gelu_erf(W_gate x) * (W_up x))."""
    return r(gelu_erf(r(x) @ w_gate.T) * (r(x) @ w_up.T)) @ w_down.T


def expert_mlp(x, w_in, w_out, activation, r=keep):
    """MLP: W_out act(W_in x), act in relu / gelu (erf) / silu."""
    return r(ACTIVATIONS[activation](r(x) @ w_in.T)) @ w_out.T


def apply_expert(kind, activation, params, x, r=keep):
    if kind == "swiglu":
        return expert_swiglu(x, *params, r)
    if kind == "geglu":
        return expert_geglu(x, *params, r)
    if kind == "mlp":
        return expert_mlp(x, *params, activation, r)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------

@dataclass
class MoeSpec:
    """All parameters of one MoE layer (float64 values, already rounded as stored)."""
    router: str                      # "softmax_topk" | "sigmoid_topk" | NEW_ROUTERS
    k: int
    normalize: bool
    scale: float
    router_weight: torch.Tensor      # [E, d] ([E + N, d] with N null experts)
    router_bias: Optional[torch.Tensor] = None  # [E], sigmoid_topk only
    n_group: int = 1
    topk_group: int = 1
    expert: str = "swiglu"           # "swiglu" | "geglu" | "mlp"
    activation: str = "silu"
    experts: list = field(default_factory=list)  # (gate, up, down) or (in, out) per expert
    shared: Optional[tuple] = None   # same kind as the routed experts
    shared_gate: Optional[torch.Tensor] = None   # [1, d]
    capacity_factor: Optional[str] = None  # R3 factor (top-k routers) or R7's factor
    drop_policy: str = ""
    threshold: float = 0.0           # R4
    max_k: int = 0                   # R4
    null_experts: int = 0            # R5: N
    iterations: int = 8              # R6
    tolerance: float = 0.0           # R6
    gates: str = "softmax"           # R6: "softmax" | "plan"
    inference_topk: bool = False     # R6: route with R1 (normalize) instead
    inputs: str = ""                 # each projection's input as "BF16" (bf16 weights) or "Q8_0"
                                     # (quantized weights; see quantized_spec), else as is

    @property
    def E(self):
        """Number of real experts (router rows minus null experts)."""
        return self.router_weight.shape[0] - self.null_experts


TOPK_ROUTERS = ("softmax_topk", "sigmoid_topk")  # the routers R3 capacity applies to
NEW_ROUTERS = ("top_p", "null_experts", "sinkhorn", "expert_choice")


def moe_forward(x, spec: MoeSpec, dec: Decisions):
    """y_t = sum over kept (t, e) of w_te * Expert_e(x_t) + shared(x_t). x: [T, d] f64.
    Returns dict with y [T,d], logits [T,E'], ids [T,S], weights [T,S], load [E] (real
    experts), slots [T] (ids >= 0, null slots included), load_balance and z_loss (see
    balance_losses), seq_balance (seq_balance_loss), null_balance (null_balance_loss;
    None without null experts); R4: capped; R6: marginal_error, iterations, row_error. Every output
    is a torch function of x and the spec's tensors (selection held constant), so
    moe_backward can differentiate it."""
    logits = x @ spec.router_weight.T
    extra = {}
    if spec.router == "softmax_topk":
        ids, weights = route_softmax_topk(logits, spec.k, spec.normalize, spec.scale, dec)
    elif spec.router == "sigmoid_topk":
        ids, weights = route_sigmoid_topk(logits, spec.router_bias, spec.k, spec.n_group,
                                          spec.topk_group, spec.normalize, spec.scale, dec)
    elif spec.router == "top_p":
        ids, weights, extra["capped"] = route_top_p(logits, spec.threshold, spec.max_k,
                                                    spec.normalize, dec)
    elif spec.router == "null_experts":
        ids, weights = route_null_experts(logits, spec.k, spec.E, spec.normalize, dec)
    elif spec.router == "sinkhorn" and spec.inference_topk:
        ids, weights = route_softmax_topk(logits, spec.k, spec.normalize, 1.0, dec)
    elif spec.router == "sinkhorn":
        ids, weights, extra = route_sinkhorn(logits, spec.k, spec.iterations, spec.tolerance,
                                             spec.gates, spec.normalize, dec)
    elif spec.router == "expert_choice":
        ids, weights = route_expert_choice(logits, spec.capacity_factor, dec)
    else:
        raise ValueError(spec.router)
    # The router's assignments before any capacity drop: what L1 counts (Switch, GShard).
    routed = torch.tensor([int((ids == e).sum()) for e in range(spec.E)], dtype=torch.int64)
    # The same per token ([T, E] real experts) and the slots L1 counts per token: k for the
    # top-k routers (dropped slots included), else every slot the router filled (null
    # slots included); L3 restricts both to a sequence.
    token_routed = torch.stack([(ids == e).sum(dim=1) for e in range(spec.E)], dim=1) \
        if ids.shape[0] else torch.zeros((0, spec.E), dtype=torch.int64)
    token_slots = torch.full((ids.shape[0],), spec.k, dtype=torch.int64) \
        if spec.router in TOPK_ROUTERS else (ids >= 0).sum(dim=1)
    null_balance = null_balance_loss(logits, ids, spec.E, spec.k) if spec.null_experts else None
    if spec.capacity_factor and spec.router in TOPK_ROUTERS:
        ids, weights = apply_capacity(ids, weights, spec.E, spec.capacity_factor, spec.drop_policy, dec)

    y = torch.zeros_like(x)
    r = keep
    if spec.inputs == "BF16":
        r = lambda t: round_to(t, "BF16")
    elif spec.inputs == "Q8_0":
        r = QuantizedInputs(x, dec)
    for e, params in enumerate(spec.experts):
        if spec.inputs == "Q8_0":
            r.rows = (ids == e).any(dim=1).tolist()  # the tokens whose activations the layer quantizes
        out = apply_expert(spec.expert, spec.activation, params, x, r)   # [T, d]
        w_e = (weights * (ids == e)).sum(dim=1, keepdim=True)          # [T, 1]
        y = y + w_e * out
    if spec.shared is not None:
        if spec.inputs == "Q8_0":
            r.rows = [True] * x.shape[0]
        sh = apply_expert(spec.expert, spec.activation, spec.shared, x, r)
        if spec.shared_gate is not None:
            sh = torch.sigmoid(x @ spec.shared_gate.T) * sh
        y = y + sh
    load = torch.tensor([int((ids == e).sum()) for e in range(spec.E)], dtype=torch.int64)
    slots = (ids >= 0).sum(dim=1)
    # The slots L1 divides by: T * k for the top-k routers (dropped slots included),
    # else every slot the router filled (null slots included).
    slots_total = x.shape[0] * spec.k if spec.router in TOPK_ROUTERS else int(slots.sum())
    load_balance, z_loss = balance_losses(logits, routed, slots_total, spec.E)
    seq_balance = seq_balance_loss(router_scores(logits, spec.router), token_routed,
                                   token_slots, spec.E)
    return dict(extra, y=y, logits=logits, ids=ids, weights=weights, load=load, slots=slots,
                load_balance=load_balance, z_loss=z_loss, seq_balance=seq_balance,
                null_balance=null_balance)


def balance_losses(logits, routed, slots_total, E):
    """L1 and L2 of docs/semantics.md "Balancing losses" with alpha = beta = 1, for every router.

    L1 (Switch form): E * sum_e (routed_e / slots_total) * P_e, routed_e = the router's
    assignments to real expert e before any capacity drop (Switch and GShard count them so),
    P_e = mean_t softmax(z_t[:E])_e (the E real experts' logits only); the counts are
    constants, so the gradient flows through P only. L2 (ST-MoE z-loss):
    mean_t (logsumexp of all of z_t, null columns included)^2. Both are 0 when T == 0."""
    if logits.shape[0] == 0:
        zero = torch.zeros((), dtype=torch.float64)
        return zero, zero.clone()
    P = torch.softmax(logits[:, :E], dim=-1).mean(dim=0)
    load_balance = E * (routed.to(torch.float64) / slots_total * P).sum()
    z_loss = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return load_balance, z_loss


def seq_len(T):
    """L3's sequence length S: the T tokens form T / S consecutive sequences of S = T / 2
    tokens if T is even and T >= 2, else one sequence of S = T tokens."""
    return T // 2 if T >= 2 and T % 2 == 0 else T


def router_scores(logits, router):
    """The scores L3 normalises per token: sigmoid(z) for sigmoid_topk, else the softmax
    over all logit columns (null columns included)."""
    return torch.sigmoid(logits) if router == "sigmoid_topk" else torch.softmax(logits, dim=-1)


def seq_balance_loss(scores, token_routed, token_slots, E):
    """L3 of docs/semantics.md "Balancing losses" (DeepSeek-V2/V3 sequence-wise balance), alpha = 1.

    Sequences of S = seq_len(T) consecutive tokens; per sequence f_e = E * c_e(seq) / n(seq)
    with c_e(seq) = the sequence's rows of token_routed (assignments to real expert e before
    any capacity drop) summed and n(seq) = its token_slots summed (the slots L1 counts);
    P'_e = mean over the sequence's tokens of s'_te, s'_t = scores_t / sum(scores_t) over
    all columns, e < E only (null columns enter the sum only). L3 = mean over sequences of
    sum_e f_e P'_e. The counts are constants: the gradient flows through the scores only.
    0 when T == 0; a sequence without slots (n = 0, all c_e = 0) adds 0."""
    T = scores.shape[0]
    if T == 0:
        return torch.zeros((), dtype=torch.float64)
    S = seq_len(T)
    s = scores / scores.sum(dim=-1, keepdim=True)
    terms = []
    for start in range(0, T, S):
        c = token_routed[start:start + S].sum(dim=0).to(torch.float64)
        n = int(token_slots[start:start + S].sum())
        f = E * c / n if n else torch.zeros_like(c)
        terms.append((f * s[start:start + S, :E].mean(dim=0)).sum())
    return torch.stack(terms).mean()


def null_balance_loss(logits, ids, E, k):
    """L4 of docs/semantics.md "Balancing losses" (AdaMoE null-aware balance), alpha = 1, for the
    null-experts router (logits [T, E + N], ids [T, k] with null ids >= E kept):
    (E + N) * sum_{e < E+N} (c'_e / (T k)) * P_e, P_e = mean_t softmax(z_t over all E + N
    columns)_e, c_e = slots choosing e, c'_e = c_e for a real expert and the mean of the N
    null experts' counts for every null expert. Gradient through P only; 0 when T == 0."""
    T, EN = logits.shape
    if T == 0:
        return torch.zeros((), dtype=torch.float64)
    c = torch.tensor([int((ids == e).sum()) for e in range(EN)], dtype=torch.float64)
    c[E:] = c[E:].mean()
    P = torch.softmax(logits, dim=-1).mean(dim=0)
    return EN * (c / (T * k) * P).sum()


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------

# --load-balance-coef A and --z-loss-coef B of the moe-run backward runs (strings, as flags).
BACKWARD_COEFS = ("0.5", "0.05")


def trainable(spec: MoeSpec):
    """The tensors of `spec` that backward differentiates, in a fixed order: router weight,
    every expert's params, the shared expert's, the shared gate. Not the correction bias."""
    params = [spec.router_weight] + [w for ex in spec.experts for w in ex]
    if spec.shared is not None:
        params += list(spec.shared)
    if spec.shared_gate is not None:
        params.append(spec.shared_gate)
    return params


def with_trainable(spec: MoeSpec, params) -> MoeSpec:
    """`spec` with its trainable tensors replaced by `params` (in the order of trainable()).
    Also maps gradients back to the layout of a spec (e.g. for layer_param_tensors)."""
    it = iter(params)
    new = dict(spec.__dict__, router_weight=next(it),
               experts=[tuple(next(it) for _ in ex) for ex in spec.experts])
    if spec.shared is not None:
        new["shared"] = tuple(next(it) for _ in spec.shared)
    if spec.shared_gate is not None:
        new["shared_gate"] = next(it)
    assert next(it, None) is None
    return MoeSpec(**new)


def rand_grad_output(name, T, d):
    """grad_output of case `name` ([T, d], N(0, 1) rounded to F32), drawn from its own
    generator seeded from "grad/" + name: the case's accepted draw stays untouched."""
    g = torch.Generator().manual_seed(zlib.crc32(("grad/" + name).encode("utf-8")) & 0x7FFFFFFF)
    return rand_input(g, T, d)


@dataclass
class Backward:
    """Result of moe_backward: the forward values (detached) and, per requested loss,
    the gradients: grad_x [T, d] and params (one per tensor of trainable(spec))."""
    out: dict
    losses: dict       # "y" (L_y), "load_balance" (L1), "z_loss" (L2); float64 scalars
    grads: dict        # loss name -> (grad_x, [grad of each trainable tensor])


# The terms moe_backward combines, in the order of its coefficient tuples.
LOSS_TERMS = ("y", "load_balance", "z_loss", "seq_balance", "null_balance")


def moe_backward(spec, x, g, coefs):
    """torch.autograd gradients (float64) of L = c_y L_y + c_lb L1 + c_z L2 + c_seq L3
    + c_null L4 with respect to x and every trainable tensor of `spec`, for each
    `coefs[name] = (c_y, c_lb, c_z[, c_seq, c_null])` (missing coefficients are 0);
    L_y = sum(y * g), L1 / L2 as in balance_losses, L3 seq_balance_loss, L4
    null_balance_loss (alpha = beta = 1; L4 only with null experts).

    The forward pass is moe_forward on fresh leaves with the same values, so the selection
    is the one the forward golden data records (asserted by the callers through y). A
    loss that does not depend on a tensor (e.g. T == 0) gives zeros of its shape."""
    leaves = [t.detach().clone().requires_grad_(True) for t in [x] + trainable(spec)]
    out = moe_forward(leaves[0], with_trainable(spec, leaves[1:]), Decisions())
    terms = ((out["y"] * g).sum(),) + tuple(out[name] for name in LOSS_TERMS[1:])
    grads = {}
    for name, cs in coefs.items():
        loss = sum(c * term for c, term in zip(cs, terms) if c)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            gs = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        else:
            gs = [None] * len(leaves)
        gs = [torch.zeros_like(l) if gr is None else gr for gr, l in zip(gs, leaves)]
        grads[name] = (gs[0], gs[1:])
    plain = {key: v.detach() if isinstance(v, torch.Tensor) else v for key, v in out.items()}
    losses = {name: t.detach() for name, t in zip(LOSS_TERMS, terms) if t is not None}
    return Backward(plain, losses, grads)


def loss_shares(total, load_balance, z_loss):
    """Report text: how much of the router-weight gradient `total` the balancing-loss
    terms make, ||d(L1 + L2)|| / ||total|| and each alone (so a test of `total` is seen
    to be sensitive to them)."""
    den = total.norm().item()

    def share(part):
        return part.norm().item() / den if den > 0 else 0.0
    return (f"{share(load_balance + z_loss):.2e} (L1 term {share(load_balance):.2e}, "
            f"L2 term {share(z_loss):.2e})")


def max_abs(tensors):
    """Largest |value| over [(name, dtype, tensor)] (0 for no or empty tensors)."""
    return max([t.abs().max().item() for _, _, t in tensors if t.numel()] or [0.0])


# --------------------------------------------------------------------------------------
# Random helpers
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# HuggingFace checkpoint families. Each builder returns (config, tensors, spec) where
# tensors = [(name, dtype, value)] for layers 0 and 1 (+ embed_tokens) and spec is the
# MoE layer 1 the test loads.
# --------------------------------------------------------------------------------------

TORCH_DTYPE_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def hf_swiglu(g, prefix, d, ff, dtype, names=("gate_proj", "up_proj", "down_proj")):
    """One SwiGLU expert under `prefix`, HF names (gate, up, down). Returns tensors, params."""
    gate, up, down = rand_linear(g, ff, d, dtype), rand_linear(g, ff, d, dtype), rand_linear(g, d, ff, dtype)
    tensors = [(f"{prefix}.{n}.weight", dtype, w) for n, w in zip(names, (gate, up, down))]
    return tensors, (gate, up, down)


def embed_tensor(g, d, dtype):
    return [("model.embed_tokens.weight", dtype, round_to(randn(g, 16, d), dtype))]


def mixtral_router(g, E, d, dtype, tied):
    """Router [E, d]; with `tied`, rows 0 == 3 and 1 == 2, and rows 0/1 also agree on
    the second half of the coordinates (so tokens living there tie on all experts)."""
    w = rand_linear(g, E, d, dtype)
    if tied:
        assert E == 4
        w[1, d // 2:] = w[0, d // 2:]
        w[2], w[3] = w[1].clone(), w[0].clone()
    return w


def build_mixtral(g, d, ff, E, k, dtype="F32", tied=False, null_experts=0, null_bias=0.0):
    """Mixtral: block_sparse_moe.gate [E,d], experts.{e}.w1 (gate) / w3 (up) / w2 (down);
    router R1 softmax top-k, always normalised, scale 1. With `null_experts` N the gate
    has E + N rows (config num_local_experts stays E) and `null_bias` is added to the
    null rows' coordinate 0, so tokens with a large x_0 prefer the null experts."""
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "hidden_size": d, "intermediate_size": ff, "num_local_experts": E,
              "num_experts_per_tok": k, "num_hidden_layers": 2, "hidden_act": "silu",
              "torch_dtype": TORCH_DTYPE_NAME[dtype]}
    tensors = embed_tensor(g, d, dtype)
    spec = None
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe"
        router = mixtral_router(g, E + null_experts, d, dtype, tied)
        if null_experts:
            router[E:, 0] = round_to(router[E:, 0] + null_bias, dtype)
        tensors.append((f"{p}.gate.weight", dtype, router))
        experts = []
        for e in range(E):
            ts, params = hf_swiglu(g, f"{p}.experts.{e}", d, ff, dtype, names=("w1", "w3", "w2"))
            tensors += ts
            experts.append(params)
        spec = MoeSpec("softmax_topk", k, True, 1.0, router, experts=experts)
    return config, tensors, spec


def build_qwen2_moe(g, d, ff, shared_ff, E, k, dtype="F32"):
    """Qwen2-MoE: mlp.gate, mlp.experts.{e}.*_proj, mlp.shared_expert.*_proj and
    mlp.shared_expert_gate [1,d]; R1 with norm_topk_prob=false; output adds
    sigmoid(x . w_g) * SwiGLU_shared(x)."""
    config = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
              "hidden_size": d, "intermediate_size": 64, "moe_intermediate_size": ff,
              "shared_expert_intermediate_size": shared_ff, "num_experts": E,
              "num_experts_per_tok": k, "norm_topk_prob": False, "num_hidden_layers": 2,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
              "torch_dtype": TORCH_DTYPE_NAME[dtype]}
    tensors = embed_tensor(g, d, dtype)
    spec = None
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        router = rand_linear(g, E, d, dtype)
        tensors.append((f"{p}.gate.weight", dtype, router))
        experts = []
        for e in range(E):
            ts, params = hf_swiglu(g, f"{p}.experts.{e}", d, ff, dtype)
            tensors += ts
            experts.append(params)
        ts, shared = hf_swiglu(g, f"{p}.shared_expert", d, shared_ff, dtype)
        tensors += ts
        shared_gate = rand_linear(g, 1, d, dtype)
        tensors.append((f"{p}.shared_expert_gate.weight", dtype, shared_gate))
        spec = MoeSpec("softmax_topk", k, False, 1.0, router, experts=experts,
                       shared=shared, shared_gate=shared_gate)
    return config, tensors, spec


def softmax_swiglu_layers(g, d, ff, E, k, normalize, dtype):
    """The unrelated embedding, then layers 0 and 1 with mlp.gate and mlp.experts.{e}.*_proj
    (Qwen3-MoE and OLMoE names); returns the tensors and layer 1's MoeSpec (R1)."""
    tensors = embed_tensor(g, d, dtype)
    spec = None
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        router = rand_linear(g, E, d, dtype)
        tensors.append((f"{p}.gate.weight", dtype, router))
        experts = []
        for e in range(E):
            ts, params = hf_swiglu(g, f"{p}.experts.{e}", d, ff, dtype)
            tensors += ts
            experts.append(params)
        spec = MoeSpec("softmax_topk", k, normalize, 1.0, router, experts=experts)
    return tensors, spec


def build_qwen3_moe(g, d, ff, E, k, dtype="F32"):
    """Qwen3-MoE: mlp.gate, mlp.experts.{e}.*_proj; R1 with norm_topk_prob=true."""
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
              "hidden_size": d, "intermediate_size": 64, "moe_intermediate_size": ff,
              "num_experts": E, "num_experts_per_tok": k, "norm_topk_prob": True,
              "num_hidden_layers": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "hidden_act": "silu", "torch_dtype": TORCH_DTYPE_NAME[dtype]}
    tensors, spec = softmax_swiglu_layers(g, d, ff, E, k, normalize=True, dtype=dtype)
    return config, tensors, spec


def build_olmoe(g, d, ff, E, k, dtype="F32"):
    """OLMoE: mlp.gate, mlp.experts.{e}.*_proj (intermediate_size = expert width);
    R1 with norm_topk_prob=false."""
    config = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
              "hidden_size": d, "intermediate_size": ff, "num_experts": E,
              "num_experts_per_tok": k, "norm_topk_prob": False, "num_hidden_layers": 2,
              "hidden_act": "silu", "torch_dtype": TORCH_DTYPE_NAME[dtype]}
    tensors, spec = softmax_swiglu_layers(g, d, ff, E, k, normalize=False, dtype=dtype)
    return config, tensors, spec


def build_deepseek_v3(g, d, dense_ff, ff, E, k, n_shared, n_group, topk_group, dtype="F32"):
    """DeepSeek-V3: layer 0 dense (first_k_dense_replace=1, mlp.{gate,up,down}_proj with
    intermediate_size); layer 1 MoE: mlp.gate.weight [E,d], mlp.gate.e_score_correction_bias
    [E] (F32, N(0, 0.1)), mlp.experts.{e}.*_proj, mlp.shared_experts.*_proj of width
    n_shared_experts * moe_intermediate_size; router R2 with scale 2.5, normalised."""
    scale = 2.5
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
              "hidden_size": d, "intermediate_size": dense_ff, "moe_intermediate_size": ff,
              "n_routed_experts": E, "num_experts_per_tok": k, "n_shared_experts": n_shared,
              "n_group": n_group, "topk_group": topk_group, "norm_topk_prob": True,
              "routed_scaling_factor": scale, "scoring_func": "sigmoid",
              "topk_method": "noaux_tc", "first_k_dense_replace": 1, "moe_layer_freq": 1,
              "num_hidden_layers": 2, "hidden_act": "silu",
              "torch_dtype": TORCH_DTYPE_NAME[dtype]}
    tensors = embed_tensor(g, d, dtype)
    ts, _ = hf_swiglu(g, "model.layers.0.mlp", d, dense_ff, dtype)
    tensors += ts
    p = "model.layers.1.mlp"
    router = rand_linear(g, E, d, dtype)
    bias = round_to(randn(g, E, std=0.1), "F32")
    tensors.append((f"{p}.gate.weight", dtype, router))
    experts = []
    for e in range(E):
        ts, params = hf_swiglu(g, f"{p}.experts.{e}", d, ff, dtype)
        tensors += ts
        experts.append(params)
    ts, shared = hf_swiglu(g, f"{p}.shared_experts", d, n_shared * ff, dtype)
    tensors += ts
    # The bias goes last so that a sharded checkpoint splits gate.weight and its bias.
    tensors.append((f"{p}.gate.e_score_correction_bias", "F32", bias))
    spec = MoeSpec("sigmoid_topk", k, True, scale, router, router_bias=bias,
                   n_group=n_group, topk_group=topk_group, experts=experts, shared=shared)
    return config, tensors, spec


def selection_changed_by_bias(x, spec):
    """Tokens whose chosen expert set differs from routing without the correction bias."""
    if x.shape[0] == 0:
        return 0
    logits = x @ spec.router_weight.T
    args = (spec.k, spec.n_group, spec.topk_group, spec.normalize, spec.scale)
    with_b, _ = route_sigmoid_topk(logits, spec.router_bias, *args, Decisions())
    without, _ = route_sigmoid_topk(logits, torch.zeros_like(spec.router_bias), *args, Decisions())
    return sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(with_b, without))


# (case, builder, builder kwargs, input shape, sharded)
D = 32
CKPT_CASES = [
    ("mixtral_f32", build_mixtral, dict(d=D, ff=24, E=4, k=2), (33, D), False),
    ("mixtral_bf16", build_mixtral, dict(d=D, ff=24, E=4, k=2, dtype="BF16"), (33, D), False),
    ("mixtral_sharded", build_mixtral, dict(d=D, ff=16, E=4, k=2), (20, D), True),
    ("qwen2_moe", build_qwen2_moe, dict(d=D, ff=16, shared_ff=24, E=8, k=2), (3, 7, D), False),
    ("qwen3_moe", build_qwen3_moe, dict(d=D, ff=16, E=8, k=3, dtype="F16"), (24, D), False),
    ("olmoe", build_olmoe, dict(d=D, ff=16, E=8, k=2), (1, D), False),
    ("deepseek_v3", build_deepseek_v3,
     dict(d=D, dense_ff=48, ff=16, E=16, k=4, n_shared=2, n_group=4, topk_group=2, dtype="BF16"),
     (40, D), False),
    ("mixtral_t0", build_mixtral, dict(d=D, ff=16, E=4, k=2), (0, D), False),
    ("mixtral_k_eq_e", build_mixtral, dict(d=D, ff=16, E=4, k=4), (20, D), False),
    ("mixtral_ties", build_mixtral, dict(d=D, ff=16, E=4, k=2, tied=True), (32, D), False),
    ("deepseek_v3_sharded_f32", build_deepseek_v3,
     dict(d=D, dense_ff=32, ff=16, E=8, k=2, n_shared=1, n_group=4, topk_group=2),
     (1, D), True),
    # Quantized experts need rows of a multiple of 32 values (see QUANT_CASES).
    ("mixtral_quant", build_mixtral, dict(d=64, ff=64, E=4, k=2), (6, 64), False),
    ("deepseek_v3_quant", build_deepseek_v3,
     dict(d=64, dense_ff=64, ff=32, E=8, k=2, n_shared=1, n_group=4, topk_group=2, dtype="BF16"),
     (6, 64), False),
    ("qwen2_moe_quant", build_qwen2_moe, dict(d=64, ff=32, shared_ff=64, E=8, k=2), (6, 64), False),
    ("qwen3_moe_quant", build_qwen3_moe, dict(d=64, ff=32, E=8, k=3, dtype="F16"), (6, 64), False),
    ("olmoe_quant", build_olmoe, dict(d=64, ff=32, E=8, k=2), (6, 64), False),
]
# Cases whose expected.safetensors also holds the outputs of the layer with q8_0 and q4_0 experts.
QUANT_CASES = ("mixtral_quant", "deepseek_v3_quant", "qwen2_moe_quant", "qwen3_moe_quant", "olmoe_quant")


def ckpt_input(g, name, shape):
    x = rand_input(g, int(math.prod(shape[:-1])), shape[-1])
    if name == "mixtral_ties":
        # every 4th token lives only on the coordinates where all router rows agree:
        # all four logits are exactly equal, so the lower index decides the selection.
        x[3::4, : shape[-1] // 2] = 0.0
    return x


def write_checkpoint(folder, config, tensors, sharded):
    """config.json + model.safetensors, or an index + two shards with layer 1 split."""
    write_json(os.path.join(folder, "config.json"), config)
    meta = {"format": "pt"}
    if not sharded:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, meta)
        return
    l1 = [i for i, (n, _, _) in enumerate(tensors) if n.startswith("model.layers.1.")]
    cut = (l1[0] + l1[-1] + 1) // 2
    shards = [tensors[:cut], tensors[cut:]]
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        assert any(n.startswith("model.layers.1.") for n, _, _ in part)
        total += write_safetensors(os.path.join(folder, fname), part, meta)
        weight_map.update({n: fname for n, _, _ in part})
    write_json(os.path.join(folder, "model.safetensors.index.json"),
               {"metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items()))})


def backward_flags():
    """The moe-run flags of a backward run (args.json "backward_flags")."""
    A, B = BACKWARD_COEFS
    return ["--backward", "--load-balance-coef", A, "--z-loss-coef", B]


def checkpoint_names(tensors, spec):
    """[(checkpoint name, index in trainable(spec))] in checkpoint order. The builders put
    the very tensor objects of `tensors` into the spec, so they are matched by identity;
    every trainable tensor must be found once, and every layer-1 tensor but DeepSeek's
    correction bias must be trainable."""
    params = trainable(spec)
    found = []
    for name, _, value in tensors:
        hits = [i for i, p in enumerate(params) if p is value]
        assert len(hits) <= 1, name
        if hits:
            found.append((name, hits[0]))
        else:
            assert not name.startswith("model.layers.1.") or name.endswith(
                ".e_score_correction_bias"), name
    assert sorted(i for _, i in found) == list(range(len(params))), "spec params not in checkpoint"
    return found


def run_backward(name, tensors, spec, x, shape, out):
    """Backward golden data of the moe-run case `name` ("ckpt/..." or "overrides/...") run
    with backward_flags(): the total loss L_y + A L1 + B L2 (A, B = BACKWARD_COEFS) is
    differentiated with respect to the input and every trainable tensor of layer 1, named
    as in the checkpoint (BF16 / F16 weights at their stored values, gradients F32).
    Returns (grad_output shaped like the input, expected_backward tensors, report text)."""
    A, B = (float(c) for c in BACKWARD_COEFS)
    g = rand_grad_output(name, *x.shape)
    bwd = moe_backward(spec, x, g, {"total": (1.0, A, B), "load_balance": (0.0, A, 0.0),
                                    "z_loss": (0.0, 0.0, B)})
    assert torch.equal(bwd.out["y"], out["y"]) and torch.equal(bwd.out["ids"], out["ids"])
    grad_x, grad_params = bwd.grads["total"]
    grads = ([("grad_hidden_states", "F32", grad_x.reshape(shape))] +
             [("grad." + n, "F32", grad_params[i]) for n, i in checkpoint_names(tensors, spec)])
    expected = ([("hidden_states", "F32", out["y"].reshape(shape)),
                 ("router_logits", "F32", out["logits"])] + grads +
                [("loss.load_balance", "F32", A * bwd.losses["load_balance"]),
                 ("loss.z_loss", "F32", B * bwd.losses["z_loss"])])
    shares = loss_shares(grad_params[0], bwd.grads["load_balance"][1][0], bwd.grads["z_loss"][1][0])
    info = (f"backward: share of A*L1 + B*L2 (A={BACKWARD_COEFS[0]}, B={BACKWARD_COEFS[1]}) in "
            f"the router-weight gradient {shares}; max |grad| of expected_backward.safetensors "
            f"{max_abs(grads):.3e}")
    return g.reshape(shape), expected, info


def gen_ckpt_case(root, name, builder, kwargs, shape, sharded, registry=None):
    """Write tests/data/ckpt/<name>/ (forward and backward data); if `registry` is given,
    keep the case's tensors, spec, input and shape there for the override cases."""
    def build(g, dec):
        config, tensors, spec = builder(g, **kwargs)
        x = ckpt_input(g, name, shape)
        out = moe_forward(x, spec, dec)
        if name in QUANT_CASES:  # the layer with quantized expert weights, activations clear of ties
            out["quantized"] = {fmt: moe_forward(x, quantized_spec(spec, fmt), dec)["y"] for fmt in ("q8_0", "q4_0")}
        return config, tensors, spec, x, out

    (config, tensors, spec, x, out), dec, attempt = generate("ckpt/" + name, build)
    folder = os.path.join(root, "ckpt", name)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):  # the case folder is owned by this script
        os.remove(os.path.join(folder, f))
    write_checkpoint(folder, config, tensors, sharded)
    write_gguf_models(folder, name, config, tensors)
    meta = {"case": name}
    g, expected_backward, backward_info = run_backward("ckpt/" + name, tensors, spec, x, shape, out)
    write_safetensors(os.path.join(folder, "input.safetensors"),
                      [("hidden_states", "F32", x.reshape(shape)), ("grad_output", "F32", g)], meta)
    expected = [
        ("hidden_states", "F32", out["y"].reshape(shape)),
        ("router_logits", "F32", out["logits"]),
        ("topk_ids", "I64", out["ids"]),
        ("topk_weights", "F32", out["weights"]),
    ]
    info = ""
    if kwargs.get("dtype") == "BF16":  # the layer with its expert weights kept as bf16
        y16 = moe_forward(x, replace(spec, inputs="BF16"), Decisions())["y"]
        expected.append(("hidden_states_bf16_weights", "F32", y16.reshape(shape)))
        info = (f"bf16-weight experts (inputs rounded to bf16) vs float: relative error "
                f"{float((y16 - out['y']).norm() / out['y'].norm()):.2e}, ")
    for fmt, yq in out.get("quantized", {}).items():
        expected.append((f"hidden_states_{fmt}_weights", "F32", yq.reshape(shape)))
        info += (f"{fmt} experts vs float: relative error "
                 f"{float((yq - out['y']).norm() / out['y'].norm()):.2e}, ")
    write_safetensors(os.path.join(folder, "expected.safetensors"), expected, meta)
    write_safetensors(os.path.join(folder, "expected_backward.safetensors"), expected_backward,
                      meta)
    write_json(os.path.join(folder, "args.json"), {"layer": 1, "backward_flags": backward_flags()})
    if registry is not None:
        registry[name] = {"tensors": tensors, "spec": spec, "x": x, "shape": shape}

    info += f"seed attempt {attempt}, min decision gap {dec.min_gap:.2e}"
    if spec.router == "sigmoid_topk":
        info += f", tokens whose selection the bias changed: {selection_changed_by_bias(x, spec)}"
    if name.endswith("ties"):
        info += (f", ties deciding selection: {dec.ties_select} tokens, "
                 f"deciding order: {dec.ties_order} tokens")
        assert dec.ties_select > 0
    return folder, info + "\n    " + backward_info, dec


# --------------------------------------------------------------------------------------
# Library-API layer cases
# --------------------------------------------------------------------------------------

LAYER_DEFAULTS = dict(expert="swiglu", activation=None, router="softmax_topk", k=2,
                      normalize=True, scale=1.0, n_group=1, topk_group=1,
                      capacity_factor="", drop_policy="", shared="none", d=16, ff=16,
                      shared_ff=0, E=4, T=24, tweak=None,
                      threshold="", max_k=None, null_experts=0, iterations=8, tolerance=0.0,
                      gates="softmax", inference_topk=False, iteration_sensitive=False)

LAYER_CASES = [
    dict(name="swiglu_topk2", E=6, k=2, ff=24, T=32),
    dict(name="swiglu_topk1_scale", E=4, k=1, normalize=False, scale=1.5, T=24),
    dict(name="geglu", expert="geglu", E=4, k=2, ff=20, T=28),
    dict(name="mlp_relu", expert="mlp", activation="relu", E=4, k=2, normalize=False,
         d=20, ff=32, T=24),
    dict(name="mlp_gelu", expert="mlp", activation="gelu", E=5, k=2, ff=24, T=30),
    dict(name="mlp_silu", expert="mlp", activation="silu", E=6, k=3, ff=24, T=20),
    dict(name="sigmoid_groups", router="sigmoid_topk", E=8, n_group=4, topk_group=2, k=3,
         normalize=True, scale=2.5, T=36),
    dict(name="sigmoid_nogroup", router="sigmoid_topk", E=6, k=2, normalize=False,
         scale=1.0, T=24),
    dict(name="capacity_position", E=4, k=2, T=30, capacity_factor="1.0",
         drop_policy="position", tweak="favour_expert0"),
    dict(name="capacity_probs", E=4, k=2, T=30, capacity_factor="1.0",
         drop_policy="probs", tweak="favour_expert0"),
    dict(name="capacity_sigmoid_probs", router="sigmoid_topk", E=8, n_group=4, topk_group=3,
         k=3, normalize=True, scale=1.0, T=32, capacity_factor="0.75", drop_policy="probs"),
    dict(name="shared_ungated", E=4, k=2, shared="ungated", shared_ff=32, T=24),
    dict(name="shared_gated", E=6, k=2, normalize=False, shared="gated", shared_ff=24, T=26),
    dict(name="k_eq_e", E=4, k=4, T=20),
    dict(name="t1", E=6, k=2, T=1),
    dict(name="ties", E=5, k=2, T=30, tweak="tied_rows"),
    # R4-R7. For top-p and expert choice the routers do not read k; it is set to the
    # slot width S of expected.ids (max_k, E). Options that do not apply keep defaults.
    dict(name="top_p_09", router="top_p", E=8, k=3, threshold="0.9", max_k=3,
         normalize=False, T=32, tweak="sharp_router"),
    dict(name="top_p_normalize", router="top_p", E=6, k=4, threshold="0.6", max_k=4,
         normalize=True, T=28),
    dict(name="null_experts", router="null_experts", E=6, null_experts=2, k=2,
         normalize=True, T=32, tweak="null_bias"),
    dict(name="null_experts_raw", router="null_experts", E=6, null_experts=2, k=2,
         normalize=False, T=32, tweak="null_bias"),
    dict(name="sinkhorn_softmax", router="sinkhorn", E=6, k=2, iterations=8, tolerance=0.0,
         gates="softmax", normalize=True, T=32, tweak="skew_expert0", iteration_sensitive=True),
    dict(name="sinkhorn_plan", router="sinkhorn", E=6, k=2, iterations=50, tolerance=1e-4,
         gates="plan", T=36, tweak="favour_expert0"),
    dict(name="sinkhorn_inference", router="sinkhorn", E=6, k=2, inference_topk=True,
         normalize=True, T=24),
    dict(name="expert_choice", router="expert_choice", E=4, k=4, capacity_factor="1.0",
         normalize=False, T=30),
    dict(name="expert_choice_t1", router="expert_choice", E=4, k=4, capacity_factor="2.0",
         normalize=False, T=1),
    dict(name="expert_choice_cf2", router="expert_choice", expert="mlp", activation="relu",
         E=8, k=8, capacity_factor="2.0", normalize=False, T=20),
]

# Cases that must be drawn from the same weights and inputs.
SAME_DATA = {"capacity_position": "capacity_pair", "capacity_probs": "capacity_pair",
             "null_experts": "null_pair", "null_experts_raw": "null_pair"}


def layer_options(case):
    opt = dict(LAYER_DEFAULTS, **case)
    if opt["activation"] is None:
        opt["activation"] = "gelu" if opt["expert"] == "geglu" else "silu"
    if opt["max_k"] is None:
        opt["max_k"] = opt["k"]
    return opt


def rand_layer_expert(g, kind, d, ff):
    """Random expert params: (gate, up, down) for gated kinds, (in, out) for mlp."""
    if kind == "mlp":
        return rand_linear(g, ff, d), rand_linear(g, d, ff)
    return rand_linear(g, ff, d), rand_linear(g, ff, d), rand_linear(g, d, ff)


def build_layer(g, opt):
    """Draw weights and input for a layer case; returns (spec, x)."""
    d, E, T = opt["d"], opt["E"], opt["T"]
    router = rand_linear(g, E + opt["null_experts"], d)
    bias = round_to(randn(g, E, std=0.1), "F32") if opt["router"] == "sigmoid_topk" else None
    experts = [rand_layer_expert(g, opt["expert"], d, opt["ff"]) for _ in range(E)]
    shared = shared_gate = None
    if opt["shared"] != "none":
        shared = rand_layer_expert(g, opt["expert"], d, opt["shared_ff"])
        if opt["shared"] == "gated":
            shared_gate = rand_linear(g, 1, d)
    x = rand_input(g, T, d)
    if opt["tweak"] == "favour_expert0":
        # every token has a large coordinate 0 that only expert 0's router row reads
        x[:, 0] += 2.0
        router[:, 0] = 0.0
        router[0, 0] = 1.0
    elif opt["tweak"] == "tied_rows":
        assert E == 5
        router[4], router[3] = router[0].clone(), router[1].clone()
    elif opt["tweak"] == "skew_expert0":
        # favour_expert0 twice as strong: Sinkhorn is still moving after a few iterations
        x[:, 0] += 2.0
        router[:, 0] = 0.0
        router[0, 0] = 2.0
    elif opt["tweak"] == "sharp_router":
        # logits 3x sharper: some tokens put >= 0.9 on one expert, others stay flat
        router = round_to(3.0 * router, "F32")
    elif opt["tweak"] == "null_bias":
        # null rows read coordinate 0 strongly: tokens with a large x_0 pick null experts
        router[E:, 0] = round_to(router[E:, 0] + 1.5, "F32")
    spec = MoeSpec(opt["router"], opt["k"], opt["normalize"], opt["scale"], router,
                   router_bias=bias, n_group=opt["n_group"], topk_group=opt["topk_group"],
                   expert=opt["expert"], activation=opt["activation"], experts=experts,
                   shared=shared, shared_gate=shared_gate,
                   capacity_factor=opt["capacity_factor"] or None,
                   drop_policy=opt["drop_policy"], threshold=float(opt["threshold"] or 0),
                   max_k=opt["max_k"], null_experts=opt["null_experts"],
                   iterations=opt["iterations"], tolerance=float(opt["tolerance"]),
                   gates=opt["gates"], inference_topk=opt["inference_topk"])
    return spec, x


def layer_param_tensors(spec, prefix="", bias=True):
    """(prefix + name, "F32", tensor) of a layer's parameters; gated experts store
    [gate rows; up rows] as in.weight. Applied to gradients laid out as a spec
    (with_trainable), with prefix "grad." and bias=False (the bias gets no gradient)."""
    def in_out(params):
        if len(params) == 3:
            return torch.cat([params[0], params[1]], dim=0), params[2]
        return params

    ts = [("router.weight", spec.router_weight)]
    if bias and spec.router_bias is not None:
        ts.append(("router.bias", spec.router_bias))
    for e, params in enumerate(spec.experts):
        w_in, w_out = in_out(params)
        ts += [(f"experts.{e}.in.weight", w_in), (f"experts.{e}.out.weight", w_out)]
    if spec.shared is not None:
        w_in, w_out = in_out(spec.shared)
        ts += [("shared.in.weight", w_in), ("shared.out.weight", w_out)]
        if spec.shared_gate is not None:
            ts.append(("shared.gate.weight", spec.shared_gate))
    return [(prefix + name, "F32", t) for name, t in ts]


# Gradients of a layer file: L_y (grad.*, every input) and L1 / L2 / L3 / L4 alone (x,
# router only; L4 only with null experts).
LAYER_BACKWARD = {"y": (1.0, 0.0, 0.0), "load_balance": (0.0, 1.0, 0.0), "z_loss": (0.0, 0.0, 1.0),
                  "seq_balance": (0.0, 0.0, 0.0, 1.0),
                  "null_balance": (0.0, 0.0, 0.0, 0.0, 1.0)}


def layer_file_tensors(spec, x, out, g, bwd):
    """Tensors of one layer file: x, the parameters, the expected forward results, then
    the backward data: grad_output g, grad.* = d L_y / d (x and every parameter),
    grad_load_balance.{x, router.weight} = d L1 and grad_z_loss.{x, router.weight} = d L2
    (alpha = beta = 1); appended after them: expected.seq_balance (L3), seq_balance.seq_len
    (S) and grad_seq_balance.{x, router.weight}, and with null experts expected.null_balance
    (L4) and grad_null_balance.{x, router.weight}."""
    ts = [("x", "F32", x)] + layer_param_tensors(spec)
    ts += [("expected.y", "F32", out["y"]), ("expected.logits", "F32", out["logits"]),
           ("expected.ids", "I64", out["ids"]), ("expected.weights", "F32", out["weights"])]
    if spec.router in NEW_ROUTERS:
        ts.append(("expected.slots", "I64", out["slots"]))
    ts.append(("expected.load", "I64", out["load"]))
    if "marginal_error" in out:
        ts += [("expected.marginal_error", "F32", out["marginal_error"]),
               ("expected.iterations", "I64", torch.tensor(out["iterations"]))]
    ts += [("expected.load_balance", "F32", out["load_balance"]),
           ("expected.z_loss", "F32", out["z_loss"])]
    grad_x, grad_params = bwd.grads["y"]
    ts += [("grad_output", "F32", g), ("grad.x", "F32", grad_x)]
    ts += layer_param_tensors(with_trainable(spec, grad_params), "grad.", bias=False)
    for loss in ("load_balance", "z_loss"):
        grad_x, grad_params = bwd.grads[loss]
        ts += [(f"grad_{loss}.x", "F32", grad_x),
               (f"grad_{loss}.router.weight", "F32", grad_params[0])]
    for loss in ("seq_balance", "null_balance"):
        if out[loss] is None:
            continue
        ts.append((f"expected.{loss}", "F32", out[loss]))
        if loss == "seq_balance":
            ts.append(("seq_balance.seq_len", "I64", torch.tensor(seq_len(x.shape[0]))))
        grad_x, grad_params = bwd.grads[loss]
        ts += [(f"grad_{loss}.x", "F32", grad_x),
               (f"grad_{loss}.router.weight", "F32", grad_params[0])]
    return ts


def layer_backward(name, spec, x, out):
    """grad_output and moe_backward (LAYER_BACKWARD) of layer case `name`, checked to
    route as the forward data; returns (g, bwd, report text)."""
    g = rand_grad_output("layer/" + name, *x.shape)
    coefs = {loss: cs for loss, cs in LAYER_BACKWARD.items()
             if loss == "y" or out[loss] is not None}
    bwd = moe_backward(spec, x, g, coefs)
    assert torch.equal(bwd.out["y"], out["y"]) and torch.equal(bwd.out["ids"], out["ids"])
    router = {loss: grads[1][0] for loss, grads in bwd.grads.items()}
    total = router["y"] + router["load_balance"] + router["z_loss"]
    text = (f"backward: share of L1 + L2 (alpha = beta = 1) in the router-weight "
            f"gradient of L_y + L1 + L2 "
            f"{loss_shares(total, router['load_balance'], router['z_loss'])}")
    text += (f"\n    L3 seq_balance {bwd.losses['seq_balance'].item():.6f} "
             f"(S={seq_len(x.shape[0])}, {math.ceil(x.shape[0] / max(seq_len(x.shape[0]), 1))} "
             f"sequences; max |grad| x {bwd.grads['seq_balance'][0].abs().max().item():.3e}, "
             f"router.weight {bwd.grads['seq_balance'][1][0].abs().max().item():.3e})")
    if "null_balance" in bwd.losses:
        text += (f"; L4 null_balance {bwd.losses['null_balance'].item():.6f} (max |grad| x "
                 f"{bwd.grads['null_balance'][0].abs().max().item():.3e}, router.weight "
                 f"{bwd.grads['null_balance'][1][0].abs().max().item():.3e})")
    return g, bwd, text


def layer_metadata(opt):
    """Case options as the strings stored in the file's __metadata__."""
    keys = ["expert", "activation", "router", "k", "normalize", "scale", "n_group",
            "topk_group", "capacity_factor", "drop_policy", "shared", "d", "ff",
            "shared_ff", "E", "T"]
    if opt["router"] in NEW_ROUTERS:
        keys += ["threshold", "max_k", "null_experts", "iterations", "tolerance", "gates",
                 "inference_topk"]

    def text(key, v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if key in ("scale", "tolerance"):
            return repr(float(v))  # e.g. "1.0", "1.5", "2.5", "0.0001"
        return str(v)

    return {key: text(key, opt[key]) for key in keys}


def router_features(spec, x, out, iteration_sensitive=False):
    """Counts that show a case of R4-R7 exercises its router: (text, ok). ok is False
    when the draw misses the feature (the case is then re-drawn). With
    `iteration_sensitive`, a Sinkhorn case must also change some token's slots if one
    iteration fewer were run (so the iteration count is tested)."""
    slots = out["slots"].tolist()
    hist = {n: slots.count(n) for n in sorted(set(slots))}
    if spec.router == "top_p":
        capped = int(out["capped"].sum())
        return (f"slots per token {hist}, tokens stopped by max_k={spec.max_k} before "
                f"the threshold: {capped}"), {1, 2, spec.max_k} <= set(hist)
    if spec.router == "null_experts":
        nulls = (out["ids"] >= spec.E).sum(dim=1).tolist()
        none, one, every = nulls.count(0), nulls.count(1), nulls.count(spec.k)
        return (f"tokens with 0 null slots: {none}, 1 null slot: {one}, all {spec.k} "
                f"slots null: {every}, load {out['load'].tolist()}"), one > 0 and every > 0 and none > 0
    if spec.router == "sinkhorn" and spec.inference_topk:
        return "inference_topk: plain softmax top-k", True
    if spec.router == "sinkhorn":
        plain, _ = route_softmax_topk(out["logits"], spec.k, True, 1.0, Decisions())
        changed = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(plain, out["ids"]))
        early = spec.tolerance > 0 and out["iterations"] < spec.iterations
        # sensitivity: what one iteration fewer would change (informational)
        ids1, w1, _ = route_sinkhorn(out["logits"], spec.k, out["iterations"] - 1, 0.0,
                                     spec.gates, spec.normalize, Decisions())
        moved = int((ids1 != out["ids"]).any(dim=1).sum())
        dw = (w1 - out["weights"]).abs().max().item()
        return (f"iterations run {out['iterations']} of {spec.iterations}"
                f"{' (stopped by tolerance)' if early else ''}, marginal_error "
                f"{out['marginal_error'].item():.3e} (row marginals: max_t |T sum_e P_te - 1| = "
                f"{out['row_error']:.3e}), tokens whose expert set differs from softmax "
                f"top-k: {changed}, load {out['load'].tolist()}; with one iteration fewer: "
                f"{moved} tokens change slots, max |dw| {dw:.1e}"), \
            changed > 0 and (spec.tolerance == 0 or early) and (moved > 0 or not iteration_sensitive)
    if spec.router == "expert_choice":
        T, E = out["ids"].shape
        C = min(T, math.ceil(Fraction(spec.capacity_factor) * T / E))
        zero, multi = hist.get(0, 0), sum(c for n, c in hist.items() if n > 1)
        return (f"C={C}, tokens with 0 experts: {zero}, with >1 experts: {multi}, "
                f"slots per token {hist}, load {out['load'].tolist()}"), \
            T == 1 or (zero > 0 and multi > 0)
    return "", True


def gen_layer_cases(root):
    os.makedirs(os.path.join(root, "layer"), exist_ok=True)
    # Group cases that share data so one draw (and one margin check) serves all of them.
    groups = {}
    for case in LAYER_CASES:
        groups.setdefault(SAME_DATA.get(case["name"], case["name"]), []).append(layer_options(case))
    results = []
    for seed_name, opts in groups.items():
        def build(g, dec, opts=opts):
            spec0, x = build_layer(g, opts[0])
            outs = []
            for opt in opts:
                spec = MoeSpec(**dict(spec0.__dict__, capacity_factor=opt["capacity_factor"] or None,
                                      drop_policy=opt["drop_policy"], normalize=opt["normalize"]))
                case_dec = Decisions()
                out = moe_forward(x, spec, case_dec)
                dec.min_gap = min(dec.min_gap, case_dec.min_gap)
                dec.near_bounds += case_dec.near_bounds
                outs.append((opt, spec, out, case_dec))
            return x, outs

        def accept(result):
            return all(router_features(spec, result[0], out, opt["iteration_sensitive"])[1]
                       for opt, spec, out, _ in result[1])

        new = any(opt["router"] in NEW_ROUTERS for opt in opts)
        (x, outs), _, attempt = generate("layer/" + seed_name, build, accept if new else None)
        for opt, spec, out, dec in outs:
            path = os.path.join(root, "layer", opt["name"] + ".safetensors")
            g, bwd, backward_info = layer_backward(opt["name"], spec, x, out)
            tensors = layer_file_tensors(spec, x, out, g, bwd)
            write_safetensors(path, tensors, layer_metadata(opt))
            info = f"seed attempt {attempt}, min decision gap {dec.min_gap:.2e}"
            if opt["capacity_factor"] and opt["router"] in TOPK_ROUTERS:
                C = math.ceil(Fraction(opt["capacity_factor"]) * opt["T"] * opt["k"] / opt["E"])
                info += (f", capacity C={C}, dropped assignments: {dec.dropped}, "
                         f"load {out['load'].tolist()}")
                assert dec.dropped > 0
            if opt["tweak"] == "tied_rows":
                info += (f", ties deciding selection: {dec.ties_select} tokens, "
                         f"deciding order: {dec.ties_order} tokens")
                assert dec.ties_select > 0
            if spec.router == "sigmoid_topk":
                info += f", tokens whose selection the bias changed: {selection_changed_by_bias(x, spec)}"
            if spec.router in NEW_ROUTERS:
                text, ok = router_features(spec, x, out, opt["iteration_sensitive"])
                info += ", " + text
                assert ok
            grads = [t for t in tensors if t[0].startswith("grad") and t[0] != "grad_output"]
            info += f"\n    {backward_info}; max |grad| {max_abs(grads):.3e}"
            results.append((path, info))
    return results


# --------------------------------------------------------------------------------------
# moe-run override cases
# --------------------------------------------------------------------------------------

# The only checkpoint written for the overrides: Mixtral with E = 4 real experts and
# N = 2 null-expert gate rows; its default run is meaningless (no input/expected/args).
NULL_CKPT = ("mixtral_null", dict(d=D, ff=16, E=4, k=2, null_experts=2, null_bias=1.5))

# (case, checkpoint folder, flag alternatives, input). The first flag list whose run
# exercises the case is written. input "ckpt": the checkpoint's own input (a fresh draw
# of the same shape only if that input has a near tie or misses the feature); an int T:
# a new [T, d] input drawn for the case.
OVERRIDE_CASES = [
    ("mixtral_capacity_position", "mixtral_f32",
     [["--capacity-factor", "1.0"], ["--capacity-factor", "0.75"]], "ckpt"),
    ("mixtral_capacity_probs", "mixtral_f32",
     [["--capacity-factor", "1.0", "--drop-policy", "probs"],
      ["--capacity-factor", "0.75", "--drop-policy", "probs"]], "ckpt"),
    ("deepseek_capacity_probs", "deepseek_v3",
     [["--capacity-factor", "1.0", "--drop-policy", "probs"]], "ckpt"),
    ("expert_choice", "qwen3_moe", [["--router", "expert_choice", "--capacity-factor", "1.0"]],
     "ckpt"),
    ("expert_choice_t1", "olmoe", [["--router", "expert_choice", "--capacity-factor", "1.0"]],
     "ckpt"),
    ("sinkhorn_softmax", "mixtral_f32", [["--router", "sinkhorn", "--sinkhorn-iters", "10"]],
     "ckpt"),
    ("sinkhorn_plan", "qwen2_moe",
     [["--router", "sinkhorn", "--sinkhorn-gates", "plan", "--sinkhorn-tolerance", "1e-3",
       "--sinkhorn-iters", "100"]], "ckpt"),
    ("top_p", "olmoe", [["--router", "top_p", "--top-p", "0.5", "--max-k", "3"]], 24),
    ("null_experts", "mixtral_null", [["--router", "null_experts", "--null-experts", "2"]], 32),
    ("softmax_topk_deepseek", "deepseek_v3", [["--router", "softmax_topk"]], "ckpt"),
    # The families' own routers on a batch of a few hundred tokens (several 64-row tasks).
    ("mixtral_bf16_t300", "mixtral_bf16", [[]], 300),
    ("deepseek_v3_t300", "deepseek_v3", [[]], 300),
]

RUN_FLAGS = ("--router", "--capacity-factor", "--drop-policy", "--sinkhorn-iters",
             "--sinkhorn-tolerance", "--sinkhorn-gates", "--null-experts", "--top-p", "--max-k")


def apply_flags(spec, flags):
    """The layer moe-run runs for a checkpoint family's layer `spec` and router flags.

    The family's settings stay: normalize = norm_topk_prob, k = num_experts_per_tok,
    shared experts; scale (routed_scaling_factor) is applied by the routers that take it
    (R1 softmax_topk and R2, the family's own router where it is DeepSeek-V3's). --capacity-factor is R7's factor with expert_choice and R3
    capacity (--drop-policy, default position) with a top-k router. Defaults:
    --sinkhorn-iters 8, --sinkhorn-tolerance 0, --sinkhorn-gates softmax, --max-k = k."""
    assert len(flags) % 2 == 0
    opts = dict(zip(flags[0::2], flags[1::2]))
    assert set(opts) <= set(RUN_FLAGS), flags
    router = opts.get("--router", spec.router)
    new = dict(spec.__dict__, router=router)
    if router in NEW_ROUTERS:
        new["scale"] = 1.0
    if "--capacity-factor" in opts:
        new["capacity_factor"] = opts["--capacity-factor"]
        if router in TOPK_ROUTERS:
            new["drop_policy"] = opts.get("--drop-policy", "position")
    new.update(iterations=int(opts.get("--sinkhorn-iters", "8")),
               tolerance=float(opts.get("--sinkhorn-tolerance", "0")),
               gates=opts.get("--sinkhorn-gates", "softmax"),
               null_experts=int(opts.get("--null-experts", "0")),
               threshold=float(opts.get("--top-p", "0")),
               max_k=int(opts.get("--max-k", str(spec.k))))
    out = MoeSpec(**new)
    assert len(out.experts) == out.E
    return out


def override_run(spec, x, dec):
    """Forward pass of an override case plus whether it exercises its feature."""
    out = moe_forward(x, spec, dec)
    if spec.capacity_factor and spec.router in TOPK_ROUTERS:
        C = math.ceil(Fraction(spec.capacity_factor) * x.shape[0] * spec.k / spec.E)
        text, ok = (f"capacity C={C}, dropped assignments: {dec.dropped}, "
                    f"load {out['load'].tolist()}"), dec.dropped > 0
    else:
        text, ok = router_features(spec, x, out)
    if spec.router == "top_p":  # also a token that --max-k stops before the threshold
        ok = ok and bool(out["capped"].any())
    return out, text, ok


def gen_override_cases(root, registry):
    """tests/data/overrides/<case>/ (+ tests/data/ckpt/mixtral_null/)."""
    results = []
    # The null-experts checkpoint, drawn together with the input of its override case.
    null_name, null_kwargs = NULL_CKPT
    (null_flags, null_T), = [(alt[0], src) for _, m, alt, src in OVERRIDE_CASES if m == null_name]

    def build_null(g, dec):
        config, tensors, spec = build_mixtral(g, **null_kwargs)
        x = rand_input(g, null_T, null_kwargs["d"])
        run = apply_flags(spec, null_flags)
        return config, tensors, spec, x, override_run(run, x, dec)

    (config, tensors, spec, x, _), _, attempt = generate(
        "ckpt/" + null_name, build_null, lambda r: r[4][2])
    folder = os.path.join(root, "ckpt", null_name)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    write_checkpoint(folder, config, tensors, False)
    registry[null_name] = {"tensors": tensors, "spec": spec, "x": x, "shape": tuple(x.shape)}
    results.append((folder, f"seed attempt {attempt}; only for overrides/null_experts "
                            f"(gate rows E + N = {spec.router_weight.shape[0]})"))

    for case, model, alternatives, source in OVERRIDE_CASES:
        base = registry[model]
        chosen = None
        if source == "ckpt" or model == null_name:  # the null input was drawn above
            for flags in alternatives:
                run = apply_flags(base["spec"], flags)
                dec = Decisions()
                out, text, ok = override_run(run, base["x"], dec)
                if dec.clean() and ok:
                    origin = ("copy of ckpt/%s/input.safetensors" % model
                              if model != null_name else "drawn with ckpt/" + model)
                    chosen = (flags, run, base["x"], base["shape"], out, text, dec, origin)
                    break
        if chosen is None:
            flags = alternatives[0]
            run = apply_flags(base["spec"], flags)
            shape = base["shape"] if source == "ckpt" else (source, base["shape"][-1])

            def build(g, dec, run=run, shape=shape):
                x = rand_input(g, int(math.prod(shape[:-1])), shape[-1])
                return (x,) + override_run(run, x, dec)

            (x, out, text, _), dec, attempt = generate("overrides/" + case, build,
                                                       lambda r: r[3])
            chosen = (flags, run, x, shape, out, text, dec,
                      f"drawn for this case (seed attempt {attempt})")
        flags, run, x, shape, out, text, dec, origin = chosen

        folder = os.path.join(root, "overrides", case)
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):  # the case folder is owned by this script
            os.remove(os.path.join(folder, f))
        write_json(os.path.join(folder, "args.json"), {"model": model, "layer": 1, "flags": flags,
                                                        "backward_flags": backward_flags()})
        meta = {"case": case}
        g, expected_backward, backward_info = run_backward("overrides/" + case, base["tensors"],
                                                           run, x, shape, out)
        write_safetensors(os.path.join(folder, "input.safetensors"),
                          [("hidden_states", "F32", x.reshape(shape)), ("grad_output", "F32", g)],
                          dict(meta, input=origin))
        write_safetensors(os.path.join(folder, "expected.safetensors"), [
            ("hidden_states", "F32", out["y"].reshape(shape)),
            ("router_logits", "F32", out["logits"]),
        ], meta)
        write_safetensors(os.path.join(folder, "expected_backward.safetensors"), expected_backward,
                          meta)
        info = (f"{model} {' '.join(flags)}; input {origin}, T={x.shape[0]}; "
                f"min decision gap {dec.min_gap:.2e}; {text or ''}")
        if case == "softmax_topk_deepseek":
            default = moe_forward(x, base["spec"], Decisions())
            differ = sum(set(a.tolist()) != set(b.tolist())
                         for a, b in zip(default["ids"], out["ids"]))
            info += f"tokens whose expert set differs from the default sigmoid router: {differ}"
        results.append((folder, info + "\n    " + backward_info))
    return results


# --------------------------------------------------------------------------------------
# Quantized formats (ggml q8_0 / q4_0), element by element in numpy float32
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# GGUF (ggml's docs/gguf.md, version 3): a writer of our own, from the specification.

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
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
             "deepseek_v3": "deepseek2"}
# Checkpoint cases also written as GGUF models (model.gguf in the file's own types; the quantized cases
# also model_q8_0.gguf and model_q4_0.gguf, their experts' tensors quantized here; mixtral_sharded as a
# split model, model-0000{1,2}-of-00002.gguf).
GGUF_CKPT_CASES = ("mixtral_f32", "mixtral_bf16", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3") + QUANT_CASES


def gguf_model_metadata(config):
    """llama.cpp's metadata keys (src/llama-arch.cpp) for a HuggingFace config of our families."""
    mt = config["model_type"]
    a = GGUF_ARCH[mt]
    experts = config.get("num_local_experts", config.get("num_experts", config.get("n_routed_experts")))
    md = [("general.architecture", "string", a), (f"{a}.block_count", "u32", config["num_hidden_layers"]),
          (f"{a}.embedding_length", "u32", config["hidden_size"]), (f"{a}.expert_count", "u32", experts),
          (f"{a}.expert_used_count", "u32", config["num_experts_per_tok"])]
    if mt in ("mixtral", "olmoe"):  # the expert width is their feed_forward_length
        md.append((f"{a}.feed_forward_length", "u32", config["intermediate_size"]))
    else:
        md.append((f"{a}.expert_feed_forward_length", "u32", config["moe_intermediate_size"]))
    if mt == "qwen2_moe":
        md.append((f"{a}.expert_shared_feed_forward_length", "u32", config["shared_expert_intermediate_size"]))
    if mt == "deepseek_v3":
        md += [(f"{a}.leading_dense_block_count", "u32", config["first_k_dense_replace"]),
               (f"{a}.expert_shared_count", "u32", config["n_shared_experts"]),
               (f"{a}.expert_weights_norm", "bool", 1 if config["norm_topk_prob"] else 0),
               (f"{a}.expert_weights_scale", "f32", config["routed_scaling_factor"]),
               (f"{a}.expert_gating_func", "u32", 2),  # sigmoid
               (f"{a}.expert_group_count", "u32", config["n_group"]),
               (f"{a}.expert_group_used_count", "u32", config["topk_group"])]
    return md


def gguf_model_tensors(config, tensors, quant=None):
    """The MoE layers' tensors under llama.cpp's names (blk.L.ffn_gate_inp, the experts stacked into
    ffn_{gate,up,down}_exps, ffn_*_shexp, ffn_gate_inp_shexp, exp_probs_b.bias), dimensions fastest
    first; with `quant` ("Q8_0" / "Q4_0") the experts' and shared experts' tensors in that format."""
    mt = config["model_type"]
    stored = {n: (dt, t) for n, dt, t in tensors}
    experts = gguf_model_metadata(config)[3][2]
    block = "block_sparse_moe" if mt == "mixtral" else "mlp"
    hf = ("w1", "w3", "w2") if mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    shared = "shared_expert" if mt == "qwen2_moe" else "shared_experts"
    out = []

    def put(name, dtype, t, quantizable):
        rows = t.to(torch.float32).reshape(-1, t.shape[-1]).numpy()
        if quant and quantizable:
            raw = (q8_0_bytes if quant == "Q8_0" else q4_0_bytes)(rows)[0]
            out.append((name, quant, list(reversed(t.shape)), raw))
        else:
            out.append((name, dtype, list(reversed(t.shape)), encode(t, dtype)))

    for layer in range(config["num_hidden_layers"]):
        p, b = f"model.layers.{layer}.{block}", f"blk.{layer}"
        if f"{p}.gate.weight" not in stored:
            continue  # a dense layer
        put(f"{b}.ffn_gate_inp.weight", *stored[f"{p}.gate.weight"], False)
        for part, name in zip(("gate", "up", "down"), hf):
            dtype = stored[f"{p}.experts.0.{name}.weight"][0]
            stacked = torch.stack([stored[f"{p}.experts.{e}.{name}.weight"][1] for e in range(experts)])
            put(f"{b}.ffn_{part}_exps.weight", dtype, stacked, True)
        if f"{p}.{shared}.gate_proj.weight" in stored:
            for part, name in zip(("gate", "up", "down"), ("gate_proj", "up_proj", "down_proj")):
                put(f"{b}.ffn_{part}_shexp.weight", *stored[f"{p}.{shared}.{name}.weight"], True)
        if f"{p}.shared_expert_gate.weight" in stored:
            dtype, t = stored[f"{p}.shared_expert_gate.weight"]
            put(f"{b}.ffn_gate_inp_shexp.weight", dtype, t.reshape(-1), False)
        if f"{p}.gate.e_score_correction_bias" in stored:
            put(f"{b}.exp_probs_b.bias", *stored[f"{p}.gate.e_score_correction_bias"], False)
    return out


def write_gguf_models(folder, name, config, tensors):
    if name == "mixtral_sharded":  # split as llama.cpp's gguf-split does: the metadata in the first file
        parts = gguf_model_tensors(config, tensors)
        cut = len(parts) // 2
        split = [("split.count", "u16", 2), ("split.tensors.count", "i32", len(parts))]
        write_gguf(os.path.join(folder, "model-00001-of-00002.gguf"),
                   gguf_model_metadata(config) + [("split.no", "u16", 0)] + split, parts[:cut])
        write_gguf(os.path.join(folder, "model-00002-of-00002.gguf"), [("split.no", "u16", 1)] + split, parts[cut:])
        return
    if name not in GGUF_CKPT_CASES:
        return
    metadata = gguf_model_metadata(config)
    write_gguf(os.path.join(folder, "model.gguf"), metadata, gguf_model_tensors(config, tensors))
    if name in QUANT_CASES:
        for fmt in ("Q8_0", "Q4_0"):
            write_gguf(os.path.join(folder, f"model_{fmt.lower()}.gguf"), metadata,
                       gguf_model_tensors(config, tensors, fmt))


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


# The sets of test data, each a folder of tests/data. ckpt and overrides come together: the override
# cases run the checkpoint cases' layers.
SETS = {"gguf": ["gguf"], "quant": ["quant"], "layer": ["layer"], "ckpt": ["ckpt", "overrides"]}


def generate_sets(root, only, report):
    """Writes the sets `only` names (all when None) under root; report(path, info) for each case."""
    wanted = [only] if only else list(SETS)
    if "gguf" in wanted:
        for path, info in gen_gguf_cases(root):
            report(path, info)
    if "quant" in wanted:
        for path, info in gen_quant_cases(root):
            report(path, info)
    if "ckpt" in wanted:
        registry = {}
        for name, builder, kwargs, shape, sharded in CKPT_CASES:
            folder, info, _ = gen_ckpt_case(root, name, builder, kwargs, shape, sharded, registry)
            report(folder, info)
        for path, info in gen_override_cases(root, registry):
            report(path, info)
    if "layer" in wanted:
        for path, info in gen_layer_cases(root):
            report(path, info)


def safetensors_tensors(path):
    """{name: (dtype, shape, float64 values)} of a safetensors file, and its metadata."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    types = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I8": np.int8, "U8": np.uint8}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        raw = data[lo:hi]
        if info["dtype"] == "BF16":
            values = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, dtype=types[info["dtype"]])
        out[name] = (info["dtype"], info["shape"], values)
    return out, header.get("__metadata__")


def compare_file(new, old, tolerance):
    """None when the files agree: the same bytes, or safetensors files with the same tensors whose
    values differ by at most `tolerance` times the tensor's largest magnitude; else why not."""
    with open(new, "rb") as a, open(old, "rb") as b:
        if a.read() == b.read():
            return None
    if not new.endswith(".safetensors"):
        return "bytes differ"
    (got, got_meta), (want, want_meta) = safetensors_tensors(new), safetensors_tensors(old)
    if got_meta != want_meta or got.keys() != want.keys():
        return "metadata or tensor names differ"
    worst = 0.0
    for name, (dtype, shape, values) in got.items():
        wdtype, wshape, wvalues = want[name]
        if (dtype, shape) != (wdtype, wshape):
            return f"{name}: {dtype} {shape} against {wdtype} {wshape}"
        if values.size == 0:
            continue
        if not np.issubdtype(values.dtype, np.floating):  # ids, counts, quantized bytes: exact
            if not np.array_equal(values, wvalues):
                return f"{name}: {dtype} values differ"
            continue
        values, wvalues = values.astype(np.float64), wvalues.astype(np.float64)
        finite = np.isfinite(wvalues)
        if not np.array_equal(np.isfinite(values), finite) or not np.array_equal(values[~finite], wvalues[~finite]):
            return f"{name}: non-finite values differ"
        if not finite.any():
            continue
        scale = max(float(np.abs(wvalues[finite]).max()), 1e-30)
        diff = float(np.abs(values[finite] - wvalues[finite]).max()) / scale
        if not diff <= tolerance:
            return f"{name}: relative difference {diff:.3g} > {tolerance:g}"
        worst = max(worst, diff)
    print(f"    {os.path.basename(new)}: bytes differ, values within {worst:.3g} of the tensors' largest")
    return None


def check(root, only, tolerance):
    """Regenerates the sets into a temporary folder and compares them with root; returns the count of
    files that differ (missing on either side included)."""
    import tempfile
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        generate_sets(tmp, only, lambda path, info: None)
        for folder in [f for key in ([only] if only else SETS) for f in SETS[key]]:
            files = set()
            for side in (tmp, root):
                for dirpath, _, names in os.walk(os.path.join(side, folder)):
                    files.update(os.path.relpath(os.path.join(dirpath, n), side) for n in names)
            for rel in sorted(files):
                new, old = os.path.join(tmp, rel), os.path.join(root, rel)
                if not os.path.exists(new) or not os.path.exists(old):
                    why = "not generated" if not os.path.exists(new) else "not committed"
                else:
                    why = compare_file(new, old, tolerance)
                if why:
                    failures += 1
                    print(f"{rel}: {why}")
    return failures


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data"),
                    help="output directory (default: tests/data)")
    ap.add_argument("--only", choices=list(SETS),
                    help="write (or check) only this set (ckpt includes overrides, which run its layers)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing: regenerate into a temporary folder and compare with --out, file by "
                         "file (exit 1 on a difference)")
    ap.add_argument("--tolerance", type=float, default=1e-6,
                    help="--check: where a safetensors file's bytes differ, the largest difference of a "
                         "tensor accepted, relative to its largest magnitude (default 1e-6; the bytes of a "
                         "few float64 reductions differ across torch builds)")
    args = ap.parse_args()
    root = os.path.normpath(args.out)
    torch.set_num_threads(1)
    if args.check:
        failures = check(root, args.only, args.tolerance)
        print(f"check: {failures} file(s) differ" if failures else "check: every file agrees")
        raise SystemExit(1 if failures else 0)

    total = 0

    def report(path, info):
        nonlocal total
        paths = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        print(f"{os.path.relpath(path, root)}: {info}")
        for p in paths:
            size = os.path.getsize(p)
            total += size
            print(f"    {os.path.relpath(p, root):60s} {size:8d} bytes")

    generate_sets(root, args.only, report)
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
