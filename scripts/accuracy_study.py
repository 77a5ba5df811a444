"""Accuracy study: the SCL variants against the LoRA baselines under label skew, every choice
made on a validation split, never on the test split.

Arms (each at one trainable-parameter budget: plain SCL at rank ``--r``, ``2 f r`` per layer;
every other arm's rank is the one whose trainable count is closest to it):

* ``scl`` (residual, C trained), ``scl-frozenC`` (C frozen at a seed-derived init, never sent),
  ``scl-parallel`` (``y = Wd h + s P sigma(C h)``), ``scl-parallel-frozenC``;
* ``fedavg-lora``, ``ffa-lora`` (B only trains, so twice FedAvg-LoRA's rank), ``fedsa-lora``
  (personalised: evaluated per client with its own B) and ``fedex-lora``.

Every run holds out ``validation_fraction`` of each client's training data; its validation
score is the mean of ``val_<metric>`` over its last 3 rounds. Stages (each resumable: a run
whose directory has a ``summary.json`` with the same config is reused, an interrupted one
continues from its last checkpoint, and a finished shorter run of the same config is copied and
trained further when ``--rounds`` grows):

1. ``head``: one learning rate for the task head, shared by every arm. The head arms (default
   ``scl`` and ``ffa-lora``) run each head lr x each of a few adapter lrs on the selection seed
   at the selection alpha; the head lr with the best mean (over arms) of the best (over adapter
   lrs) validation score wins.
2. ``screen``: every arm x every adapter lr at every screening alpha (0.5 and 0.1), on the
   selection seed, briefly. Each arm takes the lr with the best mean validation score over the
   screening alphas (ties: the smaller lr); the two best SCL arms and the two best baselines by
   that score are the finalists.
3. ``final``: the finalists at their lrs, every alpha (0.1, 0.5, IID) x every reported seed
   (not the selection seed), ``--rounds`` rounds (20 by default), 3 of 5 clients per round.
   Reported per arm and alpha: the test metric's mean over each run's last 3 rounds (mean +- std
   over seeds), its best and final round, and the bytes sent; paired differences per seed against
   the best baseline at that alpha (the baseline finalist with the best validation score there),
   with a 95% t interval.
4. ``extras`` (the finalists only, fewer seeds): full participation (5 of 5 clients); server
   momentum (FedAvgM, its server lr chosen on validation) for the best SCL arm and the best
   baseline; C at a tenth of E's lr; SCL in the upper half of the layers only (rank doubled,
   same budget); FedSA-LoRA at matched bytes per round (rank doubled: it sends A only) when it
   is a finalist.

Modes: the default is the full study on MiniLM + BBC News (2,225 articles, a 30% test split of
668 examples, 10% of each client's data for validation): 182 runs, about 12 hours of run time,
6 hours of wall time on the 2-core CPU with ``--jobs 2`` (147 of them took 9.8 h of run time). ``--quick`` shrinks every size (minutes); ``--smoke`` is tiny-bert on the synthetic
task (seconds, for tests). Other tasks: ``--task chatterbot-qa --model gemma-3-270m`` (metric:
teacher-forced ROUGE-L), any image task (accuracy). ``--arms`` picks the arms to screen;
``--finalists-from-arms`` makes them the finalists (the screening then only picks their lrs).

    python scripts/accuracy_study.py --quick
    python scripts/accuracy_study.py                         # the full study, resumable
    python scripts/accuracy_study.py --until screen          # stop after the screening
    python scripts/accuracy_study.py --report-only           # the report from the runs finished so far
    python scripts/accuracy_study.py --task chatterbot-qa --model gemma-3-270m --arms scl-frozenC \\
        scl-parallel ffa-lora fedavg-lora --finalists-from-arms --until final --alphas 0.5 --tag gemma

Writes ``benchmarks/results/study_<task>[_tag].{csv,json,md}`` and ``_rounds.png`` (test metric
per round), ``_paired.png`` (paired differences with 95% intervals), ``_bytes.png`` (metric
against cumulative bytes). Run directories go to ``runs/study/<task>[_tag]/`` (git-ignored).
Runs execute through ``fastseq run`` (``--jobs`` processes, one torch thread each when there
are several) or in this process (``--jobs 1``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance, write_results  # noqa: E402

# The budget's layer: plain SCL (the paper's residual layer, C trained). Every arm pins both
# variant fields: SCLConfig's defaults are the study's winner and may change again.
PLAIN_SCL = dict(scl_placement="residual", scl_train_compress=True)
ARMS: dict[str, dict] = {
    "scl": dict(method="scl", **PLAIN_SCL),
    "scl-frozenC": dict(method="scl", scl_placement="residual", scl_train_compress=False),
    "scl-parallel": dict(method="scl", scl_placement="parallel", scl_train_compress=True),
    "scl-parallel-frozenC": dict(method="scl", scl_placement="parallel", scl_train_compress=False),
    "fedavg-lora": dict(method="fedavg-lora"),
    "ffa-lora": dict(method="ffa-lora"),
    "fedsa-lora": dict(method="fedsa-lora"),
    "fedex-lora": dict(method="fedex-lora"),
}
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "rougeL_tf", "rougeL_gen", "bleu_tf", "bleu_gen")
STAGES = ("head", "screen", "final", "extras")
LAST = 3  # a run's score: the mean of its last LAST rounds
FLAT_WINDOW, FLAT_TOL = 5, 0.02  # "converged": the validation metric moved less than FLAT_TOL over FLAT_WINDOW rounds


def is_scl(arm: str) -> bool:
    return ARMS[arm]["method"] == "scl"


def parse_alpha(s: str):
    return "iid" if str(s).lower() == "iid" else float(s)


# ----------------------------------------------------------------------------- protocol sizes
def presets(a) -> dict:
    common = dict(model="all-MiniLM-L6-v2", task="bbc-news", task_options={"test_fraction": 0.3}, max_examples=None,
                  eval_examples=None, max_length=64, batch_size=8, local_steps=10, clients=5, clients_per_round=3,
                  r=8, validation_fraction=0.1, selection_seed=0, select_alpha=0.5, arms=list(ARMS),
                  head_arms=["scl", "ffa-lora"], codecs=["none"], n_scl=2, n_base=2)
    if a.smoke:
        p = dict(common, model="tiny-bert", task="synthetic", task_options={}, max_examples=160, eval_examples=32,
                 max_length=32, batch_size=4, local_steps=2, clients=3, clients_per_round=2, r=4,
                 validation_fraction=0.2, arms=["scl", "scl-frozenC", "fedavg-lora", "ffa-lora"],
                 head_lrs=[3e-3, 3e-2], head_arm_lrs=[1e-2], lrs=[3e-3, 3e-2], screen_alphas=[0.5],
                 screen_rounds=2, alphas=[0.5, "iid"], seeds=[1, 2], rounds=3, extra_seeds=[1], extra_alphas=[0.5],
                 n_scl=1, n_base=1, test_every=1, momentum_lrs=[1.0])
    elif a.quick:
        p = dict(common, max_examples=900, head_lrs=[1e-2], head_arm_lrs=[1e-2], lrs=[3e-3, 1e-2],
                 screen_alphas=[0.5], screen_rounds=3, alphas=[0.5], seeds=[1], rounds=4, extra_seeds=[1],
                 extra_alphas=[0.5], test_every=2, momentum_lrs=[1.0])
    else:
        p = dict(common, head_lrs=[3e-3, 1e-2, 3e-2], head_arm_lrs=[3e-3, 1e-2], lrs=[1e-3, 3e-3, 1e-2, 3e-2],
                 screen_alphas=[0.5, 0.1], screen_rounds=12, alphas=[0.1, 0.5, "iid"], seeds=[1, 2, 3, 4, 5],
                 rounds=20, extra_seeds=[1, 2, 3], extra_alphas=[0.1, 0.5], test_every=5, momentum_lrs=[0.3, 1.0])
    if getattr(a, "task", None) not in (None, "bbc-news"):
        p["task_options"] = {}  # the 30% test split is BBC News's; other tasks keep their own
    for k in list(p) + ["data_path"]:  # explicit flags win
        v = getattr(a, k, None)
        if v is not None:
            p[k] = v
    p["screen_eval_examples"] = 32  # screening never reads the test split: score only a token slice of it
    return p


# ----------------------------------------------------------------------------- runs
@dataclass
class Spec:
    """One run: which arm, where, and its ExperimentConfig."""

    stage: str
    arm: str
    alpha: object
    seed: int
    lr: float
    head_lr: float | None
    cfg: dict
    tag: str
    variant: str = "main"  # extras: full-participation, fedavgm, compress-lr, upper-layers, matched-bytes


@dataclass
class Run:
    spec: Spec
    history: list[dict] = field(default_factory=list)
    method_info: dict = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None


def ffn_shape(p: dict) -> tuple[int, int, int, bool]:
    """(d_model, d_ffn, number of FFN layers, whether the task has a trainable head)."""
    from fastseq.adapters import find_ffn_sites
    from fastseq.fed.experiment import make_task
    from fastseq.fed.experiment import ExperimentConfig
    from fastseq.models import load_model

    cfg = ExperimentConfig(model=p["model"], task=p["task"], task_options=dict(p["task_options"]))
    task = make_task(cfg)
    model, _ = load_model(p["model"], task.model_kind, num_labels=2 if task.model_kind != "causal-lm" else None)
    sites = [s for s in find_ffn_sites(model) if s.layer is not None]
    return sites[0].d_model, sites[0].d_ffn, len(sites), bool(task.head_modules_for(model))


def plain_scl_budget(p: dict, d: int, f: int) -> int:
    """The study's budget per layer: plain SCL (residual, C trained) at rank p['r'], 2 f r."""
    from fastseq.config import SCLConfig

    plain = SCLConfig(r=p["r"], placement=PLAIN_SCL["scl_placement"], train_compress=PLAIN_SCL["scl_train_compress"])
    return plain.adapter_params_per_layer(d, f)


def arm_overrides(arm: str, p: dict, shape) -> dict:
    """ExperimentConfig fields of an arm at the study's budget (plain SCL at rank p['r'])."""
    from fastseq.fed.methods import scl_rank_for_budget

    d, f = shape[:2]
    o = dict(ARMS[arm])
    if is_scl(arm):
        budget = plain_scl_budget(p, d, f)
        o["r"] = scl_rank_for_budget(budget, d, f, o.get("scl_placement", "residual"), o.get("scl_train_compress", True))
    else:  # the runtime matches the LoRA rank to plain SCL at this rank (pinned: never a changed default)
        o.update(r=p["r"], **PLAIN_SCL)
    return o


def make_spec(p: dict, shape, stage: str, arm: str, alpha, seed: int, lr: float, head_lr, rounds: int,
              runs_dir: Path, device: str, variant: str = "main", **extra) -> Spec:
    from fastseq.fed.experiment import ExperimentConfig

    screening = stage in ("head", "screen") or variant == "select"
    cfg = dict(model=p["model"], task=p["task"], data_path=p.get("data_path"), task_options=dict(p["task_options"]),
               max_examples=p["max_examples"], eval_examples=p["screen_eval_examples"] if screening else p["eval_examples"],
               max_length=p["max_length"], rounds=rounds, clients=p["clients"], clients_per_round=p["clients_per_round"],
               local_steps=p["local_steps"], lr=lr, head_lr=head_lr, batch_size=p["batch_size"],
               partition="iid" if alpha == "iid" else "dirichlet", alpha=0.5 if alpha == "iid" else float(alpha),
               seed=seed, validation_fraction=p["validation_fraction"], test_every=rounds if screening else p["test_every"],
               device=device, progress=False)
    cfg.update(arm_overrides(arm, p, shape))
    cfg.update(extra)
    tag = (f"{arm}_a{alpha}_s{seed}_lr{lr:g}_h{head_lr:g}_R{rounds}" if head_lr is not None
           else f"{arm}_a{alpha}_s{seed}_lr{lr:g}_R{rounds}")
    if variant != "main":
        tag += f"_{variant}"
    if extra.get("codec", "none") != "none":
        tag += f"_{extra['codec']}"
    cfg["out"] = str(runs_dir / tag)
    ExperimentConfig.from_dict(cfg)  # fail here, not in a worker, on a bad value
    return Spec(stage, arm, alpha, seed, lr, head_lr, cfg, tag, variant)


def _same_config(out: Path, cfg: dict, ignore: tuple[str, ...] = ()) -> bool:
    if not (out / "config.json").is_file():
        return False
    old = json.loads((out / "config.json").read_text())
    return all(old.get(k) == v for k, v in cfg.items() if k not in ignore)


def _finished(spec: Spec) -> bool:
    out = Path(spec.cfg["out"])
    if not (out / "summary.json").is_file() or not _same_config(out, spec.cfg):
        return False
    rounds = json.loads((out / "summary.json").read_text()).get("rounds")
    return rounds in (None, spec.cfg["rounds"])  # not the summary of a shorter run being trained further


def _resumable(spec: Spec) -> bool:
    """An interrupted run of this spec (the library's resume rule: the same config, a complete
    checkpoint): continued from that round, not started again (resume is bit-exact)."""
    from fastseq.config import ConfigError
    from fastseq.fed.engine import check_resume
    from fastseq.fed.experiment import ExperimentConfig

    out = Path(spec.cfg["out"])
    if not (out / "config.json").is_file():
        return False
    try:
        check_resume(ExperimentConfig.from_dict(dict(spec.cfg)), out)
    except ConfigError:
        return False
    return True


def _shorter_run(spec: Spec) -> Path | None:
    """A finished run of this spec's config with fewer rounds (its directory differs only in
    ``_R<rounds>``): the longest one, to be trained further instead of from the start. Training
    a finished run further equals a run of the longer length (tests/test_fed_engine.py), except
    that its rows at the shorter run's last rounds also carry test scores."""
    out, rounds = Path(spec.cfg["out"]), spec.cfg["rounds"]
    pattern = re.compile(re.escape(spec.tag).replace(f"_R{rounds}", r"_R(\d+)", 1) + "$")
    found = []
    for d in out.parent.glob("*") if out.parent.is_dir() else []:
        m = pattern.fullmatch(d.name)
        if (m and int(m.group(1)) < rounds and (d / "summary.json").is_file()
                and _same_config(d, spec.cfg, ignore=("rounds", "out"))):
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def _load(spec: Spec) -> Run:
    out = Path(spec.cfg["out"])
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    info = json.loads((out / "config.json").read_text()).get("method_info", {})
    return Run(spec, hist, info, summary.get("seconds"))


def _run_here(spec: Spec, resume: bool) -> None:
    from fastseq.engines import run
    from fastseq.fed.experiment import ExperimentConfig

    run(ExperimentConfig.from_dict(dict(spec.cfg)), resume=resume, echo=lambda *_: None)


def _run_subprocess(spec: Spec, threads: int, resume: bool) -> None:
    """``fastseq run --config <json>`` with ``threads`` torch threads (2 runs sharing 2 cores with
    2 threads each ran ~6x slower than with 1 each)."""
    out = Path(spec.cfg["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    conf = out.parent / f".{spec.tag}.config.json"
    conf.write_text(json.dumps(spec.cfg))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    log = out.parent / f".{spec.tag}.log"
    with open(log, "w") as fh:
        # --workers 1: the jobs share the cores already (results are bit-identical either way)
        cmd = [sys.executable, "-m", "fastseq.cli", "run", "--config", str(conf), "--workers", "1"] + \
            (["--resume", str(out)] if resume else [])
        rc = subprocess.run(cmd, env=env,
                            stdout=fh, stderr=subprocess.STDOUT)
    if rc.returncode != 0:
        raise RuntimeError(f"fastseq run exited {rc.returncode}; log: {log}")
    conf.unlink(missing_ok=True)


NOT_RUN = "not run (--report-only)"


def execute(specs: list[Spec], jobs: int, desc: str) -> list[Run]:
    """Run every spec not finished yet (``jobs`` at a time), then load them all. A failing run is
    reported and left out; rerunning the study retries it. ``jobs=0`` runs nothing (--report-only):
    the unfinished runs are left out as "not run"."""
    todo = [s for s in specs if not _finished(s)] if jobs else []
    errors: dict[str, str] = {}
    if todo:
        threads = 1 if jobs > 1 else max(1, torch.get_num_threads())
        bar = tqdm(total=len(todo), desc=f"{desc} ({len(specs) - len(todo)} reused)", unit="run")

        def one(spec: Spec):
            t0 = time.time()
            out = Path(spec.cfg["out"])
            resume = _resumable(spec)
            if resume:
                tqdm.write(f"  resuming {out}")
            elif out.exists():  # a run of an older config, or interrupted before its first checkpoint
                tqdm.write(f"  replacing {out} (another config, or no complete round)")
                shutil.rmtree(out)
            try:
                if not resume and (shorter := _shorter_run(spec)) is not None:  # the same run, shorter
                    tqdm.write(f"  extending a copy of {shorter} to {spec.cfg['rounds']} rounds")
                    partial = out.with_name(f".{out.name}.copying")  # renamed only once complete
                    shutil.rmtree(partial, ignore_errors=True)
                    shutil.copytree(shorter, partial, ignore=shutil.ignore_patterns("summary.json"))
                    partial.rename(out)
                    resume = True
                _run_here(spec, resume) if jobs == 1 else _run_subprocess(spec, threads, resume)
            except Exception as e:  # keep the study going; the report lists the failure
                errors[spec.tag] = f"{type(e).__name__}: {e}"
            bar.set_postfix_str(f"{spec.tag} {time.time() - t0:.0f}s")
            bar.update(1)

        if jobs == 1:
            for s in todo:
                one(s)
        else:
            with ThreadPoolExecutor(jobs) as pool:  # threads only wait on the subprocesses
                list(pool.map(one, todo))
        bar.close()
    runs = []
    for s in specs:
        if s.tag in errors or not _finished(s):
            runs.append(Run(s, error=errors.get(s.tag, "not finished" if jobs else NOT_RUN)))
            if jobs:
                print(f"  FAILED {s.tag}: {runs[-1].error}", flush=True)
        else:
            runs.append(_load(s))
    return runs


# ----------------------------------------------------------------------------- scores
def better(metric: str, a, b) -> bool:
    """Is a strictly better than b (None is worst)?"""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return False
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return True
    return a > b if metric in HIGHER_IS_BETTER else a < b


def metric_of(history: list[dict]) -> str:
    for k in HIGHER_IS_BETTER:
        if any(isinstance(h.get(k), (int, float)) for h in history):
            return k
    return "eval_loss"


def metric_of_runs(runs: list[Run]) -> str:
    """The metric of the first finished run; a stage with none finished stops the study."""
    hist = next((r.history for r in runs if r.history), None)
    if hist is None:
        out = Path(runs[0].spec.cfg["out"]).parent if runs else "the runs folder"
        raise SystemExit(f"no finished run in {out} for this stage: run it without --report-only, or point "
                         f"--runs-dir at the folder the study ran in")
    return metric_of(hist)


def _mean_last(history: list[dict], key: str, n: int = LAST):
    vals = [h.get(key) for h in history[-n:]]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(vals) if len(vals) == n else None


def val_score(run: Run, metric: str):
    """Model selection reads only this: the validation metric over the run's last rounds."""
    return _mean_last(run.history, f"val_{metric}") if run.history else None


def test_scores(run: Run, metric: str) -> dict:
    """Reported, never used to choose: last-3 mean, best round and final round of the test metric.
    "Best" reads only the rounds the run's own schedule tests (an extended run also carries test
    scores at its shorter run's last rounds)."""
    from fastseq.fed.experiment import ExperimentConfig, is_test_round

    cfg = ExperimentConfig.from_dict(dict(run.spec.cfg)) if run.spec.cfg else None  # None: every tested round
    tested = [(h["round"], h[metric]) for h in run.history if h["round"] > 0 and isinstance(h.get(metric), (int, float))
              and (cfg is None or is_test_round(cfg, h["round"]))]
    pick = max if metric in HIGHER_IS_BETTER else min
    return dict(last3=_mean_last(run.history, metric), best=pick(v for _, v in tested) if tested else None,
                final=run.history[-1].get(metric) if run.history else None)


def converged(run: Run, metric: str) -> bool:
    vals = [h.get(f"val_{metric}") for h in run.history[-FLAT_WINDOW:]]
    return len(vals) == FLAT_WINDOW and all(isinstance(v, (int, float)) for v in vals) and max(vals) - min(vals) <= FLAT_TOL


def run_bytes(run: Run) -> dict:
    up = sum(h.get("uplink_bytes") or 0 for h in run.history)
    down = sum((h.get("downlink_bytes") or 0) + (h.get("eval_downlink_bytes") or 0) for h in run.history)
    trained = [h for h in run.history if h["round"] > 0]
    per = [((h.get("uplink_bytes") or 0) + (h.get("downlink_bytes") or 0)) / max(1, len(h.get("clients") or []))
           for h in trained]
    return dict(total_bytes=up + down, uplink_bytes=up, round_bytes_per_client=statistics.fmean(per) if per else 0)


def _pick_lr(cands: dict[float, float | None], metric: str) -> tuple[float, float | None]:
    """The best-scoring lr (ties: the smaller lr)."""
    best = None
    for lr in sorted(cands):
        if best is None or better(metric, cands[lr], best[1]):
            best = (lr, cands[lr])
    return best


def choose_head_lr(runs: list[Run], metric: str) -> tuple[float, dict]:
    """Head lr with the best mean over arms of each arm's best validation score over adapter lrs."""
    table: dict[float, dict[str, dict[float, float | None]]] = {}
    for r in runs:
        table.setdefault(r.spec.head_lr, {}).setdefault(r.spec.arm, {})[r.spec.lr] = val_score(r, metric)
    means = {}
    for h, arms in table.items():
        bests = [_pick_lr(lrs, metric)[1] for lrs in arms.values()]
        means[h] = statistics.fmean(bests) if bests and all(b is not None for b in bests) else None
    return _pick_lr(means, metric)[0], means


def choose_lrs(runs: list[Run], metric: str) -> dict[str, tuple[float, float | None]]:
    """Per arm: the lr with the best mean validation score over the screening alphas."""
    per: dict[str, dict[float, list]] = {}
    for r in runs:
        per.setdefault(r.spec.arm, {}).setdefault(r.spec.lr, []).append(val_score(r, metric))
    out = {}
    for arm, lrs in per.items():
        means = {lr: (statistics.fmean(v) if all(x is not None for x in v) else None) for lr, v in lrs.items()}
        out[arm] = _pick_lr(means, metric)
    return out


def choose_finalists(scores: dict[str, tuple[float, float | None]], metric: str, n_scl: int, n_base: int) -> list[str]:
    def top(arms, n):
        ranked = sorted(arms, key=lambda a: (scores[a][1] is None, -(scores[a][1] or 0) if metric in HIGHER_IS_BETTER
                                             else (scores[a][1] or 0)))
        return ranked[:n]
    return top([a for a in scores if is_scl(a)], n_scl) + top([a for a in scores if not is_scl(a)], n_base)


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% Student-t interval of the mean."""
    from scipy import stats

    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


# ----------------------------------------------------------------------------- the study
def study(a) -> dict:
    p = presets(a)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    jobs = 0 if a.report_only else a.jobs or (2 if device == "cpu" and (os.cpu_count() or 1) >= 2 and not a.smoke else 1)
    suffix = "_smoke" if a.smoke else "_quick" if a.quick else ""
    name = p["task"] + (f"_{a.tag}" if a.tag else suffix)
    runs_dir = Path(a.runs_dir or ROOT / "runs" / "study" / name)
    out_dir = Path(a.out_dir or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = list(STAGES[:STAGES.index(a.until) + 1])
    shape = ffn_shape(p)
    t0, c0 = time.time(), time.process_time()
    print(f"study {name}: {p['model']} on {p['task']}, arms {p['arms']}, budget = plain SCL r={p['r']} "
          f"(d {shape[0]}, f {shape[1]}, {shape[2]} layers), {jobs} job(s), stages {stages}", flush=True)
    mk = lambda *args, **kw: make_spec(p, shape, *args, runs_dir=runs_dir, device=device, **kw)  # noqa: E731
    doc: dict = dict(protocol={k: v for k, v in p.items()}, shape=dict(d=shape[0], f=shape[1], layers=shape[2]))
    metric = a.metric
    all_runs: list[Run] = []

    # 1. head lr
    head_lr = a.head_lr
    if not shape[3]:  # a causal LM: no task head, nothing to choose
        head_lr = None
    elif head_lr is None and len(p["head_lrs"]) > 1:
        specs = [mk("head", arm, p["select_alpha"], p["selection_seed"], lr, h, p["screen_rounds"])
                 for arm in p["head_arms"] for lr in p["head_arm_lrs"] for h in p["head_lrs"]]
        runs = execute(specs, jobs, "head lr")
        all_runs += runs
        metric = metric or metric_of_runs(runs)
        head_lr, means = choose_head_lr([r for r in runs if r.history], metric)
        doc["head"] = dict(chosen=head_lr, mean_best_val=means,
                           runs=[dict(arm=r.spec.arm, lr=r.spec.lr, head_lr=r.spec.head_lr, val=val_score(r, metric))
                                 for r in runs])
        print(f"head lr {head_lr:g} (mean best validation {metric} per head lr: "
              + ", ".join(f"{h:g}: {v:.4f}" if v is not None else f"{h:g}: -" for h, v in means.items()) + ")", flush=True)
    elif head_lr is None:  # nothing to select
        head_lr = p["head_lrs"][0]
    doc["head_lr"] = head_lr

    # 2. screening
    arms = list(p["arms"])
    pick_finalists = not a.finalists_from_arms and len(arms) > p["n_scl"] + p["n_base"]
    chosen: dict[str, tuple[float, float | None]] = {}
    if "screen" in stages and (len(p["lrs"]) > 1 or pick_finalists):
        specs = [mk("screen", arm, al, p["selection_seed"], lr, head_lr, p["screen_rounds"])
                 for arm in arms for lr in p["lrs"] for al in p["screen_alphas"]]
        runs = execute(specs, jobs, "screening")
        all_runs += runs
        metric = metric or metric_of_runs(runs)
        chosen = choose_lrs([r for r in runs if r.history], metric)
        finalists = choose_finalists(chosen, metric, p["n_scl"], p["n_base"]) if pick_finalists else arms
        doc["screen"] = dict(chosen={k: dict(lr=v[0], val=v[1]) for k, v in chosen.items()}, finalists=finalists,
                             runs=[dict(arm=r.spec.arm, lr=r.spec.lr, alpha=r.spec.alpha, val=val_score(r, metric),
                                        converged=converged(r, metric) if r.history else None, error=r.error)
                                   for r in runs])
        print("screening: " + "; ".join(f"{k} lr {v[0]:g} val {v[1]:.4f}" if v[1] is not None else f"{k} -"
                                        for k, v in chosen.items()) + f"; finalists {finalists}", flush=True)
    else:  # nothing to screen: every arm at the single lr
        finalists = arms
        chosen = {arm: (p["lrs"][0], None) for arm in arms}
    doc["finalists"] = finalists
    doc["lrs"] = {k: v[0] for k, v in chosen.items()}

    # 3. converged comparison
    final_runs: list[Run] = []
    if "final" in stages:
        specs = [mk("final", arm, al, s, chosen[arm][0], head_lr, p["rounds"], codec=c, downlink_codec=c)
                 for arm in finalists for c in p["codecs"] for al in p["alphas"] for s in p["seeds"]]
        final_runs = execute(specs, jobs, "final")
        all_runs += final_runs
        metric = metric or metric_of_runs(final_runs)

    # 4. extras
    extra_runs: list[Run] = []
    if "extras" in stages and final_runs:
        best_scl = next((f for f in finalists if is_scl(f)), None)
        best_base = best_baseline_overall(final_runs, metric, finalists)
        ex = []
        ex_grid = [(al, s) for al in p["extra_alphas"] for s in p["extra_seeds"]]
        for arm in finalists:  # full participation
            ex += [mk("extras", arm, al, s, chosen[arm][0], head_lr, p["rounds"], variant="full-participation",
                      clients_per_round=p["clients"]) for al, s in ex_grid]
        momentum = [x for x in (best_scl, best_base) if x]
        sel = [mk("extras", arm, p["select_alpha"], p["selection_seed"], chosen[arm][0], head_lr, p["screen_rounds"],
                  variant=f"select-fedavgm{slr:g}", server_opt="fedavgm", server_lr=slr)
               for arm in momentum for slr in p["momentum_lrs"]]
        sel_runs = execute(sel, jobs, "fedavgm server lr")
        extra_runs += sel_runs
        server_lrs = {}
        for arm in momentum:
            cands = {r.spec.cfg["server_lr"]: val_score(r, metric) for r in sel_runs if r.spec.arm == arm and r.history}
            server_lrs[arm] = _pick_lr(cands, metric)[0] if cands else p["momentum_lrs"][0]
            ex += [mk("extras", arm, al, s, chosen[arm][0], head_lr, p["rounds"], variant="fedavgm",
                      server_opt="fedavgm", server_lr=server_lrs[arm]) for al, s in ex_grid]
        doc["fedavgm_server_lr"] = server_lrs
        c_arm = next((f for f in finalists if is_scl(f) and ARMS[f].get("scl_train_compress", True)), None)
        if c_arm:
            ex += [mk("extras", c_arm, al, s, chosen[c_arm][0], head_lr, p["rounds"], variant="compress-lr",
                      scl_compress_lr=chosen[c_arm][0] / 10) for al, s in ex_grid]
        if best_scl and shape[2] > 1:
            upper = list(range(shape[2] // 2, shape[2]))
            r2 = arm_overrides(best_scl, p, shape)["r"] * 2
            ex += [mk("extras", best_scl, al, s, chosen[best_scl][0], head_lr, p["rounds"], variant="upper-layers",
                      scl_layers=upper, r=r2) for al, s in ex_grid]
        if "fedsa-lora" in finalists:  # FedSA-LoRA sends A only: double its rank to send the budget's bytes
            from fastseq.fed.methods import matched_lora_rank

            d, f = shape[:2]
            r_sa = 2 * matched_lora_rank(plain_scl_budget(p, d, f), d, f)
            ex += [mk("extras", "fedsa-lora", al, s, chosen["fedsa-lora"][0], head_lr, p["rounds"],
                      variant="matched-bytes", lora_r=r_sa) for al, s in ex_grid]
        extra_runs += execute(ex, jobs, "extras")
        all_runs += extra_runs

    metric = metric or "accuracy"
    meta = dict(task=p["task"], model=p["model"], **provenance(device), wall_s=time.time() - t0,
                cpu_s=time.process_time() - c0, jobs=jobs, metric=metric, mode=suffix.strip("_") or "full", tag=a.tag,
                runs=len(all_runs), failed=[r.spec.tag for r in all_runs if r.error and r.error != NOT_RUN],
                not_run=[r.spec.tag for r in all_runs if r.error == NOT_RUN],
                runs_seconds_total=sum(r.seconds or 0 for r in all_runs),
                note="wall_s/cpu_s cover this invocation; runs_seconds_total sums each run's own wall seconds "
                     "(reused runs included)")
    doc["meta"] = meta
    rows, paired, curves = report(final_runs, extra_runs, metric, finalists, p)
    doc.update(paired=paired, curves=curves)
    stem = out_dir / f"study_{name}"
    write_results(stem, rows, **doc)
    Path(f"{stem}.md").write_text(markdown(doc, rows, metric))
    if rows:
        plot(doc, rows, metric, stem)
    print(f"wrote {stem}.csv/.json/.md ({meta['wall_s']:.0f} s)", flush=True)
    return dict(doc, rows=rows)


def best_baseline_overall(runs: list[Run], metric: str, finalists: list[str]) -> str | None:
    """The baseline finalist with the best mean validation score over every final run."""
    scores = {}
    for arm in (f for f in finalists if not is_scl(f)):
        v = [val_score(r, metric) for r in runs if r.spec.arm == arm and r.history]
        v = [x for x in v if x is not None]
        scores[arm] = statistics.fmean(v) if v else None
    return _pick_lr(scores, metric)[0] if scores else None  # _pick_lr works on any key


def best_baseline_at(runs: list[Run], metric: str, alpha) -> str | None:
    scores = {}
    for r in runs:
        if r.spec.alpha == alpha and not is_scl(r.spec.arm) and r.history and r.spec.cfg.get("codec", "none") == "none":
            scores.setdefault(r.spec.arm, []).append(val_score(r, metric))
    means = {k: statistics.fmean(v) for k, v in scores.items() if v and all(x is not None for x in v)}
    best = None
    for k, v in sorted(means.items()):
        if best is None or better(metric, v, best[1]):
            best = (k, v)
    return best[0] if best else None


def report(final_runs: list[Run], extra_runs: list[Run], metric: str, finalists: list[str], p: dict):
    """Rows (one per arm x variant x codec x alpha), paired differences, mean curves."""
    rows, paired, curves = [], [], []
    groups: dict[tuple, list[Run]] = {}
    for r in final_runs + [r for r in extra_runs if not r.spec.variant.startswith("select")]:
        if r.history:
            key = (r.spec.arm, r.spec.variant, r.spec.cfg.get("codec", "none"), r.spec.alpha)
            groups.setdefault(key, []).append(r)
    for (arm, variant, codec, alpha), runs in groups.items():
        runs.sort(key=lambda r: r.spec.seed)
        sc = [test_scores(r, metric) for r in runs]
        by = [run_bytes(r) for r in runs]
        info = runs[0].method_info

        def ms(key, sc=sc):
            xs = [s[key] for s in sc if s[key] is not None]
            return (statistics.fmean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else 0.0)

        l3, b, fi = ms("last3"), ms("best"), ms("final")
        rows.append(dict(arm=arm, variant=variant, codec=codec, alpha=alpha, lr=runs[0].spec.lr,
                         head_lr=runs[0].spec.head_lr, seeds=[r.spec.seed for r in runs], n=len(runs), metric=metric,
                         last3_mean=l3[0], last3_std=l3[1], best_mean=b[0], best_std=b[1], final_mean=fi[0],
                         final_std=fi[1], val_last3_mean=statistics.fmean(
                             [v for v in (val_score(r, metric) for r in runs) if v is not None] or [float("nan")]),
                         converged=sum(converged(r, metric) for r in runs), rounds=runs[0].spec.cfg["rounds"],
                         clients_per_round=runs[0].spec.cfg["clients_per_round"],
                         round_bytes_per_client=statistics.fmean(x["round_bytes_per_client"] for x in by),
                         total_bytes_mean=statistics.fmean(x["total_bytes"] for x in by),
                         trainable_params=info.get("adapter_trainable_params"), shared_params=info.get("shared_params"),
                         head_params=info.get("head_params"), scl_r=info.get("scl_r"), lora_r=info.get("lora_r"),
                         personalized_eval=arm == "fedsa-lora", seconds_mean=statistics.fmean(r.seconds or 0 for r in runs)))
        n_tested = min(len([h for h in r.history if isinstance(h.get(metric), (int, float))]) for r in runs)
        pts = [[(h["round"], h[metric], c) for h, c in zip(r.history, _cum_bytes(r.history))
                if isinstance(h.get(metric), (int, float))][:n_tested] for r in runs]
        curves.append(dict(method=arm, arm=arm, variant=variant, codec=codec, alpha=alpha, metric=metric,
                           rounds=[x[0] for x in pts[0]],
                           accuracy_mean=[statistics.fmean(pt[i][1] for pt in pts) for i in range(n_tested)],
                           accuracy_std=[statistics.stdev([pt[i][1] for pt in pts]) if len(pts) > 1 else 0.0
                                         for i in range(n_tested)],
                           cumulative_bytes_mean=[statistics.fmean(pt[i][2] for pt in pts) for i in range(n_tested)]))
    # paired differences (per seed) against the best baseline at each alpha, main variant, uncompressed
    for alpha in dict.fromkeys(r.spec.alpha for r in final_runs):
        base = best_baseline_at(final_runs, metric, alpha)
        if base is None:
            continue
        ref = {r.spec.seed: test_scores(r, metric)["last3"] for r in final_runs
               if r.spec.arm == base and r.spec.alpha == alpha and r.history and r.spec.cfg.get("codec", "none") == "none"}
        for arm in finalists:
            if arm == base:
                continue
            mine = {r.spec.seed: test_scores(r, metric)["last3"] for r in final_runs
                    if r.spec.arm == arm and r.spec.alpha == alpha and r.history and r.spec.cfg.get("codec", "none") == "none"}
            seeds = sorted(s for s in mine if s in ref and mine[s] is not None and ref[s] is not None)
            if not seeds:
                continue
            diffs = [mine[s] - ref[s] for s in seeds]
            m, lo, hi = t_interval(diffs)
            paired.append(dict(arm=arm, baseline=base, alpha=alpha, seeds=seeds, diffs=diffs, mean=m, ci_low=lo,
                               ci_high=hi, metric=metric))
    # extras against the same arm's main runs on the same seeds
    for r in [r for r in rows if r["variant"] != "main"]:
        main = {x.spec.seed: test_scores(x, metric)["last3"] for x in final_runs
                if x.spec.arm == r["arm"] and x.spec.alpha == r["alpha"] and x.history}
        mine = {x.spec.seed: test_scores(x, metric)["last3"] for x in extra_runs
                if x.spec.arm == r["arm"] and x.spec.alpha == r["alpha"] and x.spec.variant == r["variant"] and x.history}
        seeds = sorted(s for s in mine if s in main and mine[s] is not None and main[s] is not None)
        if seeds:
            m, lo, hi = t_interval([mine[s] - main[s] for s in seeds])
            r.update(vs_main_mean=m, vs_main_ci_low=lo, vs_main_ci_high=hi)
    return rows, paired, curves


def _cum_bytes(history):
    total, out = 0, []
    for h in history:
        total += (h.get("uplink_bytes") or 0) + (h.get("downlink_bytes") or 0) + (h.get("eval_downlink_bytes") or 0)
        out.append(total)
    return out


def _fmt(m, s=None, nd=3):
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:.{nd}f}" + (f" +- {s:.{nd}f}" if s is not None else "")


def markdown(doc: dict, rows: list[dict], metric: str) -> str:
    meta, p = doc["meta"], doc["protocol"]
    L = [f"# Study {meta['task']} / {meta['model']} ({meta['mode']})", "",
         f"Commit {meta['git_commit']}, {meta['device_name']}; {meta['runs']} runs "
         f"({meta['runs_seconds_total'] / 3600:.1f} h of run time, {meta['jobs']} at a time). Budget: plain SCL "
         f"r={p['r']} (d {doc['shape']['d']}, f {doc['shape']['f']}, {doc['shape']['layers']} layers); every arm's rank "
         f"matches its trainable count. {p['clients']} clients, {p['local_steps']} local steps x batch "
         f"{p['batch_size']}, {p['max_length']} tokens; {p['validation_fraction']:.0%} of each client's data held out "
         f"for validation. Every choice below reads only validation scores (mean of the last {LAST} rounds' "
         f"val_{metric}); the test split is only reported.", ""]
    if doc.get("head_lr") is None:
        L += ["No task head (a causal LM): no head lr to choose.", ""]
    elif "head" in doc:
        L += [f"**Head lr** (shared by every arm): {doc['head_lr']:g}; mean over arms of the best validation "
              f"{metric}: " + ", ".join(f"{h:g} -> {_fmt(v)}" for h, v in doc["head"]["mean_best_val"].items()), ""]
    if "screen" in doc:
        sc = doc["screen"]
        alphas = list(dict.fromkeys(str(r["alpha"]) for r in sc["runs"]))
        lrs = sorted({r["lr"] for r in sc["runs"]})
        L += [f"**Screening** ({p['screen_rounds']} rounds, selection seed {p['selection_seed']}): validation {metric} "
              f"per lr, alpha " + "/".join(alphas) + "; chosen lr in bold; finalists: " + ", ".join(sc["finalists"]), "",
              "| arm | " + " | ".join(f"lr {x:g}" for x in lrs) + " | chosen (mean val) |",
              "|---|" + "---|" * (len(lrs) + 1)]
        for arm, ch in sc["chosen"].items():
            cells = []
            for lr in lrs:
                v = [r["val"] for r in sc["runs"] if r["arm"] == arm and r["lr"] == lr]
                txt = " / ".join(_fmt(x) for x in v)
                cells.append(f"**{txt}**" if lr == ch["lr"] else txt)
            L.append(f"| {arm} | " + " | ".join(cells) + f" | {ch['lr']:g} ({_fmt(ch['val'])}) |")
        L.append("")
    main = [r for r in rows if r["variant"] == "main" and r["codec"] == "none"]
    if main:
        alphas = list(dict.fromkeys(str(r["alpha"]) for r in main))
        L += [f"**Final comparison** (matched trainable count; {p['rounds']} rounds, {p['clients_per_round']} of "
              f"{p['clients']} clients per round, seeds {p['seeds']}): test {metric}, mean of each run's last {LAST} "
              "rounds, mean +- std over seeds [best round / final round]; adapter parameters trained, parameters "
              "sent (the head included); bytes per round per client (up + down).", "",
              "| arm | lr | adapter trained | sent | " + " | ".join(f"alpha={x}" for x in alphas)
              + " | KB/round/client |",
              "|---|---|---|---|" + "---|" * len(alphas) + "---|"]
        for arm in dict.fromkeys(r["arm"] for r in main):
            rs = {str(r["alpha"]): r for r in main if r["arm"] == arm}
            r0 = next(iter(rs.values()))
            cells = [f"{_fmt(rs[x]['last3_mean'], rs[x]['last3_std'])} [{_fmt(rs[x]['best_mean'])} / "
                     f"{_fmt(rs[x]['final_mean'])}]" if x in rs else "-" for x in alphas]
            name = arm + (" (personalised eval)" if r0["personalized_eval"] else "")
            L.append(f"| {name} | {r0['lr']:g} | {r0['trainable_params']:,} | {r0['shared_params']:,} | "
                     + " | ".join(cells) + f" | {r0['round_bytes_per_client'] / 1e3:,.0f} |")
        conv = sum(r["converged"] for r in main)
        L += ["", f"Converged (validation {metric} within {FLAT_TOL} over the last {FLAT_WINDOW} rounds): "
              f"{conv} of {sum(r['n'] for r in main)} runs.", ""]
        budget = statistics.median(r["round_bytes_per_client"] for r in main)
        mb = [r for r in rows if r["codec"] == "none" and r["variant"] in ("main", "matched-bytes")]
        L += [f"**Matched bytes per round** (the budget sends about {budget / 1e3:,.0f} KB per client per round, up + "
              "down): the same arms by what they send. An arm within 5% of the budget is at matched bytes in the "
              "table above already; FedSA-LoRA sends A only, so its matched-bytes run doubles its rank (an extra, "
              "when it is a finalist); FedEx-LoRA's downlink carries the full-rank residual and cannot be matched.",
              "", "| arm | KB/round/client | vs budget | " + " | ".join(f"alpha={x}" for x in alphas) + " |",
              "|---|---|---|" + "---|" * len(alphas)]
        for (arm, variant) in dict.fromkeys((r["arm"], r["variant"]) for r in mb):
            rs = {str(r["alpha"]): r for r in mb if r["arm"] == arm and r["variant"] == variant}
            r0 = next(iter(rs.values()))
            ratio = r0["round_bytes_per_client"] / budget
            name = arm + (" (rank doubled)" if variant == "matched-bytes" else "")
            L.append(f"| {name} | {r0['round_bytes_per_client'] / 1e3:,.0f} | {ratio:.2f}x"
                     + (" (matched)" if abs(ratio - 1) <= 0.05 else "") + " | "
                     + " | ".join(_fmt(rs[x]["last3_mean"], rs[x]["last3_std"]) if x in rs else "-" for x in alphas)
                     + " |")
        L.append("")
    if doc.get("paired"):
        L += [f"**Paired differences** against the best baseline at each alpha (chosen by validation), per seed: "
              f"test {metric} (last-{LAST} mean) of the arm minus the baseline's, mean and 95% t interval.", "",
              "| arm | alpha | baseline | mean diff | 95% interval | per seed |", "|---|---|---|---|---|---|"]
        for d in doc["paired"]:
            L.append(f"| {d['arm']} | {d['alpha']} | {d['baseline']} | {d['mean']:+.3f} | "
                     f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | " + ", ".join(f"{x:+.3f}" for x in d["diffs"]) + " |")
        L.append("")
    extras = [r for r in rows if r["variant"] != "main"]
    if extras:
        L += ["**Extras** (seeds " + ", ".join(map(str, sorted({s for r in extras for s in r['seeds']})))
              + f"): test {metric} last-{LAST} mean +- std, and the paired difference against the same arm's main "
              "runs on the same seeds (95% interval).", "",
              "| arm | variant | alpha | score | vs main | KB/round/client |", "|---|---|---|---|---|---|"]
        for r in extras:
            vs = "-"
            if "vs_main_mean" in r:  # one seed has no interval
                vs = f"{r['vs_main_mean']:+.3f}" + (f" [{r['vs_main_ci_low']:+.3f}, {r['vs_main_ci_high']:+.3f}]"
                                                    if math.isfinite(r["vs_main_ci_low"]) else " (one seed)")
            L.append(f"| {r['arm']} | {r['variant']} | {r['alpha']} | {_fmt(r['last3_mean'], r['last3_std'])} | {vs} | "
                     f"{r['round_bytes_per_client'] / 1e3:,.0f} |")
        if "fedavgm_server_lr" in doc:
            L += ["", "FedAvgM server lr (momentum 0.9), chosen on validation: "
                  + ", ".join(f"{k} {v:g}" for k, v in doc["fedavgm_server_lr"].items())]
        L.append("")
    if meta["failed"]:
        L += [f"Failed runs (left out): {meta['failed']}", ""]
    if meta.get("not_run"):
        groups: dict[str, list[str]] = {}  # the seeds of each arm / alpha / variant
        for t in meta["not_run"]:
            m = re.search(r"_s(\d+)_", t)
            groups.setdefault(re.sub(r"_s\d+_", "_s*_", t, count=1), []).append(m.group(1) if m else "?")
        L += [f"**Not run yet** ({len(meta['not_run'])} runs of the protocol; a rerun without --report-only "
              "runs them): " + "; ".join(f"{k} (seeds {', '.join(v)})" for k, v in groups.items()), ""]
    return "\n".join(L) + "\n"


def plot(doc, rows, metric, stem):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    curves = [c for c in doc["curves"] if c["variant"] == "main" and c["codec"] == "none"]
    alphas = list(dict.fromkeys(str(c["alpha"]) for c in curves))
    title = f"{doc['meta']['task']} / {doc['meta']['model']} ({doc['meta']['git_commit']}, {doc['meta']['device_name']})"
    for kind, xkey, xlabel in (("rounds", "rounds", "round"),
                               ("bytes", "cumulative_bytes_mean", "cumulative bytes, up + down, all clients (MB)")):
        fig, axes = plt.subplots(1, max(1, len(alphas)), figsize=(4.5 * max(1, len(alphas)), 3.8), squeeze=False,
                                 sharey=True)
        for ax, al in zip(axes[0], alphas):
            for c in (c for c in curves if str(c["alpha"]) == al):
                x = c[xkey] if kind == "rounds" else [b / 1e6 for b in c[xkey]]
                ax.errorbar(x, c["accuracy_mean"], yerr=c["accuracy_std"], marker=".", capsize=2, label=c["arm"])
            ax.set_title("IID" if al == "iid" else f"alpha={al}", fontsize=9)
            ax.set_xlabel(xlabel)
            if kind == "bytes":
                ax.set_xscale("log")
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        axes[0][0].set_ylabel(f"test {metric} (mean +- std over seeds)")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{stem}_{kind}.png", dpi=110)
        plt.close(fig)
    if doc.get("paired"):
        pairs = doc["paired"]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(pairs) + 1.5))
        labels = [f"{d['arm']} vs {d['baseline']}, alpha={d['alpha']}" for d in pairs]
        for i, d in enumerate(pairs):
            lo = d["mean"] - d["ci_low"] if not math.isnan(d["ci_low"]) else 0
            hi = d["ci_high"] - d["mean"] if not math.isnan(d["ci_high"]) else 0
            ax.errorbar(d["mean"], i, xerr=[[lo], [hi]], fmt="o", capsize=3)
            ax.scatter(d["diffs"], [i] * len(d["diffs"]), s=8, color="grey", zorder=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(pairs)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel(f"paired difference in test {metric} (last-{LAST} mean), 95% interval; grey: seeds")
        ax.set_title(title, fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_paired.png", dpi=110)
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="every size shrunk (minutes)")
    mode.add_argument("--smoke", action="store_true", help="tiny-bert + synthetic (seconds; tests)")
    ap.add_argument("--until", choices=STAGES, default=STAGES[-1],
                    help="run the stages up to this one (default: all: " + ", ".join(STAGES) + ")")
    ap.add_argument("--task")
    ap.add_argument("--model")
    ap.add_argument("--data-path")
    ap.add_argument("--task-options", type=json.loads, help='options of the task as JSON, e.g. \'{"test_fraction": 0.3}\'')
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="arms to screen (default: all)")
    ap.add_argument("--finalists-from-arms", action="store_true",
                    help="with --arms: take the given arms as the finalists instead of the screening's top ones")
    ap.add_argument("--alphas", nargs="+", type=parse_alpha, help="final-stage Dirichlet alphas and/or 'iid'")
    ap.add_argument("--screen-alphas", nargs="+", type=parse_alpha)
    ap.add_argument("--seeds", nargs="+", type=int, help="reported seeds (final stage)")
    ap.add_argument("--extra-seeds", nargs="+", type=int)
    ap.add_argument("--extra-alphas", nargs="+", type=parse_alpha, help="alphas of the extras")
    ap.add_argument("--lrs", nargs="+", type=float, help="adapter lr grid of the screening")
    ap.add_argument("--head-lrs", nargs="+", type=float, help="head lr grid")
    ap.add_argument("--head-lr", type=float, help="skip the head stage: use this head lr")
    ap.add_argument("--codecs", nargs="+", help="final stage: payload codecs, each used up and down")
    ap.add_argument("--rounds", type=int, help="final-stage rounds (default 20)")
    ap.add_argument("--screen-rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--clients-per-round", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--r", type=int, help="the budget: plain SCL at this rank")
    ap.add_argument("--max-examples", type=int)
    ap.add_argument("--eval-examples", type=int)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--test-every", type=int, help="final stage: score the test split every N rounds (and the last 3)")
    ap.add_argument("--metric", help="history key to select and report on (default: accuracy, rougeL_tf or eval_loss)")
    ap.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--jobs", type=int, help="runs at a time (default 2 on a CPU with 2+ cores, else 1)")
    ap.add_argument("--runs-dir")
    ap.add_argument("--out-dir")
    ap.add_argument("--tag", help="name the outputs study_<task>_<tag>")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report from the runs finished so far (the rest listed as not run)")
    a = ap.parse_args(argv)
    study(a)


if __name__ == "__main__":
    main()
