"""Client-level differential privacy (DP-FedAvg) and its accountant (``--dp``).

* ``central``: the server clips each client's decoded shared delta (against the state that
  client received) to L2 norm ``clip`` over all shared tensors, averages the clipped deltas with
  equal weights and adds Gaussian noise of std ``noise_multiplier * clip / n`` to the mean of the
  ``n`` updates (McMahan et al. 2018). With ``clipping="adaptive"`` the clip follows the
  ``target_clipped_quantile`` of the update norms (Andrew et al. 2021, :class:`CentralDP`).
* ``local``: each client clips its own delta to ``clip`` and adds ``N(0, (noise * clip)^2)``
  per coordinate before encoding (:func:`privatize_local`), so the noise survives any codec and
  the server, eavesdroppers and other clients only ever see noised deltas.

Accounting (:func:`epsilon_central`, :func:`epsilon_local`) uses Google's ``dp-accounting``
(RDP accountant), never our own. The neighbouring relation is *replace one client's whole data*
(``REPLACE_ONE``): fastseq samples a fixed number of clients per round without replacement,
which ``dp_accounting.SampledWithoutReplacementDpEvent`` analyses (Wang, Balle & Kasiviswanathan
2019) under that relation only. Replacing one client moves the sum of clipped deltas by up to
``2 * clip``, so the Gaussian's multiplier relative to that sensitivity is ``noise / 2`` (as
``dp_accounting``'s own truncated-Poisson PLD code does for REPLACE_ONE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..config import ConfigError
from .aggregators import clip_update

DP_MODES = ("none", "central", "local")
DP_CLIPPING = ("fixed", "adaptive")
# Andrew et al. 2021 (and Flower's DifferentialPrivacyServerSideAdaptiveClipping) start the
# adaptive clip here.
ADAPTIVE_INITIAL_CLIP = 0.1


@dataclass(frozen=True)
class DPConfig:
    mode: str = "none"                          # none | central | local
    clip: float | None = None                   # L2 bound (adaptive: the initial bound)
    noise: float = 1.0                          # the noise multiplier z the accountant uses
    delta: float | None = None                  # None: 1 / number of clients
    clipping: str = "fixed"                     # fixed | adaptive (central only)
    target_clipped_quantile: float = 0.5        # adaptive: the fraction of updates to clip
    clip_norm_lr: float = 0.2                   # adaptive: geometric step of the clip
    clipped_count_stddev: float | None = None   # adaptive: None -> clients_per_round / 20

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def initial_clip(self) -> float:
        if self.clip is not None:
            return float(self.clip)
        if self.clipping == "adaptive":
            return ADAPTIVE_INITIAL_CLIP
        raise ConfigError(f"--dp {self.mode} with fixed clipping needs --dp-clip C (the L2 bound on each client's "
                          "delta)")

    def count_stddev(self, clients_per_round: int) -> float:
        """sigma_b, the noise on the count of unclipped updates (default ``m / 20``, Andrew et al.)."""
        return self.clipped_count_stddev if self.clipped_count_stddev is not None else clients_per_round / 20

    def update_noise_multiplier(self, clients_per_round: int) -> float:
        """The multiplier of the noise on the mean. Fixed clipping: ``noise``. Adaptive clipping
        releases the noised clipped count too, so the update gets ``z_delta = (z^-2 -
        (2 sigma_b)^-2)^-1/2 > z`` and the two Gaussians together are worth one of multiplier
        ``z = noise`` (Andrew et al. 2021, Thm 1): the accountant uses ``noise`` unchanged."""
        z = self.noise
        if self.clipping != "adaptive" or z == 0:
            return z
        sb = self.count_stddev(clients_per_round)
        if not z < 2 * sb:
            raise ConfigError(adaptive_noise_error(z, sb, clients_per_round))
        return (z ** -2 - (2 * sb) ** -2) ** -0.5

    def target_delta(self, num_clients: int) -> float:
        return self.delta if self.delta is not None else 1.0 / num_clients


def adaptive_noise_error(z: float, sb: float, m: int) -> str:
    return (f"adaptive clipping with dp_noise={z} needs dp_clipped_count_stddev > dp_noise / 2 = {z / 2:g} (it is "
            f"{sb:g}" + (f", the default clients_per_round / 20 = {m}/20" if sb == m / 20 else "") +
            f"): the count noise uses part of the privacy budget; pass --dp-clipped-count-stddev {max(z, 2 * sb):g} "
            "or more, or lower --dp-noise")


def gaussian_like(tensors: dict[str, torch.Tensor], std: float, seed: int) -> dict[str, torch.Tensor]:
    """Seeded ``N(0, std^2)`` noise shaped like ``tensors`` (drawn on the CPU in name order, so
    the same seed gives the same noise on every device and after a resume)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(tuple(tensors[n].shape), generator=gen, dtype=torch.float32) * std).to(tensors[n].device)
            for n in sorted(tensors)}


def privatize_local(delta: dict[str, torch.Tensor], clip: float, noise: float, seed: int
                    ) -> tuple[dict[str, torch.Tensor], float]:
    """Local DP: ``delta`` clipped to L2 norm ``clip`` (over all tensors) plus ``N(0, (noise *
    clip)^2)`` per coordinate; also the norm before clipping."""
    clipped, norm = clip_update(delta, clip)
    if noise == 0:
        return {n: t.float() for n, t in clipped.items()}, norm
    eps = gaussian_like(clipped, noise * clip, seed)
    return {n: clipped[n].float() + eps[n] for n in clipped}, norm


class CentralDP:
    """The server side of ``--dp central``: the clip of the round, the noise on the mean and,
    with adaptive clipping, the clip's update from the noised count of unclipped updates."""

    def __init__(self, cfg: DPConfig, clients_per_round: int):
        self.cfg = cfg
        self.clip = cfg.initial_clip()
        self.z_update = cfg.update_noise_multiplier(clients_per_round)
        self.count_stddev = cfg.count_stddev(clients_per_round)

    def noise_std(self, n: int) -> float:
        return self.z_update * self.clip / n

    def add_noise(self, mean: dict[str, torch.Tensor], n: int, seed: int) -> dict[str, torch.Tensor]:
        std = self.noise_std(n)
        if std == 0:
            return mean
        eps = gaussian_like(mean, std, seed)
        return {k: mean[k] + eps[k] for k in mean}

    def adapt(self, norms: Sequence[float], seed: int) -> None:
        """Andrew et al. 2021, Alg. 1 with the target written as the fraction *clipped*: the
        noised fraction of unclipped updates ``b`` moves the clip by ``exp(-lr (b - (1 - q)))``,
        so the clip grows while more than ``q`` of the updates are clipped. (Flower 1.42's
        wrapper applies ``exp(-lr (clipped - q))``, which moves it the other way.)"""
        if self.cfg.clipping != "adaptive" or not norms:
            return
        unclipped = sum(1 for x in norms if x <= self.clip)
        gen = torch.Generator().manual_seed(seed)
        noisy = unclipped + float(torch.randn((), generator=gen, dtype=torch.float64)) * self.count_stddev
        frac = noisy / len(norms)
        self.clip *= math.exp(-self.cfg.clip_norm_lr * (frac - (1 - self.cfg.target_clipped_quantile)))

    def state(self) -> dict[str, Any]:
        return {"clip": self.clip}

    def load_state(self, st: dict[str, Any] | None) -> None:
        if st and "clip" in st:
            self.clip = float(st["clip"])


# -- accounting ------------------------------------------------------------------------------
def _accountant():
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ImportError:
        raise ConfigError("--dp needs the dp-accounting package for its privacy accountant; "
                          "pip install 'fastseq[privacy]' (or pip install dp-accounting)") from None
    return dp_accounting, RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


def check_accountant() -> None:
    """Fail early (a clear ConfigError) when dp-accounting is missing."""
    _accountant()


def epsilon_central(noise: float, num_clients: int, clients_per_round: int, rounds: int, delta: float) -> float:
    """epsilon after ``rounds`` rounds of DP-FedAvg that samples ``clients_per_round`` of
    ``num_clients`` without replacement and adds noise of multiplier ``noise`` to the mean
    (REPLACE_ONE; see the module docstring). ``inf`` without noise, 0 before any round."""
    if rounds <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    dpa, full = _accountant()
    gauss = dpa.GaussianDpEvent(noise / 2)
    full.compose(dpa.SelfComposedDpEvent(gauss, rounds))
    eps = float(full.get_epsilon(delta))
    if clients_per_round < num_clients:
        # Sampling never costs privacy, but the without-replacement RDP bound is loose at large
        # sampling ratios (e.g. 2 of 3): both are valid bounds, report the smaller.
        _, sampled = _accountant()
        sampled.compose(dpa.SelfComposedDpEvent(
            dpa.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gauss), rounds))
        eps = min(eps, float(sampled.get_epsilon(delta)))
    return eps


def epsilon_local(noise: float, participations: int, delta: float) -> float:
    """epsilon of one client that released ``participations`` locally noised deltas (noise
    multiplier ``noise``, REPLACE_ONE). The server knows whom it sampled, so sampling amplifies
    nothing against it: this is plain composition."""
    if participations <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    dpa, acc = _accountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise / 2), participations))
    return float(acc.get_epsilon(delta))
