#!/usr/bin/python3
"""Golden test data for the MoE library: an independent float64 PyTorch reference.

Run with Debian's PyTorch (the ``python3`` on PATH may lack torch)::

    /usr/bin/python3 tools/gen_golden.py            # writes tests/data/{ckpt,layer}

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
* Ties are broken by the lower index everywhere (experts, groups, tokens); this is
  done explicitly with a sort on (-score, index), never via torch.topk.
* Experts: SwiGLU  W_down(silu(W_gate x) * W_up x); GeGLU the same with erf-GELU;
  MLP W_down act(W_up x) with act in relu / gelu (erf) / silu.
* Layer: y_t = sum over kept slots (t, e) of w_te * Expert_e(x_t) + shared(x_t),
  where shared is ungated, or gated by sigmoid(x . w_g) (Qwen2-MoE).

Outputs:

* ``tests/data/ckpt/<case>/``: a HuggingFace-style model folder (config.json,
  model.safetensors or an index + 2 shards) for the mixtral / qwen2_moe / qwen3_moe /
  olmoe / deepseek_v3 families, plus input.safetensors, expected.safetensors and
  args.json ({"layer": 1}).
* ``tests/data/layer/<case>.safetensors``: library-API layer cases; options in
  ``__metadata__``, weights, input and expected results in one file.

Robustness: the C++ side computes in float32, so every random case is re-drawn
(seed + 1, ...) until no discrete decision (top-k membership and order, group
choice, capacity cut) is decided by a margin below MARGIN; exact ties (from
duplicated router rows) are intended and are resolved by the lower index.
"""

import argparse
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional

import torch

MARGIN = 1e-4  # smallest accepted non-zero gap between scores at a discrete decision
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
    """Raw little-endian bytes of `t` in safetensors dtype F32 / F16 / BF16 / I64."""
    if dtype == "I64":
        arr = t.to(torch.int64).contiguous().numpy().astype("<i8")
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
        return self.min_gap >= MARGIN


# --------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------

def route_softmax_topk(logits, k, normalize, scale, dec):
    """R1: p = softmax(z); I = top-k(p) (ties -> lower index); w = p[I];
    if normalize: w /= sum(w); w *= scale. Returns ids [T,k] int64, weights [T,k] f64."""
    T = logits.shape[0]
    probs = torch.softmax(logits, dim=-1)
    ids = torch.zeros((T, k), dtype=torch.int64)
    weights = torch.zeros((T, k), dtype=torch.float64)
    for t in range(T):
        p = probs[t].tolist()
        chosen = dec.rank(p, k, count_ties=True)
        w = torch.tensor([p[i] for i in chosen], dtype=torch.float64)
        if normalize:
            w = w / w.sum()
        ids[t] = torch.tensor(chosen)
        weights[t] = w * scale
    return ids, weights


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
    weights = torch.zeros((T, k), dtype=torch.float64)
    assert E % n_group == 0
    gsize = E // n_group
    for t in range(T):
        s, c = s_all[t].tolist(), c_all[t].tolist()
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
        w = torch.tensor([s[i] for i in chosen], dtype=torch.float64)
        if normalize:
            w = w / (w.sum() + 1e-20)
        ids[t] = torch.tensor(chosen)
        weights[t] = w * scale
    return ids, weights


def apply_capacity(ids, weights, E, capacity_factor, policy, dec):
    """R3: C = ceil(capacity_factor * T * k / E) (exact rational arithmetic). An expert
    with more than C assignments keeps C: `position` keeps the lowest token indices,
    `probs` the largest final weights (ties -> lower token index). Dropped slots become
    id -1 / weight 0; kept weights are not renormalised."""
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


def expert_swiglu(x, w_gate, w_up, w_down):
    """SwiGLU: W_down (silu(W_gate x) * (W_up x)); weights are [out, in]."""
    return (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def expert_geglu(x, w_gate, w_up, w_down):
    """GeGLU: W_down (gelu_erf(W_gate x) * (W_up x))."""
    return (gelu_erf(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def expert_mlp(x, w_in, w_out, activation):
    """MLP: W_out act(W_in x), act in relu / gelu (erf) / silu."""
    return ACTIVATIONS[activation](x @ w_in.T) @ w_out.T


def apply_expert(kind, activation, params, x):
    if kind == "swiglu":
        return expert_swiglu(x, *params)
    if kind == "geglu":
        return expert_geglu(x, *params)
    if kind == "mlp":
        return expert_mlp(x, *params, activation)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------

@dataclass
class MoeSpec:
    """All parameters of one MoE layer (float64 values, already rounded as stored)."""
    router: str                      # "softmax_topk" | "sigmoid_topk"
    k: int
    normalize: bool
    scale: float
    router_weight: torch.Tensor      # [E, d]
    router_bias: Optional[torch.Tensor] = None  # [E], sigmoid_topk only
    n_group: int = 1
    topk_group: int = 1
    expert: str = "swiglu"           # "swiglu" | "geglu" | "mlp"
    activation: str = "silu"
    experts: list = field(default_factory=list)  # (gate, up, down) or (in, out) per expert
    shared: Optional[tuple] = None   # same kind as the routed experts
    shared_gate: Optional[torch.Tensor] = None   # [1, d]
    capacity_factor: Optional[str] = None
    drop_policy: str = ""

    @property
    def E(self):
        return self.router_weight.shape[0]


def moe_forward(x, spec: MoeSpec, dec: Decisions):
    """y_t = sum over kept (t, e) of w_te * Expert_e(x_t) + shared(x_t). x: [T, d] f64.
    Returns dict with y [T,d], logits [T,E], ids [T,k], weights [T,k], load [E]."""
    logits = x @ spec.router_weight.T
    if spec.router == "softmax_topk":
        ids, weights = route_softmax_topk(logits, spec.k, spec.normalize, spec.scale, dec)
    elif spec.router == "sigmoid_topk":
        ids, weights = route_sigmoid_topk(logits, spec.router_bias, spec.k, spec.n_group,
                                          spec.topk_group, spec.normalize, spec.scale, dec)
    else:
        raise ValueError(spec.router)
    if spec.capacity_factor:
        ids, weights = apply_capacity(ids, weights, spec.E, spec.capacity_factor,
                                      spec.drop_policy, dec)

    y = torch.zeros_like(x)
    for e, params in enumerate(spec.experts):
        out = apply_expert(spec.expert, spec.activation, params, x)   # [T, d]
        w_e = (weights * (ids == e)).sum(dim=1, keepdim=True)          # [T, 1]
        y = y + w_e * out
    if spec.shared is not None:
        sh = apply_expert(spec.expert, spec.activation, spec.shared, x)
        if spec.shared_gate is not None:
            sh = torch.sigmoid(x @ spec.shared_gate.T) * sh
        y = y + sh
    load = torch.tensor([int((ids == e).sum()) for e in range(spec.E)], dtype=torch.int64)
    # L1 (Switch form, alpha = 1) over the kept assignments, and L2 (beta = 1); SEMANTICS "Balancing losses".
    T, k = ids.shape
    P = torch.softmax(logits, dim=-1).mean(dim=0)
    load_balance = spec.E * (load.to(torch.float64) / (T * k) * P).sum()
    z_loss = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return {"y": y, "logits": logits, "ids": ids, "weights": weights, "load": load,
            "load_balance": load_balance, "z_loss": z_loss}


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


def generate(name, build):
    """Call build(generator) with seeds derived from `name` until its decisions are clean."""
    base = zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
    for attempt in range(MAX_ATTEMPTS):
        g = torch.Generator().manual_seed(base + attempt)
        dec = Decisions()
        result = build(g, dec)
        if dec.clean():
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


def build_mixtral(g, d, ff, E, k, dtype="F32", tied=False):
    """Mixtral: block_sparse_moe.gate [E,d], experts.{e}.w1 (gate) / w3 (up) / w2 (down);
    router R1 softmax top-k, always normalised, scale 1."""
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "hidden_size": d, "intermediate_size": ff, "num_local_experts": E,
              "num_experts_per_tok": k, "num_hidden_layers": 2, "hidden_act": "silu",
              "torch_dtype": TORCH_DTYPE_NAME[dtype]}
    tensors = embed_tensor(g, d, dtype)
    spec = None
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe"
        router = mixtral_router(g, E, d, dtype, tied)
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


def build_qwen3_moe(g, d, ff, E, k, dtype="F32"):
    """Qwen3-MoE: mlp.gate, mlp.experts.{e}.*_proj; R1 with norm_topk_prob=true."""
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
              "hidden_size": d, "intermediate_size": 64, "moe_intermediate_size": ff,
              "num_experts": E, "num_experts_per_tok": k, "norm_topk_prob": True,
              "num_hidden_layers": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "hidden_act": "silu", "torch_dtype": TORCH_DTYPE_NAME[dtype]}
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
        spec = MoeSpec("softmax_topk", k, True, 1.0, router, experts=experts)
    return config, tensors, spec


def build_olmoe(g, d, ff, E, k, dtype="F32"):
    """OLMoE: mlp.gate, mlp.experts.{e}.*_proj (intermediate_size = expert width);
    R1 with norm_topk_prob=false."""
    config = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
              "hidden_size": d, "intermediate_size": ff, "num_experts": E,
              "num_experts_per_tok": k, "norm_topk_prob": False, "num_hidden_layers": 2,
              "hidden_act": "silu", "torch_dtype": TORCH_DTYPE_NAME[dtype]}
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
        spec = MoeSpec("softmax_topk", k, False, 1.0, router, experts=experts)
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
]


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


def gen_ckpt_case(root, name, builder, kwargs, shape, sharded):
    def build(g, dec):
        config, tensors, spec = builder(g, **kwargs)
        x = ckpt_input(g, name, shape)
        return config, tensors, spec, x, moe_forward(x, spec, dec)

    (config, tensors, spec, x, out), dec, attempt = generate("ckpt/" + name, build)
    folder = os.path.join(root, "ckpt", name)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):  # the case folder is owned by this script
        os.remove(os.path.join(folder, f))
    write_checkpoint(folder, config, tensors, sharded)
    meta = {"case": name}
    write_safetensors(os.path.join(folder, "input.safetensors"),
                      [("hidden_states", "F32", x.reshape(shape))], meta)
    write_safetensors(os.path.join(folder, "expected.safetensors"), [
        ("hidden_states", "F32", out["y"].reshape(shape)),
        ("router_logits", "F32", out["logits"]),
        ("topk_ids", "I64", out["ids"]),
        ("topk_weights", "F32", out["weights"]),
    ], meta)
    write_json(os.path.join(folder, "args.json"), {"layer": 1})

    info = f"seed attempt {attempt}, min decision gap {dec.min_gap:.2e}"
    if spec.router == "sigmoid_topk":
        info += f", tokens whose selection the bias changed: {selection_changed_by_bias(x, spec)}"
    if name.endswith("ties"):
        info += (f", ties deciding selection: {dec.ties_select} tokens, "
                 f"deciding order: {dec.ties_order} tokens")
        assert dec.ties_select > 0
    return folder, info, dec


# --------------------------------------------------------------------------------------
# Library-API layer cases
# --------------------------------------------------------------------------------------

LAYER_DEFAULTS = dict(expert="swiglu", activation=None, router="softmax_topk", k=2,
                      normalize=True, scale=1.0, n_group=1, topk_group=1,
                      capacity_factor="", drop_policy="", shared="none", d=16, ff=16,
                      shared_ff=0, E=4, T=24, tweak=None)

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
]

# Cases that must be drawn from the same weights and inputs.
SAME_DATA = {"capacity_position": "capacity_pair", "capacity_probs": "capacity_pair"}


def layer_options(case):
    opt = dict(LAYER_DEFAULTS, **case)
    if opt["activation"] is None:
        opt["activation"] = "gelu" if opt["expert"] == "geglu" else "silu"
    return opt


def rand_layer_expert(g, kind, d, ff):
    """Random expert params: (gate, up, down) for gated kinds, (in, out) for mlp."""
    if kind == "mlp":
        return rand_linear(g, ff, d), rand_linear(g, d, ff)
    return rand_linear(g, ff, d), rand_linear(g, ff, d), rand_linear(g, d, ff)


def build_layer(g, opt):
    """Draw weights and input for a layer case; returns (spec, x)."""
    d, E, T = opt["d"], opt["E"], opt["T"]
    router = rand_linear(g, E, d)
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
    spec = MoeSpec(opt["router"], opt["k"], opt["normalize"], opt["scale"], router,
                   router_bias=bias, n_group=opt["n_group"], topk_group=opt["topk_group"],
                   expert=opt["expert"], activation=opt["activation"], experts=experts,
                   shared=shared, shared_gate=shared_gate,
                   capacity_factor=opt["capacity_factor"] or None,
                   drop_policy=opt["drop_policy"])
    return spec, x


def layer_file_tensors(spec, x, out):
    """Tensors of one layer file; gated experts store [gate rows; up rows] as in.weight."""
    def in_out(params):
        if len(params) == 3:
            return torch.cat([params[0], params[1]], dim=0), params[2]
        return params

    ts = [("x", "F32", x), ("router.weight", "F32", spec.router_weight)]
    if spec.router_bias is not None:
        ts.append(("router.bias", "F32", spec.router_bias))
    for e, params in enumerate(spec.experts):
        w_in, w_out = in_out(params)
        ts += [(f"experts.{e}.in.weight", "F32", w_in), (f"experts.{e}.out.weight", "F32", w_out)]
    if spec.shared is not None:
        w_in, w_out = in_out(spec.shared)
        ts += [("shared.in.weight", "F32", w_in), ("shared.out.weight", "F32", w_out)]
        if spec.shared_gate is not None:
            ts.append(("shared.gate.weight", "F32", spec.shared_gate))
    ts += [("expected.y", "F32", out["y"]), ("expected.logits", "F32", out["logits"]),
           ("expected.ids", "I64", out["ids"]), ("expected.weights", "F32", out["weights"]),
           ("expected.load", "I64", out["load"]),
           ("expected.load_balance", "F32", out["load_balance"]), ("expected.z_loss", "F32", out["z_loss"])]
    return ts


def layer_metadata(opt):
    """Case options as the strings stored in the file's __metadata__."""
    keys = ["expert", "activation", "router", "k", "normalize", "scale", "n_group",
            "topk_group", "capacity_factor", "drop_policy", "shared", "d", "ff",
            "shared_ff", "E", "T"]
    def text(key, v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if key == "scale":
            return repr(float(v))  # e.g. "1.0", "1.5", "2.5"
        return str(v)

    return {key: text(key, opt[key]) for key in keys}


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
                                      drop_policy=opt["drop_policy"]))
                case_dec = Decisions()
                out = moe_forward(x, spec, case_dec)
                dec.min_gap = min(dec.min_gap, case_dec.min_gap)
                outs.append((opt, spec, out, case_dec))
            return x, outs

        (x, outs), _, attempt = generate("layer/" + seed_name, build)
        for opt, spec, out, dec in outs:
            path = os.path.join(root, "layer", opt["name"] + ".safetensors")
            write_safetensors(path, layer_file_tensors(spec, x, out), layer_metadata(opt))
            info = f"seed attempt {attempt}, min decision gap {dec.min_gap:.2e}"
            if opt["capacity_factor"]:
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
            results.append((path, info))
    return results


# --------------------------------------------------------------------------------------

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data"),
                    help="output directory (default: tests/data)")
    root = os.path.normpath(ap.parse_args().out)
    torch.set_num_threads(1)

    total = 0

    def report(path, info):
        nonlocal total
        paths = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        print(f"{os.path.relpath(path, root)}: {info}")
        for p in paths:
            size = os.path.getsize(p)
            total += size
            print(f"    {os.path.relpath(p, root):60s} {size:8d} bytes")

    for name, builder, kwargs, shape, sharded in CKPT_CASES:
        folder, info, _ = gen_ckpt_case(root, name, builder, kwargs, shape, sharded)
        report(folder, info)
    for path, info in gen_layer_cases(root):
        report(path, info)
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
