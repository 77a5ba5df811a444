"""Simulated hostile clients (``--byzantine K --attack ...``), local engine only.

Each round, ``K`` of the sampled clients are chosen by a seeded RNG (:func:`hostile_clients`);
each trains honestly, then tampers with its delta before encoding it (:meth:`Attack.apply`):

* ``sign-flip``: sends ``-attack_scale * delta`` (pulls the model away from the honest direction);
* ``scale``: sends ``attack_scale * delta`` (an overweighted, otherwise honest update);
* ``noise``: sends Gaussian noise, per tensor of std ``attack_scale * RMS(delta)``;
* ``nan``: sends NaN everywhere (the server's validation drops it as non-finite).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .client import derive_seed

ATTACKS = ("sign-flip", "scale", "noise", "nan")


@dataclass(frozen=True)
class Attack:
    kind: str
    scale: float = 10.0
    seed: int = 0

    def apply(self, delta: dict[str, torch.Tensor], round: int, client_id: str) -> dict[str, torch.Tensor]:
        if self.kind == "sign-flip":
            return {n: -self.scale * t for n, t in delta.items()}
        if self.kind == "scale":
            return {n: self.scale * t for n, t in delta.items()}
        if self.kind == "noise":
            gen = torch.Generator().manual_seed(derive_seed(self.seed, round, client_id, "attack-noise"))
            out = {}
            for n, t in delta.items():
                rms = float(t.float().pow(2).mean().sqrt()) if t.numel() else 0.0
                out[n] = (torch.randn(t.shape, generator=gen) * (self.scale * rms)).to(t.dtype)
            return out
        if self.kind == "nan":
            return {n: torch.full_like(t, float("nan")) for n, t in delta.items()}
        raise ValueError(f"unknown attack {self.kind!r}; valid: {', '.join(ATTACKS)}")


def hostile_clients(sampled: Sequence[str], k: int, seed: int, round: int) -> list[str]:
    """The ``k`` hostile clients among ``sampled`` this round (seeded; sorted by id)."""
    if k <= 0:
        return []
    rng = random.Random(derive_seed(seed, round, "byzantine"))
    return sorted(rng.sample(list(sampled), min(k, len(sampled))), key=int)
