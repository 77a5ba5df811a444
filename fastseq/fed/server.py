"""The federated server: bytes in, bytes out, no engine-specific logic.

``configure_round(r) -> [(client_id, downlink_blob)]``, ``aggregate(r, [(client_id, uplink_blob)],
failures) -> record``, ``evaluate(r)``, ``configure_evaluate(r)``, ``state_dict`` /
``load_state_dict`` (checkpoints: safetensors + json, see :mod:`.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..comm import ByteCounter, DownlinkState, Expected, PayloadError, decode
from .aggregators import clip_update, get_combiner, l2_norm
from .client import derive_seed
from .hetero import nested_aggregate, trim, trimmed_shapes
from .methods import Method
from .privacy import CentralDP, DPConfig, epsilon_central, epsilon_local
from .server_opt import ServerOptimizer
from .state_store import KnownStore

# Personalised evaluation (FedSA-LoRA) of every client costs one evaluation per client per round;
# above this many clients, a seeded panel of this many is evaluated instead (personal_eval_clients).
PERSONAL_EVAL_DEFAULT = 20


def personal_eval_count(num_clients: int, requested: int | None) -> int:
    """How many clients a personalised evaluation scores: ``requested`` (capped at the number of
    clients), or by default all of them up to PERSONAL_EVAL_DEFAULT clients, else that many."""
    if requested is None:
        return min(num_clients, PERSONAL_EVAL_DEFAULT)
    return min(num_clients, requested)

log = logging.getLogger("fastseq.fed")


@dataclass
class ServerConfig:
    num_clients: int = 5
    clients_per_round: int = 3
    seed: int = 0
    min_clients: int = 1
    server_opt: str = "fedavg"
    server_lr: float | None = None
    server_momentum: float = 0.9
    downlink_codec: str = "none"
    uplink_codecs: tuple[str, ...] | None = None
    max_update_bytes: int | None = None
    aggregator: str = "mean"          # see .aggregators
    trim_fraction: float = 0.2
    norm_bound: float | None = None   # norm-clip's L2 bound on each client's delta
    personal_eval_clients: int | None = None  # see personal_eval_count
    dp: DPConfig = field(default_factory=DPConfig)  # client-level DP, see .privacy
    # A heterogeneous fleet (.fleet, .hetero): each client's rank (None: all at the full rank), the
    # nested-rank aggregation rule, and clients left out because nothing fits their tier.
    ranks: dict[str, int] | None = None
    hetero_rule: str | None = None
    excluded: tuple[str, ...] = ()


@dataclass
class SecureSum:
    """What a secure-aggregation round (SecAgg+, :mod:`fastseq.flower.secagg`) gives the server:
    the example-weighted mean of the contributing clients' deltas and nothing per client but
    their weights (example counts) and training metrics.

    ``mean_delta`` lists one tensor per shared name in sorted order; ``None`` when the protocol
    halted (too few clients answered a stage). Bytes are the protocol's payload bytes.
    """

    mean_delta: list[torch.Tensor] | None
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class Server:
    def __init__(self, method: Method, initial_state: dict[str, torch.Tensor], cfg: ServerConfig,
                 evaluator: Callable[[dict[str, torch.Tensor], int], dict[str, Any]] | None = None,
                 logger: Callable[[str], None] | None = None, state_dir: str | os.PathLike | None = None):
        """``state_dir``: where per-client server state goes (what each client holds, kept only
        for a delta-coded downlink, i.e. a lossy ``downlink_codec``); None keeps it in RAM and in
        :meth:`state_dict` (fine for a few clients)."""
        self.method, self.cfg, self.evaluator = method, cfg, evaluator
        self.log = logger or log.info
        self.global_state = {k: v.detach().float().clone() for k, v in initial_state.items()}
        self.shared = list(method.shared_names())
        self.combine = get_combiner(cfg.aggregator, cfg.trim_fraction)
        if cfg.aggregator == "norm-clip" and not (cfg.norm_bound or 0) > 0:
            raise ValueError("aggregator norm-clip needs a positive norm_bound")
        self.opt = ServerOptimizer(cfg.server_opt, cfg.server_lr, momentum=cfg.server_momentum)
        self.down = DownlinkState(cfg.downlink_codec)
        if state_dir is not None and self.down.delta:
            self.down.known = KnownStore(Path(state_dir) / "known")
        # What each client of the current round holds after its downlink: the base its uplink
        # delta is added to. Only this round's clients, so it does not grow with the clients.
        self._held: dict[str, dict[str, torch.Tensor]] = {}
        self.bytes = ByteCounter()
        self.history: list[dict[str, Any]] = []
        self.round = 0
        if not (1 <= cfg.clients_per_round <= cfg.num_clients):
            raise ValueError(f"clients_per_round must be in 1..{cfg.num_clients}, got {cfg.clients_per_round}")
        self._shapes = {n: tuple(initial_state[n].shape) for n in self.shared}
        # nested ranks: only when the fleet's clients do not all train the full rank
        self._axes = method.rank_axes() if cfg.ranks else {}
        self.ranks = cfg.ranks if cfg.ranks and any(
            trimmed_shapes(self._shapes, self._axes, r) != self._shapes for r in cfg.ranks.values()) else None
        if len(self.client_ids) < cfg.clients_per_round:
            raise ValueError(f"clients_per_round={cfg.clients_per_round} exceeds the {len(self.client_ids)} clients "
                             f"that can take part")
        self.dp = CentralDP(cfg.dp, cfg.clients_per_round) if cfg.dp.mode == "central" else None
        if self.dp is not None and cfg.aggregator != "mean":
            raise ValueError("--dp central calibrates its noise to the mean; use aggregator 'mean'")

    @property
    def client_ids(self) -> list[str]:
        """The clients that take part (a fleet's misfits left out)."""
        out = set(self.cfg.excluded)
        return [str(i) for i in range(self.cfg.num_clients) if str(i) not in out]

    def sample(self, round: int) -> list[str]:
        rng = random.Random(derive_seed(self.cfg.seed, round, "sample"))
        return sorted(rng.sample(self.client_ids, self.cfg.clients_per_round), key=int)

    def _downlink(self, cid: str, round: int, hold: bool = False) -> bytes:
        if isinstance(self.down.known, KnownStore):
            self.down.known.round = round
        state = self.global_state
        if self.ranks is not None:  # a client of rank r_k receives the first r_k slots
            state = trim(state, self._axes, self.ranks[cid])
        blob, held = self.down.send(cid, state, round=round, method=self.method.name)
        if hold:
            self._held[cid] = held
        self.bytes.record(blob)
        return blob

    def configure_round(self, round: int) -> list[tuple[str, bytes]]:
        """Sample the round's clients and encode each one's downlink (counted)."""
        self._held = {}
        return [(cid, self._downlink(cid, round, hold=True)) for cid in self.sample(round)]

    def eval_clients(self, round: int) -> list[str]:
        """The clients a personalised evaluation scores: all of them, or (``personal_eval_clients``
        fewer than the clients) a panel drawn once from the seed, the same every round so that the
        rounds' means compare the same clients."""
        n = personal_eval_count(len(self.client_ids), self.cfg.personal_eval_clients)
        if n >= len(self.client_ids):
            return self.client_ids
        rng = random.Random(derive_seed(self.cfg.seed, "personal-eval"))
        return sorted(rng.sample(self.client_ids, n), key=int)

    def configure_evaluate(self, round: int) -> list[tuple[str, bytes]]:
        """Downlinks for a personalised evaluation of :meth:`eval_clients` (counted as downlink bytes)."""
        return [(cid, self._downlink(cid, round)) for cid in self.eval_clients(round)]

    @property
    def state_bytes(self) -> int:
        """Bytes of per-client server state on disk (delta-coded downlink only; else 0)."""
        return self.down.known.nbytes if isinstance(self.down.known, KnownStore) else 0

    def state_files(self, round: int, client_ids: Sequence[str]) -> list[Path]:
        """The on-disk per-client state files these clients have as of ``round`` (to flush them)."""
        return self.down.known.state_files(client_ids, round) if isinstance(self.down.known, KnownStore) else []

    def commit(self, round: int, client_ids: Sequence[str]) -> None:
        """The checkpoint of ``round`` is complete: drop older on-disk versions of these clients."""
        if isinstance(self.down.known, KnownStore):
            self.down.known.commit(client_ids, round)

    def discard_after(self, round: int) -> None:
        """Forget on-disk per-client state newer than ``round`` (-1: a fresh run, all of it)."""
        if isinstance(self.down.known, KnownStore):
            self.down.known.discard_after(round)

    def aggregate(self, round: int, results: Sequence[tuple[str, bytes]],
                  failures: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """Decode, validate and aggregate the uplinks; returns the round record."""
        dropped = [{"client": str(c), "reason": str(r)} for c, r in failures]
        for d in dropped:
            self.log(f"round {round}: dropped client {d['client']}: {d['reason']}")
        expected = Expected(tensors={n: (s, None) for n, s in self._shapes.items()}, round=round,
                            method=self.method.name, direction="up", codecs=self.cfg.uplink_codecs,
                            max_bytes=self.cfg.max_update_bytes)
        states, weights, ok, losses, clipped, ranks = [], [], [], [], [], []
        norms: dict[str, float] = {}
        examples = 0
        dp_clip = self.dp.clip if self.dp is not None else None
        for cid, blob in results:
            cid = str(cid)
            try:
                mine = {"client_id": cid}
                if self.ranks is not None:  # its update is at its own rank
                    shapes = trimmed_shapes(self._shapes, self._axes, self.ranks[cid])
                    mine["tensors"] = {n: (s, None) for n, s in shapes.items()}
                exp = Expected(**{**expected.__dict__, **mine})
                upd = decode(blob, expected=exp)
                for n, t in upd.tensors.items():
                    if not bool(torch.isfinite(t).all()):
                        raise PayloadError(f"tensor {n!r} has non-finite values")
                if upd.example_count < 1:
                    raise PayloadError("example_count is 0")
                known = self._held.get(cid)
                if known is None:
                    raise PayloadError(f"client {cid} sent an update without having received the global state")
            except PayloadError as e:
                self.bytes.record(blob, round=round, client_id=cid, direction="up")
                dropped.append({"client": cid, "reason": f"{type(e).__name__}: {e}"})
                self.log(f"round {round}: dropped client {cid}: {type(e).__name__}: {e}")
                continue
            self.bytes.record(upd)
            tensors = {n: upd.tensors[n] for n in self.shared}
            # the norm of the delta as sent (a guide to --dp-clip / --norm-bound), computed once
            norm = norms[cid] = l2_norm(tensors)
            if self.cfg.aggregator == "norm-clip":
                tensors, _ = clip_update(tensors, self.cfg.norm_bound, norm)
                if norm > self.cfg.norm_bound:
                    clipped.append(cid)
                norm = min(norm, self.cfg.norm_bound)
            if dp_clip is not None:
                tensors, _ = clip_update(tensors, dp_clip, norm)
                if norm > dp_clip:
                    clipped.append(cid)
            states.append({n: known[n].float() + tensors[n].float() for n in self.shared})
            # DP-FedAvg's mean has fixed (equal) weights: an example count would be unbounded
            # influence (and is private) under central DP.
            weights.append(1.0 if dp_clip is not None else float(upd.example_count))
            examples += upd.example_count
            ok.append(cid)
            if self.ranks is not None:
                ranks.append(self.ranks[cid])
            tl = upd.extra.get("train_loss")
            if isinstance(tl, (int, float)) and math.isfinite(tl):
                losses.append((tl, upd.example_count))
        summary = self.bytes.summary(round)
        record = self._record(round, ok, dropped, summary["uplink_bytes"] + summary["uplink_rejected_bytes"],
                              summary["downlink_bytes"], examples, losses)
        record["update_norms"] = norms
        if self.cfg.aggregator == "norm-clip" or dp_clip is not None:
            record["clipped"] = clipped  # clients whose delta was scaled down to norm_bound / dp_clip
        return self._commit(round, record, states, weights, norms, ranks)

    def aggregate_secure(self, round: int, result: SecureSum) -> dict[str, Any]:
        """The round record from a secure sum: the new global state is the weighted mean of what
        the contributing clients knew (the server sent it: exact) plus the revealed mean delta."""
        dropped = [{"client": str(c), "reason": str(r)} for c, r in result.failures]
        for d in dropped:
            self.log(f"round {round}: dropped client {d['client']}: {d['reason']}")
        ok = sorted(result.weights, key=int)
        weights = [float(result.weights[c]) for c in ok]
        losses = [(m["train_loss"], result.weights[c]) for c, m in result.metrics.items()
                  if c in result.weights and isinstance(m.get("train_loss"), (int, float))
                  and math.isfinite(m["train_loss"])]
        summary = self.bytes.summary(round)
        record = self._record(round, ok, dropped, result.uplink_bytes, summary["downlink_bytes"] + result.downlink_bytes,
                              int(sum(weights)), losses)
        record["secure_aggregation"] = dict(result.info)
        states: list[dict[str, torch.Tensor]] = []
        if result.mean_delta is not None and ok:
            names = sorted(self.shared)
            shapes = [tuple(t.shape) for t in result.mean_delta]
            if shapes != [self._shapes[n] for n in names]:
                raise PayloadError(f"the secure sum has shapes {shapes}, expected {[self._shapes[n] for n in names]}")
            known = [self._held.get(c) for c in ok]
            if any(k is None for k in known):
                raise PayloadError("a client in the secure sum never received the global state")
            total = sum(weights)
            states = [{n: sum(w * k[n].float() for w, k in zip(weights, known)) / total + d.float()
                       for n, d in zip(names, result.mean_delta)}]
        return self._commit(round, record, states, [sum(weights)] if states else [])

    def _record(self, round: int, ok: list[str], dropped: list[dict], up: int, down: int,
                examples: int, losses: list[tuple[float, float]]) -> dict[str, Any]:
        return {
            "round": round, "method": self.method.name, "clients": ok, "dropped": dropped,
            "uplink_bytes": up, "downlink_bytes": down, "examples": int(examples),
            "train_loss": (sum(l * w for l, w in losses) / sum(w for _, w in losses)) if losses else None,
        }

    def _commit(self, round: int, record: dict[str, Any], states: list[dict[str, torch.Tensor]],
                weights: list[float], norms: dict[str, float] | None = None,
                ranks: list[int] | None = None) -> dict[str, Any]:
        """Aggregate ``states`` into the global state (central DP: noise on the mean, then the
        adaptive clip's step; server optimizer step), or skip the round when fewer than
        ``min_clients`` updates are valid."""
        if len(record["clients"]) < max(1, self.cfg.min_clients) or not states:
            record["skipped"] = True
            self.log(f"round {round}: only {len(record['clients'])} valid updates (< min_clients="
                     f"{self.cfg.min_clients}); the global state is unchanged")
        else:
            if ranks:  # clients of several ranks: .hetero's rule
                target = nested_aggregate(self.method, self.cfg.hetero_rule, self.global_state, states, weights,
                                          ranks, self.combine)
            else:
                target = self.method.aggregate(self.global_state, states, weights, combine=self.combine)
            if self.dp is not None:
                ok = record["clients"]
                noised = self.dp.add_noise({n: target[n] for n in self.shared}, len(ok),
                                           derive_seed(self.cfg.seed, round, "dp-central"))
                target = {**target, **noised}
                record.update(dp_clip=self.dp.clip, dp_noise_std=self.dp.noise_std(len(ok)))
                self.dp.adapt([norms[c] for c in ok], derive_seed(self.cfg.seed, round, "dp-clip-count"))
            delta = {n: target[n] - self.global_state[n] for n in self.shared}
            new = self.opt.step(self.global_state, delta)
            state = dict(self.global_state)
            state.update({k: v for k, v in target.items() if k not in new})
            state.update(new)
            self.global_state = state
            record["skipped"] = False
        self.round = round
        self._held = {}
        record.update(self.privacy_metrics(round))
        return record

    def privacy_metrics(self, round: int) -> dict[str, Any]:
        """``epsilon`` (at ``dp_delta``) spent after ``round`` rounds; {} without DP. Every round
        counts, a skipped one too (conservative). Local DP: the most-sampled client's epsilon."""
        dp = self.cfg.dp
        if not dp.enabled:
            return {}
        delta = dp.target_delta(self.cfg.num_clients)
        if dp.mode == "central":
            eps = epsilon_central(dp.noise, self.cfg.num_clients, self.cfg.clients_per_round, round, delta)
        else:
            counts = Counter(c for r in range(1, round + 1) for c in self.sample(r))
            eps = epsilon_local(dp.noise, max(counts.values(), default=0), delta)
        return {"epsilon": eps, "dp_delta": delta}

    def evaluate(self, round: int) -> dict[str, Any]:
        """Evaluate the global state (non-personalised methods): ``evaluator(state, round)``."""
        if self.evaluator is None:
            return {}
        return self.evaluator(self.global_state, round)

    def finish_round(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.bytes.forget_before(int(record["round"]))  # the record holds the round's bytes

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, json-able metadata) of everything a resumed run needs."""
        tensors = {f"global/{k}": v for k, v in self.global_state.items()}
        tensors.update({f"opt/{k}": v for k, v in self.opt.state_dict().items()})
        if not isinstance(self.down.known, KnownStore):  # on disk, versioned by round, it is not copied
            for cid, st in self.down.known.items():
                tensors.update({f"known/{cid}/{k}": v for k, v in st.items()})
        meta = {"round": self.round, "history": self.history, "method": self.method.name}
        if self.dp is not None:
            meta["dp"] = self.dp.state()  # the adaptive clip
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("method") != self.method.name:
            raise ValueError(f"checkpoint is for method {meta.get('method')!r}, not {self.method.name!r}")
        self.global_state = {k[7:]: v.float() for k, v in tensors.items() if k.startswith("global/")}
        self.opt.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("opt/")})
        known: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("known/"):
                _, cid, name = k.split("/", 2)
                known.setdefault(cid, {})[name] = v
        self.round = int(meta["round"])
        if isinstance(self.down.known, KnownStore):
            store = self.down.known
            store.discard_after(self.round)
            store.round = self.round
            for cid, st in known.items():  # a checkpoint from before the on-disk store
                store[cid] = st
        elif self.down.delta:
            self.down.known = known
        self.history = list(meta["history"])
        if self.dp is not None:
            self.dp.load_state(meta.get("dp"))

