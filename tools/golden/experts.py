"""The expert FFNs: SwiGLU, GeGLU, MLP, with the projection inputs rounded as the weights' storage
rounds them."""

import math

import torch


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
