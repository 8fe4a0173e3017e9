"""HuggingFace checkpoint families. Each builder returns (config, tensors, spec) where
tensors = [(name, dtype, value)] for layers 0 and 1 (+ embed_tokens) and spec is the MoE layer 1
the test loads."""

import torch

from files import round_to
from decisions import Decisions
from routers import route_sigmoid_topk
from layer import MoeSpec
from randoms import rand_linear, randn


TORCH_DTYPE_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def hf_swiglu(g, prefix, d, ff, dtype, names=("gate_proj", "up_proj", "down_proj")):
    """One SwiGLU expert under `prefix`, HF names (gate, up, down). Returns tensors, params."""
    gate, up, down = rand_linear(g, ff, d, dtype), rand_linear(g, ff, d, dtype), rand_linear(g, d, ff, dtype)
    tensors = [(f"{prefix}.{n}.weight", dtype, w) for n, w in zip(names, (gate, up, down))]
    return tensors, (gate, up, down)


def hf_experts(g, prefix, E, d, ff, dtype, names=("gate_proj", "up_proj", "down_proj")):
    """E SwiGLU experts under `prefix`.experts.{e}, HF names. Returns tensors, the experts' params."""
    tensors, experts = [], []
    for e in range(E):
        ts, params = hf_swiglu(g, f"{prefix}.experts.{e}", d, ff, dtype, names)
        tensors += ts
        experts.append(params)
    return tensors, experts


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
        ts, experts = hf_experts(g, p, E, d, ff, dtype, names=("w1", "w3", "w2"))
        tensors += ts
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
    tensors, spec = softmax_swiglu_layers(g, d, ff, E, k, normalize=False, dtype=dtype, shared_ff=shared_ff)
    return config, tensors, spec


def softmax_swiglu_layers(g, d, ff, E, k, normalize, dtype, shared_ff=0):
    """The unrelated embedding, then layers 0 and 1 with mlp.gate and mlp.experts.{e}.*_proj
    (Qwen2-MoE, Qwen3-MoE and OLMoE names) and, with shared_ff, mlp.shared_expert.*_proj and
    mlp.shared_expert_gate [1, d] (Qwen2-MoE); returns the tensors and layer 1's MoeSpec (R1)."""
    tensors = embed_tensor(g, d, dtype)
    spec = None
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        router = rand_linear(g, E, d, dtype)
        tensors.append((f"{p}.gate.weight", dtype, router))
        ts, experts = hf_experts(g, p, E, d, ff, dtype)
        tensors += ts
        shared = shared_gate = None
        if shared_ff:
            ts, shared = hf_swiglu(g, f"{p}.shared_expert", d, shared_ff, dtype)
            tensors += ts
            shared_gate = rand_linear(g, 1, d, dtype)
            tensors.append((f"{p}.shared_expert_gate.weight", dtype, shared_gate))
        spec = MoeSpec("softmax_topk", k, normalize, 1.0, router, experts=experts, shared=shared,
                       shared_gate=shared_gate)
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
    ts, experts = hf_experts(g, p, E, d, ff, dtype)
    tensors += ts
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
