"""Clients of different ranks on one global adapter: the rank view a client trains through, and
the server's nested-rank aggregation rules (docs/federated.md, "Heterogeneous fleets").

The global adapter has the run's full rank R. A client of rank r_k trains the first r_k rank
slots of it: rows of SCL's C / LoRA's A, columns of P, E / B. With a frozen projection (SCL with
C frozen, FFA-LoRA) the first r_k rows of C / A are the same on every client (every process
draws the full-rank C / A from the run's seed and takes its first rows), so slot j means the
same thing on every client that holds it and the server can average slot by slot:

* ``holders``: slot j is the example-weighted combination over the clients that trained it;
  slots nobody in the round holds keep their global value.
* ``zero-pad``: a client that does not hold slot j counts as sending a zero delta for it.

When both factors train (FedAvg-LoRA, FedSA-LoRA, SCL with C trained) slot j of two clients
need not line up; the two published answers are kept as baselines:

* ``hetlora`` (Cho et al., 2024): zero-pad every client's factors to rank R, average, and
  send each client the first r_k slots (truncation).
* ``flexlora`` (Bai et al., 2024): average the clients' products B_k A_k (full size, any rank),
  and redistribute the rank-R truncated SVD of the mean as B = U sqrt(S), A = sqrt(S) V^T.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

from ..config import ConfigError

RULES = ("holders", "zero-pad", "hetlora", "flexlora")


def frozen_projection(method) -> bool:
    """Whether the method's rank slots nest across clients (the projection into the rank is frozen
    and seeded): SCL with C frozen, FFA-LoRA."""
    if method.name == "scl":
        return not method.scl_train_compress
    return bool(getattr(method, "freeze_A", False))


def default_rule(method) -> str:
    return "holders" if frozen_projection(method) else "hetlora"


def check_rule(method, rule: str) -> None:
    """Refuse a rule that makes no sense for the method, with the reason."""
    if rule not in RULES:
        raise ConfigError(f"hetero_aggregation={rule!r} is not valid; valid values: {', '.join(RULES)}")
    name = method.name
    if name == "fedex-lora":
        raise ConfigError("fedex-lora folds B_k A_k residuals into the base weight at one rank; heterogeneous ranks "
                          "are not supported for it: use ffa-lora or scl (nested), or fedavg-lora with hetlora/flexlora")
    if rule in ("holders", "zero-pad") and not frozen_projection(method):
        what = "C" if name == "scl" else "A"
        raise ConfigError(f"--hetero-aggregation {rule} averages rank slots that mean the same thing on every client, "
                          f"which needs {what} frozen at its seeded init; {name}"
                          f"{' with C trained' if name == 'scl' else ''} trains {what}, so use hetlora or flexlora "
                          f"(or {'--no-scl-train-compress' if name == 'scl' else 'ffa-lora'})")
    if rule == "flexlora" and name != "fedavg-lora":
        reason = ("SCL's branch is nonlinear in C, so there is no product to decompose" if name == "scl" else
                  "FedSA-LoRA keeps B local, so the server never sees the products" if name == "fedsa-lora" else
                  "A is frozen, so a redistributed A would not be the clients' A")
        raise ConfigError(f"flexlora redistributes the SVD of the averaged products B_k A_k, for fedavg-lora only: "
                          f"{reason}; use {default_rule(method)}")


def trim(state: dict[str, torch.Tensor], axes: dict[str, int], rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` slots of every rank-carrying tensor (others unchanged)."""
    return {n: (t.narrow(axes[n], 0, rank).contiguous() if n in axes and t.shape[axes[n]] > rank else t)
            for n, t in state.items()}


def trimmed_shapes(shapes: dict[str, tuple], axes: dict[str, int], rank: int) -> dict[str, tuple]:
    out = {}
    for n, s in shapes.items():
        s = list(s)
        if n in axes and s[axes[n]] > rank:
            s[axes[n]] = rank
        out[n] = tuple(s)
    return out


@contextlib.contextmanager
def rank_view(method, rank: int | None):
    """Train and evaluate ``method``'s model at ``rank``: each rank-carrying parameter is swapped
    for a copy of its first ``rank`` slots for the duration (a frozen C / A keeps its first rows,
    bit for bit), and put back afterwards. None or the full rank: the model as it is."""
    axes = method.rank_axes()
    model = method.model
    if rank is None or not axes or all(model.get_parameter(n).shape[a] <= rank for n, a in axes.items()):
        yield
        return
    saved = []
    with torch.no_grad():
        for name, axis in axes.items():
            mod_name, attr = name.rsplit(".", 1)
            mod = model.get_submodule(mod_name)
            full = getattr(mod, attr)
            saved.append((mod, attr, full))
            setattr(mod, attr, nn.Parameter(full.detach().narrow(axis, 0, rank).clone(),
                                            requires_grad=full.requires_grad))
    method.refresh_params()
    try:
        yield
    finally:
        for mod, attr, full in saved:
            setattr(mod, attr, full)
        method.refresh_params()


@contextlib.contextmanager
def checkpoint_level(method, level: int | None):
    """SCL's checkpoint level set to ``level`` for the body (a fleet client's plan); other methods
    have none."""
    adapter = getattr(method.model, "fastseq_adapter", None)
    if adapter is None or level is None or adapter.config.checkpoint_level == level:
        yield
        return
    was = adapter.config.checkpoint_level
    adapter.config.checkpoint_level = level
    try:
        yield
    finally:
        adapter.config.checkpoint_level = was


def _holders(full: torch.Tensor, states: Sequence[torch.Tensor], weights: Sequence[float], ranks: Sequence[int],
             axis: int, combine: Callable, name: str) -> torch.Tensor:
    out = full.float().clone()
    lo = 0
    for hi in sorted(set(ranks)):
        idx = [i for i, r in enumerate(ranks) if r >= hi]
        band = [{name: states[i].narrow(axis, lo, hi - lo)} for i in idx]
        out.narrow(axis, lo, hi - lo).copy_(combine(band, [weights[i] for i in idx], [name])[name])
        lo = hi
    return out


def _pad(t: torch.Tensor, full: torch.Tensor, axis: int, fill: torch.Tensor | None) -> torch.Tensor:
    """``t`` extended along ``axis`` to ``full``'s size with ``fill``'s slots (zeros if None)."""
    n = t.shape[axis]
    if n == full.shape[axis]:
        return t.float()
    rest = full.narrow(axis, n, full.shape[axis] - n)
    rest = torch.zeros_like(rest, dtype=torch.float32) if fill is None else rest.float()
    return torch.cat([t.float(), rest], dim=axis)


def nested_aggregate(method, rule: str, global_state: dict[str, torch.Tensor],
                     states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], ranks: Sequence[int],
                     combine: Callable) -> dict[str, torch.Tensor]:
    """The target global state from clients of ``ranks`` (their states at their own ranks)."""
    shared = method.shared_names()
    axes = {n: a for n, a in method.rank_axes().items() if n in shared}
    plain = [n for n in shared if n not in axes]
    out = combine(states, weights, plain) if plain else {}
    if rule == "flexlora":
        for _, a, b, _ in method.pairs:
            mean = combine([{"p": s[b].float() @ s[a].float()} for s in states], weights, ["p"])["p"]
            R = global_state[a].shape[0]
            u, sv, vh = torch.linalg.svd(mean, full_matrices=False)
            root = sv[:R].sqrt()
            out[b] = (u[:, :R] * root).contiguous()
            out[a] = (root[:, None] * vh[:R]).contiguous()
        return out
    for n, axis in axes.items():
        full = global_state[n]
        if rule == "holders":
            out[n] = _holders(full, [s[n].float() for s in states], weights, ranks, axis, combine, n)
        else:
            fill = full if rule == "zero-pad" else None   # zero-pad: missing slots are zero deltas
            padded = [{n: _pad(s[n], full, axis, fill)} for s in states]
            out[n] = combine(padded, weights, [n])[n]
    return out
