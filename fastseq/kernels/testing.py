"""Helpers shared by the kernel tests and benchmarks (torch only): random SCL FFN inputs,
a plain SwiGLU MLP, and a saved-for-backward byte counter built on
``torch.autograd.graph.saved_tensors_hooks``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn


def make_scl_inputs(T: int, d: int, f: int, r: int, *, gated: bool = True, bias: bool = False,
                    train_down: bool = False, dtype=torch.float32, param_dtype=None,
                    seed: int = 0, device="cpu", lead=None, placement: str = "residual",
                    train_compress: bool = True, x_grad: bool = True) -> Dict[str, Optional[torch.Tensor]]:
    """Inputs of ``scl_ffn`` with O(1) activations. Frozen weights do not require grad; x
    (unless ``x_grad=False``: the first adapted layer), C, bc (unless ``train_compress=False``),
    E, be (and Wd, bd with ``train_down``) do. ``E`` (``[f, r]``; ``[d, r]`` for the parallel
    placement's P) is random, not zero, so that every gradient is exercised. Generated in
    fp64, then cast."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    shape_x = (T, d) if lead is None else (*lead, d)
    t = {
        "x": rnd(*shape_x),
        "up_weight": rnd(f, d, std=1 / math.sqrt(d)),
        "up_bias": rnd(f, std=0.1) if bias else None,
        "gate_weight": rnd(f, d, std=1 / math.sqrt(d)) if gated else None,
        "gate_bias": rnd(f, std=0.1) if (bias and gated) else None,
        "down_weight": rnd(d, f, std=1 / math.sqrt(f)),
        "down_bias": rnd(d, std=0.1) if bias else None,
        "compress_weight": rnd(r, f, std=1 / math.sqrt(f)),
        "compress_bias": rnd(r, std=0.1) if bias else None,
        "expand_weight": rnd(f if placement == "residual" else d, r, std=0.5 / math.sqrt(r)),
        "expand_bias": rnd(f if placement == "residual" else d, std=0.1) if bias else None,
    }
    trainable = {"expand_weight", "expand_bias"}
    if x_grad:
        trainable.add("x")
    if train_compress:
        trainable |= {"compress_weight", "compress_bias"}
    if train_down:
        trainable |= {"down_weight", "down_bias"}
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
            continue
        dt = param_dtype if k in ("compress_weight", "compress_bias", "expand_weight", "expand_bias") else dtype
        out[k] = v.to(device=device, dtype=dt).requires_grad_(k in trainable)
    return out


ARG_ORDER = ("x", "up_weight", "up_bias", "gate_weight", "gate_bias", "down_weight", "down_bias",
             "compress_weight", "compress_bias", "expand_weight", "expand_bias")


def as_args(inp: Dict[str, Optional[torch.Tensor]]):
    return tuple(inp[k] for k in ARG_ORDER)


@dataclass
class SavedStats:
    bytes: int = 0
    elements: int = 0
    tensors: int = 0


def count_saved_activations(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor]) -> SavedStats:
    """Run ``fn()`` (a forward) under ``saved_tensors_hooks`` and count the *activation*
    tensors autograd keeps for backward: tensors whose storage is one of ``exclude``
    (parameters / frozen weights) are skipped, and each storage is counted once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen = set()
    stats = SavedStats()

    def pack(t):
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        key = t.untyped_storage().data_ptr()
        if key not in skip and key not in seen:
            seen.add(key)
            stats.bytes += t.untyped_storage().nbytes()
            stats.elements += t.untyped_storage().nbytes() // t.element_size()
            stats.tensors += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return stats


class SwiGLU(nn.Module):
    """A Llama-style frozen FFN (gate/up/down, SiLU), the baseline the kernels are measured against."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
