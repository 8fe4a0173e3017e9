#!/usr/bin/python3
"""Side-by-side speed of moe-run and a HuggingFace-style PyTorch MoE block on identical weights.

For each standard shape this writes a Mixtral-format checkpoint (config.json + model.safetensors,
random float32 weights) and an input file to a scratch folder, then, in one run:
  * times the PyTorch block written as HuggingFace's MixtralSparseMoeBlock computes it (router
    linear, softmax, top-k, renormalise, one masked gather per expert, index_add_), forward and,
    with --backward, its autograd backward;
  * times one dense PyTorch (OpenBLAS) SwiGLU FFN doing the same active FLOPs (T*k rows);
  * runs `moe-run --repeat N` on the same files (--rounds times, median taken) and reads its
    forward_ms_median (and backward_ms_median);
  * checks that moe-run's output (and gradients) agree with PyTorch's.
It prints medians and the ratios the performance issue asks for. Needs Debian's python3-torch:
run it with /usr/bin/python3.

With --bf16 the checkpoint stores its weights as BF16 (as real ones do; PyTorch and the float32 run
get the same values widened) and moe-run also runs with --weights bf16: its time, the speed-up over
the float32 run and its error against the float32 PyTorch block. With --quant moe-run also runs with
--weights q8_0 and q4_0 (quantized at load), reported the same way: the error is what the formats
trade for their speed.

With --plot FILE it also draws GFLOP/s on active FLOPs per shape and engine (forward) into a PNG
(Debian's python3-matplotlib).

usage: tools/compare_pytorch.py [--moe-run build/apps/moe-run] [--threads 1] [--repeat 10] [--rounds 3]
                                [--shapes small,mixtral,fine,decode_t1] [--backward] [--bf16] [--quant]
                                [--plot FILE]
"""
import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

# OpenBLAS keeps its own thread pool, which torch.set_num_threads does not limit: set it before torch loads.
_threads = argparse.ArgumentParser(add_help=False)
_threads.add_argument("--threads", type=int, default=1)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ[_var] = str(_threads.parse_known_args()[0].threads)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden"))
from files import round_to, write_json, write_safetensors  # noqa: E402  (the generator's safetensors writer)

# The standard shapes of bench/bench_layer.cpp: tokens, d, ff, experts, k.
SHAPES = {
    "small": (512, 512, 1024, 8, 2),
    "mixtral": (256, 1024, 2816, 8, 2),
    "fine": (512, 1024, 512, 64, 8),
    "decode_t1": (1, 1024, 2816, 8, 2),
}


def read_safetensors(path):
    """{name: float32 tensor} of a safetensors file (F32 tensors only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(info["shape"])
    return out


class HFBlock(torch.nn.Module):
    """A Mixtral sparse MoE block as HuggingFace transformers computes it."""

    def __init__(self, gate, experts, k):
        super().__init__()
        self.gate = torch.nn.Parameter(gate)
        self.w1 = torch.nn.ParameterList([torch.nn.Parameter(w1) for w1, _, _ in experts])
        self.w3 = torch.nn.ParameterList([torch.nn.Parameter(w3) for _, w3, _ in experts])
        self.w2 = torch.nn.ParameterList([torch.nn.Parameter(w2) for _, _, w2 in experts])
        self.k = k

    def forward(self, x):
        logits = x @ self.gate.T
        weights = torch.softmax(logits, dim=1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(chosen, num_classes=len(self.w1)).permute(2, 1, 0)
        for e in range(len(self.w1)):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            h = x[token]
            y = (torch.nn.functional.silu(h @ self.w1[e].T) * (h @ self.w3[e].T)) @ self.w2[e].T
            out.index_add_(0, token, y * weights[token, slot, None])
        return out


def median_ms(f, repeat):
    f()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def relative_error(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def compare(name, moe_run, threads, repeat, rounds, backward, bf16, others, folder):
    """One shape: PyTorch's times, moe-run's with float32 weights and with each of `others`
    (moe-run --weights names), their errors against the PyTorch block."""
    T, d, ff, E, k = SHAPES[name]
    g = torch.Generator().manual_seed(1)
    dtype = "BF16" if bf16 else "F32"
    stored = lambda t: round_to(t, dtype).to(torch.float32)  # noqa: E731  the values as the file holds them
    gate = stored(torch.randn(E, d, generator=g) / d ** 0.5)
    experts = [(stored(torch.randn(ff, d, generator=g) / d ** 0.5), stored(torch.randn(ff, d, generator=g) / d ** 0.5),
                stored(torch.randn(d, ff, generator=g) / ff ** 0.5)) for _ in range(E)]
    x = torch.randn(T, d, generator=g)
    grad_out = torch.randn(T, d, generator=g)

    config = {"model_type": "mixtral", "hidden_size": d, "intermediate_size": ff, "num_local_experts": E,
              "num_experts_per_tok": k, "num_hidden_layers": 1, "hidden_act": "silu"}
    write_json(os.path.join(folder, "config.json"), config)
    p = "model.layers.0.block_sparse_moe"
    tensors = [(f"{p}.gate.weight", dtype, gate)]
    for e, (w1, w3, w2) in enumerate(experts):
        tensors += [(f"{p}.experts.{e}.w1.weight", dtype, w1), (f"{p}.experts.{e}.w2.weight", dtype, w2),
                    (f"{p}.experts.{e}.w3.weight", dtype, w3)]
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    inputs = [("hidden_states", "F32", x)] + ([("grad_output", "F32", grad_out)] if backward else [])
    write_safetensors(os.path.join(folder, "input.safetensors"), inputs, {})

    torch.set_num_threads(threads)
    block = HFBlock(gate, experts, k)
    row = {"shape": name}
    with torch.no_grad():
        row["torch_ms"] = median_ms(lambda: block(x), repeat)
        reference = block(x)
        # One dense FFN over T*k rows: the same active FLOPs, no routing.
        rows = torch.randn(T * k, d, generator=g)
        w_in, w_out = torch.randn(2 * ff, d, generator=g) / d ** 0.5, torch.randn(d, ff, generator=g) / ff ** 0.5

        def dense():
            h = rows @ w_in.T
            return (torch.nn.functional.silu(h[:, :ff]) * h[:, ff:]) @ w_out.T
        row["dense_ms"] = median_ms(dense, repeat)
    if backward:
        xg = x.clone().requires_grad_(True)

        def forward_backward():
            block.zero_grad(set_to_none=True)
            xg.grad = None
            (block(xg) * grad_out).sum().backward()
        pair = median_ms(forward_backward, repeat)
        with torch.no_grad():
            forward = median_ms(lambda: block(x), repeat)
        row["torch_bwd_ms"] = max(0.0, pair - forward)
        forward_backward()

    # moe-run with each storage of its weights, alternately, `rounds` times: the medians of their
    # medians, so that a burst of load on a shared machine does not decide a ratio.
    output = {w: os.path.join(folder, f"out_{w}.safetensors") for w in ("f32",) + others}
    out = output["f32"]
    common = [moe_run, "--model", folder, "--layer", "0", "--input", os.path.join(folder, "input.safetensors"),
              "--threads", str(threads), "--repeat", str(repeat)]
    samples = {w: [] for w in output}
    for _ in range(rounds):
        for weights in output:
            extra = ["--backward"] if backward and weights == "f32" else []
            run = subprocess.run(common + ["--output", output[weights], "--weights", weights] + extra,
                                 capture_output=True, text=True, check=True)
            printed = dict(line.split("=") for line in run.stdout.split() if "=" in line)
            samples[weights].append(printed)
    timings = {key: statistics.median(float(p[key]) for p in samples["f32"]) for key in samples["f32"][0] if key.endswith("_median")}
    row["moe_ms"] = timings["forward_ms_median"]
    row["kernels"] = samples["f32"][0]["kernels"]
    got = read_safetensors(out)
    row["error"] = relative_error(got["hidden_states"], reference)
    for w in others:
        row[f"moe_{w}_ms"] = statistics.median(float(p["forward_ms_median"]) for p in samples[w])
        row[f"{w}_error"] = relative_error(read_safetensors(output[w])["hidden_states"], reference)
    if backward:
        row["moe_bwd_ms"] = timings["backward_ms_median"]
        pairs = [("grad_hidden_states", xg), (f"grad.{p}.gate.weight", block.gate)]
        for e in range(E):
            pairs += [(f"grad.{p}.experts.{e}.{w}.weight", getattr(block, w)[e]) for w in ("w1", "w2", "w3")]
        # Experts no token chose have no gradient in PyTorch (None): theirs must be zero.
        row["grad_error"] = max(relative_error(got[n], t.grad if t.grad is not None else torch.zeros_like(t))
                                for n, t in pairs)
    return row


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe-run", default=os.path.join(here, "..", "build", "apps", "moe-run"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="moe-run processes per engine (median taken)")
    ap.add_argument("--shapes", default="small,mixtral,fine,decode_t1")
    ap.add_argument("--backward", action="store_true", help="also time and check the backward")
    ap.add_argument("--bf16", action="store_true", help="BF16 checkpoint; also run moe-run --weights bf16")
    ap.add_argument("--quant", action="store_true", help="also run moe-run --weights q8_0 and q4_0")
    ap.add_argument("--plot", metavar="FILE", help="draw GFLOP/s per shape and engine into this PNG")
    args = ap.parse_args()
    others = (("bf16",) if args.bf16 else ()) + (("q8_0", "q4_0") if args.quant else ())
    rows = []
    print(f"threads {args.threads}, medians of {args.repeat} runs (moe: median of {args.rounds} such), "
          f"float32{' (BF16 checkpoint)' if args.bf16 else ''}; torch {torch.__version__}")
    header = f"{'shape':10s} {'torch ms':>9s} {'dense ms':>9s} {'moe ms':>8s} {'vs torch':>8s} {'vs dense':>8s} {'rel err':>8s}"
    if args.backward:
        header += f" {'torch bwd':>9s} {'moe bwd':>8s} {'vs torch':>8s} {'grad err':>8s}"
    for w in others:
        header += f" {w + ' ms':>8s} {'vs moe':>7s} {w + ' err':>8s}"
    print(header)
    for name in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            r = compare(name, args.moe_run, args.threads, args.repeat, args.rounds, args.backward, args.bf16, others,
                        folder)
        line = (f"{name:10s} {r['torch_ms']:9.2f} {r['dense_ms']:9.2f} {r['moe_ms']:8.2f} "
                f"{r['torch_ms'] / r['moe_ms']:7.2f}x {r['dense_ms'] / r['moe_ms']:7.2f}x {r['error']:8.1e}")
        if args.backward:
            line += (f" {r['torch_bwd_ms']:9.2f} {r['moe_bwd_ms']:8.2f} {r['torch_bwd_ms'] / r['moe_bwd_ms']:7.2f}x"
                     f" {r['grad_error']:8.1e}")
        for w in others:
            line += f" {r[f'moe_{w}_ms']:8.2f} {r['moe_ms'] / r[f'moe_{w}_ms']:6.2f}x {r[f'{w}_error']:8.1e}"
        print(line, flush=True)
        rows.append(r)
    print(f"moe kernels: {rows[0]['kernels']} (MOE_ISA selects another)")
    if args.plot:
        plot(rows, args.threads, args.plot)


def active_gflop(name):
    """Forward FLOPs of the experts that run: T*k rows through a SwiGLU FFN (3 projections d x ff)."""
    T, d, ff, E, k = SHAPES[name]
    return 2.0 * T * k * 3 * d * ff * 1e-9


def plot(rows, threads, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [("torch_ms", "PyTorch block (HF Mixtral style)"), ("dense_ms", "one dense PyTorch FFN, same FLOPs"),
               ("moe_ms", "moe")]
    for w in ("bf16", "q8_0", "q4_0"):
        if f"moe_{w}_ms" in rows[0]:
            engines.append((f"moe_{w}_ms", f"moe, {w} weights"))
    fig, ax = plt.subplots(figsize=(7.5, 3.9), dpi=120)
    width = 0.8 / len(engines)
    for i, (key, label) in enumerate(engines):
        values = [active_gflop(r["shape"]) / (r[key] * 1e-3) for r in rows]
        bars = ax.bar([j + (i - (len(engines) - 1) / 2) * width for j in range(len(rows))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["shape"] for r in rows])
    ax.set_ylabel("GFLOP/s (active FLOPs)")
    ax.set_title(f"MoE layer forward, float32 activations, {threads} thread{'s' if threads > 1 else ''}")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
