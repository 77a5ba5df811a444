"""One federated round, on its own: sample, fit the sampled clients, aggregate, evaluate.

The engine's loop (:func:`fastseq.fed.engine.run_experiment`) owns the run: its directory,
config.json, checkpoints, resume and metrics.jsonl. A :class:`RoundRunner` owns what happens
between two checkpoints and returns the round's record. How the clients of a round are run
(in turn in this process, as Flower's remote clients, under SecAgg+) is decided here, in
:func:`fit_clients`, so that a new way of running them changes this module, not the loop.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Callable

from tqdm.auto import tqdm

from ..config import ConfigError
from .attacks import Attack, hostile_clients

log = logging.getLogger("fastseq.fed")


class ClientPool:
    """The run's clients, built when a round first needs them (a run of 1,000 clients never holds
    1,000 of them): a client object holds its example list and the path of its state, no tensors;
    its state stays on disk until it fits or evaluates. The newest ``cache`` clients are kept.

    A client is told to ``discard_after(floor)`` (the resumed round, -1 for a fresh run) once per
    process, when first built: a proxy for a remote client sends that with its next message, and a
    second time would drop state written since. ``_discarded`` holds ids only."""

    def __init__(self, make: Callable[[str], Any], floor: int, cache: int):
        self.make, self.floor, self.cache = make, floor, max(1, cache)
        self._built: OrderedDict[str, Any] = OrderedDict()
        self._discarded: set[str] = set()

    def __getitem__(self, cid: str) -> Any:
        cid = str(cid)
        c = self._built.get(cid)
        if c is None:
            c = self.make(cid)
            if cid not in self._discarded:
                c.discard_after(self.floor)
                self._discarded.add(cid)
            self._built[cid] = c
            while len(self._built) > self.cache:
                self._built.popitem(last=False)
        else:
            self._built.move_to_end(cid)
        return c

    def built(self) -> int:
        """How many client objects are held now (tests check it stays bounded)."""
        return len(self._built)

    def state_files(self, round: int, cids) -> list:
        """The state files these clients wrote, as of ``round`` (remote proxies: none here)."""
        return [getattr(self[cid], "state_file", lambda r: None)(round) for cid in cids]

    def commit(self, round: int, cids) -> None:
        for cid in cids:
            commit = getattr(self[cid], "commit", None)  # remote proxies keep their nodes' versions
            if commit is not None:
                commit(round)


class ClientBuilder:
    """Makes the run's client ``cid`` in this process with ``make(cfg, rt, cid, state_dir)``.
    Picklable with its runtime, so that a spawned worker builds its clients with it."""

    def __init__(self, make: Callable, cfg, rt, clients_dir):
        self.make, self.cfg, self.rt, self.clients_dir = make, cfg, rt, clients_dir

    def __call__(self, cid: str):
        c = self.make(self.cfg, self.rt, cid, self.clients_dir / f"client_{cid}")
        if hasattr(c, "fsync_each"):
            c.fsync_each = False  # flushed with the round's other state files (fsync_files)
        return c


class WorkerCall:
    """What a worker runs for a job (see :class:`.workers.WorkerPool`). ``fit`` / ``evaluate``:
    one client (the parent built it first and discarded any newer state of a crashed run; the
    worker's copy only reads and writes its files). ``score``: the records of a shard of the
    server's evaluation, with the state in ``blob`` loaded (see
    :meth:`RoundRunner.score_in_workers`)."""

    def __init__(self, build: ClientBuilder):
        self.build = build

    def in_spawned_worker(self) -> None:
        """A spawned worker got the runtime's tensors shared with the engine: copy what a client
        writes (its trainable parameters, FedEx-LoRA's base weights), keep the backbone shared."""
        from .workers import own_writable_copies

        rt = self.build.rt
        for backbone in {id(b): b for b in [rt, *rt.backbones.values()]}.values():
            own_writable_copies(backbone.model, backbone.method.written_in_fit())

    def __call__(self, header: dict, blob: bytes) -> tuple[bytes, Any]:
        op, key, round = header["op"], header["key"], header["round"]
        if op == "score":
            from safetensors.torch import load as load_tensors

            rt = self.build.rt
            rt.method.load(load_tensors(blob))
            examples = rt.val_examples if header["which"] == "val" else rt.eval_examples
            shard = examples[header["start"]:header["stop"]]
            return b"", rt.task.eval_records(rt.model, shard, rt.processor, self.build.cfg.eval_batch_size)
        client = self.build(key)
        if op == "fit":
            cfg = self.build.cfg
            kw = {"attack": Attack(cfg.attack, cfg.attack_scale, cfg.seed)} if header["hostile"] else {}
            return client.fit(blob, round, **kw)
        return b"", client.evaluate(blob, round)


class RoundRunner:
    """Runs round 0 (the initial evaluation) and rounds 1..R of one run; keeps the running total
    of the clients' state on disk (``state_bytes``) that every record carries.

    With ``workers`` > 1 (in-process clients only) the round's fits and personalised evaluations
    run in a :class:`.workers.WorkerPool` (``start``: forked from this process, or spawned);
    ``build(cid)`` makes a client object there. :meth:`close` ends the pool."""

    def __init__(self, cfg, server, clients: ClientPool, *, personalized: bool, progress: bool,
                 echo: Callable[[str], None], state_bytes: int = 0, workers: int = 1, threads: int = 1,
                 build: "ClientBuilder | None" = None, start: str = "fork"):
        self.cfg, self.server, self.clients = cfg, server, clients
        self.personalized, self.progress, self.echo = personalized, progress, echo
        self.state_bytes = state_bytes
        self.workers, self.threads, self.build, self.start = workers, threads, build, start
        self._pool = None
        self.server_runtime = None  # set by the engine: the server's evaluation is split in the workers

    def pool(self):
        """The worker pool (started on first use, after the backbone is loaded), or None."""
        if self.workers <= 1 or self.build is None:
            return None
        if self._pool is None:
            from .workers import WorkerPool

            self._pool = WorkerPool(self.workers, self.threads, WorkerCall(self.build), start=self.start)
        return self._pool

    def _run_in_pool(self, pool, op: str, plan: list[tuple[str, bytes]], round: int, hostile=(), desc: str = ""):
        for cid, _ in plan:
            self.clients[cid]  # built here first: a resumed run's newer state is discarded once, here
        with tqdm(total=len(plan), desc=desc, leave=False, disable=not self.progress) as bar:
            def done(cid, worker):
                bar.set_postfix_str(f"client {cid} done on worker {worker}")
                bar.update()
            jobs = [(cid, down, {"hostile": cid in hostile, "label": f"client {cid}'s {op}"}) for cid, down in plan]
            return pool.run(op, jobs, round, on_done=done)

    def score_in_workers(self, which: str, examples: list, state: dict, round: int | None) -> dict | None:
        """The server's evaluation of ``state`` on ``examples`` (the runtime's ``val`` or ``test``
        examples), its batches split across the workers and reduced here in batch order: the
        same metrics as one process computes. None when there is nothing to split."""
        pool, rt = self.pool(), self.server_runtime
        bs = self.cfg.eval_batch_size
        n_batches = -(-len(examples) // bs)
        if pool is None or rt is None or not rt.task.splittable_eval or n_batches < 2:
            return None
        if examples is not (rt.val_examples if which == "val" else rt.eval_examples):
            return None  # the workers slice the runtime's own lists: anything else is scored here
        from safetensors.torch import save as save_tensors

        blob = save_tensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
        per = -(-n_batches // min(self.workers, n_batches))
        jobs = [(f"{which} batches {i}-{min(i + per, n_batches) - 1}", blob,
                 {"which": which, "start": i * bs, "stop": min(len(examples), (i + per) * bs)})
                for i in range(0, n_batches, per)]
        outcomes, _ = pool.run("score", jobs, -1 if round is None else round)
        records = []
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise RuntimeError(f"the server's evaluation failed in a worker: {outcome}")
            records += outcome[1]
        return rt.task.reduce_eval(records, rt.processor)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def initial(self) -> dict[str, Any]:
        """Round 0: the global state's evaluation before any training."""
        t0 = time.time()
        server = self.server
        ev = server.evaluate(0)
        return {"round": 0, "method": self.cfg.method, "train_loss": None, "clients": [], "dropped": [],
                "uplink_bytes": 0, "downlink_bytes": 0, "examples": 0, "skipped": False, **ev,
                **server.privacy_metrics(0), "seconds": time.time() - t0, "client_state_bytes": 0,
                "server_state_bytes": server.state_bytes}

    def run(self, r: int) -> tuple[dict[str, Any], list[str]]:
        """Round ``r``: (its record, the ids of the clients whose state it touched)."""
        t0 = time.time()
        rec, client_metrics, touched = self.train(r)
        self.state_bytes += sum(int(m.get("state_bytes_delta") or 0) for m in client_metrics.values())
        t_eval = time.time()
        touched += self.evaluate(r, rec, touched)
        rec["eval_seconds"] = time.time() - t_eval
        rec["train_seconds"] = sum(float(m.get("train_seconds") or 0) for m in client_metrics.values())
        rec["client_train_loss"] = {c: m["train_loss"] for c, m in client_metrics.items()}
        peaks = {c: m["cuda_peak_bytes"] for c, m in client_metrics.items() if "cuda_peak_bytes" in m}
        if peaks:  # on a GPU: each client's peak of its own process's allocations during its fit
            rec["client_cuda_peak_bytes"] = peaks
        ray_resources = {c: m["ray_resources"] for c, m in client_metrics.items() if "ray_resources" in m}
        if ray_resources:  # flower-sim: the CPUs / GPUs of each client's Ray actor
            rec["client_ray_resources"] = ray_resources
        rec["client_state_bytes"] = self.state_bytes
        rec["server_state_bytes"] = self.server.state_bytes
        rec["seconds"] = time.time() - t0
        return rec, touched

    def train(self, r: int) -> tuple[dict[str, Any], dict[str, dict], list[str]]:
        """Sample, fit and aggregate: (the round's record, per-client training metrics, sampled ids)."""
        cfg, server = self.cfg, self.server
        plan = server.configure_round(r)
        sampled = [cid for cid, _ in plan]
        hostile = hostile_clients(sampled, cfg.byzantine, cfg.seed, r)
        attack = Attack(cfg.attack, cfg.attack_scale, cfg.seed) if hostile else None
        pool = self.pool()
        ran_on = None
        if cfg.secagg:
            rec, client_metrics = secure_round(server, self.clients, plan, r)
        else:
            if pool is not None:
                outcomes, ran_on = self._run_in_pool(pool, "fit", plan, r, hostile, desc=f"round {r} clients")
            else:
                outcomes = fit_clients(self.clients, plan, r, self.progress, hostile, attack)
            results, failures, client_metrics = [], [], {}
            for cid, outcome in zip(sampled, outcomes):
                if isinstance(outcome, Exception):  # a failing client is dropped; the round goes on
                    failures.append((cid, failure_reason(outcome)))
                else:
                    results.append((cid, outcome[0]))
                    client_metrics[cid] = outcome[1]
            rec = server.aggregate(r, results, failures)
        plans = {c: m.pop("plan") for c, m in client_metrics.items() if "plan" in m}
        if plans:  # a heterogeneous fleet: what each client ran with (fleet.ClientPlan.as_row)
            rec["plans"] = plans
        if cfg.byzantine > 0:
            rec["hostile"] = hostile
        if pool is not None:
            rec["workers"] = self.workers
            rec["client_worker"] = ran_on or {}
        if sampled and not rec.get("clients"):
            self.echo(f"WARNING round {r}: every sampled client was dropped, nothing was aggregated: "
                      + "; ".join(f"client {d['client']}: {d['reason']}" for d in rec.get("dropped", [])))
        return rec, client_metrics, sampled

    def evaluate(self, r: int, rec: dict[str, Any], touched: list[str]) -> list[str]:
        """The round's evaluation into ``rec``: the global state on the server, or (personalised
        methods) each evaluation client with its own local state. Returns the clients it touched
        beyond ``touched``."""
        server = self.server
        if not self.personalized:
            rec.update(server.evaluate(r))
            return []
        down_before = server.bytes.summary(r)["downlink_bytes"]
        plan = server.configure_evaluate(r)
        pool = self.pool()
        if pool is not None:  # each client's own model is scored in a worker, in parallel
            outcomes, _ = self._run_in_pool(pool, "evaluate", plan, r, desc=f"round {r} eval")
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise RuntimeError(f"round {r}: a personalised evaluation failed in a worker: {outcome}")
            results = [metrics for _, metrics in outcomes]
        else:
            results = (self.clients[cid].evaluate(down, r)
                       for cid, down in tqdm(plan, desc=f"round {r} eval", leave=False, disable=not self.progress))
        evs, evaluated = [], []
        for (cid, _), metrics in zip(plan, results):
            m = dict(metrics)
            self.state_bytes += int(m.pop("state_bytes_delta", 0) or 0)
            evs.append(m)
            evaluated.append(cid)
        ev = {k: sum(e[k] for e in evs) / len(evs) for k in evs[0] if isinstance(evs[0][k], (int, float))}
        ev["personalized"] = True
        if "accuracy" in evs[0]:
            ev["per_client_accuracy"] = [e.get("accuracy") for e in evs]
        ev["eval_clients"] = evaluated  # which clients' own state was scored (personal_eval_clients)
        rec["eval_downlink_bytes"] = server.bytes.summary(r)["downlink_bytes"] - down_before
        rec.update(ev)
        return sorted(set(evaluated) - set(touched), key=int)


def failure_reason(e: Exception) -> str:
    """A failed client's reason as every engine records it (a worker words it the same way)."""
    from .workers import ClientFailure

    return str(e) if isinstance(e, ClientFailure) else f"{type(e).__name__}: {e}"


def fit_clients(clients: "ClientPool | dict", plan: list[tuple[str, bytes]], round: int, progress: bool,
                hostile: list[str] = (), attack: Attack | None = None) -> list:
    """One round's fits, in plan order: ``(uplink_blob, metrics)`` or the client's exception.

    Clients whose class offers ``fit_many`` (Flower's remote clients) get all their fits sent
    at once, so they train concurrently; in-process clients share one model and go in turn.
    The ``hostile`` clients fit with ``attack`` (simulated in process only).
    """
    fit_many = getattr(type(clients[plan[0][0]]), "fit_many", None) if plan else None
    if fit_many is not None:
        if hostile:
            raise ConfigError("byzantine clients are simulated by the local engine only; use --engine local")
        return fit_many([(clients[cid], down) for cid, down in plan], round)
    outcomes: list = []
    for cid, down in tqdm(plan, desc=f"round {round} clients", leave=False, disable=not progress):
        try:
            kw = {"attack": attack} if cid in hostile else {}
            outcomes.append(clients[cid].fit(down, round, **kw))
        except Exception as e:
            log.debug("client %s failed", cid, exc_info=True)
            outcomes.append(e)
    return outcomes


def secure_round(server, clients: dict, plan: list[tuple[str, bytes]], round: int) -> tuple[dict, dict]:
    """A round under secure aggregation: the clients' class runs the protocol (``secure_sum``:
    Flower's SecAgg+ in :mod:`fastseq.flower.secagg`) and the server learns only the weighted
    mean of the deltas. Returns (round record, per-client training metrics)."""
    secure_sum = getattr(type(clients[plan[0][0]]), "secure_sum", None) if plan else None
    if secure_sum is None:
        raise ConfigError("secure aggregation needs clients that run the SecAgg+ protocol: use --engine flower")
    result = secure_sum([(clients[cid], down) for cid, down in plan], round)
    return server.aggregate_secure(round, result), result.metrics
