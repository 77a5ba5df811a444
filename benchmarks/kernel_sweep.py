"""Sweep: fwd+bwd time and memory of one FFN layer, SCL vs baselines.

Providers (all on the same frozen SwiGLU weights, trainable rank r=16):

* ``frozen_mlp``   the frozen SwiGLU MLP alone (x requires grad, nothing trainable inside)
* ``peft_lora``    HF PEFT LoRA r on up_proj + down_proj (the baseline the ratios refer to)
* ``scl_eager``    SCL, checkpoint level 0 (plain autograd reference)
* ``scl_torch_l1`` / ``scl_torch_l2``   SCL, PyTorch recompute autograd.Function
* ``scl_triton_l1`` / ``scl_triton_l2`` SCL, fused Triton kernels (CUDA only)

Shapes: TinyLlama FFN (d=2048, f=5632) and Gemma-2B FFN (d=2048, f=16384). Memory:
``saved_bytes`` = activation bytes autograd keeps for backward (saved_tensors_hooks,
parameters excluded; deterministic, every device); ``peak_bytes`` = peak allocator bytes
above the inputs during fwd+bwd (CUDA: torch.cuda.max_memory_allocated; CPU: not measurable
per call with the default allocator, left empty). Each row carries the device name, torch
version and git commit; ``*_vs_lora`` ratios are against ``peft_lora`` from the same process.

    python benchmarks/kernel_sweep.py            # full (CPU: tokens 64, 256)
    python benchmarks/kernel_sweep.py --quick    # TinyLlama only, tokens 64

Writes ``benchmarks/results/kernels_<device>.{csv,json,png}``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Only benchmarks/ goes on sys.path: fastseq.kernels exists only in an installed fastseq
# (pip install -e .), and the repo root there would let `kernels/` shadow the PyPI package of that name.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from provenance import provenance, write_results  # noqa: E402
from fastseq.kernels import scl_ffn, triton_available  # noqa: E402
from fastseq.kernels.testing import SwiGLU, count_saved_activations  # noqa: E402

SHAPES = {"tinyllama": (2048, 5632), "gemma-2b": (2048, 16384)}
RANK = 16
PROVIDERS = ("frozen_mlp", "peft_lora", "scl_eager", "scl_torch_l1", "scl_torch_l2",
             "scl_triton_l1", "scl_triton_l2")


def available(provider: str, device: torch.device) -> bool:
    if provider == "peft_lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            return False
    if provider.startswith("scl_triton"):
        return device.type == "cuda" and triton_available(device)
    return True


def build(provider: str, d: int, f: int, r: int, T: int, dtype, device, seed: int = 0):
    """Returns (step, exclude, trainable_count): ``step()`` runs one forward and returns the
    output; ``exclude`` are parameter tensors (not counted as saved activations)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mlp = SwiGLU(d, f)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            p.requires_grad_(False)
    mlp = mlp.to(device=device, dtype=dtype)
    x = torch.randn(T, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    if provider == "frozen_mlp":
        return x, (lambda: mlp(x)), list(mlp.parameters()), 0
    if provider == "peft_lora":
        import peft
        model = peft.get_peft_model(mlp, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                        target_modules=["up_proj", "down_proj"]))
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return x, (lambda: model(x)), list(model.parameters()), n
    C = (torch.randn(r, f, generator=g) / f ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    E = (torch.randn(f, r, generator=g) * 0.01).to(device=device, dtype=dtype).requires_grad_(True)
    level = {"scl_eager": 0, "scl_torch_l1": 1, "scl_torch_l2": 2, "scl_triton_l1": 1, "scl_triton_l2": 2}[provider]
    backend = "triton" if provider.startswith("scl_triton") else "torch"
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight

    def step():
        return scl_ffn(x, wu, None, wg, None, wd, None, C, None, E, None, ffn_activation="silu",
                       scl_activation="silu", scale=1.0, checkpoint_level=level, backend=backend)

    return x, step, [wg, wu, wd, C, E], 2 * f * r


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_block(providers, d, f, r, T, dtype, device, reps, warmup):
    """Measure several providers on one shape. Timing reps are interleaved round-robin across
    providers so that background load on a shared machine hits all of them alike."""
    built = {}
    for prov in providers:
        x, step, exclude, n_train = build(prov, d, f, r, T, dtype, device)
        saved = count_saved_activations(step, exclude)
        built[prov] = (x, step, saved, n_train)
    dy = torch.randn(T, d, device=device, dtype=dtype)
    for _ in range(warmup):
        for x, step, _, _ in built.values():
            step().backward(dy)
    _sync(device)
    peaks = {}
    for prov, (x, step, _, _) in built.items():
        if device.type == "cuda":
            x.grad = None
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step().backward(dy)
            _sync(device)
            peaks[prov] = torch.cuda.max_memory_allocated(device) - base
    times = {prov: [] for prov in built}
    for _ in range(reps):
        for prov, (x, step, _, _) in built.items():
            x.grad = None
            _sync(device)
            t0 = time.perf_counter()
            step().backward(dy)
            _sync(device)
            times[prov].append((time.perf_counter() - t0) * 1e3)
    return {prov: dict(ms_median=statistics.median(times[prov]), ms_min=min(times[prov]),
                       saved_bytes=saved.bytes, saved_tensors=saved.tensors,
                       peak_bytes=peaks.get(prov), trainable_params=n_train)
            for prov, (_, _, saved, n_train) in built.items()}


def run(quick=False, device=None, dtype=None, tokens=None, shapes=None, reps=None, out_dir=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if tokens is None:
        tokens = ([64] if quick else [64, 256]) if device.type == "cpu" else ([1024] if quick else [512, 2048, 8192])
    shapes = shapes or (["tinyllama"] if quick else list(SHAPES))
    reps = reps or (5 if device.type == "cpu" else 10)
    warmup = 2 if device.type == "cpu" else 3
    meta = dict(provenance(device), dtype=str(dtype).replace("torch.", ""), rank=RANK)
    rows = []
    for shape in shapes:
        d, f = SHAPES[shape]
        for T in tokens:
            provs = [p for p in PROVIDERS if available(p, device)]
            for p in PROVIDERS:
                if p not in provs:
                    print(f"skip {p} on {device.type}")
            load0 = os.getloadavg()[0]
            res = measure_block(provs, d, f, RANK, T, dtype, device, reps, warmup)
            load = round(max(load0, os.getloadavg()[0]), 2)  # 1-min load average: others' work
            block = []
            for prov in provs:
                m = res[prov]
                block.append(dict(meta, shape=shape, d=d, f=f, tokens=T, provider=prov, **m,
                                  loadavg_1min=load))
                print(f"{shape:9s} T={T:5d} {prov:14s} median {m['ms_median']:9.1f} ms  min {m['ms_min']:9.1f} ms  "
                      f"saved {m['saved_bytes'] / 2**20:8.2f} MiB" +
                      (f"  peak {m['peak_bytes'] / 2**20:8.1f} MiB" if m["peak_bytes"] is not None else ""),
                      flush=True)
            lora = next((rw for rw in block if rw["provider"] == "peft_lora"), None)
            for rw in block:
                rw["time_vs_lora"] = rw["ms_median"] / lora["ms_median"] if lora else None
                rw["time_min_vs_lora"] = rw["ms_min"] / lora["ms_min"] if lora else None
                rw["saved_vs_lora"] = rw["saved_bytes"] / lora["saved_bytes"] if lora else None
                rw["peak_vs_lora"] = (rw["peak_bytes"] / lora["peak_bytes"]
                                      if lora and rw["peak_bytes"] is not None else None)
            rows.extend(block)
    out_dir = Path(out_dir or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernels_{device.type}"
    write_results(stem, rows, meta=meta, quick=quick)
    plot(rows, f"{stem}.png")
    print(f"wrote {stem}.csv/.json/.png")
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["shape"], r["tokens"]) for r in rows})
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(provs))
    for j, (metric, label) in enumerate((("ms_min", "fwd+bwd time, best of reps (ms)"),
                                          ("saved_bytes", "saved activations (MiB)"))):
        ax = axes[j]
        for i, p in enumerate(provs):
            vals = []
            for k in keys:
                r = next((r for r in rows if (r["shape"], r["tokens"]) == k and r["provider"] == p), None)
                v = r[metric] if r else float("nan")
                vals.append(v / 2**20 if metric == "saved_bytes" else v)
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=p)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
        ax.set_xticklabels([f"{s}\nT={t}" for s, t in keys])
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"one FFN layer, r={r0['rank']}, {r0['dtype']}, {r0['device_name']}, "
                 f"torch {r0['torch']}, {r0['git_commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="TinyLlama shape and one small token count")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    run(quick=a.quick, device=a.device, dtype=a.dtype, tokens=a.tokens, shapes=a.shapes,
        reps=a.reps, out_dir=a.out_dir)


if __name__ == "__main__":
    main()
