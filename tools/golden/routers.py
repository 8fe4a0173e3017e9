"""The routers R1-R7 in float64 (docs/semantics.md): weights are torch functions of the logits, the
selection a constant."""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import torch

from decisions import SINKHORN_STOP_MARGIN, Decisions


# Every router returns weights that are torch functions of the logits, so autograd
# differentiates them as docs/semantics.md "Backward" says: the selection (ids, drops, Sinkhorn's
# d0 / d1) is computed from plain Python floats or detached values and is a constant; the
# gradient flows through p (or s) of the chosen experts, the normalisation and the scale.

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


# What a drawn case of R4-R7 must exercise: features(spec, out, iteration_sensitive) -> (text, ok),
# ok False when the draw misses it (the case is then re-drawn; see layer_cases.router_features).

def _slots_histogram(out):
    slots = out["slots"].tolist()
    return {n: slots.count(n) for n in sorted(set(slots))}


def top_p_features(spec, out, iteration_sensitive):
    hist = _slots_histogram(out)
    capped = int(out["capped"].sum())
    return (f"slots per token {hist}, tokens stopped by max_k={spec.max_k} before "
            f"the threshold: {capped}"), {1, 2, spec.max_k} <= set(hist)


def null_experts_features(spec, out, iteration_sensitive):
    nulls = (out["ids"] >= spec.E).sum(dim=1).tolist()
    none, one, every = nulls.count(0), nulls.count(1), nulls.count(spec.k)
    return (f"tokens with 0 null slots: {none}, 1 null slot: {one}, all {spec.k} "
            f"slots null: {every}, load {out['load'].tolist()}"), one > 0 and every > 0 and none > 0


def sinkhorn_features(spec, out, iteration_sensitive):
    """With `iteration_sensitive` a case must also change some token's slots if one iteration
    fewer were run (so the iteration count is tested)."""
    if spec.inference_topk:
        return "inference_topk: plain softmax top-k", True
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


def expert_choice_features(spec, out, iteration_sensitive):
    hist = _slots_histogram(out)
    T, E = out["ids"].shape
    C = min(T, math.ceil(Fraction(spec.capacity_factor) * T / E))
    zero, multi = hist.get(0, 0), sum(c for n, c in hist.items() if n > 1)
    return (f"C={C}, tokens with 0 experts: {zero}, with >1 experts: {multi}, "
            f"slots per token {hist}, load {out['load'].tolist()}"), \
        T == 1 or (zero > 0 and multi > 0)


@dataclass(frozen=True)
class RouterDef:
    """A router of the registry: how a layer spec routes with it, whether R3 capacity applies
    after it (the top-k routers, whose L1 counts k slots per token, dropped ones included), and
    what a drawn case of it must exercise (None: nothing)."""
    route: Callable  # (logits, spec, dec) -> (ids, weights, extra outputs)
    takes_capacity: bool = False
    features: Optional[Callable] = None


# The routers by the name the C++ registry gives them (include/moe/routers/registry.hpp).
ROUTERS = {
    "softmax_topk": RouterDef(
        lambda z, s, dec: (*route_softmax_topk(z, s.k, s.normalize, s.scale, dec), {}), takes_capacity=True),
    "sigmoid_topk": RouterDef(
        lambda z, s, dec: (*route_sigmoid_topk(z, s.router_bias, s.k, s.n_group, s.topk_group, s.normalize,
                                               s.scale, dec), {}), takes_capacity=True),
    "top_p": RouterDef(lambda z, s, dec: _with_capped(route_top_p(z, s.threshold, s.max_k, s.normalize, dec)),
                       features=top_p_features),
    "null_experts": RouterDef(lambda z, s, dec: (*route_null_experts(z, s.k, s.E, s.normalize, dec), {}),
                              features=null_experts_features),
    "sinkhorn": RouterDef(
        lambda z, s, dec: (*route_softmax_topk(z, s.k, s.normalize, 1.0, dec), {}) if s.inference_topk
        else route_sinkhorn(z, s.k, s.iterations, s.tolerance, s.gates, s.normalize, dec),
        features=sinkhorn_features),
    "expert_choice": RouterDef(lambda z, s, dec: (*route_expert_choice(z, s.capacity_factor, dec), {}),
                               features=expert_choice_features),
}
TOPK_ROUTERS = tuple(name for name, r in ROUTERS.items() if r.takes_capacity)  # R3 applies after them
NEW_ROUTERS = tuple(name for name, r in ROUTERS.items() if not r.takes_capacity)  # R4-R7


def _with_capped(routed):
    ids, weights, capped = routed
    return ids, weights, {"capped": capped}
