"""EleutherAI's lm-evaluation-harness as a scorer of causal LMs: the tasks, the scoring through
lm-eval's own ``HFLM`` and ``simple_evaluate``, and the results files of a run folder.

This module knows models, tokenizers and lm-eval only; :mod:`fastseq.harness` (``fastseq eval``)
rebuilds a run's model from its folder, and the server's evaluation during a run
(``harness_tasks`` in the run's config) scores the model it holds. fastseq computes no score
itself: lm-eval's HFLM runs the model, lm-eval's tasks and metrics score it.

lm-eval is optional (``pip install "fastseq[harness]"``); it is imported only when a task
manager is built or a model is scored. fastseq ships an offline task, ``fastseq_medqa_mini``
(``fastseq/harness_tasks``: YAML + local JSON), always on the task path; hub tasks
(mmlu_anatomy, pubmedqa, ...) need the Hugging Face hub or its cache.
"""

from __future__ import annotations

import datetime
import difflib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigError

log = logging.getLogger(__name__)

SHIPPED_TASKS = Path(__file__).resolve().parent.parent / "harness_tasks"
RESULTS_DIR = "harness"
RESULT_RE = re.compile(r"round_(\d+)\.json")
INSTALL_HINT = "pip install \"fastseq[harness]\" (or pip install lm-eval)"
HARNESS_HEADER = ["run", "round", "lm-eval task", "metric", "value", "stderr", "n"]


class HarnessError(ConfigError):
    """Bad input for lm-evaluation-harness (a user error: exit code 2, one line)."""


def require_lm_eval():
    """The ``lm_eval`` module, or a HarnessError that names the extra to install."""
    try:
        import lm_eval  # noqa: PLC0415
        import lm_eval.models.huggingface  # noqa: F401, PLC0415
    except ImportError as e:
        raise HarnessError(f"evaluating with lm-eval needs EleutherAI's lm-evaluation-harness, which is not "
                           f"installed ({e}): {INSTALL_HINT}") from None
    return lm_eval


def quiet_lm_eval() -> None:
    """lm-eval's INFO/WARNING chatter (e.g. "pretrained is not a str") off unless FASTSEQ_LOG asks."""
    if not os.environ.get("FASTSEQ_LOG"):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)


# -- tasks ------------------------------------------------------------------------------------

def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def task_manager(names: Sequence[str], include_paths: Sequence[str | os.PathLike] = ()):
    """``(TaskManager, names)``: lm-eval's task index with fastseq's shipped tasks and
    ``include_paths``, and the requested names (glob patterns expanded). lm-eval's own ~15,000
    tasks are indexed (about 8 s) only when a name is not among the shipped and included ones.
    A name lm-eval does not know is a HarnessError naming the closest ones."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    paths = [str(SHIPPED_TASKS)]
    for p in include_paths:
        if not Path(p).is_dir():
            raise HarnessError(f"include path {p} is not a folder; pass a folder of lm-eval task YAML files")
        paths.append(str(p))
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise HarnessError("no lm-eval task named; name some, e.g. fastseq_medqa_mini,mmlu_anatomy")
    tm = TaskManager(include_path=paths, include_defaults=False)
    if any(_is_pattern(n) or n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=paths)
    out: list[str] = []
    for n in names:
        found = tm.match_tasks([n]) if _is_pattern(n) else ([n] if n in tm.all_tasks else [])
        if not found:
            close = difflib.get_close_matches(n, tm.all_tasks, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HarnessError(f"unknown lm-eval task {n!r}{hint}; `lm-eval ls tasks` lists lm-eval's tasks, "
                               f"fastseq ships fastseq_medqa_mini, an include path adds a folder of task YAMLs")
        out += [f for f in found if f not in out]
    return tm, out


def load_tasks(tm, names: Sequence[str]) -> list:
    """The tasks and groups ``names`` built (their documents loaded), before any model is: a task
    whose data cannot be loaded (a hub task offline) is a HarnessError."""
    built: list = []
    for n in names:
        try:
            loaded = tm.load([n])
        except Exception as e:  # datasets / hub errors come in many types
            text = " ".join(str(e).split())[:300]
            raise HarnessError(f"lm-eval could not load task {n!r}: {type(e).__name__}: {text}. Hub tasks need the "
                               f"Hugging Face hub or its cache; offline, use a local task such as fastseq_medqa_mini "
                               f"or an include path") from None
        if n in loaded["groups"]:
            built.append(loaded["groups"][n])
        elif n in loaded["tasks"]:
            built.append(loaded["tasks"][n])
        else:  # a tag: its tasks
            built += list(loaded["tasks"].values())
    return built


def parse_limit(text: str) -> int | float:
    """A command line's limit: a count of documents per task, or a fraction in (0, 1)."""
    import argparse  # noqa: PLC0415

    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = 0
    try:
        check_limit(value)
    except HarnessError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a number of documents per task such as 50, "
                                         f"or a fraction in (0, 1)") from None
    return value


def check_limit(limit: int | float | None) -> None:
    if limit is not None and not (limit >= 1 if isinstance(limit, int) else 0 < limit < 1):
        raise HarnessError(f"limit {limit}: give a number of documents per task >= 1, or a fraction in (0, 1)")


class HarnessScorer:
    """lm-eval ``tasks`` resolved and built once (every check before any model is scored);
    ``score(model, tokenizer)`` runs them on a model as it is now."""

    def __init__(self, tasks: Sequence[str], limit: int | float | None = None, num_fewshot: int | None = None,
                 batch_size: int = 8, include_paths: Sequence[str | os.PathLike] = ()):
        self.lm_eval = require_lm_eval()
        check_limit(limit)
        if batch_size < 1:
            raise HarnessError(f"batch size {batch_size}: give a batch size >= 1")
        self.tm, self.names = task_manager(tasks, include_paths)
        self.tasks = load_tasks(self.tm, self.names)
        self.limit, self.num_fewshot, self.batch_size = limit, num_fewshot, batch_size

    def score(self, model, tokenizer, log_samples: bool = False) -> dict[str, Any]:
        """lm-eval's results dict for ``model`` (in eval mode, on its device) and ``tokenizer``,
        scored by lm-eval's HFLM."""
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

        quiet_lm_eval()
        was_training = model.training
        model.eval()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            return self.lm_eval.simple_evaluate(model=lm, tasks=self.tasks, limit=self.limit,
                                                num_fewshot=self.num_fewshot, task_manager=self.tm,
                                                log_samples=log_samples)
        finally:
            model.train(was_training)


# -- results in a run folder ------------------------------------------------------------------

def results_path(run: str | os.PathLike, round: int) -> Path:
    return Path(run) / RESULTS_DIR / f"round_{round}.json"


def samples_path(run: str | os.PathLike, round: int, task: str) -> Path:
    return Path(run) / RESULTS_DIR / f"round_{round}.{task}.samples.jsonl"


def write_results(run: str | os.PathLike, round: int, res: dict[str, Any], info: dict[str, Any],
                  scorer: HarnessScorer, seconds: float) -> tuple[Path, dict[str, Any]]:
    """Write lm-eval's results ``res`` for ``round`` into ``run/harness/round_<round>.json``
    (this evaluation's tasks and groups replaced, the file's others kept) and, when ``res`` has
    them, each task's samples; atomically. ``info``: method, model, source. Returns the path and
    the record."""
    from .._atomic import atomic_write_bytes  # noqa: PLC0415

    path = results_path(run, round)
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("tasks"), dict):
            raise ValueError
    except (OSError, ValueError):
        record = {"tasks": {}}
    record.update(run=Path(run).name, round=round, method=info.get("method"), model=info.get("model"))
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    n_samples = res.get("n-samples") or {}
    for kind in ("results", "groups"):
        for task, metrics in (res.get(kind) or {}).items():
            record["tasks"][task] = {
                # lm-eval's own "metric,filter" keys (not "alias", "name", "sample_len")
                "metrics": {k: v for k, v in metrics.items() if "," in k},
                "group": kind == "groups", "requested": task in scorer.names, "source": info.get("source"),
                "limit": scorer.limit, "num_fewshot": (res.get("n-shot") or {}).get(task, scorer.num_fewshot),
                "n_samples": n_samples.get(task), "version": (res.get("versions") or {}).get(task),
                "higher_is_better": (res.get("higher_is_better") or {}).get(task),
                "lm_eval_version": scorer.lm_eval.__version__, "seconds": float(f"{seconds:.2f}"),
                "evaluated_at": when,
            }
    if res.get("samples"):
        from lm_eval.utils import handle_non_serializable  # noqa: PLC0415

        for task, samples in res["samples"].items():
            text = "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n"
                           for s in samples)
            atomic_write_bytes(samples_path(run, round, task), text.encode())
    atomic_write_bytes(path, json.dumps(record, indent=2, default=str, allow_nan=True).encode())
    return path, record


def flat_metrics(res: dict[str, Any]) -> dict[str, float]:
    """lm-eval's numbers as flat metrics-row keys: ``harness/<task>/<metric>`` (the filter
    appended when it is not ``none``), stderr left out."""
    out = {}
    for kind in ("results", "groups"):
        for task, metrics in (res.get(kind) or {}).items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if filt and "_stderr" not in metric and isinstance(value, (int, float)):
                    out[f"harness/{task}/{metric}" + ("" if filt == "none" else f",{filt}")] = float(value)
    return out


def read_results(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The harness results files of ``run``, by round (unreadable files are skipped with a warning)."""
    d = Path(run) / RESULTS_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if not RESULT_RE.fullmatch(p.name):
            continue
        try:
            rec = json.loads(p.read_text())
            if not isinstance(rec, dict) or not isinstance(rec.get("tasks"), dict):
                raise ValueError("no tasks table")
        except (OSError, ValueError) as e:
            log.warning("skipping %s: not a harness results file (%s)", p, e)
            continue
        rec["round"] = int(RESULT_RE.fullmatch(p.name).group(1))
        out.append(rec)
    return sorted(out, key=lambda r: r["round"])


def metric_rows(run: str | os.PathLike) -> list[list[str]]:
    """``HARNESS_HEADER`` rows, one per metric of each harness result of ``run`` (a metric's
    stderr in its row)."""
    rows = []
    name = Path(run).name
    for rec in read_results(run):
        for task, entry in sorted(rec["tasks"].items()):
            metrics = entry.get("metrics") or {} if isinstance(entry, dict) else {}
            n = entry.get("n_samples") if isinstance(entry, dict) else None
            count = str(n.get("effective", "")) if isinstance(n, dict) else ""
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                label = metric if filt == "none" else f"{metric} ({filt})"
                rows.append([name, str(rec["round"]), task, label, _fmt(value),
                             _fmt(stderr) if isinstance(stderr, (int, float)) else "-", count])
    return rows


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) >= 1e6 else f"{x:.4f}"  # (a random model's perplexity of whole answers)


def timed_score(scorer: HarnessScorer, model, tokenizer, log_samples: bool = False) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    res = scorer.score(model, tokenizer, log_samples=log_samples)
    return res, time.perf_counter() - t0
