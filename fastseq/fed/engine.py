"""The embedded ``local`` engine: one process, one frozen backbone shared by every simulated
client (only adapter/trainable state and local state are swapped), CPU or one GPU.

``run_experiment(cfg)`` builds everything, runs the rounds (resuming from the newest complete
checkpoint when ``resume=True``), and writes ``config.json``, ``metrics.jsonl``,
``summary.json``, ``checkpoints/``, ``clients/``, ``adapter/`` and ``curves.png`` to ``cfg.out``.
While a process writes ``cfg.out`` it holds the directory's lock (:mod:`.run_lock`): a second
run, or a ``--resume``, into the same directory is refused in one line and changes nothing.
Nothing but the lock file is written before the config, data and model have loaded (and, when
resuming, the checkpoint was found to fit them); a new directory is removed again if the run
fails before its first checkpoint (a directory that existed before is never removed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from ..config import ConfigError
from ..models import resolve_model_source
from ..tracking import Trackers
from .checkpoint import atomic_save_tensors, atomic_write_json, load_tensors
from .experiment import ExperimentConfig, build_client, build_runtime, build_server, check_environment, default_out
from .fleet import without_resources
from .rounds import ClientBuilder, ClientPool, RoundRunner
from .run_lock import LOCK_NAME, RunLock, run_lock
from .workers import resolve_workers, start_method
from .state_store import KnownStore, discard_tree_after, fsync_files, tree_bytes


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


# What a resumed run may change: how and how long it runs, never what it computes.
RESUME_MAY_CHANGE = ("rounds", "out", "progress", "device", "engine", "deepspeed", "eval_batch_size", "client_cpus",
                     "client_gpus", "workers", "worker_start", "report_to", "harness_tasks", "harness_every",
                     "harness_limit")


class NothingTrained(RuntimeError):
    """A run finished its rounds without aggregating a single client update (every sampled
    client was dropped, or too few were valid for ``min_clients``, in every round): its
    adapter is the initial one. The message carries the clients' reasons."""


def aggregated_rounds(history: list[dict]) -> int:
    """How many training rounds (round >= 1) aggregated at least one update."""
    return sum(1 for h in history if h.get("round", 0) >= 1 and not h.get("skipped", False))


def drop_reasons(history: list[dict], most: int = 5) -> list[str]:
    """The distinct reasons clients were dropped, newest round first, at most ``most``."""
    seen: dict[str, str] = {}
    for h in reversed(history):
        for d in h.get("dropped", []):
            seen.setdefault(str(d.get("reason")), str(d.get("client")))
    return [f"client {c}: {reason}" for reason, c in list(seen.items())[:most]]


def check_trained(summary: dict[str, Any]) -> None:
    """Raise NothingTrained when ``summary`` (any engine's) records no aggregated round. A summary
    without the count (an engine whose outputs are on another machine) passes."""
    if summary.get("aggregated_rounds", 1) > 0 or not summary.get("rounds"):
        return
    reasons = summary.get("failure") or ["no client update was valid (see metrics.jsonl)"]
    raise NothingTrained(f"the run in {summary.get('out')} trained nothing: no round of {summary['rounds']} "
                         f"aggregated a client update; the adapter is the initial one. Clients' reasons: "
                         + "; ".join(reasons))


class AlreadyFinished(ConfigError):
    """``resume=True`` on a run that has done all its rounds; nothing was changed."""


def check_output_path(out: Path) -> None:
    """The output path must be a directory or not exist yet (its parent may not exist either)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"output directory {out} cannot be created: {p} is a file; pass another --out")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"output directory {out}: {p} is not writable; pass another --out")
            return


def read_run_config(out: str | os.PathLike, doing: str = "resume") -> dict[str, Any]:
    """The ``config.json`` of the run in ``out`` (ExperimentConfig keys and what the engine
    added); a ConfigError that says what is wrong when ``out`` is not a readable run directory
    (``cannot <doing>: ...``)."""
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"cannot {doing}: {out} does not exist; pass the directory of an earlier `fastseq run`"
                          if not out.exists() else f"cannot {doing}: {out} is a file; pass a run directory")
    path = out / "config.json"
    if not path.is_file():
        raise ConfigError(f"cannot {doing}: {out} has no config.json (is it a fastseq run directory?)")
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot {doing}: {path} is not valid JSON ({e}); the run directory is damaged") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot {doing}: {path} does not hold a config table; the run directory is damaged")
    return saved


def check_resume(cfg: ExperimentConfig, out: Path) -> Path:
    """The checkpoint to resume ``cfg`` from in ``out``; a ConfigError when there is none, when
    ``cfg`` differs from the run's ``config.json`` beyond RESUME_MAY_CHANGE (a key it lacks: from
    the key's default), when the checkpoint was trained with another method, when it asks for
    fewer rounds than were done, and AlreadyFinished when all rounds are done. Reads only."""
    saved = read_run_config(out)
    now = json.loads(json.dumps(cfg.to_dict()))  # compared as config.json holds it (tuples are lists)
    # A key config.json lacks (a run from before the key existed, or an edited file) ran with its
    # default, as the keys it has imply it (lr: the method's): a config that sets it otherwise is
    # a change too.
    was = json.loads(json.dumps(ExperimentConfig(**{k: saved[k] for k in ExperimentConfig.keys() if k in saved})
                                .to_dict()))
    for d in (was, now):
        d["fleet"] = without_resources(d["fleet"])
    changed = [k for k in ExperimentConfig.keys() if k not in RESUME_MAY_CHANGE and was[k] != now[k]]
    if changed:
        diffs = ", ".join(f"{k} {was[k]!r}{'' if k in saved else ' (the default)'} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume {out} with a different config ({diffs}); resume without changing these, "
                          f"or start a new run with another --out")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ConfigError(f"cannot resume: {out} has no complete checkpoint (checkpoints/round_<r>/server.json); "
                          f"start the run again")
    # config.json is where a resumed config comes from, so it agreeing with itself proves
    # nothing: the checkpoint says which method it holds (and check_checkpoint_fits, once the
    # model is built, what shapes).
    try:
        trained = json.loads((ckpt / "server.json").read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"cannot resume: {ckpt / 'server.json'} is not readable JSON; the run directory is "
                          f"damaged") from None
    if trained is not None and trained != cfg.method:
        said = (f"as {out / 'config.json'} says (was it edited?)" if "method" in saved
                else f"({out / 'config.json'} names no method: the default)")
        raise ConfigError(f"cannot resume {out}: its checkpoint {ckpt.name} was trained with method {trained!r}, "
                          f"not {cfg.method!r} {said}; set method to {trained!r} in {out / 'config.json'} to "
                          f"resume it, or start a new run with another --out")
    done = int(CKPT_RE.fullmatch(ckpt.name).group(1))
    if done > cfg.rounds:
        raise ConfigError(f"cannot resume {out} with rounds={cfg.rounds}: it has already done {done} rounds; "
                          f"pass --rounds {done} or more")
    if done == cfg.rounds and (out / "summary.json").is_file():
        raise AlreadyFinished(f"{out} has already finished all {done} rounds: nothing to resume, nothing was changed; "
                              f"pass --rounds N (N > {done}) to train it further")
    return ckpt


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")


def check_no_earlier_run(out: Path) -> None:
    """A new run never writes over an earlier one: ``out`` must not hold a run's files."""
    found = [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []
    if found:
        raise ConfigError(f"output directory {out} already holds a run ({', '.join(found)}); pass --resume {out} "
                          f"to continue it, or another --out (nothing was changed)")


def check_run_directory(cfg: ExperimentConfig, out: Path, resume: bool) -> Path | None:
    """The output path, and no earlier run in it or (resuming) a run to resume: the checkpoint
    to resume from, None for a new run."""
    check_output_path(out)
    if resume:
        return check_resume(cfg, out)
    check_no_earlier_run(out)
    return None


@contextlib.contextmanager
def locked_run_directory(cfg: ExperimentConfig, out: Path, resume: bool, *, echo: Callable[[str], None] = print,
                         token: str | None = None) -> Iterator[tuple[RunLock, Path | None]]:
    """Hold ``out``'s lock for the body and check the run directory under it (so a run that is
    still writing it is reported as such, not as a half-written run); yields ``(lock, the
    checkpoint to resume from or None)``. A path that cannot be a run directory (or, resuming,
    holds no run) is refused before the lock file is put there. ``token``: a lock the launching
    process holds for this one (Flower's ServerApp)."""
    check_output_path(out)
    if resume:
        read_run_config(out)
    with run_lock(out, token=token, echo=echo) as lock:
        yield lock, check_run_directory(cfg, out, resume)


@contextlib.contextmanager
def check_before_writing(cfg: ExperimentConfig, out: Path, resume: bool, *,
                         echo: Callable[[str], None] = print) -> Iterator[RunLock]:
    """What every engine does before it writes anything: lock and check the run directory
    (:func:`locked_run_directory`) and check the environment (the task's packages, the device);
    the lock is held for the body. The local engine's ``build_runtime`` checks the latter."""
    with locked_run_directory(cfg, out, resume, echo=echo) as (lock, _):
        check_environment(cfg)
        yield lock


def check_checkpoint_fits(cfg: ExperimentConfig, rt, out: Path, ckpt: Path) -> None:
    """Resuming: the model and method built from the config are the ones the checkpoint was
    trained on (config.json's record of them, the checkpoint's tensor names and shapes), checked
    before anything is written; a ConfigError otherwise."""
    from safetensors import SafetensorError, safe_open

    fix = (f"was {out / 'config.json'} edited, or the model changed? Restore it to resume, or start a new run "
           f"with another --out")
    saved = read_run_config(out).get("method_info")
    built = _jsonable(rt.method.info)
    if isinstance(saved, dict):
        def show(v):
            return f"{v:,}" if isinstance(v, int) else repr(v)

        diffs = [f"{k} {show(saved[k])} -> {show(built[k])}" for k in ("method", "total_params")
                 if k in saved and k in built and saved[k] != built[k]]
        if diffs:
            raise ConfigError(f"cannot resume {out}: {cfg.model!r} with {cfg.method!r} is not the model the run "
                              f"trained ({', '.join(diffs)}); {fix}")
    try:
        with safe_open(str(ckpt / "server.safetensors"), framework="pt") as f:
            held = {k[len("global/"):]: list(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("global/")}
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"cannot resume: {ckpt / 'server.safetensors'} cannot be read ({e}); the run directory "
                          f"is damaged") from None
    want = {k: list(v.shape) for k, v in rt.initial_global.items()}
    if held != want:
        k = (sorted(set(held) ^ set(want)) or sorted(k for k in want if held[k] != want[k]))[0]
        detail = f"{k}: {held.get(k, 'absent')} in the checkpoint, {want.get(k, 'absent')} in the model built now"
        raise ConfigError(f"cannot resume {out}: its checkpoint {ckpt.name} does not fit {cfg.model!r} with "
                          f"{cfg.method!r} ({detail}); {fix}")


@contextlib.contextmanager
def output_directory(out: Path, created: bool) -> Iterator[None]:
    """``out`` for the body, which writes the run; ``created``: ``out`` is new (the run lock made
    it). If the body fails (or is interrupted) before the run's first checkpoint, what it wrote
    in a new ``out`` is removed again, the lock file aside (the lock's release then removes the
    empty folder and the parents it made). A directory that existed before is never emptied."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created and latest_checkpoint(out) is None:
            for p in out.iterdir():
                if p.name == LOCK_NAME:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise


def show_progress(cfg: ExperimentConfig) -> bool:
    """Progress bars: as ``cfg.progress`` says, or (None) only when stderr is a terminal."""
    if cfg.progress is not None:
        return bool(cfg.progress)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' / huggingface_hub's own progress bars (e.g. "Loading weights") off
    for the body when fastseq's are off, and restore them after."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def run_seconds(history: list[dict]) -> float:
    """A run's time: the sum of its rounds' ``seconds`` (round 0's evaluation included), so it
    covers every invocation of a resumed run. ``summary.json`` and ``fastseq compare`` report it."""
    return float(sum(h.get("seconds") or 0 for h in history))


class Hooks:
    """Callbacks of the local engine (tests use them to simulate crashes)."""

    def on_round_end(self, round: int, record: dict[str, Any]) -> None:  # after the checkpoint
        pass


def run_experiment(cfg: ExperimentConfig, *, resume: bool = False, hooks: Hooks | None = None,
                   client_factory: Callable | None = None, echo: Callable[[str], None] = print,
                   lock_token: str | None = None, config_extra: dict[str, Any] | None = None,
                   plans: dict | None = None) -> dict[str, Any]:
    """Run (or resume) a federated experiment on the local engine; returns the summary.

    ``lock_token``: the token of the run directory's lock when the process that launched this
    one holds it (Flower's ServerApp); otherwise the run takes the lock itself.
    ``config_extra``: entries written over ``config.json``'s from the start (the Flower engines
    record their engine there, so that ``--resume`` of an interrupted run resumes it on Flower).
    ``plans``: a fleet's client plans made by the clients themselves (Flower's SuperNodes)."""
    hooks = hooks or Hooks()
    if cfg.engine != "local":
        # The other engines sit above this package (they run this loop with remote clients).
        raise ConfigError(f"fastseq.fed.run_experiment runs the local engine only; run engine {cfg.engine!r} with "
                          f"fastseq.engines.run(cfg) (or `fastseq run --engine {cfg.engine}`)")
    if cfg.secagg and client_factory is None:  # Flower's ServerApp passes its remote clients
        raise ConfigError("secure aggregation hides each client's update from a server in another process; the "
                          "local engine runs everything in one process: use --engine flower or flower-sim")
    if cfg.out is None:
        cfg.out = default_out(cfg)
    out = Path(cfg.out)
    with locked_run_directory(cfg, out, resume, echo=echo, token=lock_token) as (lock, ckpt):
        with library_progress_bars(show_progress(cfg)):
            # Everything that can fail on the user's input fails here, before any file is written.
            rt = build_runtime(cfg, echo=echo, plans=plans)
            if ckpt is not None:
                check_checkpoint_fits(cfg, rt, out, ckpt)
            with output_directory(out, created=bool(lock.created)):
                return _run_rounds(cfg, rt, out, ckpt, hooks, client_factory, echo, config_extra or {})


def _run_rounds(cfg: ExperimentConfig, rt, out: Path, ckpt: Path | None, hooks: Hooks,
                client_factory: Callable | None, echo: Callable[[str], None],
                config_extra: dict[str, Any]) -> dict[str, Any]:
    atomic_write_json(out / "config.json", {**cfg.to_dict(), "method_info": _jsonable(rt.method.info),
                                            "resolved_model": resolve_model_source(cfg.model), **config_extra})
    # --report-to: the trackers get the config now, each round's row and, at the end, the summary and files
    with Trackers(cfg.report_to, out, cfg.to_dict(), resume=ckpt is not None, echo=echo) as trackers:
        summary = _train_and_finish(cfg, rt, out, ckpt, hooks, client_factory, echo, trackers)
        trackers.finish(summary)
    return summary


def _train_and_finish(cfg: ExperimentConfig, rt, out: Path, ckpt: Path | None, hooks: Hooks,
                      client_factory: Callable | None, echo: Callable[[str], None], trackers: Trackers
                      ) -> dict[str, Any]:
    progress = show_progress(cfg)
    if ckpt is not None:  # a finished run trained further is unfinished until finish() writes its summary again
        (out / "summary.json").unlink(missing_ok=True)
    server = build_server(cfg, rt, logger=echo, state_dir=out / "server")
    if isinstance(server.down.known, KnownStore):
        server.down.known.fsync_each = False  # flushed with the round's other state files
    make_client = client_factory or build_client
    if client_factory is None:  # clients are built when first sampled: say now what would fail then
        empty = [i for i, part in enumerate(rt.parts) if not part]
        if empty:
            raise ValueError(f"client {empty[0]} has no training examples")
    metrics_path = out / "metrics.jsonl"
    personalized = rt.method.personalized
    if ckpt is not None:
        meta = json.loads((ckpt / "server.json").read_text())
        server.load_state_dict(load_tensors(ckpt / "server.safetensors"), meta)  # discards newer server state
        floor = server.round
    else:
        server.discard_after(-1)
        floor = -1
    discard_tree_after(out / "clients", floor)  # the local clients' state (remote ones: ClientPool)
    n_eval = len(server.eval_clients(0)) if personalized else 0

    build = ClientBuilder(make_client, cfg, rt, out / "clients")
    clients = ClientPool(build, floor, cfg.clients_per_round + n_eval)
    # Remote clients (Flower's) train on their own machines; SecAgg+ is theirs too.
    # A DeepSpeed client owns its devices: one at a time.
    in_process = (not cfg.secagg and cfg.deepspeed is None
                  and getattr(type(clients["0"]), "fit_many", None) is None)
    workers, threads = resolve_workers(cfg.workers, cfg.clients_per_round, rt.device.type) if in_process else (1, 1)
    start = start_method(cfg.worker_start, rt.device.type)
    if workers > 1:
        echo(f"workers: {workers} {start}ed processes share the backbone, {threads} torch thread(s) each")
    runner = RoundRunner(cfg, server, clients, personalized=personalized, progress=progress, echo=echo,
                         workers=workers, threads=threads, build=build, start=start)
    if workers > 1:
        runner.server_runtime, rt.scorer = rt, runner.score_in_workers
    try:
        _rounds_loop(cfg, runner, server, clients, out, ckpt, metrics_path, hooks, echo, progress, trackers)
    finally:
        rt.scorer = None
        runner.close()  # no worker outlives the run, whatever ended it
    return finish(cfg, rt, server, out, echo)


def _rounds_loop(cfg: ExperimentConfig, runner: RoundRunner, server, clients: ClientPool, out: Path,
                 ckpt: Path | None, metrics_path: Path, hooks: Hooks, echo, progress: bool,
                 trackers: Trackers) -> None:
    if ckpt is not None:
        _write_metrics(metrics_path, server.history)
        trackers.catch_up(server.history)
        echo(f"resumed from {ckpt} (round {server.round})")
        start = server.round + 1
        last = server.history[-1] if server.history else {}
        # the clients' state size as of the checkpoint (a run from before the field: one walk)
        state_bytes = last.get("client_state_bytes")
        runner.state_bytes = tree_bytes(out / "clients") if state_bytes is None else state_bytes
    else:
        rec0 = runner.initial()
        server.finish_round(rec0)
        save_checkpoint(out, server, 0)
        _write_metrics(metrics_path, server.history)
        trackers.log(rec0)
        echo(_line(rec0))
        start = 1

    for r in tqdm(range(start, cfg.rounds + 1), desc="rounds", disable=not progress, initial=start - 1,
                  total=cfg.rounds):
        rec, touched = runner.run(r)
        server.finish_round(rec)
        # The round's state files reach the disk before the checkpoint that relies on them.
        fsync_files(clients.state_files(r, touched) + server.state_files(r, touched))
        save_checkpoint(out, server, r)
        # Round r is now the state any resume starts from: older state versions can go.
        clients.commit(r, touched)
        server.commit(r, touched)
        _write_metrics(metrics_path, server.history)
        trackers.log(rec)
        echo(_line(rec))
        hooks.on_round_end(r, rec)


def _line(rec: dict) -> str:
    parts = [f"round {rec['round']}"]
    for k in ("train_loss", "val_accuracy", "val_rougeL_tf", "eval_loss", "accuracy", "rougeL_tf", "perplexity"):
        v = rec.get(k)
        if isinstance(v, (int, float)):
            parts.append(f"{k} {v:.4f}")
    for k, v in rec.items():  # lm-eval's scores (harness_tasks), e.g. harness/pubmedqa/acc
        if k.startswith("harness/") and isinstance(v, (int, float)):
            parts.append(f"{k} {v:.4g}" if abs(v) >= 1e6 else f"{k} {v:.4f}")
    if "epsilon" in rec:  # a DP run: the privacy spent so far (None: no noise, no guarantee)
        parts.append(f"epsilon {_fmt_eps(rec['epsilon'])}")
    parts.append(f"up {rec.get('uplink_bytes', 0):,} B, down {rec.get('downlink_bytes', 0):,} B")
    if rec.get("dropped"):
        parts.append(f"dropped {[d['client'] for d in rec['dropped']]}")
    if rec.get("hostile"):
        parts.append(f"hostile {rec['hostile']}")
    if rec.get("client_state_bytes") or rec.get("server_state_bytes"):
        parts.append(f"client state {rec.get('client_state_bytes', 0) + rec.get('server_state_bytes', 0):,} B on disk")
    return ", ".join(parts)


def _fmt_eps(eps) -> str:
    return f"{eps:.3g}" if isinstance(eps, (int, float)) and math.isfinite(eps) else "inf"


def finish(cfg: ExperimentConfig, rt, server, out: Path, echo) -> dict[str, Any]:
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
        "seconds": run_seconds(hist), "method_info": _jsonable(rt.method.info), "out": str(out),
        # per-client state on disk at the end (clients' own files; the server's record of what
        # each client holds, kept for a lossy downlink only), and where the rounds' time went
        "client_state_bytes": hist[-1].get("client_state_bytes", 0),
        "server_state_bytes": hist[-1].get("server_state_bytes", 0),
        "train_seconds": float(sum(h.get("train_seconds") or 0 for h in hist)),
        "eval_seconds": float(sum(h.get("eval_seconds") or 0 for h in hist)),
        "aggregated_rounds": aggregated_rounds(hist),
    }
    if summary["aggregated_rounds"] == 0 and summary["rounds"] > 0:
        summary["failure"] = drop_reasons(hist) or [
            f"fewer than min_clients={cfg.min_clients} valid updates in every round"]
    if cfg.dp != "none":  # the privacy spent by the whole run (null: no noise, no guarantee)
        summary.update(dp=cfg.dp, epsilon=hist[-1].get("epsilon"), dp_delta=hist[-1].get("dp_delta"),
                       dp_noise=cfg.dp_noise)
    atomic_write_json(out / "summary.json", _jsonable(summary))
    try:
        from .plots import plot_runs

        plot_runs([(cfg.method, hist)], out / "curves.png")
    except Exception as e:  # plotting must never lose a finished run
        echo(f"warning: could not write curves.png: {e}")
    echo(f"summary: {metric} {first:.4f} at round 0 -> {last:.4f} at round {summary['rounds']} "
         f"(gain {summary['gain']:+.4f}); uplink {summary['uplink_bytes']:,} B, downlink "
         f"{summary['downlink_bytes']:,} B; {summary['seconds']:.1f} s"
         + (f"; epsilon {_fmt_eps(summary['epsilon'])} at delta {summary['dp_delta']:.3g}" if "epsilon" in summary
            else "") + f"; outputs in {out}"
         if isinstance(summary["gain"], float) else f"summary: {summary}")
    return summary
