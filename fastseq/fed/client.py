"""The federated client: bytes in, bytes out, no engine-specific logic.

``Client.fit(downlink_blob, round) -> (uplink_blob, metrics)`` and
``Client.evaluate(downlink_blob, round) -> metrics``. The client's persisted local state
(its local parameters, its error-feedback residual and, with a delta-coded downlink, the
global state it holds) lives in ``state_dir/round_<r>.safetensors``
(:class:`.state_store.VersionedFiles`), versioned by round so that a resumed run reloads
exactly the state of the last complete round. A client with nothing to keep writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..comm import ErrorFeedback, Expected, apply_downlink, decode, encode, get_codec
from .checkpoint import join_prefixed, split_prefixed
from .state_store import VersionedFiles
from .privacy import DPConfig, privatize_local

log = logging.getLogger("fastseq.fed")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. seed, round, client, purpose)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class TrainConfig:
    """Client-side training and uplink settings."""

    local_steps: int = 20
    local_epochs: float | None = None   # set: train this many passes over the local data instead
    lr: float = 1e-3
    head_lr: float | None = None        # the task head's lr (None: lr)
    compress_lr: float | None = None    # SCL's C's lr (None: lr)
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    prox_mu: float = 0.0
    codec: str = "none"
    block_size: int | None = None
    topk: float | None = None
    stochastic: bool = False
    error_feedback: bool = False
    seed: int = 0
    eval_batch_size: int = 32
    # The server's downlink codec: only a lossy one is delta-coded (fastseq.comm.DownlinkState),
    # and only then must the client keep the global state it holds between rounds.
    downlink_codec: str = "none"
    dp: DPConfig = field(default_factory=DPConfig)  # mode "local": clip + noise here (see .privacy)

    def codec_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {}
        if self.block_size is not None:
            p["block_size"] = self.block_size
        if self.topk is not None:
            p["topk"] = self.topk
        if self.stochastic:
            p["stochastic"] = True
        return p


def optimizer_groups(method: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the task head at ``head_lr``, SCL's C at ``compress_lr``, the
    rest of the adapter at ``lr`` (a role whose lr is None trains at ``lr``)."""
    params = dict(method.model.named_parameters())
    lrs = {"head": cfg.head_lr, "compress": cfg.compress_lr, "adapter": cfg.lr}
    return [{"params": [params[n] for n in names], "lr": cfg.lr if lrs[role] is None else lrs[role], "role": role}
            for role, names in method.lr_groups().items() if names]


def autocast_context(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prox_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: ``mu/2 * sum ||w - w_global||^2`` over the shared trainable parameters."""
    total = None
    for n, p in params.items():
        t = (p.float() - anchor[n].to(p.device).float()).pow(2).sum()
        total = t if total is None else total + t
    return 0.5 * mu * total if total is not None else torch.zeros(())


class Client:
    """One federated client. ``runtime`` holds the (shared) model, processor, task and method;
    ``examples`` is this client's training data."""

    def __init__(self, client_id: str, runtime: Any, examples: Sequence[dict], train: TrainConfig,
                 state_dir: str | os.PathLike | None = None, plan: Any = None):
        """``plan``: this client's :class:`.fleet.ClientPlan` in a heterogeneous fleet (its rank
        and checkpoint level; ``train`` and ``runtime`` already carry its micro-batch, codec and
        backbone); None: the run's configuration as it is."""
        self.client_id = str(client_id)
        self.plan = plan
        self.rt = runtime
        self.examples = list(examples)
        self.train_cfg = train
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._mem: dict[int, dict[str, torch.Tensor]] = {}
        # Flush each state file to disk as it is written; the local engine turns this off and
        # flushes a round's files together before the round's checkpoint (one journal commit).
        self.fsync_each = True
        if not self.examples:
            raise ValueError(f"client {self.client_id} has no training examples")

    # -- persisted local state -----------------------------------------------------------
    @property
    def keeps_known(self) -> bool:
        """Whether the downlink is delta-coded, so the global state held must be persisted."""
        return not get_codec(self.train_cfg.downlink_codec).lossless

    def _versions(self) -> list[int]:
        return sorted(self._mem) if self.state_dir is None else VersionedFiles(self.state_dir).versions()

    def load_state(self, upto: int) -> tuple[dict, dict, dict]:
        """(known global, local params, error-feedback residual) of the newest version <= upto."""
        vs = [v for v in self._versions() if v <= upto]
        if not vs:
            return {}, self.initial_local(), {}
        st = self._mem[vs[-1]] if self.state_dir is None else VersionedFiles(self.state_dir).load(upto)
        return split_prefixed(st, "known"), split_prefixed(st, "local") or self.initial_local(), \
            split_prefixed(st, "ef")

    def initial_local(self) -> dict[str, torch.Tensor]:
        """The local parameters before the first round (at this client's rank in a fleet)."""
        if self.plan is None:
            return dict(self.rt.initial_local)
        from .hetero import trim

        return trim(self.rt.initial_local, self.rt.method.rank_axes(), self.plan.rank)

    @contextlib.contextmanager
    def as_planned(self):
        """The shared model at this client's rank and checkpoint level (a fleet's plan) for the body."""
        if self.plan is None:
            yield
            return
        from .hetero import checkpoint_level, rank_view

        with rank_view(self.rt.method, self.plan.rank), checkpoint_level(self.rt.method, self.plan.checkpoint_level):
            yield

    def save_state(self, round: int, known: dict, local: dict, ef: dict) -> int:
        """Persist the state of ``round`` (nothing when there is nothing to keep); returns how many
        bytes the newest persisted state grew by (reported as the run's client state size)."""
        st = join_prefixed(known=known if self.keeps_known else {}, local=local, ef=ef)
        if not st and not self._versions():
            return 0
        if self.state_dir is None:
            self._mem[round] = {k: v.clone() for k, v in st.items()}
            before = [v for v in self._versions() if v < round]
            keep = {round} | ({before[-1]} if before else set())
            for v in [v for v in self._mem if v not in keep]:
                self._mem.pop(v)
            return 0
        return VersionedFiles(self.state_dir).save(
            round, st, metadata={"fastseq_client": json.dumps({"client_id": self.client_id, "round": round})},
            fsync=self.fsync_each)

    def state_file(self, round: int) -> Path | None:
        """The file of the newest state version <= ``round`` (None: none, or kept in RAM)."""
        return None if self.state_dir is None else VersionedFiles(self.state_dir).newest_path(round)

    def commit(self, round: int) -> None:
        """The checkpoint of ``round`` is complete: drop versions older than the newest <= round."""
        if self.state_dir is not None:
            VersionedFiles(self.state_dir).commit(round)
            return
        vs = [v for v in self._versions() if v <= round]
        for v in vs[:-1]:
            self._mem.pop(v)

    def discard_after(self, round: int) -> None:
        """Forget state versions newer than ``round`` (written by a run that crashed later);
        call on resume from the checkpoint of ``round``."""
        if self.state_dir is not None:
            VersionedFiles(self.state_dir).discard_after(round)
            return
        for v in [v for v in self._mem if v > round]:
            self._mem.pop(v)

    def _receive(self, downlink_blob: bytes, round: int, upto: int) -> tuple[dict, dict, dict]:
        known, local, ef = self.load_state(upto)
        upd = decode(downlink_blob, expected=Expected(direction="down", round=round,
                                                      method=self.rt.method.name, client_id=self.client_id))
        known = apply_downlink(known, upd)
        return known, local, ef

    # -- training (the part a DeepSpeed client replaces) -------------------------------------
    def num_steps(self) -> int:
        cfg, n = self.train_cfg, len(self.examples)
        if cfg.local_epochs is not None:
            return max(1, math.ceil(cfg.local_epochs * n / (cfg.batch_size * cfg.grad_accum)))
        return cfg.local_steps

    def batches(self, round: int):
        """Endless collated batches in a seeded order derived from (seed, round, client)."""
        gen = torch.Generator().manual_seed(derive_seed(self.train_cfg.seed, round, self.client_id, "data"))
        n, micro = len(self.examples), self.train_cfg.batch_size
        order: list[int] = []
        while True:
            picked = []
            while len(picked) < min(micro, n):
                if not order:
                    order = torch.randperm(n, generator=gen).tolist()
                picked.append(self.examples[order.pop()])
            yield self.rt.task.collate(picked, self.rt.processor)

    def step_loss(self, model, batch: dict, anchor: dict | None, device: torch.device,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(task loss, loss + FedProx term) of one micro-batch."""
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if dtype is not None:
            batch = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                     for k, v in batch.items()}
        with autocast_context(device):
            loss = self.rt.task.loss(model, batch)
        total = loss
        if anchor is not None:
            params = dict(self.rt.model.named_parameters())
            total = total + prox_term({k: params[k] for k in anchor}, anchor, self.train_cfg.prox_mu)
        return loss, total

    def train(self, steps: int, batches, anchor: dict | None) -> list[float]:
        """Local optimisation (AdamW, gradient accumulation, clipping); per-step losses."""
        cfg, model = self.train_cfg, self.rt.model
        groups = optimizer_groups(self.rt.method, cfg)
        train_params = [p for g in groups for p in g["params"]]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        model.train()
        losses = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                loss, total = self.step_loss(model, next(batches), anchor, self.rt.device)
                step_loss += float(loss.detach()) / cfg.grad_accum
                (total / cfg.grad_accum).backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(train_params, cfg.max_grad_norm)
            opt.step()
            losses.append(step_loss)
        return losses

    # -- the two entry points --------------------------------------------------------------
    def fit(self, downlink_blob: bytes, round: int, attack: Any = None) -> tuple[bytes, dict[str, Any]]:
        """``attack`` (an :class:`.attacks.Attack`, local engine only) tampers with the delta."""
        with self.as_planned():
            blob, metrics = self._fit(downlink_blob, round, attack)
        if self.plan is not None:  # the server's record says what each client ran with
            metrics["plan"] = self.plan.as_row()
        return blob, metrics

    def _fit(self, downlink_blob: bytes, round: int, attack: Any) -> tuple[bytes, dict[str, Any]]:
        cfg, method = self.train_cfg, self.rt.method
        known, local, ef_state = self._receive(downlink_blob, round, round - 1)
        method.load(known)
        method.load(local)
        shared = method.shared_names()
        anchor = {n: known[n] for n in shared} if cfg.prox_mu > 0 else None
        torch.manual_seed(derive_seed(cfg.seed, round, self.client_id, "dropout"))
        steps = self.num_steps()
        cuda = self.rt.device.type == "cuda"
        if cuda:  # this process's own allocations (a spawned worker's exclude the shared backbone)
            torch.cuda.reset_peak_memory_stats(self.rt.device)
        t0 = time.perf_counter()
        losses = self.train(steps, self.batches(round), anchor)
        train_seconds = time.perf_counter() - t0
        self.rt.model.eval()

        now = method.shared_state()
        delta = {k: now[k] - known[k].float() for k in shared}
        train_loss = sum(losses) / len(losses)
        n = len(self.examples)
        extra = {"train_loss": train_loss if math.isfinite(train_loss) else None, "steps": steps}
        local_dp = cfg.dp.mode == "local"
        if local_dp:
            # Clip and noise before encoding, so every codec carries (and quantizes) noised values.
            delta, _ = privatize_local(delta, cfg.dp.initial_clip(), cfg.dp.noise,
                                       derive_seed(cfg.seed, round, self.client_id, "dp-local"))
            # Nothing else about the data leaves the client: no loss, no step count (local_epochs
            # makes it a function of the data size), an example count of 1 (the server's mean is
            # then unweighted).
            n, extra = 1, {}
        if attack is not None:  # a hostile client tampers with what it would have sent
            delta = attack.apply(delta, round, self.client_id)
        header = dict(round=round, client_id=self.client_id, method=method.name, direction="up",
                      example_count=n, extra=extra)
        if cfg.error_feedback:
            ef = ErrorFeedback()
            ef.load_state_dict(ef_state)
            blob = ef.encode(delta, get_codec(cfg.codec, **cfg.codec_params()), **header)
            ef_state = ef.state_dict()
        else:
            blob = encode(delta, get_codec(cfg.codec, **cfg.codec_params()), **header)
        grew = self.save_state(round, known, method.local_state(), ef_state)
        metrics = {"train_loss": train_loss, "steps": steps, "examples": n, "uplink_bytes": len(blob),
                   "train_seconds": train_seconds, "state_bytes_delta": grew}
        if local_dp:  # these travel to the server too on the Flower engine
            metrics = {"train_loss": None, "uplink_bytes": len(blob), "train_seconds": train_seconds,
                       "state_bytes_delta": grew}
        if cuda:
            metrics["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.rt.device)
        return blob, metrics

    def evaluate(self, downlink_blob: bytes, round: int) -> dict[str, Any]:
        """Evaluate with the client's own local state (personalised methods) on the client's own
        validation examples and, in test rounds, its own test split and the global test set
        (``Runtime.evaluate``)."""
        known, local, ef_state = self._receive(downlink_blob, round, round)
        with self.as_planned():
            self.rt.method.load(known)
            self.rt.method.load(local)
            metrics = self.rt.evaluate(round, client=self.client_id)
        # Only what the client holds changed (delta-coded downlink): nothing else to write.
        grew = self.save_state(round, known, local, ef_state) if self.keeps_known else 0
        return {**metrics, "state_bytes_delta": grew}
