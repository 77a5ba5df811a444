"""Robust aggregation of the clients' shared tensors (``--aggregator``).

A *combiner* ``combine(states, weights, names) -> {name: tensor}`` replaces the weighted mean
inside every method's own aggregation rule (:meth:`Method.aggregate`):

* ``mean``: the example-weighted mean (today's rule, bit-identical).
* ``median``: the coordinate-wise median; example counts are ignored (a hostile client could
  claim any count). With an even count, the mean of the two middle values.
* ``trimmed-mean``: per coordinate, drop the ``floor(trim_fraction * n)`` largest and smallest
  values and average the rest, unweighted (same reason).
* ``norm-clip``: the server scales each client's decoded delta so that its L2 norm over all
  its shared tensors is at most ``norm_bound`` (:func:`clip_update`), then takes the weighted
  mean. Coordinate-wise rules are translation-equivariant, so combining the clients' states
  equals combining their deltas from the global state.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .methods import weighted_mean

AGGREGATORS = ("mean", "median", "trimmed-mean", "norm-clip")

Combiner = Callable[[Sequence[dict[str, torch.Tensor]], Sequence[float], Sequence[str]], dict[str, torch.Tensor]]


def trim_count(trim_fraction: float, n: int) -> int:
    """Values dropped at each end of ``n``: ``floor(trim_fraction * n)``, always leaving one."""
    k = int(math.floor(trim_fraction * n + 1e-9))  # 1e-9: 0.2 * 5 is 1, not 0.999...
    return max(0, min(k, (n - 1) // 2))


def _sorted_stack(states, name) -> torch.Tensor:
    return torch.sort(torch.stack([s[name].float() for s in states]), dim=0).values


def coordinate_median(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
                      names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-coordinate median (unweighted; ``weights`` are ignored)."""
    n = len(states)
    lo, hi = (n - 1) // 2, n // 2
    out = {}
    for name in names:
        s = _sorted_stack(states, name)
        out[name] = s[lo] if lo == hi else 0.5 * (s[lo] + s[hi])
    return out


def trimmed_mean(trim_fraction: float) -> Combiner:
    def combine(states, weights, names):
        """Per-coordinate trimmed mean (unweighted; ``weights`` are ignored)."""
        n = len(states)
        k = trim_count(trim_fraction, n)
        return {name: _sorted_stack(states, name)[k:n - k].mean(dim=0) for name in names}
    return combine


def get_combiner(aggregator: str, trim_fraction: float = 0.2) -> Combiner:
    """The combiner of ``aggregator`` (norm-clip clips in the server, then averages)."""
    if aggregator in ("mean", "norm-clip"):
        return weighted_mean
    if aggregator == "median":
        return coordinate_median
    if aggregator == "trimmed-mean":
        return trimmed_mean(trim_fraction)
    raise ValueError(f"unknown aggregator {aggregator!r}; valid: {', '.join(AGGREGATORS)}")


def l2_norm(tensors: dict[str, torch.Tensor]) -> float:
    """The L2 norm over all of ``tensors`` (a client's delta)."""
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors.values()))


def clip_update(tensors: dict[str, torch.Tensor], bound: float,
                norm: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """``tensors`` scaled to L2 norm (over all of them) at most ``bound``; also the norm before
    (``norm``, when the caller has it already)."""
    norm = l2_norm(tensors) if norm is None else norm
    if norm <= bound:
        return tensors, norm
    f = bound / norm
    return {n: t.float() * f for n, t in tensors.items()}, norm
