"""Plain-autograd reference of the SCL FFN (checkpoint level 0).

This is the math of docs/internals.md, written the obvious way: autograd keeps every
intermediate it needs (x, g, u, act(g), h, p, sigma(p), c, ...). Two placements:

* ``"residual"``: ``y = (h + s (sigma(h C^T + bc) E^T + be)) Wd^T + bd``, E ``[f, r]``;
* ``"parallel"``: ``y = h Wd^T + bd + s (sigma(h C^T + bc) P^T + bp)``, P ``[d, r]``
  (passed as ``expand_weight`` / ``expand_bias``).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .activations import act

WeightArg = Union[torch.Tensor, Callable[[], torch.Tensor]]
PLACEMENTS = ("residual", "parallel")


def resolve(w: Optional[WeightArg]) -> Optional[torch.Tensor]:
    """A frozen weight argument is a tensor or a zero-arg callable returning one."""
    if w is None or isinstance(w, torch.Tensor):
        return w
    if callable(w):
        out = w()
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"weight callable returned {type(out).__name__}, expected a Tensor")
        return out
    raise TypeError(f"expected a Tensor or a zero-argument callable, got {type(w).__name__}")


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _frozen(w: WeightArg, dtype: torch.dtype) -> torch.Tensor:
    """Resolve a weight for the reference. A callable's result lives in a buffer that other
    layers overwrite, and autograd would keep it for backward, so level 0 takes a private
    copy (level 0 keeps everything anyway; levels 1/2 call the callable again instead)."""
    t = resolve(w)
    if not isinstance(w, torch.Tensor):
        t = t.detach().clone() if t.dtype == dtype else t.detach().to(dtype)
    return t.to(dtype)


def scl_ffn_reference(
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
    scale: float,
    placement: str = "residual",
) -> torch.Tensor:
    dt = x.dtype
    wu = _frozen(up_weight, dt)
    wd = _frozen(down_weight, dt)
    if gate_weight is not None:
        wg = _frozen(gate_weight, dt)
        h = act(F.linear(x, wg, _cast(gate_bias, dt)), ffn_activation) * F.linear(x, wu, _cast(up_bias, dt))
    else:
        h = act(F.linear(x, wu, _cast(up_bias, dt)), ffn_activation)
    p = F.linear(h, compress_weight.to(dt), _cast(compress_bias, dt))
    z = F.linear(act(p, scl_activation), expand_weight.to(dt), _cast(expand_bias, dt))
    if placement == "parallel":
        return F.linear(h, wd, _cast(down_bias, dt)) + scale * z
    return F.linear(h + scale * z, wd, _cast(down_bias, dt))
