"""The embedded ``local`` engine: one process, one frozen backbone shared by every simulated
client (only adapter/trainable state and local state are swapped), CPU or one GPU.

``run_experiment(cfg)`` builds everything, runs the rounds (resuming from the newest complete
checkpoint when ``resume=True``), and writes ``config.json``, ``metrics.jsonl``,
``summary.json``, ``checkpoints/``, ``clients/``, ``adapter/`` and ``curves.png`` to ``cfg.out``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..config import ConfigError
from ..models import resolve_model_source
from .checkpoint import atomic_save_tensors, atomic_write_json, load_tensors
from .experiment import ExperimentConfig, build_client, build_runtime, build_server, default_out

log = logging.getLogger("fastseq.fed")

CKPT_RE = re.compile(r"round_(\d+)")


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in d.iterdir()
            if (m := CKPT_RE.fullmatch(p.name)) and (p / "server.json").is_file()]
    return max(done)[1] if done else None


def save_checkpoint(out: Path, server, round: int, keep: int = 2) -> Path:
    """Atomically write ``checkpoints/round_<r>/`` (tmp dir + os.replace); keep the newest ``keep``."""
    tensors, meta = server.state_dict()
    ck = out / "checkpoints"
    final = ck / f"round_{round}"
    tmp = ck / f".round_{round}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    atomic_save_tensors(tmp / "server.safetensors", tensors)
    atomic_write_json(tmp / "server.json", meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    rounds = sorted(int(m.group(1)) for p in ck.iterdir() if (m := CKPT_RE.fullmatch(p.name)))
    for r in rounds[:-keep]:
        shutil.rmtree(ck / f"round_{r}", ignore_errors=True)
    return final


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _write_metrics(path: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in history)
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


class Hooks:
    """Callbacks of the local engine (tests use them to simulate crashes)."""

    def on_round_end(self, round: int, record: dict[str, Any]) -> None:  # after the checkpoint
        pass


def run_experiment(cfg: ExperimentConfig, *, resume: bool = False, hooks: Hooks | None = None,
                   client_factory: Callable | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a federated experiment on the local engine; returns the summary."""
    hooks = hooks or Hooks()
    if cfg.engine == "flower":
        try:
            from ..flower import run_flower  # noqa: PLC0415
        except ImportError as e:
            raise ConfigError("engine 'flower' needs fastseq.flower.run_flower, which is not available in this "
                              f"installation ({e}); use --engine local") from None
        return run_flower(cfg, resume=resume)
    if cfg.out is None:
        cfg.out = default_out(cfg)
    out = Path(cfg.out)
    t_start = time.time()
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"cannot resume: {out} has no complete checkpoint (checkpoints/round_<r>/server.json)")
    out.mkdir(parents=True, exist_ok=True)
    rt = build_runtime(cfg, echo=echo)
    atomic_write_json(out / "config.json", {**cfg.to_dict(), "method_info": _jsonable(rt.method.info),
                                            "resolved_model": resolve_model_source(cfg.model)})
    server = build_server(cfg, rt, logger=echo)
    make_client = client_factory or build_client
    clients = {cid: make_client(cfg, rt, cid, out / "clients" / f"client_{cid}") for cid in server.client_ids}
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        meta = json.loads((ckpt / "server.json").read_text())
        server.load_state_dict(load_tensors(ckpt / "server.safetensors"), meta)
        for c in clients.values():
            c.discard_after(server.round)
        _write_metrics(metrics_path, server.history)
        echo(f"resumed from {ckpt} (round {server.round})")
        start = server.round + 1
    else:
        for c in clients.values():
            c.discard_after(-1)
        t0 = time.time()
        ev = server.evaluate(0)
        rec0 = {"round": 0, "method": cfg.method, "train_loss": None, "clients": [], "dropped": [],
                "uplink_bytes": 0, "downlink_bytes": 0, "examples": 0, "skipped": False, **ev,
                "seconds": time.time() - t0}
        server.finish_round(rec0)
        save_checkpoint(out, server, 0)
        _write_metrics(metrics_path, server.history)
        echo(_line(rec0))
        start = 1

    personalized = rt.method.personalized
    rounds = range(start, cfg.rounds + 1)
    for r in tqdm(rounds, desc="rounds", disable=not cfg.progress, initial=start - 1, total=cfg.rounds):
        t0 = time.time()
        plan = server.configure_round(r)
        results, failures, client_metrics = [], [], {}
        for (cid, _), outcome in zip(plan, fit_clients(clients, plan, r, cfg.progress)):
            if isinstance(outcome, Exception):  # a failing client is dropped; the round goes on
                failures.append((cid, f"{type(outcome).__name__}: {outcome}"))
            else:
                results.append((cid, outcome[0]))
                client_metrics[cid] = outcome[1]
        rec = server.aggregate(r, results, failures)
        down_before = server.bytes.summary(r)["downlink_bytes"]
        if personalized:
            evs = []
            for cid, down in tqdm(server.configure_evaluate(r), desc=f"round {r} eval", leave=False,
                                  disable=not cfg.progress):
                evs.append(clients[cid].evaluate(down, r))
            ev = {k: sum(e[k] for e in evs) / len(evs) for k in evs[0] if isinstance(evs[0][k], (int, float))}
            ev["personalized"] = True
            if "accuracy" in evs[0]:
                ev["per_client_accuracy"] = [e.get("accuracy") for e in evs]
            rec["eval_downlink_bytes"] = server.bytes.summary(r)["downlink_bytes"] - down_before
        else:
            ev = server.evaluate(r)
        rec.update(ev)
        rec["client_train_loss"] = {c: m["train_loss"] for c, m in client_metrics.items()}
        rec["seconds"] = time.time() - t0
        server.finish_round(rec)
        save_checkpoint(out, server, r)
        _write_metrics(metrics_path, server.history)
        echo(_line(rec))
        hooks.on_round_end(r, rec)

    summary = finish(cfg, rt, server, out, time.time() - t_start, echo)
    return summary


def fit_clients(clients: dict, plan: list[tuple[str, bytes]], round: int, progress: bool) -> list:
    """One round's fits, in plan order: ``(uplink_blob, metrics)`` or the client's exception.

    Clients whose class offers ``fit_many`` (Flower's remote clients) get all their fits sent
    at once, so they train concurrently; in-process clients share one model and go in turn.
    """
    fit_many = getattr(type(clients[plan[0][0]]), "fit_many", None) if plan else None
    if fit_many is not None:
        return fit_many([(clients[cid], down) for cid, down in plan], round)
    outcomes: list = []
    for cid, down in tqdm(plan, desc=f"round {round} clients", leave=False, disable=not progress):
        try:
            outcomes.append(clients[cid].fit(down, round))
        except Exception as e:
            log.debug("client %s failed", cid, exc_info=True)
            outcomes.append(e)
    return outcomes


def _line(rec: dict) -> str:
    parts = [f"round {rec['round']}"]
    for k in ("train_loss", "val_accuracy", "val_rougeL_tf", "eval_loss", "accuracy", "rougeL_tf", "perplexity"):
        v = rec.get(k)
        if isinstance(v, (int, float)):
            parts.append(f"{k} {v:.4f}")
    parts.append(f"up {rec.get('uplink_bytes', 0):,} B, down {rec.get('downlink_bytes', 0):,} B")
    if rec.get("dropped"):
        parts.append(f"dropped {[d['client'] for d in rec['dropped']]}")
    return ", ".join(parts)


def finish(cfg: ExperimentConfig, rt, server, out: Path, seconds: float, echo) -> dict[str, Any]:
    """Final adapter (the global state, and the local state of client 0 for personalised
    methods is NOT mixed in: the saved adapter is the global one), summary.json, curves.png."""
    rt.method.load(server.global_state)
    rt.method.load(rt.initial_local)
    adapter = out / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    rt.method.save_adapter(adapter)
    hist = server.history
    metric = "accuracy" if any("accuracy" in h for h in hist) else "eval_loss"
    first, last = hist[0].get(metric), hist[-1].get(metric)
    summary = {
        "method": cfg.method, "model": cfg.model, "task": cfg.task, "rounds": hist[-1]["round"],
        "metric": metric, "initial": first, "final": last,
        "gain": (last - first) if isinstance(first, (int, float)) and isinstance(last, (int, float)) else None,
        "uplink_bytes": sum(h.get("uplink_bytes", 0) for h in hist),
        "downlink_bytes": sum(h.get("downlink_bytes", 0) + h.get("eval_downlink_bytes", 0) for h in hist),
        "dropped": sum(len(h.get("dropped", [])) for h in hist),
        "seconds": seconds, "method_info": _jsonable(rt.method.info), "out": str(out),
    }
    atomic_write_json(out / "summary.json", _jsonable(summary))
    try:
        from .plots import plot_runs

        plot_runs([(cfg.method, hist)], out / "curves.png")
    except Exception as e:  # plotting must never lose a finished run
        echo(f"warning: could not write curves.png: {e}")
    echo(f"summary: {metric} {first:.4f} at round 0 -> {last:.4f} at round {summary['rounds']} "
         f"(gain {summary['gain']:+.4f}); uplink {summary['uplink_bytes']:,} B, downlink "
         f"{summary['downlink_bytes']:,} B; {seconds:.1f} s; outputs in {out}"
         if isinstance(summary["gain"], float) else f"summary: {summary}")
    return summary
