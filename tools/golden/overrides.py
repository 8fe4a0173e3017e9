"""tests/data/overrides: moe-run runs with router flags on the checkpoints."""

import math
import os
from fractions import Fraction

from files import write_json, write_safetensors
from decisions import Decisions
from layer import MoeSpec, moe_forward
from routers import NEW_ROUTERS, TOPK_ROUTERS
from randoms import generate, rand_input
from families import build_mixtral
from ckpt_cases import D, backward_flags, run_backward, write_checkpoint
from layer_cases import router_features


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
