"""tests/data/layer: library-API layer cases, one file each."""

import math
import os
from fractions import Fraction

import torch

from files import round_to, write_safetensors
from decisions import Decisions
from routers import NEW_ROUTERS, ROUTERS, TOPK_ROUTERS
from layer import (
    MoeSpec, loss_shares, max_abs, moe_backward, moe_forward, rand_grad_output,
    seq_len, with_trainable)
from randoms import generate, rand_input, rand_linear, randn
from families import selection_changed_by_bias


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
    features = ROUTERS[spec.router].features
    return features(spec, out, iteration_sensitive) if features else ("", True)


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
