"""Per-tier Ray resources on ``flower-sim``: one actor pool per fleet tier.

Flower's Simulation Engine gives every ClientApp actor the same resources (one
``client_resources`` for the whole pool: flwrlabs/flower#3548, #7321). A heterogeneous fleet
wants more: its laptop tier's clients should take a small slice of a GPU, so that many run at
once, and its workstation tier's a large one. When a fleet tier sets ``client_cpus`` or
``client_gpus``, :func:`tier_pools` sizes one pool per tier (every actor with its tier's
resources, at least one actor a tier, the rest of Ray's CPUs and GPUs shared in proportion to the
tier's clients) and :func:`installed` lets Flower's engine build :class:`TierPoolsBackend` instead
of its own RayBackend for the run. That backend sends every virtual SuperNode's messages to the
pool of its client's tier. Flower names its backend class directly (no registry), so the class
is swapped in the module Flower reads it from, for the run only; the run warns when Flower did
not build it, and every round's row says what each client's actor held (``client_ray_resources``).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from ..config import ConfigError

BACKEND_KEY = "fastseq_tier_pools"  # the backend config's table of pools (JSON, as Flower passes it)
_EPS = 1e-9


@dataclass
class TierPool:
    tier: str
    num_cpus: float
    num_gpus: float
    partitions: list[int]  # the tier's clients (virtual SuperNodes' partition ids)
    actors: int = 0

    @property
    def resources(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


@dataclass
class _Left:
    cpus: float
    gpus: float

    def take(self, p: TierPool) -> bool:
        if p.num_cpus > self.cpus + _EPS or p.num_gpus > self.gpus + _EPS:
            return False
        self.cpus -= p.num_cpus
        self.gpus -= p.num_gpus
        p.actors += 1
        return True


def wants_gpus(cfg) -> bool:
    """Whether any client of ``cfg`` asks Ray for a GPU (the run's or a tier's ``client_gpus``)."""
    from ..fed.fleet import load_fleet

    return cfg.client_gpus > 0 or (cfg.fleet is not None
                                   and any((t.client_gpus or 0) > 0 for t in load_fleet(cfg.fleet, cfg.r).tiers))


def tier_pools(cfg, cpus: float, gpus: float) -> list[TierPool] | None:
    """The actor pools of ``cfg``'s fleet on a Ray with ``cpus`` CPUs and ``gpus`` GPUs, or None
    when no tier sets its own resources (Flower's one pool). Every tier with clients gets one
    actor; the rest go, one at a time, to the tier with the most clients per actor that still
    fits (never more actors than clients). A ConfigError says what to change when one actor per
    tier does not fit."""
    from ..fed.fleet import assign_tiers, load_fleet

    if cfg.fleet is None:
        return None
    fleet = load_fleet(cfg.fleet, cfg.r)
    if all(t.client_cpus is None and t.client_gpus is None for t in fleet.tiers):
        return None
    tiers_of = assign_tiers(fleet, cfg.clients, cfg.seed)
    pools = []
    for t in fleet.tiers:
        members = sorted(int(c) for c, name in tiers_of.items() if name == t.name)
        if not members:
            continue
        pool = TierPool(t.name, cfg.client_cpus if t.client_cpus is None else t.client_cpus,
                        cfg.client_gpus if t.client_gpus is None else t.client_gpus, members)
        if cfg.device.startswith("cuda") and pool.num_gpus == 0:  # Ray hides every GPU from such an actor
            raise ConfigError(f"flower-sim: device={cfg.device!r} but fleet tier {t.name!r} "
                              f"has client_gpus=0, so Ray gives its clients no GPU; give the tier a GPU fraction "
                              f"(client_gpus = 0.25: four of its clients per GPU) or run with --device auto")
        pools.append(pool)
    left = _Left(float(cpus), float(gpus))
    for p in pools:
        if not left.take(p):
            need_c = sum(q.num_cpus for q in pools)
            need_g = sum(q.num_gpus for q in pools)
            raise ConfigError(f"flower-sim: one actor per fleet tier needs {need_c:g} CPUs and {need_g:g} GPUs "
                              f"({', '.join(f'{q.tier}: {q.num_cpus:g}/{q.num_gpus:g}' for q in pools)}), but "
                              f"Ray has {cpus:g} CPUs and {gpus:g} GPUs; lower the tiers' client_cpus / "
                              f"client_gpus")
    while True:  # one more actor to the most crowded tier that still fits
        crowded = sorted((p for p in pools if p.actors < len(p.partitions)),
                         key=lambda p: (-len(p.partitions) / p.actors, p.tier))
        if not any(left.take(p) for p in crowded):
            return pools


def as_backend_config(pools: list[TierPool]) -> dict[str, Any]:
    return {BACKEND_KEY: [dict(tier=p.tier, num_cpus=p.num_cpus, num_gpus=p.num_gpus, partitions=p.partitions,
                               actors=p.actors) for p in pools]}


def describe(pools: list[TierPool]) -> str:
    return "; ".join(f"{p.tier}: {p.actors} actor(s) x {p.num_cpus:g} CPU / {p.num_gpus:g} GPU for "
                     f"{len(p.partitions)} client(s)" for p in pools)


def _backend_class(base: type) -> type:
    """Flower's RayBackend with one BasicActorPool per tier."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    class TierPoolsBackend(base):  # type: ignore[misc, valid-type]
        used = False  # set when Flower built one (the run checks that its pools were in use)

        def __init__(self, backend_config: dict[str, Any]) -> None:
            super().__init__(backend_config)
            self.tiers = [TierPool(**d) for d in backend_config[BACKEND_KEY]]
            self.tier_of = {pid: p.tier for p in self.tiers for pid in p.partitions}
            self.pools: dict[str, Any] = {}
            self.free: dict[str, threading.Semaphore] = {}
            type(self).used = True

        @property
        def num_workers(self) -> int:  # Flower starts this many threads that call process_message
            return sum(pool.num_actors for pool in self.pools.values())

        def is_worker_idle(self) -> bool:
            return any(pool.is_actor_available() for pool in self.pools.values())

        def build(self, app_fn) -> None:
            for p in self.tiers:
                pool = BasicActorPool(actor_type=ClientAppActor, client_resources=p.resources,
                                      actor_kwargs=self.actor_kwargs)
                pool.add_actors_to_pool(p.actors)
                self.pools[p.tier] = pool
                # Flower's threads outnumber one tier's actors: a thread waits for its tier's actor
                self.free[p.tier] = threading.Semaphore(p.actors)
            self.pool = next(iter(self.pools.values()))
            self.app_fn = app_fn

        def process_message(self, message, context):
            partition = int(context.node_config["partition-id"])
            tier = self.tier_of[partition]
            pool = self.pools[tier]
            with self.free[tier]:
                future = pool.submit(lambda a, a_fn, mssg, cid, state: a.run.remote(a_fn, mssg, cid, state),
                                     (self.app_fn, message, str(partition), context))
                try:
                    return pool.fetch_result_and_return_actor_to_pool(future)
                except Exception:
                    pool.add_actor_back_to_pool(future)
                    raise

        def terminate(self) -> None:
            for pool in self.pools.values():
                pool.terminate_all_actors()
            ray.shutdown()

    return TierPoolsBackend


@contextlib.contextmanager
def installed() -> Iterator[type]:
    """Flower's engine builds a :class:`TierPoolsBackend` while this is open; yields the class
    (its ``used`` says whether Flower built one)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    cls = _backend_class(original)
    raybackend.RayBackend = cls
    try:
        yield cls
    finally:
        raybackend.RayBackend = original


def assigned_resources() -> dict[str, float] | None:
    """The Ray resources of the actor this runs in ({"CPU": 1.0, "GPU": 0.25}), or None outside Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        got = ray.get_runtime_context().get_assigned_resources()
    except Exception:  # not in a worker (the driver)
        return None
    return {k: float(v) for k, v in got.items() if k in ("CPU", "GPU")}
