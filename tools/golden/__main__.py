"""Golden test data for the MoE library: an independent float64 PyTorch reference.

Run with Debian's PyTorch (the ``python3`` on PATH may lack torch)::

    /usr/bin/python3 tools/golden   # writes tests/data/{ckpt,layer,overrides,quant,gguf}
    /usr/bin/python3 tools/golden --check   # compares a fresh run with tests/data
    /usr/bin/python3 tools/golden --only layer [--check]   # one set

The package (run as a folder): files (safetensors, JSON), decisions (margins), routers, experts,
quant (ggml's blocks), layer (forward, losses, backward), randoms, families (checkpoint builders),
gguf_io (a GGUF writer), and one module per set of cases: ckpt_cases, overrides, layer_cases,
quant_cases, gguf_cases; this file generates and checks them.

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
import os
import struct

import numpy as np
import torch

from ckpt_cases import CKPT_CASES, gen_ckpt_case
from layer_cases import gen_layer_cases
from overrides import gen_override_cases
from quant_cases import gen_quant_cases
from gguf_cases import gen_gguf_cases


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
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "data"),
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
