"""Sweep: fwd+bwd time and memory of one FFN layer, SCL vs baselines.

Providers (all on the same frozen SwiGLU weights):

* ``frozen_mlp``   the frozen SwiGLU MLP alone (x requires grad, nothing trainable inside)
* ``peft_lora``    HF PEFT LoRA r=16 on up_proj + down_proj (equal rank; the baseline of ``*_vs_lora``)
* ``peft_lora_matched``  PEFT LoRA on up_proj + down_proj at the rank whose trainable count
  matches the SCL variant's (``fastseq.fed.methods.matched_lora_rank``)
* ``scl_eager``    SCL, checkpoint level 0 (plain autograd reference)
* ``scl_torch_l1`` / ``scl_torch_l2``   SCL, PyTorch recompute autograd.Function
* ``scl_triton_l1`` / ``scl_triton_l2`` SCL, fused Triton kernels (CUDA only; the interpreter
  on request, for rehearsals)

SCL variants (``VARIANTS``): ``plain`` (residual placement, C trained, r=16: ``2 f r``
trainable, the default of this script) and ``default`` (the library's ``SCLConfig()``:
parallel placement, C frozen, r=64: ``d r`` trainable).

Shapes: TinyLlama FFN (d=2048, f=5632) and Gemma-2B FFN (d=2048, f=16384). Memory:
``saved_bytes`` = activation bytes autograd keeps for backward (saved_tensors_hooks,
parameters excluded; deterministic, every device); ``peak_bytes`` = peak allocator bytes
above the inputs during fwd+bwd (CUDA: torch.cuda.max_memory_allocated; CPU: not measurable
per call with the default allocator, left empty). Each row carries the device name, torch
version and git commit; ``*_vs_lora`` ratios are against ``peft_lora`` from the same process.
FLOPs (``flops_fwd``, ``flops``: forward and forward+backward as the model needs them, frozen
GEMMs without weight gradients; ``flops_executed`` adds level 2's recomputed GEMMs) turn the
times into ``tflops_fwd`` / ``tflops``. On CUDA times come from ``triton.testing.do_bench``
(median and min of its repetitions, CUDA events, L2 flushed); on CPU from interleaved wall-clock reps.

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
from typing import Callable, NamedTuple

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from provenance import provenance, write_results  # noqa: E402
from fastseq.config import SCLConfig  # noqa: E402
from fastseq.fed.methods import matched_lora_rank  # noqa: E402  (the runtime's own budget rule)
from fastseq.kernels import scl_ffn, triton_available  # noqa: E402
from fastseq.kernels.testing import SwiGLU, count_saved_activations  # noqa: E402

SHAPES = {"tinyllama": (2048, 5632), "gemma-2b": (2048, 16384)}
RANK = 16
_DEFAULT = SCLConfig()
VARIANTS = {"plain": dict(placement="residual", train_compress=True, r=RANK),
            "default": dict(placement=_DEFAULT.placement, train_compress=_DEFAULT.train_compress, r=_DEFAULT.r)}
PROVIDERS = ("frozen_mlp", "peft_lora", "peft_lora_matched", "scl_eager", "scl_torch_l1", "scl_torch_l2",
             "scl_triton_l1", "scl_triton_l2")
LEVELS = {"scl_eager": 0, "scl_torch_l1": 1, "scl_torch_l2": 2, "scl_triton_l1": 1, "scl_triton_l2": 2}


class Built(NamedTuple):
    x: torch.Tensor
    step: Callable[[], torch.Tensor]  # one forward, returns the output
    exclude: list  # parameter tensors (not counted as saved activations)
    trainable_params: int
    grads: list  # the tensors that receive gradients (x included)
    rank: int


def scl_trainable(d: int, f: int, variant: str = "plain") -> int:
    v = VARIANTS[variant]
    return SCLConfig(r=v["r"], placement=v["placement"], train_compress=v["train_compress"]).adapter_params_per_layer(d, f)


def lora_matched_rank(d: int, f: int, variant: str = "plain") -> int:
    return matched_lora_rank(scl_trainable(d, f, variant), d, f)


def available(provider: str, device: torch.device, allow_interpreter: bool = False) -> bool:
    """Whether ``provider`` can run on ``device``; the Triton interpreter (CPU) counts only with
    ``allow_interpreter`` (a rehearsal: its times mean nothing)."""
    if provider.startswith("peft_lora"):
        try:
            import peft  # noqa: F401
        except ImportError:
            return False
    if provider.startswith("scl_triton"):
        return (device.type == "cuda" or allow_interpreter) and triton_available(device)
    return True


def ffn_flops(provider: str, d: int, f: int, T: int, rank: int, variant: str = "plain") -> dict:
    """FLOPs of one gated FFN layer: ``flops_fwd``; ``flops`` = forward + backward as training
    needs them (frozen GEMMs get an input gradient, no weight gradient: 2x their forward; the
    adapter 3x its forward); ``flops_executed`` adds what level 2 recomputes (gate and up)."""
    frozen = 6 * T * d * f
    if provider == "frozen_mlp":
        adapter = 0
    elif provider.startswith("peft_lora"):
        adapter = 4 * T * rank * (d + f)  # up: x A^T, (.) B^T; down: h A^T, (.) B^T
    else:
        residual = VARIANTS[variant]["placement"] == "residual"
        adapter = 2 * T * f * rank + 2 * T * d * rank + (2 * d * f * rank if residual else 0)  # p, epilogue, M = Wd E
    flops = 2 * frozen + 3 * adapter
    executed = flops + (4 * T * d * f if LEVELS.get(provider) == 2 else 0)
    return dict(flops_fwd=frozen + adapter, flops=flops, flops_executed=executed)


def build(provider: str, d: int, f: int, r: int, T: int, dtype, device, seed: int = 0,
          variant: str = "plain") -> Built:
    """One provider on one shape. ``r`` is ``peft_lora``'s rank; the SCL providers take theirs
    from ``variant`` and ``peft_lora_matched`` the rank matching that variant's budget."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mlp = SwiGLU(d, f)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            p.requires_grad_(False)
    mlp = mlp.to(device=device, dtype=dtype)
    x = torch.randn(T, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    if provider == "frozen_mlp":
        return Built(x, lambda: mlp(x), list(mlp.parameters()), 0, [x], 0)
    if provider.startswith("peft_lora"):
        import peft
        if provider == "peft_lora_matched":
            r = lora_matched_rank(d, f, variant)
        model = peft.get_peft_model(mlp, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                        target_modules=["up_proj", "down_proj"]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        return Built(x, lambda: model(x), list(model.parameters()), sum(p.numel() for p in trainable),
                     [x] + trainable, r)
    v = VARIANTS[variant]
    r = v["r"]
    out_width = f if v["placement"] == "residual" else d
    C = (torch.randn(r, f, generator=g) / f ** 0.5).to(device=device, dtype=dtype).requires_grad_(v["train_compress"])
    E = (torch.randn(out_width, r, generator=g) * 0.01).to(device=device, dtype=dtype).requires_grad_(True)
    level = LEVELS[provider]
    backend = "triton" if provider.startswith("scl_triton") else "torch"
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight

    def step():
        return scl_ffn(x, wu, None, wg, None, wd, None, C, None, E, None, ffn_activation="silu",
                       scl_activation="silu", scale=1.0, checkpoint_level=level, backend=backend,
                       placement=v["placement"])

    grads = [x, E] + ([C] if v["train_compress"] else [])
    return Built(x, step, [wg, wu, wd, C, E], scl_trainable(d, f, variant), grads, r)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench(fn, grads):
    """Median and min ms of ``fn`` by ``triton.testing.do_bench`` (CUDA events, L2 flushed
    between runs, gradients reset so that backward never accumulates)."""
    from triton.testing import do_bench

    med, low = do_bench(fn, warmup=25, rep=100, grad_to_none=grads, quantiles=[0.5, 0.0])
    return med, low


def measure_block(providers, d, f, r, T, dtype, device, reps, warmup, variant="plain", timer=None, fwd=False):
    """Measure several providers on one shape: fwd+bwd time (and with ``fwd`` the forward alone),
    saved bytes, CUDA peak bytes, FLOPs. ``timer``: ``"do_bench"`` (the CUDA default) or
    ``"interleaved"`` (the CPU default: reps interleaved round-robin across providers, so that
    background load on a shared machine hits all of them alike)."""
    timer = timer or ("do_bench" if device.type == "cuda" else "interleaved")
    built = {}
    for prov in providers:
        b = build(prov, d, f, r, T, dtype, device, variant=variant)
        built[prov] = (b, count_saved_activations(b.step, b.exclude))
    dy = torch.randn(T, d, device=device, dtype=dtype)
    for _ in range(warmup):  # compiles and autotunes the Triton kernels for this shape too
        for b, _ in built.values():
            b.step().backward(dy)
    _sync(device)
    peaks = {}
    for prov, (b, _) in built.items():
        if device.type == "cuda":
            b.x.grad = None
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            b.step().backward(dy)
            _sync(device)
            peaks[prov] = torch.cuda.max_memory_allocated(device) - base
    times = {prov: {} for prov in built}
    if timer == "do_bench":
        for prov, (b, _) in built.items():
            times[prov]["fwd_bwd"] = _do_bench(lambda b=b: b.step().backward(dy), b.grads)
            if fwd:
                times[prov]["fwd"] = _do_bench(b.step, b.grads)
    else:
        raw = {prov: {"fwd_bwd": [], "fwd": []} for prov in built}
        for _ in range(reps):
            for prov, (b, _) in built.items():
                for kind in (("fwd_bwd", "fwd") if fwd else ("fwd_bwd",)):
                    for t in b.grads:
                        t.grad = None
                    _sync(device)
                    t0 = time.perf_counter()
                    y = b.step()
                    if kind == "fwd_bwd":
                        y.backward(dy)
                    _sync(device)
                    raw[prov][kind].append((time.perf_counter() - t0) * 1e3)
                    del y
        for prov, kinds in raw.items():
            times[prov] = {k: (statistics.median(v), min(v)) for k, v in kinds.items() if v}
    out = {}
    for prov, (b, saved) in built.items():
        med, low = times[prov]["fwd_bwd"]
        fl = ffn_flops(prov, d, f, T, b.rank, variant)
        row = dict(variant=variant, rank=b.rank, ms_median=med, ms_min=low, saved_bytes=saved.bytes,
                   saved_tensors=saved.tensors, peak_bytes=peaks.get(prov), trainable_params=b.trainable_params,
                   **fl, tflops=fl["flops"] / (med * 1e-3) / 1e12, timer=timer)
        if "fwd" in times[prov]:
            fmed, fmin = times[prov]["fwd"]
            row.update(fwd_ms_median=fmed, fwd_ms_min=fmin, tflops_fwd=fl["flops_fwd"] / (fmed * 1e-3) / 1e12)
        out[prov] = row
    return out


def add_ratios(block: list[dict], baseline: str = "peft_lora") -> list[dict]:
    """``*_vs_lora`` columns: each row against ``baseline``'s row of the same block (time ratios
    > 1 are slower than the baseline)."""
    lora = next((rw for rw in block if rw["provider"] == baseline), None)
    for rw in block:
        rw["baseline"] = baseline if lora else None
        rw["time_vs_lora"] = rw["ms_median"] / lora["ms_median"] if lora else None
        rw["time_min_vs_lora"] = rw["ms_min"] / lora["ms_min"] if lora else None
        rw["saved_vs_lora"] = rw["saved_bytes"] / lora["saved_bytes"] if lora else None
        rw["peak_vs_lora"] = (rw["peak_bytes"] / lora["peak_bytes"]
                              if lora and rw["peak_bytes"] is not None and lora["peak_bytes"] else None)
    return block


def run(quick=False, device=None, dtype=None, tokens=None, shapes=None, reps=None, out_dir=None, variant="plain"):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if tokens is None:
        tokens = ([64] if quick else [64, 256]) if device.type == "cpu" else ([1024] if quick else [512, 2048, 8192])
    shapes = shapes or (["tinyllama"] if quick else list(SHAPES))
    reps = reps or (5 if device.type == "cpu" else 10)
    warmup = 2 if device.type == "cpu" else 3
    meta = dict(provenance(device), dtype=str(dtype).replace("torch.", ""), scl_rank=VARIANTS[variant]["r"])
    rows = []
    for shape in shapes:
        d, f = SHAPES[shape]
        for T in tokens:
            provs = [p for p in PROVIDERS if available(p, device)]
            for p in PROVIDERS:
                if p not in provs:
                    print(f"skip {p} on {device.type}")
            load0 = os.getloadavg()[0]
            res = measure_block(provs, d, f, RANK, T, dtype, device, reps, warmup, variant=variant)
            load = round(max(load0, os.getloadavg()[0]), 2)  # 1-min load average: others' work
            block = []
            for prov in provs:
                m = res[prov]
                block.append(dict(meta, shape=shape, d=d, f=f, tokens=T, provider=prov, **m,
                                  loadavg_1min=load))
                print(f"{shape:9s} T={T:5d} {prov:17s} median {m['ms_median']:9.1f} ms  min {m['ms_min']:9.1f} ms  "
                      f"saved {m['saved_bytes'] / 2**20:8.2f} MiB" +
                      (f"  peak {m['peak_bytes'] / 2**20:8.1f} MiB" if m["peak_bytes"] is not None else ""),
                      flush=True)
            add_ratios(block)
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
    fig.suptitle(f"one FFN layer, SCL {r0['variant']} r={r0['scl_rank']}, {r0['dtype']}, {r0['device_name']}, "
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
    ap.add_argument("--variant", choices=list(VARIANTS), default="plain", help="the SCL variant (see the docstring)")
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    run(quick=a.quick, device=a.device, dtype=a.dtype, tokens=a.tokens, shapes=a.shapes,
        reps=a.reps, out_dir=a.out_dir, variant=a.variant)


if __name__ == "__main__":
    main()
