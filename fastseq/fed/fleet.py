"""Heterogeneous fleets: tiers of clients with their own memory and uplink budgets, and each
client's own plan (docs/federated.md, "Heterogeneous fleets").

A fleet file names tiers (a memory budget, an optional uplink budget per round, the share of
the clients or the client ids) and an optional rank ladder. Before the first round every client
plans itself for its tier: the largest rank on the ladder whose training step fits its memory
(quantization x checkpoint level x micro-batch, as ``fastseq plan`` chooses) and whose encoded
update fits its uplink with the run's codec or a lossier one. The server then aggregates the
clients' nested ranks (:mod:`.hetero`).

This module only reads, checks and plans; it imports nothing above ``fed``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..config import ConfigError, unknown_keys_error

# a tier's Ray resources on flower-sim: how its clients run there, never what they compute
RAY_RESOURCE_KEYS = ("client_cpus", "client_gpus")
TIER_KEYS = ("name", "memory", "uplink", "share", "clients", "device", "max_rank", *RAY_RESOURCE_KEYS)
FLEET_KEYS = ("tiers", "rank_ladder")
MISFIT = ("refuse", "drop")
# The memory model's stated tolerance (docs/quantization.md: a step's measured total within 10 %
# of the estimate): a client plans within budget / (1 + HEADROOM), so its real step fits.
HEADROOM = 0.10
# Lossier codecs a client falls back to when its update does not fit its uplink, in order
UPLINK_FALLBACK = ("none", "bf16", "int8", "nf4", "fp4")


class FleetMisfit(ConfigError):
    """A fleet tier that nothing fits (the run is refused; ``fastseq plan`` exits 3)."""


def read_fleet_file(path: str) -> dict:
    """A fleet file (TOML/YAML/JSON; a ``[fleet]`` table is unwrapped) as a checked table, the
    form a run's config records."""
    from .experiment import load_config_file

    d = load_config_file(path)
    if set(d) == {"fleet"} and isinstance(d["fleet"], dict):
        d = d["fleet"]
    try:
        parse_fleet(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return d


@dataclass
class Tier:
    name: str
    memory: int | None = None   # bytes; None: no memory limit (the run's own configuration)
    uplink: int | None = None   # bytes a client may send per round; None: no limit
    share: float | None = None  # of the clients not named in any tier's ``clients``
    clients: list[str] | None = None
    device: str | None = None   # what the tier's devices are (planning dtype); None: the run's
    max_rank: int | None = None  # the largest rank the tier may take (e.g. a policy); None: the ladder's
    # Ray resources of the tier's ClientApp actors on flower-sim; None: the run's --client-cpus/--client-gpus
    client_cpus: float | None = None
    client_gpus: float | None = None


@dataclass
class Fleet:
    tiers: list[Tier]
    rank_ladder: list[int] | None = None

    def ladder(self, r: int) -> list[int]:
        """The ranks clients may take, largest first (default r, r/2, r/4, r/8)."""
        if self.rank_ladder is not None:
            return sorted(set(self.rank_ladder), reverse=True)
        return sorted({max(1, r // k) for k in (1, 2, 4, 8)}, reverse=True)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tiers": [{k: v for k, v in dataclasses.asdict(t).items() if v is not None}
                                       for t in self.tiers]}
        if self.rank_ladder is not None:
            d["rank_ladder"] = list(self.rank_ladder)
        return d


def _size(where: str, key: str, value: Any) -> int | None:
    from ..memory import MemoryModelError, parse_bytes

    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be a size such as 4GB, got {value!r}")
    if isinstance(value, (int, float)) and value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive size such as 4GB, got {value!r}")
    try:
        n = parse_bytes(value if isinstance(value, str) else int(value))
    except MemoryModelError as e:
        raise ConfigError(f"{where}: {key}: {e}") from None
    if n <= 0:
        raise ConfigError(f"{where}: {key} must be a positive size such as 4GB, got {value!r}")
    return n


def _resource(where: str, key: str, value: Any) -> float | None:
    # client_cpus must be positive (Ray sizes its actor pool by it); client_gpus may be 0 (no GPU)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (key == "client_cpus"
                                                                                         and value == 0):
        what = "a positive number of CPUs such as 1 or 0.5" if key == "client_cpus" else \
            "a GPU fraction such as 0.25 (or 0: no GPU)"
        raise ConfigError(f"{where}: {key} must be {what}, got {value!r}")
    return float(value)


def parse_fleet(d: Any, r: int | None = None) -> Fleet:
    """A fleet table (from a TOML/YAML file or a run config's ``fleet``) -> :class:`Fleet`. Every
    mistake is one ConfigError naming the tier and the key."""
    if not isinstance(d, dict):
        raise ConfigError(f"a fleet must be a table with 'tiers' (and optionally 'rank_ladder'), got {d!r}")
    bad = sorted(set(d) - set(FLEET_KEYS))
    if bad:
        raise unknown_keys_error("fleet", bad, list(FLEET_KEYS))
    raw = d.get("tiers")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("a fleet needs at least one tier: [[tiers]] with name and memory")
    tiers, names, named_clients = [], set(), {}
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise ConfigError(f"fleet tier {i + 1} must be a table, got {t!r}")
        bad = sorted(set(t) - set(TIER_KEYS))
        if bad:
            raise unknown_keys_error(f"fleet tier {i + 1}", bad, list(TIER_KEYS))
        name = t.get("name", f"tier{i + 1}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"fleet tier {i + 1}: name must be a non-empty string, got {name!r}")
        if name in names:
            raise ConfigError(f"fleet tier name {name!r} is used twice; give each tier its own name")
        names.add(name)
        where = f"fleet tier {name!r}"
        share, clients = t.get("share"), t.get("clients")
        if (share is None) == (clients is None):
            raise ConfigError(f"{where}: give either share (a fraction of the clients) or clients (a list of ids)")
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0 < share <= 1):
            raise ConfigError(f"{where}: share must be a fraction in (0, 1], got {share!r}")
        if clients is not None:
            if not isinstance(clients, list) or not clients:
                raise ConfigError(f"{where}: clients must be a non-empty list of client ids, e.g. [\"0\", \"3\"]")
            clients = [str(c) for c in clients]
            for c in clients:
                if c in named_clients:
                    raise ConfigError(f"client {c} is in tiers {named_clients[c]!r} and {name!r}; put it in one")
                named_clients[c] = name
        device = t.get("device")
        if device is not None and not isinstance(device, str):
            raise ConfigError(f"{where}: device must be a string such as 'cpu' or 'cuda', got {device!r}")
        max_rank = t.get("max_rank")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise ConfigError(f"{where}: max_rank must be a positive rank, got {max_rank!r}")
        resources = {k: _resource(where, k, t.get(k)) for k in RAY_RESOURCE_KEYS}
        tiers.append(Tier(name, _size(where, "memory", t.get("memory")), _size(where, "uplink", t.get("uplink")),
                          None if share is None else float(share), clients, device, max_rank, **resources))
    shares = [t.share for t in tiers if t.share is not None]
    if shares and not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ConfigError(f"the fleet's shares sum to {sum(shares):g}; they must sum to 1 (the clients not named "
                          f"in a tier's clients list)")
    ladder = d.get("rank_ladder")
    if ladder is not None:
        if (not isinstance(ladder, list) or not ladder
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ladder)):
            raise ConfigError(f"rank_ladder must be a list of positive ranks such as [64, 32, 16, 8], got {ladder!r}")
        if r is not None and max(ladder) > r:
            raise ConfigError(f"rank_ladder's largest rank {max(ladder)} is above the run's r={r}; the global "
                              f"adapter has rank r: raise --r or lower the ladder")
    return Fleet(tiers, None if ladder is None else list(ladder))


def without_resources(fleet: Any) -> Any:
    """A fleet table without its tiers' Ray resources (client_cpus / client_gpus): they change how
    a flower-sim run is carried out, not what it computes (a resumed run may change them)."""
    if not isinstance(fleet, dict) or not isinstance(fleet.get("tiers"), list):
        return fleet
    return {**fleet, "tiers": [{k: v for k, v in t.items() if k not in RAY_RESOURCE_KEYS}
                               if isinstance(t, dict) else t for t in fleet["tiers"]]}


def load_fleet(source: str | dict, r: int | None = None) -> Fleet:
    """A fleet file (see :func:`read_fleet_file`) or an already-read table."""
    return parse_fleet(source if isinstance(source, dict) else read_fleet_file(source), r)


def assign_tiers(fleet: Fleet, num_clients: int, seed: int) -> dict[str, str]:
    """client id -> tier name. Named clients first; the rest split by share (largest remainder),
    which clients go where drawn from the seed."""
    from .client import derive_seed

    ids = [str(i) for i in range(num_clients)]
    out: dict[str, str] = {}
    for t in fleet.tiers:
        for c in t.clients or []:
            if c not in ids:
                raise ConfigError(f"fleet tier {t.name!r} names client {c}, but the run has clients 0..{num_clients - 1}")
            out[c] = t.name
    rest = [c for c in ids if c not in out]
    shared = [t for t in fleet.tiers if t.share is not None]
    if rest and not shared:
        raise ConfigError(f"clients {', '.join(rest[:5])}{'...' if len(rest) > 5 else ''} are in no fleet tier; "
                          f"name them in a tier's clients or give a tier a share")
    if rest:
        exact = [t.share * len(rest) for t in shared]
        counts = [math.floor(x) for x in exact]
        order = sorted(range(len(shared)), key=lambda i: (-(exact[i] - counts[i]), i))
        for i in order[:len(rest) - sum(counts)]:
            counts[i] += 1
        random.Random(derive_seed(seed, "fleet-tiers")).shuffle(rest)
        start = 0
        for t, n in zip(shared, counts):
            for c in rest[start:start + n]:
                out[c] = t.name
            start += n
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


@dataclass
class ClientPlan:
    """What one tier's clients run with (``plans`` in every metrics row)."""

    tier: str
    fits: bool
    quantization: str
    checkpoint_level: int
    micro_batch: int
    grad_accum: int
    rank: int
    codec: str
    estimated_bytes: int          # peak memory of one training step (the planner's estimate)
    update_bytes: int             # the encoded uplink at this rank and codec
    reason: str = ""              # why it does not fit (empty when it fits)
    memory_budget: int | None = None  # the tier's budgets it was planned for
    uplink_budget: int | None = None

    def as_row(self) -> dict[str, Any]:
        return {"tier": self.tier, "quantization": self.quantization, "checkpoint_level": self.checkpoint_level,
                "micro_batch": self.micro_batch, "rank": self.rank, "codec": self.codec,
                "estimated_bytes": self.estimated_bytes, "update_bytes": self.update_bytes}

    def describe(self) -> str:
        from ..memory import format_bytes

        text = (f"rank {self.rank}, {self.quantization}, checkpoint level {self.checkpoint_level}, micro-batch "
                f"{self.micro_batch} x {self.grad_accum}, codec {self.codec}: step "
                f"{format_bytes(self.estimated_bytes)}, update {format_bytes(self.update_bytes)}")
        return text if self.fits else f"DOES NOT FIT: {self.reason}"


@dataclass
class PlanInputs:
    """What planning needs to know of the run (kept apart from ExperimentConfig so that the plan
    CLI and the engines build it the same way)."""

    model: Any                      # nn.Module, config or hub id (memory.model_shape takes any)
    r: int
    placement: str
    train_compress: bool
    batch_size: int                 # the effective batch: micro-batch x accumulation
    seq_len: int
    run_quantization: str
    run_checkpoint_level: int
    run_codec: str
    run_device: str
    quantizations: Sequence[str]
    update_bytes: Callable[[int, str], int]   # (rank, codec) -> encoded update bytes
    task: str | None = None
    num_labels: int | None = None
    # a LoRA method's rank -> the SCL rank its memory is estimated as (the memory model is SCL's);
    # None: the rank is SCL's own
    scl_r_of: Callable[[int], int] | None = None


def _dtype_for(device: str | None) -> str:
    # what a client on such a device computes in (the planner's activation sizes)
    return "float32" if (device or "cpu").startswith("cpu") else "bfloat16"


def plan_tier(tier: Tier, ladder: list[int], p: PlanInputs) -> ClientPlan:
    """The best plan for one tier: the largest rank on ``ladder`` that fits both budgets."""
    from ..config import SCLConfig
    from ..memory import estimate, format_bytes, plan as plan_memory

    dtype = _dtype_for(tier.device or p.run_device)
    kwargs = dict(seq_len=p.seq_len, dtype=dtype, task=p.task, num_labels=p.num_labels)
    misses = []
    if tier.max_rank is not None:
        ladder = [r for r in ladder if r <= tier.max_rank]
        if not ladder:
            return ClientPlan(tier.name, False, p.run_quantization, p.run_checkpoint_level, p.batch_size, 1,
                              tier.max_rank, p.run_codec, 0, 0, reason=f"tier {tier.name!r}: max_rank "
                                                                      f"{tier.max_rank} is below every rank on the ladder",
                              memory_budget=tier.memory, uplink_budget=tier.uplink)
    for rank in ladder:
        scl = SCLConfig(r=p.scl_r_of(rank) if p.scl_r_of else rank, placement=p.placement, train_compress=p.train_compress)
        if tier.memory is None:
            # no budget: the run's own configuration
            est = estimate(p.model, scl, p.run_quantization, p.batch_size, checkpoint_level=p.run_checkpoint_level,
                           **kwargs)
            q, lvl, mb = p.run_quantization, p.run_checkpoint_level, p.batch_size
        else:
            mem = plan_memory(p.model, int(tier.memory / (1 + HEADROOM)), scl, batch_size=p.batch_size, quantizations=p.quantizations,
                              **kwargs)
            if not mem.fits:
                misses.append(f"rank {rank}: {mem.message} (the memory model's {HEADROOM:.0%} headroom kept "
                              f"from {format_bytes(tier.memory)})")
                continue
            est, q, lvl, mb = mem.estimate, mem.quantization, mem.checkpoint_level, mem.micro_batch
        codecs = [p.run_codec] + [c for c in UPLINK_FALLBACK[UPLINK_FALLBACK.index(p.run_codec) + 1:]] \
            if p.run_codec in UPLINK_FALLBACK else [p.run_codec]
        for codec in codecs:
            nbytes = p.update_bytes(rank, codec)
            if tier.uplink is None or nbytes <= tier.uplink:
                return ClientPlan(tier.name, True, q, lvl, mb, p.batch_size // mb, rank, codec, est.total, nbytes,
                                  memory_budget=tier.memory, uplink_budget=tier.uplink)
        misses.append(f"rank {rank}: the smallest update ({codecs[-1]}) is {format_bytes(nbytes)}, over the uplink "
                      f"{format_bytes(tier.uplink)}")
    last = misses[-1] if misses else "no rank on the ladder"
    return ClientPlan(tier.name, False, p.run_quantization, p.run_checkpoint_level, p.batch_size, 1, ladder[-1],
                      p.run_codec, 0, 0, reason=f"tier {tier.name!r}: nothing fits even at the ladder's lowest "
                                                f"{last}", memory_budget=tier.memory, uplink_budget=tier.uplink)


def plan_fleet(fleet: Fleet, tiers_of: dict[str, str], p: PlanInputs) -> dict[str, ClientPlan]:
    """client id -> its plan (one planning per tier: a tier's clients plan alike)."""
    ladder = fleet.ladder(p.r)
    by_tier = {t.name: plan_tier(t, ladder, p) for t in fleet.tiers}
    return {cid: by_tier[name] for cid, name in tiers_of.items()}


def fleet_table(plans: dict[str, ClientPlan]) -> str:
    """The plans, one line per tier (what ``fastseq plan --fleet`` and a fleet run print)."""
    from ..memory import format_bytes

    lines = []
    for tier in dict.fromkeys(p.tier for p in plans.values()):
        members = [c for c, p in plans.items() if p.tier == tier]
        p = plans[members[0]]
        budget = ", ".join(x for x in (f"memory {format_bytes(p.memory_budget)}" if p.memory_budget
                                       else "memory unlimited",
                                       f"uplink {format_bytes(p.uplink_budget)}" if p.uplink_budget else "") if x)
        lines.append(f"  {tier} ({len(members)} client{'s' if len(members) > 1 else ''}; {budget}): {p.describe()}")
    return "\n".join(lines)


def node_tier(node_config: dict, client_id: str) -> Tier | None:
    """A Flower SuperNode's own budgets (``--node-config "memory-budget='8GB' uplink-budget='1MB'
    max-rank=16 tier='laptop'"``), or None when it sets none (it plans as its fleet tier)."""
    keys = ("memory-budget", "uplink-budget", "max-rank")
    if not any(k in node_config for k in keys):
        return None
    where = f"node config of client {client_id}"
    max_rank = node_config.get("max-rank")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ConfigError(f"{where}: max-rank must be a positive rank, got {max_rank!r}")
    return Tier(str(node_config.get("tier") or f"node {client_id}"),
                _size(where, "memory-budget", node_config.get("memory-budget")),
                _size(where, "uplink-budget", node_config.get("uplink-budget")), clients=[client_id],
                max_rank=max_rank)


def measure_plan(client) -> Any:
    """One training step of ``client`` as its plan runs it (rank, checkpoint level, micro-batch,
    backbone), measured by the planner's own measurement path (:func:`fastseq.memory.measure_step`:
    frozen + trainable + optimizer state + saved activations; on CUDA also the allocator's peak).
    The step updates the shared model: measure on a runtime of its own, not a running one."""
    from ..memory import measure_step

    rt = client.rt
    batch = next(client.batches(0))
    batch = {k: v.to(rt.device) if hasattr(v, "to") else v for k, v in batch.items()}
    with client.as_planned():
        rt.model.train()
        try:
            return measure_step(rt.model, batch, lr=client.train_cfg.lr, loss_fn=lambda m, b: rt.task.loss(m, b))
        finally:
            rt.model.eval()
