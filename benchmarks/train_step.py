"""Full training step of a TinyLlama-shaped causal LM: SCL vs PEFT LoRA on the FFN.

One step = forward + causal-LM loss + backward + AdamW step + zero_grad, on random token
ids, for every provider on the same frozen backbone (built once per backbone dtype, seeded,
deep-copied per provider):

* ``lora_matched``  PEFT LoRA on up_proj + down_proj at the rank whose trainable count
  ``2 r_lora (d + f)`` per layer is closest to SCL's ``2 f r`` (TinyLlama, r=16: r_lora=12).
  **The baseline every ratio refers to.**
* ``lora_r16``      PEFT LoRA on up_proj + down_proj at SCL's rank (equal rank, more params).
* ``lora_up_r16``   PEFT LoRA r=16 on up_proj only (the authors' repository's setting).
* ``scl_eager``     SCL, checkpoint level 0 (plain autograd through the model's modules).
* ``scl_recompute_l1`` / ``scl_recompute_l2``  SCL levels 1/2, PyTorch recompute path.
* ``scl_fused_l1`` / ``scl_fused_l2``  SCL levels 1/2, Triton kernels (CUDA only; the
  interpreter on request, for rehearsals).

Backbones: ``fp32``, ``bf16`` and ``nf4`` (bitsandbytes 4-bit via ``fastseq.quant``; compute
dtype fp32 on CPU, bf16 on CUDA). Adapter parameters are fp32 in every case.

Memory. ``saved_bytes``: bytes autograd keeps for backward during the forward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded, each storage once; exact
and deterministic). ``param_bytes`` (all parameters, 4-bit weights by their packed storage
plus quantization constants), ``grad_bytes`` (trainable), ``optim_bytes`` (AdamW state after a
step). ``est_peak_bytes`` = the sum of those four: a model of the peak (no allocator
workspace). Secondary, CPU: ``rss_fwd_delta_bytes`` = process RSS after the forward minus
before it (after ``malloc_trim``; noisy, allocator-dependent). CUDA: ``cuda_peak_bytes`` =
``torch.cuda.max_memory_allocated`` over one step (absolute: every provider's model is
resident); ``cuda_peak_alone_bytes`` = that step's peak as a process holding only this provider
would see it (the step's rise above what was allocated before it, plus this model's parameters,
quantization constants and optimizer state, plus the shared dequantization buffers the fused
path uses on a quantized backbone). ``plan_estimate_bytes``: ``fastseq.memory.estimate`` for
the same model, SCL config, quantization, batch and dtype (SCL rows only).

Timing: repetitions interleaved round-robin across providers (a shared machine's load hits
all alike); ``ms_min`` / ``ms_median`` wall time per step, ``tokens_per_s`` from the min;
``cpu_ms_min`` = the process's CPU time (all threads) of the fastest step (it also grows
when the machine is loaded: compare runs made at a low ``loadavg_1min``; on CUDA it is host
time only). ``loadavg_1min`` records the machine's load during the block. Ratios
(``*_vs_lora``) against ``lora_matched`` of the same backbone in the same process.

CPU defaults (a quick run): TinyLlama widths (d 2048, f 5632, 32 heads, 4 KV heads) but
2 layers, vocabulary 4096 (TinyLlama: 22 layers, 32000), batch 1 x 128 tokens, 3 reps.
CUDA defaults: 22 layers, vocabulary 32000, batch 4 x 512 tokens, 5 reps.

    python benchmarks/train_step.py                        # CPU: fp32, bf16, nf4
    python benchmarks/train_step.py --backbones fp32 --reps 5
    python benchmarks/train_step.py --smoke                # tiny shapes, fp32 (tests)

Writes ``benchmarks/results/train_step_<device>.{csv,json,png}`` (``--smoke``: ``_smoke``).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from provenance import provenance, write_results  # noqa: E402

import fastseq  # noqa: E402
from fastseq.kernels.testing import count_saved_activations  # noqa: E402
from fastseq.fed.methods import matched_lora_rank  # noqa: E402  (the runtime's own budget rule)

log = logging.getLogger("train_step")

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)
GEMMA_2B = dict(arch="gemma", hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
                head_dim=256)  # 18 layers, vocabulary 256000, tied embeddings
SMOKE = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=2)
SCL_RANK = 16
LORA = ("lora_matched", "lora_r16", "lora_up_r16")
SCL = ("scl_eager", "scl_recompute_l1", "scl_recompute_l2", "scl_fused_l1", "scl_fused_l2")
PROVIDERS = LORA + SCL
BASELINE = "lora_matched"


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def nf4_available() -> str | None:
    """None if an nf4 backbone can be built here, else the reason."""
    try:
        from fastseq import quant
    except ImportError as e:
        return f"fastseq.quant is not available ({e})"
    try:
        quant.check_device("nf4", "cpu" if not torch.cuda.is_available() else "cuda")
    except Exception as e:  # QuantizationError or missing bitsandbytes
        return str(e)
    return None


def model_config(shape: dict, layers: int, vocab: int):
    """(model class, transformers config) of a random-weight causal LM of ``shape``."""
    import transformers as tf

    shape = dict(shape)
    gemma = shape.pop("arch", "llama") == "gemma"
    cls, config_cls = ((tf.GemmaForCausalLM, tf.GemmaConfig) if gemma else (tf.LlamaForCausalLM, tf.LlamaConfig))
    return cls, config_cls(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)


def build_backbone(shape: dict, layers: int, vocab: int, backbone: str, device: torch.device):
    """A random-weight causal LM of ``shape`` (Llama-style; ``arch="gemma"`` in the shape: Gemma,
    GeGLU, tied embeddings) as ``backbone`` (fp32, bf16, nf4, int8). On CUDA it is built on the
    GPU (seconds instead of a minute of CPU initialisation)."""
    cls, cfg = model_config(shape, layers, vocab)
    torch.manual_seed(0)
    with torch.device(device if device.type == "cuda" else "cpu"):
        model = cls(cfg)
    compute = torch.bfloat16 if (backbone == "bf16" or (backbone in ("nf4", "int8") and device.type == "cuda")) \
        else torch.float32
    if backbone in ("nf4", "int8"):
        from fastseq.quant import quantize_model

        model = quantize_model(model.to(compute), backbone, compute_dtype=compute, device=device)
    else:
        model = model.to(device=device, dtype=compute)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()  # no dropout in Llama; train() so adapters behave as in training
    return model, compute


LEVELS = {"scl_eager": 0, "scl_recompute_l1": 1, "scl_recompute_l2": 2, "scl_fused_l1": 1, "scl_fused_l2": 2}


def scl_config(level: int, backend: str = "auto") -> "fastseq.SCLConfig":
    """The SCL every provider here trains: the plain layer (residual, C trained), r=16: the
    ``2 f r`` budget the LoRA baselines are matched to."""
    return fastseq.SCLConfig(r=SCL_RANK, checkpoint_level=level, backend=backend, placement="residual",
                             train_compress=True)


def attach(provider: str, base, device: torch.device):
    model = copy.deepcopy(base)
    d, f = base.config.hidden_size, base.config.intermediate_size
    if provider.startswith("lora"):
        import peft

        r = {"lora_matched": matched_lora_rank(2 * f * SCL_RANK, d, f), "lora_r16": SCL_RANK, "lora_up_r16": SCL_RANK}[provider]
        targets = ["up_proj"] if provider == "lora_up_r16" else ["up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                           target_modules=targets))
        return model, r
    level = LEVELS[provider]
    backend = "triton" if "fused" in provider else "torch"
    if level == 0:
        backend = "auto"
    model = fastseq.get_scl_model(model, scl_config(level, backend))
    return model, SCL_RANK


def available(provider: str, device: torch.device, allow_interpreter: bool = False) -> str | None:
    """None if ``provider`` runs on ``device``, else why not. The Triton interpreter (CPU) counts
    only with ``allow_interpreter`` (a rehearsal of the CUDA run: its times mean nothing)."""
    if provider.startswith("lora"):
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed"
    if "fused" in provider:
        from fastseq.kernels import triton_available

        if not (device.type == "cuda" or allow_interpreter) or not triton_available(device):
            return "the fused Triton path runs on CUDA only" + (" (or under TRITON_INTERPRET=1)" if allow_interpreter else "")
    return None


def _tensor_bytes(t) -> int:
    return t.untyped_storage().nbytes() if isinstance(t, torch.Tensor) else 0


def param_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += _tensor_bytes(t)
        qs = getattr(t, "quant_state", None)  # bitsandbytes 4-bit constants
        if qs is not None:
            total += _tensor_bytes(getattr(qs, "absmax", None)) + _tensor_bytes(getattr(qs, "code", None))
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                total += _tensor_bytes(getattr(s2, "absmax", None)) + _tensor_bytes(getattr(s2, "code", None))
    return total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    def __init__(self, provider, base, device, batch, seq, vocab, lr=1e-4):
        self.provider, self.device = provider, device
        self.model, self.rank = attach(provider, base, device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.opt = torch.optim.AdamW(self.trainable, lr=lr)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)

    def loss(self):
        return self.model(input_ids=self.ids, labels=self.ids).loss

    def step(self):
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def _dequant_buffer_bytes(self) -> int:
        """The dequantization buffers the fused path shares across layers (and across the
        providers of one process): a lone client holds them too."""
        if LEVELS.get(self.provider, 0) == 0:
            return 0
        from fastseq.adapters.scl import _DEQUANT_BUFFERS

        return sum(b.untyped_storage().nbytes() for b in _DEQUANT_BUFFERS.values() if b.device == self.device)

    def memory(self):
        params = list(self.model.parameters())
        saved = count_saved_activations(self.loss, params)
        self.step()  # optimizer state exists after one step
        optim = sum(_tensor_bytes(v) for st in self.opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
        grads = sum(p.numel() * p.element_size() for p in self.trainable)
        pb = param_bytes(self.model)
        out = dict(saved_bytes=saved.bytes, saved_tensors=saved.tensors, param_bytes=pb, grad_bytes=grads,
                   optim_bytes=optim, est_peak_bytes=pb + grads + optim + saved.bytes)
        if self.device.type == "cuda":
            _sync(self.device)
            resident = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            out["cuda_peak_bytes"] = peak
            out["cuda_peak_alone_bytes"] = peak - resident + pb + optim + self._dequant_buffer_bytes()
            out["rss_fwd_delta_bytes"] = None
        else:
            _trim()
            r0 = _rss()
            loss = self.loss()
            out["rss_fwd_delta_bytes"] = _rss() - r0
            loss.backward()
            self.opt.zero_grad(set_to_none=True)
            del loss
            out["cuda_peak_bytes"] = None
        return out


def measure_backbone(providers, backbone, shape, layers, vocab, batch, seq, reps, warmup, device):
    t0 = time.perf_counter()
    base, compute = build_backbone(shape, layers, vocab, backbone, device)
    print(f"[{backbone}] backbone built in {time.perf_counter() - t0:.1f} s", flush=True)
    runners, mem = {}, {}
    for prov in providers:
        runners[prov] = Runner(prov, base, device, batch, seq, vocab)
        mem[prov] = runners[prov].memory()
        mem[prov].update(plan_estimate(base.config, prov, backbone, batch, seq, compute, mem[prov].get("cuda_peak_alone_bytes")))
    del base
    for _ in range(warmup):
        for r in runners.values():
            r.step()
    times = {p: [] for p in runners}
    cpu_times = {p: [] for p in runners}
    load0 = os.getloadavg()[0]
    for _ in range(reps):
        for prov, r in runners.items():
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            loss = r.step()
            _sync(device)
            times[prov].append(time.perf_counter() - t)
            cpu_times[prov].append(time.process_time() - c)
            assert torch.isfinite(loss).all(), f"{prov}: non-finite loss"
    load = round(max(load0, os.getloadavg()[0]), 2)
    out = {}
    for prov, r in runners.items():
        tmin, tmed = min(times[prov]), statistics.median(times[prov])
        out[prov] = dict(backbone=backbone, compute_dtype=str(compute).replace("torch.", ""), provider=prov,
                         rank=r.rank, trainable_params=r.n_trainable, ms_min=tmin * 1e3, ms_median=tmed * 1e3,
                         cpu_ms_min=min(cpu_times[prov]) * 1e3,
                         tokens_per_s=batch * seq / tmin, tokens_per_s_median=batch * seq / tmed,
                         loadavg_1min=load, **mem[prov])
    del runners
    _trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def plan_estimate(config, provider: str, backbone: str, batch: int, seq: int, compute, measured: int | None) -> dict:
    """The memory planner's estimate of an SCL provider's step (LoRA rows: None), and its ratio
    to the measured CUDA peak when there is one."""
    if provider not in LEVELS:
        return dict(plan_estimate_bytes=None, plan_vs_cuda_peak=None)
    from fastseq.memory import estimate

    est = estimate(config, scl_config(LEVELS[provider]), quantization=backbone if backbone in ("nf4", "int8") else "none",
                   batch_size=batch, seq_len=seq, dtype=compute).total
    return dict(plan_estimate_bytes=est, plan_vs_cuda_peak=est / measured if measured else None)


def with_ratios(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """``*_vs_lora`` columns: each row of one backbone against ``baseline``'s row."""
    base = next((r for r in rows if r["provider"] == baseline), None)
    for row in rows:
        for k in ("ms_min", "ms_median", "cpu_ms_min", "saved_bytes", "est_peak_bytes", "trainable_params"):
            row[f"{k}_vs_lora"] = row[k] / base[k] if base and base[k] else None
        row["tokens_per_s_vs_lora"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
    return rows


def run(backbones=None, providers=None, layers=None, vocab=None, batch=None, seq=None, reps=None, warmup=None,
        device=None, smoke=False, out_dir=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    shape = SMOKE if smoke else TINYLLAMA
    layers = layers or (1 if smoke else 2 if cpu else 22)
    vocab = vocab or (256 if smoke else 4096 if cpu else 32000)
    batch = batch or (1 if cpu else 4)
    seq = seq or (16 if smoke else 128 if cpu else 512)
    reps = reps or (1 if smoke else 3 if cpu else 5)
    warmup = (0 if smoke else 1) if warmup is None else warmup
    backbones = backbones or (["fp32"] if smoke else ["fp32", "bf16", "nf4"])
    providers = providers or ([p for p in PROVIDERS if p not in ("lora_r16", "lora_up_r16")] if smoke else list(PROVIDERS))
    d, f = shape["hidden_size"], shape["intermediate_size"]
    meta = dict(provenance(device), model="tinyllama-shaped" if not smoke else "smoke", d=d, f=f,
                layers=layers, vocab=vocab, batch=batch, seq=seq, tokens=batch * seq, reps=reps,
                scl_rank=SCL_RANK, lora_matched_rank=matched_lora_rank(2 * f * SCL_RANK, d, f))
    print(f"budget per layer: SCL 2*f*r = {2 * f * SCL_RANK:,}; LoRA up+down r={matched_lora_rank(2 * f * SCL_RANK, d, f)}: "
          f"2*r*(d+f) = {2 * matched_lora_rank(2 * f * SCL_RANK, d, f) * (d + f):,}; LoRA up+down r=16: {2 * 16 * (d + f):,}; "
          f"LoRA up r=16: {16 * (d + f):,}", flush=True)
    rows, skipped = [], []
    for backbone in backbones:
        if backbone == "nf4":
            why = nf4_available()
            if why:
                print(f"skip nf4 backbone: {why}", flush=True)
                skipped.append(dict(backbone="nf4", provider="*", reason=why))
                continue
        provs = []
        for p in providers:
            why = available(p, device)
            if why:
                print(f"skip {p} on {device.type}: {why}", flush=True)
                skipped.append(dict(backbone=backbone, provider=p, reason=why))
            else:
                provs.append(p)
        res = measure_backbone(provs, backbone, shape, layers, vocab, batch, seq, reps, warmup, device)
        for row in with_ratios([dict(meta, **res[prov]) for prov in provs]):
            rows.append(row)
            print(f"[{backbone}] {row['provider']:17s} r={row['rank']:3d} trainable {row['trainable_params']:>10,d}  "
                  f"step min {row['ms_min']:8.1f} ms  med {row['ms_median']:8.1f} ms  cpu {row['cpu_ms_min']:8.1f} ms  "
                  f"{row['tokens_per_s']:8.1f} tok/s  "
                  f"saved {row['saved_bytes'] / 2**20:8.2f} MiB  est.peak {row['est_peak_bytes'] / 2**20:8.1f} MiB  "
                  + (f"rss.fwd {row['rss_fwd_delta_bytes'] / 2**20:7.1f} MiB" if row["rss_fwd_delta_bytes"] is not None
                     else f"cuda.peak {row['cuda_peak_bytes'] / 2**20:8.1f} MiB"), flush=True)
    out_dir = Path(out_dir or HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (f"train_step_{device.type}" + ("_smoke" if smoke else ""))
    write_results(stem, rows, meta=meta, smoke=smoke, skipped=skipped)
    if rows:
        plot(rows, f"{stem}.png")
    print(f"wrote {stem}.csv/.json/.png")
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / len(provs)
    for ax, (metric, label, scale) in zip(axes, (("tokens_per_s", "tokens/s (best of reps)", 1),
                                                  ("saved_bytes", "saved for backward (MiB)", 2**-20),
                                                  ("est_peak_bytes", "params+grads+AdamW+saved (MiB)", 2**-20))):
        for i, p in enumerate(provs):
            vals = [next((r[metric] * scale for r in rows if r["backbone"] == b and r["provider"] == p), float("nan"))
                    for b in backbones]
            ax.bar([x + i * width for x in range(len(backbones))], vals, width, label=p)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(backbones))])
        ax.set_xticklabels(backbones)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"training step, {r0['model']} d={r0['d']} f={r0['f']} layers={r0['layers']} vocab={r0['vocab']} "
                 f"tokens={r0['tokens']}; {r0['device_name']}, torch {r0['torch']}, {r0['git_commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny widths, 1 layer, 16 tokens, fp32, no warmup, LoRA baseline only (seconds)")
    ap.add_argument("--backbones", nargs="+", choices=["fp32", "bf16", "nf4", "int8"])
    ap.add_argument("--providers", nargs="+", choices=list(PROVIDERS))
    ap.add_argument("--layers", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--device")
    ap.add_argument("--out-dir")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    run(backbones=a.backbones, providers=a.providers, layers=a.layers, vocab=a.vocab, batch=a.batch, seq=a.seq,
        reps=a.reps, warmup=a.warmup, device=a.device, smoke=a.smoke, out_dir=a.out_dir)


if __name__ == "__main__":
    main()
