"""fastseq.kernels: the fused SCL FFN (tensors only; imports torch, and triton lazily).

``scl_ffn`` computes, for ``x`` of shape ``[..., d]``::

    gated:  h = act(x Wg^T + bg) * (x Wu^T + bu)        plain: h = act(x W1^T + b1)
    placement="residual":  c = h + s * (sigma(h C^T + bc) E^T + be);  y = c Wd^T + bd
    placement="parallel":  y = h Wd^T + bd + s * (sigma(h C^T + bc) P^T + bp)

(P ``[d, r]`` and bp ``[d]`` are passed as ``expand_weight`` / ``expand_bias``)

with a choice of what is kept for backward (``checkpoint_level`` 0/1/2) and of the backend
(``"torch"`` recompute autograd.Function, ``"triton"`` fused kernels, ``"auto"``: Triton for
CUDA tensors when Triton is importable, PyTorch otherwise). See docs/kernels.md.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional, Union

import torch

from .activations import ACTIVATIONS, act, act_grad, check_activation
from .reference import PLACEMENTS, scl_ffn_reference
from .scl_ffn_torch import SCLFFNRecompute

__all__ = ["ACTIVATIONS", "BACKENDS", "CHECKPOINT_LEVELS", "PLACEMENTS", "scl_ffn", "scl_ffn_reference",
           "triton_available", "resolve_backend", "act", "act_grad"]

BACKENDS = ("torch", "triton", "auto")
CHECKPOINT_LEVELS = (0, 1, 2)

WeightArg = Union[torch.Tensor, Callable[[], torch.Tensor]]


def _triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _interpreter_on() -> bool:
    """TRITON_INTERPRET=1 now, and our Triton module (if already imported) was built with it."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    mod = importlib.sys.modules.get(__name__ + ".scl_ffn_triton")
    return mod is None or bool(getattr(mod, "INTERPRET", False))


def triton_available(device: Union[torch.device, str, None] = None) -> bool:
    """Whether the Triton backend can run on ``device``: CUDA with a working driver, or any
    CPU tensor under the Triton interpreter (``TRITON_INTERPRET=1`` set before import)."""
    if not _triton_importable():
        return False
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "cpu":
        return _interpreter_on()
    return False


def resolve_backend(backend: str, device: Union[torch.device, str]) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors when Triton is available, else ``"torch"``
    (the interpreter is never chosen automatically: it is ~1000x slower). ``"triton"`` on a
    device Triton cannot run on raises a RuntimeError that says how to fix it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    dev = torch.device(device)
    if backend == "auto":
        return "triton" if dev.type == "cuda" and triton_available(dev) else "torch"
    if backend == "triton" and not triton_available(dev):
        why = ("triton is not installed (pip install 'fastseq[triton]')" if not _triton_importable()
               else f"tensors are on {dev} and " + (
                   "CUDA is not available" if dev.type == "cuda" else
                   "neither CUDA nor the Triton interpreter is available"))
        raise RuntimeError(
            f"fastseq.kernels: backend='triton' cannot run: {why}. Use backend='torch' (the "
            "PyTorch recompute path: same math and the same memory saving) or, for CPU tests, "
            "set TRITON_INTERPRET=1 in the environment before triton is first imported.")
    return backend


def scl_ffn(
    x: torch.Tensor,
    up_weight: WeightArg,
    up_bias: Optional[torch.Tensor],
    gate_weight: Optional[WeightArg],
    gate_bias: Optional[torch.Tensor],
    down_weight: WeightArg,
    down_bias: Optional[torch.Tensor],
    compress_weight: torch.Tensor,
    compress_bias: Optional[torch.Tensor],
    expand_weight: torch.Tensor,
    expand_bias: Optional[torch.Tensor],
    *,
    ffn_activation: str,
    scl_activation: str,
    scale: float = 1.0,
    checkpoint_level: int = 1,
    backend: str = "torch",
    placement: str = "residual",
) -> torch.Tensor:
    """The SCL FFN; see the module docstring and docs/internals.md for the contract."""
    check_activation(ffn_activation)
    check_activation(scl_activation)
    if checkpoint_level not in CHECKPOINT_LEVELS:
        raise ValueError(f"checkpoint_level must be one of {CHECKPOINT_LEVELS}, got {checkpoint_level!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    out_name, out_width = ("f", compress_weight.shape[-1]) if placement == "residual" else ("d", x.shape[-1])
    if compress_weight.dim() != 2 or expand_weight.dim() != 2:
        raise ValueError(f"compress_weight must be [r, f] and expand_weight [{out_name}, r]")
    if compress_weight.shape[0] != expand_weight.shape[1] or expand_weight.shape[0] != out_width:
        raise ValueError(f"compress_weight {tuple(compress_weight.shape)} and expand_weight "
                         f"{tuple(expand_weight.shape)} do not match ([r, f] and [{out_name}, r] for the "
                         f"{placement} placement, {out_name}={out_width})")
    be = resolve_backend(backend, x.device)
    args = (up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias,
            compress_weight, compress_bias, expand_weight, expand_bias)
    if checkpoint_level == 0:
        return scl_ffn_reference(x, *args, ffn_activation=ffn_activation,
                                 scl_activation=scl_activation, scale=scale, placement=placement)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if be == "triton":
        from .scl_ffn_triton import SCLFFNTriton as Fn
    else:
        Fn = SCLFFNRecompute
    y = Fn.apply(x2, *args, ffn_activation, scl_activation, float(scale), int(checkpoint_level), placement)
    return y.reshape(*lead, y.shape[-1])
