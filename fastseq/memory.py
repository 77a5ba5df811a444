"""A memory model of SCL training, a planner over it, and the measurement that validates it.

`estimate(model, scl_config, quantization, batch_size, seq_len, checkpoint_level, optimizer,
dtype)` predicts the peak memory of one training step, split into

* ``frozen``: the frozen backbone (quantized projections + floating point embeddings,
  norms and heads; fp32 4 B, bf16/fp16 2 B, int8 1 B + a fp32 scale per row, nf4 0.5 B +
  one absmax per 64 weights, 8-bit with double quantization);
* ``trainable``: SCL parameters (fp32) and the trainable head, their gradients and the
  optimizer state (AdamW: two moments; SGD: none);
* ``activations``: what autograd keeps for backward (norms, attention, the FFN as the
  chosen checkpoint level keeps it, the loss), counted the way
  ``torch.autograd.graph.saved_tensors_hooks`` sees it;
* ``workspace``: transient memory at the peak (causal-LM logits and their gradients at
  vocabulary size, dequantization buffers, the FFN backward's largest temporaries).

`plan(model, budget)` searches quantization x checkpoint level x micro-batch and returns the
first configuration that fits in the order quality > recompute > throughput (see `plan`).
`measure_step` runs one real training step and measures the same parts exactly (parameter,
gradient and optimizer-state tensors; saved activations through saved-tensor hooks).
`add_plan_parser` wires ``fastseq plan`` into the CLI. docs/quantization.md has the formulas.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import SCLConfig
from .exit_codes import EXIT_CODES, NOTHING_FITS_EXIT
from .quant import QUANTIZATIONS, check_quantization

OPTIMIZERS = ("adamw", "sgd")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
NF4_BLOCK = 64  # weights per absmax (bitsandbytes default for 4-bit)
DQ_BLOCK = 256  # absmax values per second-level constant (double quantization)


class MemoryModelError(ValueError):
    """The memory model cannot describe this model or request; the message says why."""


# --- model shapes -------------------------------------------------------------------------

@dataclass
class ModelShape:
    """What the memory model needs to know about a backbone.

    arch: "decoder" (Llama/Gemma-style, RoPE, RMSNorm, gated FFN), "vision" (SigLIP/ViT:
    patch embedding, LayerNorm, plain FFN) or "encoder" (BERT: LayerNorm, plain FFN).
    """

    name: str
    arch: str
    d: int
    f: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int = 0
    gated: bool = True
    tie_embeddings: bool = False
    task: str = "causal-lm"
    num_labels: int = 2
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 3
    max_positions: int = 0
    type_vocab: int = 0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    gemma_norm: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.patch_size else 0

    def tokens_per_example(self, seq_len: int) -> int:
        return self.num_patches if self.arch == "vision" else seq_len


def _llama_dict(d, f, layers, heads, kv, vocab, head_dim=None, tie=False, gemma=False):
    return dict(arch="decoder", d=d, f=f, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                head_dim=head_dim or d // heads, vocab=vocab, gated=True, tie_embeddings=tie, task="causal-lm",
                gemma_norm=gemma)


#: real configurations, usable offline (numbers from the models' config.json)
KNOWN_CONFIGS: dict[str, dict] = {
    "TinyLlama/TinyLlama_v1.1": _llama_dict(2048, 5632, 22, 32, 4, 32000),
    "google/gemma-2b": _llama_dict(2048, 16384, 18, 8, 1, 256000, head_dim=256, tie=True, gemma=True),
    "google/siglip-so400m-patch14-384": dict(arch="vision", d=1152, f=4304, n_layers=27, n_heads=16, n_kv_heads=16,
                                             head_dim=72, gated=False, task="image-classification", image_size=384,
                                             patch_size=14),
    "sentence-transformers/all-MiniLM-L6-v2": dict(arch="encoder", d=384, f=1536, n_layers=6, n_heads=12,
                                                   n_kv_heads=12, head_dim=32, vocab=30522, gated=False,
                                                   task="text-classification", max_positions=512, type_vocab=2,
                                                   hidden_dropout=0.1, attention_dropout=0.1),
}
KNOWN_CONFIGS["TinyLlama/TinyLlama-1.1B"] = KNOWN_CONFIGS["TinyLlama/TinyLlama_v1.1"]


def _shape_from_hf_config(cfg, name: str, task: str | None) -> ModelShape:
    mt = getattr(cfg, "model_type", "")
    num_labels = getattr(cfg, "num_labels", 2) or 2  # SiglipForImageClassification: the top-level config's
    if mt == "siglip":
        cfg = cfg.vision_config
        mt = "siglip_vision_model"
    if mt in ("siglip_vision_model", "vit", "clip_vision_model"):
        return ModelShape(name, "vision", cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                          cfg.num_attention_heads, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads,
                          gated=False, task="image-classification", num_labels=num_labels, image_size=cfg.image_size,
                          patch_size=cfg.patch_size, num_channels=getattr(cfg, "num_channels", 3),
                          hidden_dropout=getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0,
                          attention_dropout=getattr(cfg, "attention_probs_dropout_prob", 0.0) or 0.0)
    if mt in ("bert", "roberta", "xlm-roberta"):
        return ModelShape(name, "encoder", cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                          cfg.num_attention_heads, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads,
                          vocab=cfg.vocab_size, gated=False, task=task or "text-classification", num_labels=num_labels,
                          max_positions=cfg.max_position_embeddings, type_vocab=cfg.type_vocab_size,
                          hidden_dropout=cfg.hidden_dropout_prob, attention_dropout=cfg.attention_probs_dropout_prob)
    if hasattr(cfg, "intermediate_size") and hasattr(cfg, "num_key_value_heads"):
        heads = cfg.num_attention_heads
        return ModelShape(name, "decoder", cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, heads,
                          cfg.num_key_value_heads or heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                          vocab=cfg.vocab_size, gated=True,
                          tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                          task=task or "causal-lm", num_labels=num_labels,
                          attention_dropout=getattr(cfg, "attention_dropout", 0.0) or 0.0,
                          gemma_norm=mt.startswith("gemma"))
    raise MemoryModelError(f"the memory model knows Llama/Gemma/Qwen/Mistral-style decoders, SigLIP/ViT vision "
                           f"encoders and BERT-style encoders; {name!r} has model_type {mt!r}")


def model_shape(model: Any, task: str | None = None, num_labels: int | None = None) -> ModelShape:
    """A ModelShape from a ModelShape, a known name (`KNOWN_CONFIGS`), a built-in tiny model
    name, a transformers config, a loaded model, or a local folder / hub id with a config.json."""
    if isinstance(model, ModelShape):
        shape = model
    elif isinstance(model, str) and model in KNOWN_CONFIGS:
        shape = ModelShape(model, **KNOWN_CONFIGS[model])
    elif isinstance(model, str):
        from .models import TINY_MODELS

        if model in TINY_MODELS:
            from . import models as fm

            if model in ("tiny-siglip", "tiny-vit"):
                built, _ = fm._tiny_model(model, "image-classification", num_labels)
                cfg = built.config
            else:
                cfg = fm._tiny_text_config(model, num_labels)
            shape = _shape_from_hf_config(cfg, model, task)
        else:
            from .models import ModelLoadError, check_model_source

            known = f"one of the known configurations ({', '.join(sorted(KNOWN_CONFIGS))})"
            try:
                check_model_source(model)
            except ModelLoadError as exc:
                raise MemoryModelError(f"{exc}, or {known}") from None
            try:
                from transformers import AutoConfig

                cfg = AutoConfig.from_pretrained(model)
            except Exception as exc:
                reason = " ".join(str(exc).split()).rstrip(".")
                raise MemoryModelError(
                    f"cannot read a config for {model!r} ({type(exc).__name__}: {reason}). Offline, use a local folder "
                    f"with a config.json, a built-in tiny model, or {known}") from exc
            shape = _shape_from_hf_config(cfg, model, task)
    elif isinstance(model, torch.nn.Module):
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise MemoryModelError(f"{type(model).__name__} has no transformers config")
        shape = _shape_from_hf_config(cfg, type(model).__name__, task or _task_of_module(model))
    elif hasattr(model, "model_type"):
        shape = _shape_from_hf_config(model, type(model).__name__, task)
    else:
        raise MemoryModelError(f"cannot describe {type(model).__name__}: pass a name, a path, a config or a model")
    if task is not None or num_labels is not None:
        shape = dataclasses.replace(shape, task=task or shape.task, num_labels=num_labels or shape.num_labels)
    return shape


def _task_of_module(model: torch.nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "causal-lm"
    if cls.endswith("ForImageClassification"):
        return "image-classification"
    if cls.endswith("ForSequenceClassification"):
        return "text-classification"
    return None


# --- the estimate -------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Peak training memory in bytes, by part. `details` breaks the parts down further."""

    frozen: int
    trainable: int
    activations: int
    workspace: int
    config: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.activations + self.workspace

    def as_dict(self) -> dict:
        return dict(frozen=self.frozen, trainable=self.trainable, activations=self.activations,
                    workspace=self.workspace, total=self.total, config=self.config, details=self.details)

    def as_table(self) -> str:
        rows = [("frozen weights", self.frozen), ("trainable + grads + optimizer", self.trainable),
                ("activations (saved for backward)", self.activations), ("workspace (transient)", self.workspace),
                ("total", self.total)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'part':<{width}}  {'bytes':>15}  {'MiB':>10}", "-" * (width + 30)]
        for i, (name, value) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * (width + 30))
            lines.append(f"{name:<{width}}  {value:>15,}  {value / 2**20:>10.1f}")
        return "\n".join(lines)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MemoryModelError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _linear_bytes(out_f: int, in_f: int, quantization: str, b: int, double_quant: bool = True) -> int:
    """Bytes of one frozen [out_f, in_f] weight as bitsandbytes stores it."""
    n = out_f * in_f
    if quantization == "none":
        return n * b
    if quantization == "int8":
        return n + 4 * out_f  # int8 codes + fp32 absmax scale per output row (SCB)
    blocks = math.ceil(n / NF4_BLOCK)
    packed = (n + 1) // 2
    if not double_quant:
        return packed + 4 * blocks + 64  # fp32 absmax per block + the 16-entry code
    # 8-bit absmax per block, an fp32 constant per 256 blocks, the 256-entry code, the NF4 code
    return packed + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 * 256 + 64


def _layer_linears(s: ModelShape) -> list[tuple[int, int]]:
    """(out, in) of every projection of one transformer layer (attention + FFN)."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    attn = [(q, s.d), (kv, s.d), (kv, s.d), (s.d, q)]
    ffn = [(s.f, s.d), (s.f, s.d), (s.d, s.f)] if s.gated else [(s.f, s.d), (s.d, s.f)]
    return attn + ffn


def _scl_sites(s: ModelShape, scl: SCLConfig) -> list[int]:
    layers = list(range(s.n_layers)) if scl.layers is None else sorted(scl.layers)
    bad = [i for i in layers if i >= s.n_layers]
    if bad:
        raise MemoryModelError(f"SCLConfig.layers asks for layers {bad} but {s.name} has {s.n_layers} layers")
    return layers


def frozen_bytes(s: ModelShape, quantization: str, dtype=torch.float32, double_quant: bool = True,
                 train_down_proj: bool = False) -> dict:
    """Bytes of the frozen backbone by group (quantized projections, float rest)."""
    b = torch.tensor([], dtype=_dtype(dtype)).element_size()
    q = check_quantization(quantization)
    proj = 0
    for out_f, in_f in _layer_linears(s):
        proj += _linear_bytes(out_f, in_f, q, b, double_quant)
    proj *= s.n_layers
    if train_down_proj:  # trainable down projections are counted with the trainable part
        proj -= s.n_layers * _linear_bytes(s.d, s.f, q, b, double_quant)
    floats = 0  # elements kept in floating point
    d = s.d
    if s.arch == "decoder":
        floats += s.vocab * d + s.n_layers * 2 * d + d
        if s.task == "causal-lm" and not s.tie_embeddings:
            floats += s.vocab * d
    elif s.arch == "vision":
        floats += s.num_channels * s.patch_size ** 2 * d + d + s.num_patches * d
        floats += s.n_layers * (4 * d + 4 * d + s.f + d) + 2 * d  # attn/FFN biases, 2 LayerNorms, post LN
    else:
        floats += (s.vocab + s.max_positions + s.type_vocab) * d + 2 * d
        floats += s.n_layers * (4 * d + 4 * d + s.f + d) + d * d + d  # biases, LNs, pooler
    return dict(projections=proj, floating=floats * b)


def _frozen_compress_bytes(scl: SCLConfig, f: int) -> int:
    """Bytes of one frozen C (r x f, + its bias) in fp32."""
    return 4 * scl.r * (f + (1 if scl.bias else 0))


def trainable_param_count(s: ModelShape, scl: SCLConfig) -> dict:
    sites = len(_scl_sites(s, scl))
    out = dict(scl=sites * scl.adapter_params_per_layer(s.d, s.f), head=0, down=0)
    if scl.train_down_proj:
        out["down"] = sites * (s.d * s.f + (0 if s.arch == "decoder" else s.d))
    if s.task != "causal-lm":
        out["head"] = s.d * s.num_labels + (0 if s.arch == "decoder" else s.num_labels)
    return out


def _ffn_saved_elems(s: ModelShape, level: int, r: int, grad_in: bool, int8: bool,
                     train_compress: bool = True) -> int:
    """Elements (per token) one SCL FFN keeps for backward; see docs/kernels.md. The placement
    does not change them (the parallel branch keeps what the residual one keeps)."""
    d, f = s.d, s.f
    if level == 1:
        return (2 * f + r) if s.gated else (f + r)
    if level == 2:
        return d + r
    # level 0: autograd through the model's own modules. h (f) is kept only for dC.
    h_for_dc = f if train_compress else 0
    if grad_in:  # the FFN's own (act input, act output, up output / the fc1 pre-activation) + p, sigma(p)
        elems = (3 * f if s.gated else f) + h_for_dc + 2 * r
    elif train_compress:  # nothing before the first SCL needs a gradient: only h, p, sigma(p)
        elems = h_for_dc + 2 * r
    else:  # ... and with C frozen, p needs none either: sigma(p) for dE only
        elems = r
    if int8:  # bitsandbytes' 8-bit matmul keeps its input on ctx: down's input c (+ x for gate/up)
        elems += f + (d if grad_in else 0)
    return elems


def estimate(model: Any, scl_config: SCLConfig | None = None, quantization: str = "none", batch_size: int = 1,
             seq_len: int = 512, checkpoint_level: int | None = None, optimizer: str = "adamw",
             dtype="float32", double_quant: bool = True, input_requires_grad: bool = False,
             task: str | None = None, num_labels: int | None = None) -> MemoryEstimate:
    """Peak memory of one training step of `model` with SCL (see the module docstring).

    `checkpoint_level` overrides ``scl_config.checkpoint_level``. `input_requires_grad`
    (what `fastseq.quant.prepare_for_kbit_training` turns on) makes the layers before the first
    SCL keep their activations too. Batches are assumed unpadded (no attention mask), so SDPA
    runs its GQA-aware fused kernel; a padding mask adds the expanded K/V per layer.
    """
    s = model_shape(model, task, num_labels)
    scl = scl_config or SCLConfig()
    level = scl.checkpoint_level if checkpoint_level is None else checkpoint_level
    if level not in (0, 1, 2):
        raise MemoryModelError(f"checkpoint_level must be 0, 1 or 2, got {level!r}")
    q = check_quantization(quantization)
    if optimizer not in OPTIMIZERS:
        raise MemoryModelError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
    if batch_size < 1 or (seq_len < 1 and s.arch != "vision"):
        raise MemoryModelError("batch_size and seq_len must be positive")
    dt = _dtype(dtype)
    b = torch.tensor([], dtype=dt).element_size()
    r = scl.r
    d, f = s.d, s.f
    B = batch_size
    S = s.tokens_per_example(seq_len)
    T = B * S
    qd, kvd = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim

    # frozen (a frozen C is an fp32 SCL tensor: frozen, never quantized)
    fz = frozen_bytes(s, q, dt, double_quant, scl.train_down_proj)
    fz["frozen_compress"] = 0 if scl.train_compress else len(_scl_sites(s, scl)) * _frozen_compress_bytes(scl, s.f)
    frozen = fz["projections"] + fz["floating"] + fz["frozen_compress"]

    # trainable: SCL in fp32, head/down projection in the model dtype; grads alike
    counts = trainable_param_count(s, scl)
    param_bytes = counts["scl"] * 4 + (counts["head"] + counts["down"]) * b
    n_tensors = len(_scl_sites(s, scl)) * (2 if scl.bias else 1) * (2 if scl.train_compress else 1) + (
        2 if counts["head"] else 0)
    opt_bytes = 2 * param_bytes + 4 * n_tensors if optimizer == "adamw" else 0
    trainable = 2 * param_bytes + opt_bytes

    # activations, per layer, counted as saved-tensor storages (each once)
    sites = set(_scl_sites(s, scl))
    first = min(sites)
    norm_b = 4 if (s.arch == "decoder") else b  # RMSNorm computes in fp32; LayerNorm saves its input
    int8 = q == "int8"
    per_layer: list[int] = []
    for i in range(s.n_layers):
        grad_in = input_requires_grad or i > first
        if not grad_in and i < first:
            per_layer.append(0)
            continue
        elems = 0
        if grad_in:
            # norm 1 + norm 2: input (fp32 copy for RMSNorm) + per-token statistics
            if s.arch == "decoder":
                elems_b = 2 * T * (d * norm_b + 4)
            else:
                elems_b = 2 * T * (d * b + 2 * 4)  # input + mean + rstd (fp32)
            # attention: q, k, v, out (+ logsumexp per head and token, fp32)
            elems += T * (qd + 2 * kvd + qd)
            elems_b += 4 * T * s.n_heads
            if int8:  # 8-bit q/k/v keep their (shared) input, the norm output; o_proj's input is a
                elems += T * d  # view of SDPA's saved output
            if s.attention_dropout > 0 or s.hidden_dropout > 0:
                elems_b += 2 * T * d  # dropout masks (bool) after attention and FFN
        else:
            elems_b = 0
        if i in sites:
            elems += T * _ffn_saved_elems(s, level, r, grad_in, int8, scl.train_compress)
            if level == 0 and b != 4:  # the reference casts C (kept for dh) and E / P (kept for d sigma(p))
                out_width = f if scl.placement == "residual" else d
                elems += r * f * grad_in + r * out_width * (grad_in or scl.train_compress)
        else:  # a frozen FFN after the first SCL: act input, act output, up output (gated)
            elems += T * ((3 * f) if s.gated else f) + (T * (d + f) if int8 else 0)
        per_layer.append(elems * b + elems_b)
    acts = sum(per_layer)
    extra = {}
    if s.arch == "decoder":
        extra["rope"] = 2 * S * s.head_dim * b  # cos/sin [1, S, head_dim], shared by every layer and example
        extra["final_norm"] = T * (d * 4 + 4)
    elif s.arch == "vision":
        extra["final_norm"] = T * (d * b + 8)
    else:
        extra["final_norm"] = 0
    if s.task == "causal-lm":
        extra["loss"] = T * s.vocab * 4 + T * 8  # log_softmax output (fp32) + targets
    else:
        extra["loss"] = B * d * b + B * s.num_labels * 4 + B * 8
    activations = acts + sum(extra.values())

    # workspace: transient at the peak
    ws = {}
    if s.task == "causal-lm":
        # logits (model output, alive) + fp32 upcast when half + grad of log_softmax + grad of logits
        ws["logits"] = T * s.vocab * (b + (4 if b != 4 else 0) + 4 + 4)
    ffn_temps = {0: 3, 1: 4, 2: 6}[level]
    ws["ffn_backward"] = T * f * b * ffn_temps + 3 * T * d * b
    if q != "none":
        buf_b = 4 if q == "int8" else b
        ws["dequant_buffers"] = (3 if s.gated else 2) * f * d * buf_b if level > 0 else 0
        ws["dequant_transient"] = f * d * buf_b  # one layer's weight dequantized inside a bnb matmul
    workspace = max(ws.get("logits", 0), ws["ffn_backward"]) + ws.get("dequant_buffers", 0) + ws.get(
        "dequant_transient", 0)

    config = dict(model=s.name, quantization=q, batch_size=B, seq_len=seq_len, tokens=T, checkpoint_level=level,
                  optimizer=optimizer, dtype=str(dt).replace("torch.", ""), r=r, double_quant=double_quant,
                  input_requires_grad=input_requires_grad, task=s.task)
    details = dict(frozen=fz, trainable_params=counts, param_bytes=param_bytes, optimizer_bytes=opt_bytes,
                   activations_per_layer=per_layer, activations_extra=extra, workspace=ws)
    return MemoryEstimate(frozen, trainable, activations, workspace, config, details)


# --- the planner --------------------------------------------------------------------------

@dataclass
class Plan:
    """The planner's answer. `fits` is False when nothing fits: `estimate` is then the closest
    configuration and `shortfall` the bytes by which it misses the budget."""

    fits: bool
    budget: int
    quantization: str
    checkpoint_level: int
    micro_batch: int
    grad_accum: int
    estimate: MemoryEstimate
    shortfall: int = 0
    considered: int = 0

    @property
    def message(self) -> str:
        cfg = (f"quantization={self.quantization}, checkpoint_level={self.checkpoint_level}, "
               f"micro_batch={self.micro_batch} x grad_accum={self.grad_accum}")
        if self.fits:
            return (f"fits: {cfg}: {format_bytes(self.estimate.total)} of {format_bytes(self.budget)} "
                    f"({format_bytes(self.budget - self.estimate.total)} to spare)")
        return (f"nothing fits in {format_bytes(self.budget)} ({self.considered} configurations tried); the closest is "
                f"{cfg} at {format_bytes(self.estimate.total)}, {format_bytes(self.shortfall)} over the budget")


def _divisors(n: int) -> list[int]:
    return sorted({k for k in range(1, n + 1) if n % k == 0}, reverse=True)


def plan_candidates(batch_size: int, quantizations=QUANTIZATIONS, levels=(0, 1, 2)) -> list[tuple[str, int, int]]:
    """Every (quantization, level, micro_batch), in order of preference: less quantization first
    (quality), then a lower checkpoint level (less recompute), then a larger micro-batch
    (fewer accumulation steps). Micro-batches divide the batch, so the effective batch is kept."""
    qrank = {name: i for i, name in enumerate(QUANTIZATIONS)}
    out = [(q, lvl, mb) for q in quantizations for lvl in levels for mb in _divisors(batch_size)]
    return sorted(out, key=lambda c: (qrank[c[0]], c[1], -c[2]))


def plan(model: Any, budget_bytes: int, scl_config: SCLConfig | None = None, batch_size: int = 4,
         seq_len: int = 512, optimizer: str = "adamw", dtype="bfloat16", quantizations=QUANTIZATIONS,
         checkpoint_levels=(0, 1, 2), **kwargs) -> Plan:
    """The most preferred configuration whose estimate fits `budget_bytes` (see `plan_candidates`
    for the order), or the smallest one with ``fits=False`` and the shortfall."""
    if budget_bytes <= 0:
        raise MemoryModelError(f"the budget must be more than 0 bytes, got {budget_bytes}; pass the memory the client "
                               f"has, e.g. 8GB")
    quantizations = [check_quantization(q) for q in quantizations]
    shape = model_shape(model, kwargs.pop("task", None), kwargs.pop("num_labels", None))
    best_miss = None
    cands = plan_candidates(batch_size, quantizations, checkpoint_levels)
    for q, lvl, mb in cands:
        est = estimate(shape, scl_config, q, mb, seq_len, lvl, optimizer, dtype, **kwargs)
        if est.total <= budget_bytes:
            return Plan(True, budget_bytes, q, lvl, mb, batch_size // mb, est, 0, len(cands))
        if best_miss is None or est.total < best_miss[1].total:
            best_miss = ((q, lvl, mb), est)
    (q, lvl, mb), est = best_miss
    return Plan(False, budget_bytes, q, lvl, mb, batch_size // mb, est, est.total - budget_bytes, len(cands))


# --- sizes --------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'8GB', '8GiB', '6g', '500MB', '123' -> bytes. Units are binary (8GB = 8 GiB, as GPU
    memory sizes are quoted)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MemoryModelError(f"cannot read {text!r} as a size; write e.g. 8GB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# --- measurement --------------------------------------------------------------------------

@dataclass
class MeasuredMemory:
    """One training step, measured: bytes of the frozen and trainable tensors, optimizer state,
    activations saved for backward (exact: saved-tensor hooks plus the inputs bitsandbytes'
    8-bit matmul keeps on its ctx), and the step's loss."""

    frozen: int
    trainable: int
    activations: int
    loss: float
    saved_tensors: int = 0
    cuda_peak: int | None = None


def _storage_key(t: torch.Tensor):
    return (t.device.type, t.untyped_storage().data_ptr())


def _quant_state_tensors(param) -> list[torch.Tensor]:
    out = []
    state = getattr(param, "quant_state", None)
    if state is not None:
        for v in (state.absmax, state.code, getattr(state, "offset", None)):
            if isinstance(v, torch.Tensor):
                out.append(v)
        s2 = getattr(state, "state2", None)
        if s2 is not None:
            out += [v for v in (s2.absmax, s2.code) if isinstance(v, torch.Tensor)]
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def frozen_and_trainable_bytes(model: torch.nn.Module) -> tuple[int, int, set]:
    """(frozen bytes incl. quantization constants, trainable parameter bytes, storage keys)."""
    seen: set = set()
    frozen = trainable = 0
    for p in model.parameters():
        for t in [p] + _quant_state_tensors(p):
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            if t is p and p.requires_grad:
                trainable += nbytes
            else:
                frozen += nbytes
    for m in model.modules():  # Linear8bitLt keeps SCB on its state too
        st = getattr(m, "state", None)
        scb = getattr(st, "SCB", None)
        if isinstance(scb, torch.Tensor) and _storage_key(scb) not in seen:
            seen.add(_storage_key(scb))
            frozen += scb.untyped_storage().nbytes()
    return frozen, trainable, seen


def _count_bnb8_inputs(count):
    """Wrap bitsandbytes' 8-bit matmul Functions so that `count` sees the input they keep on
    ``ctx`` (``ctx.A`` / ``ctx.tensors``) rather than through ``save_for_backward``. Returns
    the function that undoes the wrapping."""
    try:
        from bitsandbytes.autograd import _functions as bf
    except Exception:
        return lambda: None
    originals = {}
    for name in ("MatMul8bitFp", "MatMul8bitLt"):
        cls = getattr(bf, name, None)
        if cls is None:
            continue
        original = cls.__dict__["forward"]
        originals[cls] = original

        def forward(ctx, A, *args, _f=original.__func__, **kwargs):
            if any(ctx.needs_input_grad):  # otherwise autograd drops ctx at once
                count(A)
            return _f(ctx, A, *args, **kwargs)

        cls.forward = staticmethod(forward)

    def restore():
        for cls, original in originals.items():
            cls.forward = original

    return restore


def measure_step(model: torch.nn.Module, batch: dict, optimizer: str = "adamw", lr: float = 1e-3,
                 loss_fn=None) -> MeasuredMemory:
    """Run forward + backward + optimizer step once and measure the parts of `estimate`.

    Activations: every tensor autograd saves for backward (``saved_tensors_hooks``), counted
    once per storage, parameters and quantization constants excluded, plus the inputs that
    bitsandbytes' 8-bit matmul keeps on its ctx (invisible to the hooks; caught with forward
    hooks). On CUDA also ``torch.cuda.max_memory_allocated`` for the step.
    """
    frozen, train_params, param_keys = frozen_and_trainable_bytes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        raise MemoryModelError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
    seen: set = set()
    saved = [0, 0]

    def count(t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            return
        key = _storage_key(t)
        if key in param_keys or key in seen:
            return
        seen.add(key)
        saved[0] += t.untyped_storage().nbytes()
        saved[1] += 1

    def pack(t):
        count(t)
        return t

    restore = _count_bnb8_inputs(count)
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
    finally:
        restore()
    loss.backward()
    opt.step()
    cuda_peak = None
    if cuda:
        torch.cuda.synchronize()
        cuda_peak = torch.cuda.max_memory_allocated()
    grads = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
    state = 0
    for st in opt.state.values():
        state += sum(v.untyped_storage().nbytes() for v in st.values() if isinstance(v, torch.Tensor))
    opt.zero_grad(set_to_none=True)
    return MeasuredMemory(frozen, train_params + grads + state, saved[0], float(loss.detach()), saved[1], cuda_peak)


# --- CLI ----------------------------------------------------------------------------------

def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``fastseq plan`` to an argparse subparsers object; its handler is ``args.func``."""
    p = subparsers.add_parser(
        "plan", help="estimate peak training memory and pick a configuration that fits a budget",
        description="Estimate the peak memory of SCL training and choose quantization x checkpoint level x "
                    "micro-batch (gradient accumulation keeps the batch) for a memory budget. Preference: no "
                    "quantization > int8 > nf4, then lower checkpoint level, then larger micro-batch. Exits "
                    f"with {NOTHING_FITS_EXIT} when nothing fits.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, local folder, tiny model or known config "
                                                   f"({', '.join(sorted(KNOWN_CONFIGS))})")
    p.add_argument("--budget", required=True, help="memory budget, e.g. 8GB (binary units: 8GB = 8 GiB)")
    default = SCLConfig()
    p.add_argument("--r", type=int, default=None, help=f"SCL rank (default {default.r})")
    p.add_argument("--scl-placement", choices=("residual", "parallel"), default=default.placement,
                   help=f"SCL placement (default {default.placement})")
    p.add_argument("--scl-train-compress", action=argparse.BooleanOptionalAction, default=default.train_compress,
                   help="train SCL's C (default: C frozen at its seeded init; only P or E trains)")
    p.add_argument("--batch-size", type=int, default=None, help="effective batch size (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 512; vision: patches)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="the clients' optimizer (default adamw)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help=f"fix the quantization instead of searching it (default: search {', '.join(QUANTIZATIONS)})")
    p.add_argument("--checkpoint-level", type=int, choices=(0, 1, 2), default=None,
                   help="fix the checkpoint level instead of searching it (default: search 0, 1, 2)")
    p.add_argument("--task", choices=("causal-lm", "text-classification", "image-classification"), default=None,
                   help="the head trained on the model (default: what its config or name says)")
    p.add_argument("--num-labels", type=int, default=None,
                   help="labels of a classification head (default: the model config's, else 2)")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args) -> int:
    """``fastseq plan``; a bad input raises (MemoryModelError, ConfigError, QuantizationError)
    and the CLI prints it as one line on stderr."""
    args.r = SCLConfig().r if args.r is None else args.r
    args.batch_size = 4 if args.batch_size is None else args.batch_size
    args.seq_len = 512 if args.seq_len is None else args.seq_len
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--r", args.r),
                        ("--num-labels", args.num_labels)):
        if value is not None and value < 1:
            raise MemoryModelError(f"{flag} must be an integer >= 1, got {value}")
    budget = parse_bytes(args.budget)
    quants = (args.quantization,) if args.quantization else QUANTIZATIONS
    levels = (args.checkpoint_level,) if args.checkpoint_level is not None else (0, 1, 2)
    scl = SCLConfig(r=args.r, placement=args.scl_placement, train_compress=args.scl_train_compress)
    result = plan(args.model, budget, scl, batch_size=args.batch_size, seq_len=args.seq_len,
                  optimizer=args.optimizer, dtype=args.dtype, quantizations=quants, checkpoint_levels=levels,
                  task=args.task, num_labels=args.num_labels)
    c = result.estimate.config
    print(f"model {c['model']} ({c['task']}), r={c['r']}, batch {args.batch_size} x seq {args.seq_len}, "
          f"{c['optimizer']}, {c['dtype']}")
    print(result.estimate.as_table())
    print(result.message)
    return 0 if result.fits else NOTHING_FITS_EXIT
