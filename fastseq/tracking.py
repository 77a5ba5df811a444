"""Experiment trackers (``ExperimentConfig.report_to``, ``fastseq run --report-to``).

Each tracker named in ``report_to`` gets, through its own API, the run's config (as
parameters), every metrics row as it is written to ``metrics.jsonl`` (step = the round: train,
eval and validation metrics, bytes, epsilon, seconds; numbers only, one level of nesting as
``key/sub``), and at the end the summary, ``curves.png`` and the final adapter where the tracker
keeps files. Every tracker writes locally by default, inside the run folder where it can:

* ``tensorboard``: ``<out>/tensorboard`` (``tensorboard --logdir runs``), through
  ``torch.utils.tensorboard.SummaryWriter``; the curves as an image.
* ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<out>/mlflow.db`` with artifacts in
  ``<out>/mlartifacts``; experiment ``MLFLOW_EXPERIMENT_NAME`` or ``fastseq``, through
  ``MlflowClient``.
* ``wandb``: ``WANDB_MODE`` when set, else ``offline``, in ``<out>/wandb`` (``wandb sync`` uploads
  it later); project ``WANDB_PROJECT`` or ``fastseq``.
* ``trackio``: trackio's local database (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``),
  project ``TRACKIO_PROJECT`` or ``fastseq`` (``trackio show --project fastseq``).

The run is named after its folder. ``<out>/tracking.json`` records where each tracker wrote and
the last round it got, so that ``--resume`` continues the same tracker runs and sends the rounds
they missed. A tracker that fails after the run started is dropped with a warning: the run's
own files are the record, a tracker never loses a run. This module imports no tracker until a
run asks for it.
"""

from __future__ import annotations

import abc
import contextlib
import difflib
import importlib.util
import io
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError

log = logging.getLogger("fastseq.tracking")

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
EXTRA_HINT = 'pip install "fastseq[trackers]"'
# what each tracker imports (mlflow's default local store is SQLite, through SQLAlchemy + Alembic)
REQUIRES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic"), "wandb": ("wandb",),
            "trackio": ("trackio",)}
STATE_FILE = "tracking.json"


def parse_report_to(text: str) -> list[str]:
    """``"tensorboard,mlflow"`` -> ``["tensorboard", "mlflow"]``; ``"none"`` or ``""`` -> ``[]``."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    return [] if names == ["none"] else names


def check_report_to(names: Any) -> None:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"report_to must be a list of tracker names ({', '.join(TRACKERS)}) or 'none', got {names!r}")
    for n in names:
        if n not in TRACKERS:
            close = difflib.get_close_matches(n, TRACKERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            what = "'none' means no tracker and cannot be combined with others" if n == "none" else \
                f"unknown tracker {n!r}{hint}"
            raise ConfigError(f"report_to: {what}; valid: {', '.join(TRACKERS)} (comma-separated), or none")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ConfigError(f"report_to names {dup[0]!r} twice; name each tracker once")


def check_installed(names: list[str]) -> None:
    """A ConfigError naming the extra to install for the first tracker whose package is missing."""
    for n in names:
        missing = [m for m in REQUIRES[n] if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--report-to {n} needs {', '.join(missing)}, which is not installed: {EXTRA_HINT} "
                              f"(or leave {n} out of --report-to)")


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (bools as 0/1, one level of dicts as ``key/sub``; lists and
    non-finite values left out), without ``round`` (the step)."""
    out: dict[str, float] = {}

    def put(key: str, v: Any) -> None:
        if isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = float(v)

    for k, v in row.items():
        if k == "round":
            continue
        if isinstance(v, dict):
            for kk, vv in v.items():
                put(f"{k}/{kk}", vv)
        else:
            put(k, v)
    return out


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """The config as string parameters (tables and lists as JSON)."""
    return {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else str(v))
            for k, v in config.items()}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:100] or "run"


def _code_block(d: dict[str, Any]) -> str:
    """A table as a JSON code block (TensorBoard's text plugin renders markdown)."""
    return "```\n" + json.dumps(d, indent=1, sort_keys=True, default=str) + "\n```"


@contextlib.contextmanager
def _quiet_stdout():
    """trackio prints its banners to stdout; fastseq's own lines say where it logs."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class _Tracker(abc.ABC):
    name = ""
    state: dict[str, Any]

    @abc.abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """One metrics row at ``step`` (the round)."""

    @abc.abstractmethod
    def finish(self, out: Path, summary: dict[str, Any] | None, failed: bool) -> None:
        """The end of the run: the summary and artifacts, and the tracker's run closed."""

    @abc.abstractmethod
    def where(self) -> str:
        """Where the tracker writes (said once at the start)."""


class TensorBoardTracker(_Tracker):
    name = "tensorboard"

    def __init__(self, out: Path, state: dict, config: dict, resume: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.state = {"log_dir": state.get("log_dir") or str(out / "tensorboard")}
        self.writer = SummaryWriter(log_dir=self.state["log_dir"])
        if not resume:
            self.writer.add_text("config", _code_block(config))
            self.writer.flush()

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def finish(self, out, summary, failed):
        curves = out / "curves.png"
        if summary is not None and curves.is_file():
            import matplotlib.image

            img = matplotlib.image.imread(str(curves))[..., :3]
            self.writer.add_image("curves", img, summary.get("rounds", 0), dataformats="HWC")
        if summary is not None:
            self.writer.add_text("summary", _code_block(summary))
        self.writer.close()

    def where(self):
        return f"tensorboard --logdir {self.state['log_dir']}"


class MLflowTracker(_Tracker):
    name = "mlflow"
    PARAM_CHARS = 6000  # MLflow's limit on a parameter value

    def __init__(self, out: Path, state: dict, config: dict, resume: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = state.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(out / 'mlflow.db').resolve()}"
        # not "Creating initial MLflow database tables" at every run
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        run_id = state.get("run_id")
        if run_id and resume:
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fastseq")
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                exp_id = exp.experiment_id
            elif "MLFLOW_TRACKING_URI" in os.environ:
                exp_id = self.client.create_experiment(name)
            else:  # the run folder's own store: its files beside it
                exp_id = self.client.create_experiment(name, artifact_location=(out / "mlartifacts").resolve().as_uri())
            run_id = self.client.create_run(exp_id, run_name=out.name, tags={"fastseq.out": str(out)}).info.run_id
            params = [Param(k, v[:self.PARAM_CHARS]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes 100 parameters per batch
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.state = {"tracking_uri": uri, "run_id": run_id}

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.state["run_id"], metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, out, summary, failed):
        run_id = self.state["run_id"]
        if summary is not None:
            for f in ("curves.png", "summary.json", "config.json"):
                if (out / f).is_file():
                    self.client.log_artifact(run_id, str(out / f))
            if (out / "adapter").is_dir():
                self.client.log_artifacts(run_id, str(out / "adapter"), "adapter")
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def where(self):
        return f"mlflow run {self.state['run_id']} in {self.state['tracking_uri']}"


class WandbTracker(_Tracker):
    name = "wandb"

    def __init__(self, out: Path, state: dict, config: dict, resume: bool) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_code=True,
                                  disable_git=True, x_save_requirements=False)
        run_id = state.get("id") if resume else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastseq"), name=out.name, dir=str(out),
                              mode=mode, config=config, id=run_id, resume="allow" if run_id else None,
                              settings=settings, reinit="create_new")
        self.state = {"id": self.run.id, "mode": mode, "dir": str(out / "wandb")}
        self.step = -1

    def log(self, metrics, step):
        self.run.log(metrics, step=step)
        self.step = step

    def finish(self, out, summary, failed):
        import wandb

        if summary is not None:
            self.run.summary.update(metrics_of({k: v for k, v in summary.items() if k != "rounds"}))
            if (out / "curves.png").is_file():
                self.run.log({"curves": wandb.Image(str(out / "curves.png"))}, step=max(self.step, 0))
            if (out / "adapter").is_dir():
                art = wandb.Artifact(_safe_name(f"{out.name}-adapter"), type="model")
                with contextlib.redirect_stderr(io.StringIO()):  # "Adding directory to artifact ... Done."
                    art.add_dir(str(out / "adapter"))
                self.run.log_artifact(art)
        self.run.finish(exit_code=1 if failed else 0)

    def where(self):
        return f"wandb run {self.state['id']} ({self.state['mode']}) in {self.state['dir']}"


class TrackioTracker(_Tracker):
    name = "trackio"

    def __init__(self, out: Path, state: dict, config: dict, resume: bool) -> None:
        import trackio
        import trackio.utils

        project = state.get("project") or os.environ.get("TRACKIO_PROJECT", "fastseq")
        name = state.get("name") or out.name
        with _quiet_stdout():
            self.run = trackio.init(project=project, name=name, config=config,
                                    resume="allow" if resume else "never", embed=False, auto_log_cpu=False,
                                    auto_log_gpu=False)
        self.state = {"project": project, "name": self.run.name, "dir": str(trackio.utils.TRACKIO_DIR)}
        self.step = -1

    def log(self, metrics, step):
        self.run.log(metrics, step=step)
        self.step = step

    def finish(self, out, summary, failed):
        import trackio

        with _quiet_stdout():
            if summary is not None:
                if (out / "curves.png").is_file():
                    self.run.log({"curves": trackio.Image(str(out / "curves.png"))}, step=max(self.step, 0))
                if (out / "adapter").is_dir():
                    self.run.log_artifact(str(out / "adapter"), name=_safe_name(f"{self.run.name}-adapter"),
                                          type="model")
            current = getattr(getattr(trackio, "context_vars", None), "current_run", None)
            if current is not None and current.get() is self.run:
                trackio.finish()  # also forgets it as trackio's current run (else its atexit finishes it again)
            else:
                self.run.finish()

    def where(self):
        return f"trackio project {self.state['project']!r} run {self.state['name']!r} in {self.state['dir']}"


CLASSES: dict[str, Callable[..., _Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker,
                                               "wandb": WandbTracker, "trackio": TrackioTracker}


class Trackers:
    """The run's trackers (none when ``names`` is empty): ``log`` each metrics row, ``finish``
    at the end; as a context manager, a run that ends in an exception marks them failed."""

    def __init__(self, names: list[str], out: str | os.PathLike, config: dict[str, Any], *, resume: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        self.out, self.echo, self.active, self.done = Path(out), echo, [], False
        saved = self._read_state() if resume else {}
        self.state: dict[str, Any] = {}
        self.logged: dict[str, int] = {}  # the last round each tracker got (one added on resume: none)
        for n in names:
            try:
                tracker = CLASSES[n](self.out, saved.get(n, {}), config, resume and n in saved)
            except Exception as e:  # noqa: BLE001 - said in one line, before any round ran
                self.close(failed=True)
                raise ConfigError(f"--report-to {n} could not start ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]})") from None
            self.active.append(tracker)
            self.state[n] = tracker.state
            self.logged[n] = int(saved.get("logged_rounds", {}).get(n, -1)) if n in saved else -1
            echo(f"report_to {n}: {tracker.where()}")
        if self.active:
            self._write_state()

    def _read_state(self) -> dict[str, Any]:
        try:
            d = json.loads((self.out / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    def _write_state(self) -> None:
        from ._atomic import atomic_write_bytes

        atomic_write_bytes(self.out / STATE_FILE,
                           json.dumps({**self.state, "logged_rounds": self.logged}, indent=1).encode())

    def _each(self, what: str, fn: Callable[[_Tracker], None]) -> None:
        for t in list(self.active):
            try:
                fn(t)
            except Exception as e:  # noqa: BLE001 - a tracker never loses a run
                self.active.remove(t)
                self.echo(f"warning: report_to {t.name} failed to {what} ({type(e).__name__}: {e}); it gets nothing "
                          f"more from this run (metrics.jsonl has everything)")

    def log(self, row: dict[str, Any]) -> None:
        """Send one metrics row (step = its round) unless the trackers had it already."""
        step = int(row.get("round", 0))
        behind = [t for t in self.active if self.logged[t.name] < step]
        if not behind:
            return
        metrics = metrics_of(row)
        self._each("log", lambda t: t.log(metrics, step) if t in behind else None)
        for t in behind:
            if t in self.active:  # not one that failed just now: a resume sends it this row again
                self.logged[t.name] = step
        self._write_state()

    def catch_up(self, history: list[dict[str, Any]]) -> None:
        """Resuming: send each tracker the rows it missed (a stop between a checkpoint and its log;
        every row for a tracker added on resume)."""
        for row in history:
            self.log(row)

    def finish(self, summary: dict[str, Any]) -> None:
        self._each("finish", lambda t: t.finish(self.out, summary, False))
        self.active, self.done = [], True

    def close(self, failed: bool) -> None:
        if not self.done:
            self._each("close", lambda t: t.finish(self.out, None, failed))
            self.active, self.done = [], True

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
