"""The MoE layer in float64: routing, experts, shared FFN, the balancing losses, and the backward by
autograd."""

import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from files import round_to
from decisions import Decisions
from routers import ROUTERS, TOPK_ROUTERS, apply_capacity
from experts import apply_expert, keep
from quant import QuantizedInputs
from randoms import rand_input


@dataclass
class MoeSpec:
    """All parameters of one MoE layer (float64 values, already rounded as stored)."""
    router: str                      # a name in routers.ROUTERS
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


def moe_forward(x, spec: MoeSpec, dec: Decisions):
    """y_t = sum over kept (t, e) of w_te * Expert_e(x_t) + shared(x_t). x: [T, d] f64.
    Returns dict with y [T,d], logits [T,E'], ids [T,S], weights [T,S], load [E] (real
    experts), slots [T] (ids >= 0, null slots included), load_balance and z_loss (see
    balance_losses), seq_balance (seq_balance_loss), null_balance (null_balance_loss;
    None without null experts); R4: capped; R6: marginal_error, iterations, row_error. Every output
    is a torch function of x and the spec's tensors (selection held constant), so
    moe_backward can differentiate it."""
    logits = x @ spec.router_weight.T
    if spec.router not in ROUTERS:
        raise ValueError(spec.router)
    ids, weights, extra = ROUTERS[spec.router].route(logits, spec, dec)
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
