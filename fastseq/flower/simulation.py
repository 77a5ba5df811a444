"""Run a fastseq experiment on Flower's Simulation Engine (``--engine flower-sim``).

The same ServerApp and ClientApp as the ``flower`` engine (:mod:`fastseq.flower.app`) run
through ``flwr.simulation.run_simulation``: the ServerApp in a thread of this process, one
virtual SuperNode per client (node config ``partition-id`` / ``num-partitions``, set by the
Simulation Engine), and the ClientApps in a pool of Ray actors with ``cfg.client_cpus`` CPUs and
``cfg.client_gpus`` GPUs each. Each actor builds its own model (a Flower user's workflow on one
multi-GPU box); the ``local`` engine shares one backbone between all clients instead.

Ray is started with small, explicit settings (no dashboard, no log forwarding, a small object
store: the messages are adapter deltas) and is shut down when the run ends, also on errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import to_run_config
from .deploy import flower_env
from .tier_pools import TierPool, as_backend_config, describe as describe_pools, installed, tier_pools, wants_gpus

# The object store carries messages (encoded deltas) and Contexts, never a model.
DEFAULT_OBJECT_STORE_BYTES = 200 * 1024**2


@contextlib.contextmanager
def _flower_environ() -> Iterator[None]:
    """``os.environ`` as :func:`.deploy.flower_env` gives a Flower process (telemetry and update
    check off, no torch.distributed rendezvous variables: Ray workers inherit this environment)
    plus Ray's usage stats off, for the body; the whole environment is restored after (Flower's
    Ray backend rewrites PYTHONPATH to this process's sys.path)."""
    saved = dict(os.environ)
    env = flower_env()
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _ChildProcesses:
    """Remembers every process that this process starts while the body runs (Ray's GCS,
    raylet and worker processes), so that those still alive after ``ray.shutdown()`` (which
    returns before its workers exit) are waited for and, after ``timeout``, killed."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.seen, self._stop = interval, {}, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="fastseq-ray-children")

    def _sample(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            for p in psutil.Process().children(recursive=True):
                self.seen.setdefault(p.pid, p)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "_ChildProcesses":
        self._sample()
        self.before = set(self.seen)  # children that were there before are not ours to end
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def reap(self, timeout: float = 15.0) -> list[int]:
        """Wait for the processes started during the body; kill those alive after ``timeout``.
        Returns the pids that had to be killed."""
        import psutil

        self._sample()
        procs = [p for pid, p in self.seen.items() if pid not in self.before]
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        return [p.pid for p in alive]


def ray_init_args(cfg, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ray.init`` arguments for one run: every CPU of the machine (``client_cpus`` per actor
    decides how many actors run at once), and as many GPUs as CUDA shows when clients ask for
    GPUs."""
    args: dict[str, Any] = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False,
                            "object_store_memory": DEFAULT_OBJECT_STORE_BYTES, "logging_level": logging.ERROR,
                            "configure_logging": True}
    if wants_gpus(cfg):
        try:
            import torch

            args["num_gpus"] = torch.cuda.device_count()
        except ImportError:
            pass
    args.update(overrides or {})
    return args


def backend_config(cfg, init_args: dict[str, Any], pools: list[TierPool] | None = None) -> dict[str, Any]:
    return {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
            "init_args": dict(init_args), **(as_backend_config(pools) if pools else {})}


def check_resources(cfg, init_args: dict[str, Any]) -> None:
    """A client that asks for more than Ray has would never be scheduled: say so up front."""
    from ..config import ConfigError

    cpus = float(init_args.get("num_cpus") or 0)
    if cfg.client_cpus > cpus:
        raise ConfigError(f"client_cpus={cfg.client_cpus} exceeds the {cpus:g} CPUs given to Ray; pass "
                          f"--client-cpus {cpus:g} or less")
    gpus = float(init_args.get("num_gpus") or 0)
    if cfg.client_gpus > gpus:
        raise ConfigError(f"client_gpus={cfg.client_gpus} but Ray has {gpus:g} GPUs (CUDA devices visible); pass "
                          f"--client-gpus 0 or run on a machine with a GPU")
    if cfg.device.startswith("cuda") and cfg.client_gpus == 0:
        # Ray hides every GPU from an actor that asked for none.
        raise ConfigError(f"device={cfg.device!r} but client_gpus=0: Ray gives the virtual clients no GPU; pass "
                          f"--client-gpus F (e.g. 0.25: four clients per GPU) or --device auto")


def run_flower_simulation(cfg, *, resume: bool = False, ray_init_args_overrides: dict[str, Any] | None = None,
                          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cfg`` (an ExperimentConfig) on Flower's Simulation Engine; returns the summary
    (as ``run_experiment``), with ``engine`` ``"flower-sim"``.

    ``cfg.clients`` virtual SuperNodes; ``cfg.client_cpus`` / ``cfg.client_gpus`` Ray
    resources per ClientApp actor. ``ray_init_args_overrides`` update the ``ray.init``
    arguments (see :func:`ray_init_args`). Outputs land in ``cfg.out`` exactly as with the
    local engine (client state in ``out/clients``)."""
    from ..config import ConfigError
    from ..fed.engine import check_before_writing
    from ..fed.experiment import default_out

    cfg = dataclasses.replace(cfg)
    cfg.validate()
    if cfg.out is None:
        cfg.out = default_out(cfg)
    cfg.out = os.path.abspath(cfg.out)
    out = Path(cfg.out)
    # the config's mistakes first, whatever is installed (none of this needs Ray)
    init_args = ray_init_args(cfg, ray_init_args_overrides)
    # a fleet whose tiers set client_cpus / client_gpus: one actor pool per tier
    pools = tier_pools(cfg, float(init_args.get("num_cpus") or 0), float(init_args.get("num_gpus") or 0))
    if pools is None:
        check_resources(cfg, init_args)
    for module in ("flwr", "ray"):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"engine 'flower-sim' needs {module}, which is not installed; "
                              f'pip install "fastseq[flower-sim]" (or use --engine local)')
    # as the local engine does, before Ray starts; the ServerApp thread re-enters the lock
    with check_before_writing(cfg, out, resume, echo=echo) as lock:
        return _simulate(cfg, out, resume, init_args, pools, lock.token, echo)


def _simulate(cfg, out: Path, resume: bool, init_args: dict[str, Any], pools: list[TierPool] | None,
              lock_token: str, echo: Callable[[str], None]) -> dict[str, Any]:
    import ray
    from flwr.simulation import run_simulation

    from ..config import ConfigError
    from .app import make_apps

    rc = to_run_config(dataclasses.replace(cfg, engine="flower-sim", progress=False), resume=bool(resume),
                       **{"client-state-dir": str(out / "clients"), "node-wait-s": 120, "run-lock": lock_token})
    server_app, client_app = make_apps(rc)
    per_client = describe_pools(pools) if pools else f"{cfg.client_cpus:g} CPU / {cfg.client_gpus:g} GPU per client"
    echo(f"flower-sim: {cfg.clients} virtual SuperNodes, {per_client}, Ray with {init_args.get('num_cpus')} CPUs")
    if ray.is_initialized():
        raise ConfigError("Ray is already running in this process; flower-sim starts its own (call ray.shutdown() "
                          "first)")
    watch = _ChildProcesses() if importlib.util.find_spec("psutil") else contextlib.nullcontext()
    t0 = time.time()
    try:
        with _flower_environ(), watch, (installed() if pools else contextlib.nullcontext()) as tiered:
            try:
                run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients,
                               backend_config=backend_config(cfg, init_args, pools), verbose_logging=False)
            finally:
                if ray.is_initialized():  # Flower shuts Ray down itself unless the engine crashed early
                    ray.shutdown()
        if tiered is not None and not tiered.used:
            echo("flower-sim: WARNING: this Flower version did not build fastseq's per-tier actor pools; every "
                 "client ran with --client-cpus / --client-gpus (see client_ray_resources in metrics.jsonl)")
    finally:
        if isinstance(watch, _ChildProcesses):
            killed = watch.reap()
            if killed:
                echo(f"flower-sim: killed Ray processes that outlived ray.shutdown(): {killed}")
    summary_path = out / "summary.json"
    if not (summary_path.is_file() and summary_path.stat().st_mtime >= t0 - 1):
        from .deploy import FlowerError

        raise FlowerError(f"the Flower simulation wrote no {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    return summary
