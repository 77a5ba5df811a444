"""Sweep: peak training memory (estimate vs measurement) and step time of SCL training on a
quantized / floating point backbone, backbone {fp32, bf16, nf4, int8} x checkpoint level {0, 1, 2}.

CPU (default): a TinyLlama-shaped model at full width (d=2048, f=5632, 32 heads, 4 KV heads,
vocab 32000) with 2 layers instead of 22, random weights, batch 1 x seq 128, SCL r=16, AdamW,
compute dtype fp32 for fp32/nf4/int8 and bf16 for bf16. GPU (``torch.cuda.is_available()``):
TinyLlama-1.1B and Gemma-2B-shaped models (all layers, random weights) at batch 4 x seq 512,
bf16 compute, plus ``torch.cuda.max_memory_allocated`` for the step.

Measured per configuration (fastseq.memory.measure_step): frozen bytes, trainable bytes
(parameters + grads + optimizer state) and activation bytes saved for backward (exact:
saved-tensor hooks + bitsandbytes' ctx-held inputs); as a secondary figure the process RSS
peak above the RSS before the step (sampled every 2 ms; includes allocator slack); step time =
median of 3 timed fwd+bwd+AdamW steps after the measured one. Also prints the planner's
choice for TinyLlama-1.1B at 6 GB and Gemma-2B at 8 GB (batch 4 x 512).

    OMP_NUM_THREADS=2 python benchmarks/memory_sweep.py [--layers 2 --seq 128 --batch 1]

Writes ``benchmarks/results/memory_<device>.{csv,json,png}`` tagged with device, torch
version and git commit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from provenance import provenance, write_results  # noqa: E402

import fastseq  # noqa: E402
from fastseq import memory  # noqa: E402

BACKBONES = ("fp32", "bf16", "nf4", "int8")
RANK = 16


class RSSPeak:
    """Peak resident set size above the value at start, sampled in a thread."""

    def __init__(self, interval=0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta(self):
        return self.peak - self.base


def release_freed_memory():
    """Return freed heap pages to the OS (glibc malloc_trim) so the RSS baseline is honest."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def llama_config(shape: memory.ModelShape, layers: int):
    import transformers as tf

    return tf.LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.d, intermediate_size=shape.f,
                          num_hidden_layers=layers, num_attention_heads=shape.n_heads,
                          num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                          tie_word_embeddings=shape.tie_embeddings, max_position_embeddings=4096,
                          hidden_act="gelu_pytorch_tanh" if shape.gemma_norm else "silu")


def build(folder: str, backbone: str, device: str):
    import transformers as tf

    from fastseq.quant import bnb_config, keep_cpu_layout

    dt = torch.bfloat16 if (backbone == "bf16" or device == "cuda") else torch.float32
    kwargs = dict(dtype=dt)
    if backbone in ("nf4", "int8"):
        kwargs.update(quantization_config=bnb_config(backbone, dt), device_map={"": device})
    model = tf.LlamaForCausalLM.from_pretrained(folder, **kwargs)
    if backbone not in ("nf4", "int8"):
        model = model.to(device)
    keep_cpu_layout(model)
    return model, dt


def run_one(folder, shape, backbone, level, batch, seq, device, steps=3):
    model, dt = build(folder, backbone, device)
    model.train()
    scl = fastseq.SCLConfig(r=RANK, checkpoint_level=level, backend="auto")
    fastseq.get_scl_model(model, scl)
    q = backbone if backbone in ("nf4", "int8") else "none"
    layers = model.config.num_hidden_layers
    est = memory.estimate(dataclass_replace(shape, n_layers=layers), scl, q, batch, seq, level, "adamw", dt)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=g).to(device)
    data = dict(input_ids=ids, labels=ids)
    with torch.no_grad():  # page in the (memory-mapped) weights so RSS starts from them
        for t in list(model.parameters()) + list(model.buffers()):
            t.float().sum() if t.is_floating_point() else t.sum()
    release_freed_memory()
    with RSSPeak() as rss:
        meas = memory.measure_step(model, data, "adamw")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row = dict(backbone=backbone, checkpoint_level=level, layers=layers, batch=batch, seq=seq, r=RANK,
               compute_dtype=str(dt).replace("torch.", ""),
               est_frozen=est.frozen, est_trainable=est.trainable, est_activations=est.activations,
               est_workspace=est.workspace, est_total=est.total,
               meas_frozen=meas.frozen, meas_trainable=meas.trainable, meas_activations=meas.activations,
               act_error=est.activations / meas.activations - 1,
               exact_sum_error=(est.frozen + est.trainable + est.activations)
               / (meas.frozen + meas.trainable + meas.activations) - 1,
               rss_step_delta=rss.delta, est_step_delta=est.total - est.frozen,
               cuda_peak=meas.cuda_peak, cuda_total_error=(est.total / meas.cuda_peak - 1) if meas.cuda_peak else None,
               step_s=statistics.median(times), loss=meas.loss)
    del model, opt
    return row


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def sweep(name, layers, batch, seq, device):
    import transformers as tf

    shape = memory.model_shape(name)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastseq-memsweep-") as folder:
        torch.manual_seed(0)
        cfg = llama_config(shape, layers)
        tf.LlamaForCausalLM(cfg).save_pretrained(folder)
        for backbone in BACKBONES:
            if device == "cuda" and backbone == "fp32":
                continue
            for level in (0, 1, 2):
                row = run_one(folder, shape, backbone, level, batch, seq, device)
                row["model"] = name
                rows.append(row)
                print(f"{name} {backbone:>4} L{level}: est act {row['est_activations'] / 2**20:8.1f} MiB, "
                      f"meas act {row['meas_activations'] / 2**20:8.1f} MiB ({100 * row['act_error']:+.1f}%), "
                      f"est total {row['est_total'] / 2**20:8.1f} MiB, rss step delta "
                      f"{row['rss_step_delta'] / 2**20:8.1f} MiB (est {row['est_step_delta'] / 2**20:8.1f}), "
                      f"step {row['step_s']:.2f} s", flush=True)
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['backbone']}\nL{r['checkpoint_level']}" for r in rows]
    xs = range(len(rows))
    w = 0.38
    ax = axes[0]
    ax.bar([x - w / 2 for x in xs], [r["est_total"] / 2**20 for r in rows], w, label="estimate (total)")
    ax.bar([x + w / 2 for x in xs], [(r["meas_frozen"] + r["meas_trainable"] + r["meas_activations"]) / 2**20
                                     for r in rows], w, label="measured (frozen+trainable+activations)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("peak training memory")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(list(xs), [r["step_s"] for r in rows])
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("s / step")
    ax.set_title("step time (fwd+bwd+AdamW)")
    r0 = rows[0]
    fig.suptitle(f"{r0['model']} shape, {r0['layers']} layers, batch {r0['batch']} x seq {r0['seq']}, SCL r={RANK}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_plans():
    lines = []
    for name, budget in (("TinyLlama/TinyLlama_v1.1", "6GB"), ("google/gemma-2b", "8GB")):
        p = memory.plan(name, memory.parse_bytes(budget), fastseq.SCLConfig(r=RANK), batch_size=4, seq_len=512,
                        dtype="bf16")
        lines.append(f"plan {name} @ {budget} (batch 4 x 512, bf16, AdamW, r={RANK}): {p.message}")
        lines.append(p.estimate.as_table())
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = provenance(device)
    if torch.cuda.is_available():
        rows = sweep("TinyLlama/TinyLlama_v1.1", memory.model_shape("TinyLlama/TinyLlama_v1.1").n_layers, 4,
                     512, "cuda")
        rows += sweep("google/gemma-2b", memory.model_shape("google/gemma-2b").n_layers, 4, 512, "cuda")
        tag = "cuda"
    else:
        rows = sweep("TinyLlama/TinyLlama_v1.1", args.layers, args.batch, args.seq, "cpu")
        tag = "cpu"
    for r in rows:
        r.update(meta)
    plans = print_plans()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / f"memory_{tag}", rows, meta=meta, plans=plans)
    plot([r for r in rows if r["model"] == rows[0]["model"]], out / f"memory_{tag}.png")
    print(f"wrote {out}/memory_{tag}.csv|json|png")


if __name__ == "__main__":
    main()
