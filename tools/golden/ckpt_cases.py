"""tests/data/ckpt: HuggingFace-style checkpoint folders (and their GGUF models) with inputs and
expected outputs and gradients."""

import math
import os
from dataclasses import replace

import torch

from files import encode, write_json, write_safetensors
from decisions import Decisions
from quant import quantized_spec
from layer import BACKWARD_COEFS, loss_shares, max_abs, moe_backward, moe_forward, rand_grad_output, trainable
from randoms import generate, rand_input
from families import (
    build_deepseek_v3, build_mixtral, build_olmoe, build_qwen2_moe, build_qwen3_moe,
    selection_changed_by_bias)
from gguf_io import q4_0_bytes, q8_0_bytes, write_gguf


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
