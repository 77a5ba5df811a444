"""Accuracy against epsilon: client-level DP (``--dp central``) for SCL and FFA-LoRA.

The demo task (the defaults of ``fastseq run``: all-MiniLM-L6-v2 + BBC News, 5 clients, 3 per
round, Dirichlet alpha 0.5, 10 rounds), with 10% of each client's training data held out for
validation. Per method: noise multiplier 0 (no DP: the plain run), 0.5, 1 and 2.

* ``scl`` is the default SCL variant (parallel placement, C frozen) at the default lr 1e-2;
  FFA-LoRA runs at lr 3e-3, the lr the accuracy study chose for it on validation
  (``benchmarks/results/study_bbc-news.md``); both at SCL r=8's budget.
* **The clip** of each method is the median L2 norm of its clients' deltas in its no-DP run
  (``update_norms`` of every round in ``metrics.jsonl``), rounded to 2 significant digits: the
  quantile Andrew et al. (2021) aim adaptive clipping at (0.5). It reads training updates only,
  never a validation or test score. (Choosing it this way uses the clients' data outside the
  DP guarantee, as any hyperparameter choice does; see docs/privacy.md.)
* epsilon is fastseq's (dp-accounting's RDP accountant, fixed-size sampling without
  replacement, replace-one, delta = 1/clients), after the last round.
* Reported accuracy: the test accuracy of the final round and the mean of the last 3 rounds;
  the validation accuracy (last-3 mean) beside it.

Resumable: one run directory per config under ``--runs-dir`` (default ``runs/dp_epsilon``); a
directory whose ``summary.json`` exists and whose ``config.json`` matches is reused.

    python benchmarks/dp_epsilon.py            # 8 runs, ~1-3 min each on one CPU core
    python benchmarks/dp_epsilon.py --smoke    # tiny-bert + synthetic task, seconds (tests)

Writes ``benchmarks/results/dp_epsilon.{json,csv,md,png}`` (``dp_epsilon_smoke.*`` with
``--smoke``).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from provenance import provenance, write_results  # noqa: E402

NOISES = [0.0, 0.5, 1.0, 2.0]
METHODS = {"scl": {}, "ffa-lora": {"lr": 3e-3}}
LAST = 3


def base_config(smoke: bool) -> dict:
    if smoke:
        return dict(model="tiny-bert", task="synthetic", max_examples=160, max_length=32, rounds=2, clients=3,
                    clients_per_round=2, local_steps=2, batch_size=4, r=4, validation_fraction=0.2,
                    eval_batch_size=64, progress=False)
    return dict(rounds=10, validation_fraction=0.1, progress=False)  # everything else: fastseq run's defaults


def spec(base: dict, method: str, noise: float, clip: float | None, runs_dir: Path) -> dict:
    cfg = dict(base, method=method, **METHODS[method])
    tag = f"{method}_noise{noise:g}"
    if noise > 0:
        cfg.update(dp="central", dp_noise=noise, dp_clip=clip)
    cfg["out"] = str(runs_dir / tag)
    return cfg


def finished(cfg: dict) -> bool:
    out = Path(cfg["out"])
    if not (out / "summary.json").is_file() or not (out / "config.json").is_file():
        return False
    old = json.loads((out / "config.json").read_text())
    return all(old.get(k) == v for k, v in cfg.items())


def run(cfg: dict) -> None:
    from fastseq.fed.engine import run_experiment
    from fastseq.fed.experiment import ExperimentConfig

    out = Path(cfg["out"])
    if out.exists():  # an interrupted run or one of another config: started again
        tqdm.write(f"  replacing {out} (unfinished or another config)")
        shutil.rmtree(out)
    run_experiment(ExperimentConfig.from_dict(dict(cfg)), echo=lambda *_: None)


def history(cfg: dict) -> list[dict]:
    text = (Path(cfg["out"]) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def median_norm(hist: list[dict]) -> float:
    norms = [v for h in hist for v in (h.get("update_norms") or {}).values()]
    if not norms:
        raise RuntimeError("the no-DP run recorded no update_norms")
    return float(f"{statistics.median(norms):.2g}")


def last_mean(hist: list[dict], key: str) -> float | None:
    vals = [h[key] for h in hist if isinstance(h.get(key), (int, float))][-LAST:]
    return sum(vals) / len(vals) if vals else None


def row(cfg: dict, noise: float, clip: float | None) -> dict:
    hist = history(cfg)
    summary = json.loads((Path(cfg["out"]) / "summary.json").read_text())
    eps = summary.get("epsilon") if noise > 0 else math.inf
    prov = Path(cfg["out"]) / "provenance.json"
    commit = json.loads(prov.read_text())["git_commit"] if prov.is_file() else "unrecorded"
    return dict(method=cfg["method"], lr=cfg.get("lr", 1e-2), noise=noise, dp="central" if noise > 0 else "none",
                dp_clip=clip, epsilon=eps if eps is not None else math.inf, dp_delta=summary.get("dp_delta"),
                rounds=hist[-1]["round"], accuracy_round0=hist[0].get("accuracy"), accuracy_final=hist[-1].get("accuracy"),
                accuracy_last3=last_mean(hist, "accuracy"), val_accuracy_last3=last_mean(hist, "val_accuracy"),
                clipped_fraction=(sum(len(h.get("clipped", [])) for h in hist[1:]) /
                                  max(1, sum(len(h["clients"]) for h in hist[1:]))) if noise > 0 else None,
                seconds=summary.get("seconds"), run_git_commit=commit, out=cfg["out"])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Accuracy against epsilon (DP-FedAvg, `--dp central`)", "",
             f"Commit {meta['git_commit']}, {meta['device_name']}; {meta['model']} + {meta['task']}, "
             f"{meta['clients']} clients, {meta['clients_per_round']} per round, {meta['rounds']} rounds "
             f"(runs at commit(s) {', '.join(sorted({r['run_git_commit'] for r in rows}))}). "
             "epsilon after the last round at delta = 1/clients (dp-accounting RDP, fixed-size sampling without "
             "replacement, replace-one); clip = the median update norm of the method's no-DP run. Test accuracy: "
             "final round and mean of the last 3 rounds; validation: last-3 mean.", "",
             "| method | noise | clip | epsilon | test acc (final) | test acc (last 3) | val acc (last 3) | "
             "clipped | round-0 acc | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, nd=3: "-" if x is None else ("inf" if isinstance(x, float) and math.isinf(x) else f"{x:.{nd}f}")  # noqa: E731
    for r in rows:
        clip = "-" if r["dp_clip"] is None else format(r["dp_clip"], "g")
        lines.append(f"| {r['method']} | {r['noise']:g}{' (no DP)' if r['noise'] == 0 else ''} | {clip} | "
                     f"{f(r['epsilon'], 1)} | {f(r['accuracy_final'])} | {f(r['accuracy_last3'])} | "
                     f"{f(r['val_accuracy_last3'])} | {f(r['clipped_fraction'], 2)} | {f(r['accuracy_round0'])} | "
                     f"{f(r['seconds'], 0)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        rs = [r for r in rows if r["method"] == method]
        dp = sorted((r for r in rs if math.isfinite(r["epsilon"])), key=lambda r: r["epsilon"])
        color = f"C{i}"
        ax.plot([r["epsilon"] for r in dp], [r["accuracy_last3"] for r in dp], "o-", color=color, label=method)
        for r in dp:
            ax.annotate(f"z={r['noise']:g}", (r["epsilon"], r["accuracy_last3"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        for r in rs:
            if r["noise"] == 0:
                ax.axhline(r["accuracy_last3"], color=color, ls="--", lw=1, label=f"{method}, no DP")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon after {meta['rounds']} rounds (delta = 1/clients)")
    ax.set_ylabel("test accuracy (mean of the last 3 rounds)")
    ax.set_title(f"{meta['model']} + {meta['task']}, DP central ({meta['git_commit']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny-bert + synthetic task, 2 rounds, noise 0 and 1")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--runs-dir", default=None, help="run directories (default runs/dp_epsilon, smoke: OUT/runs)")
    ap.add_argument("--noises", type=float, nargs="+", default=None,
                    help=f"noise multipliers (default {' '.join(map(str, NOISES))}; 0 = the no-DP run, always run first)")
    a = ap.parse_args(argv)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(a.runs_dir) if a.runs_dir else (out_dir / "runs" if a.smoke else HERE.parent / "runs" / "dp_epsilon")
    if a.smoke:
        runs_dir = runs_dir / "smoke"
    base = base_config(a.smoke)
    noises = a.noises or ([0.0, 1.0] if a.smoke else NOISES)
    noises = [0.0] + sorted(set(noises) - {0.0})  # noise 0 first: its update norms give the clip
    if any(z < 0 for z in noises):
        ap.error("--noises must be >= 0")
    rows, t0 = [], time.time()
    prov = provenance("cpu")  # the code as it was when the runs started
    bar = tqdm(total=len(METHODS) * len(noises), desc="dp_epsilon", unit="run")
    for method in METHODS:
        clip = None
        for noise in noises:  # noise 0 first: its update norms give the clip of the DP runs
            cfg = spec(base, method, noise, clip, runs_dir)
            bar.set_postfix_str(Path(cfg["out"]).name)
            if not finished(cfg):
                run(cfg)
                # the code this run used (a rerun reuses it under a later commit)
                (Path(cfg["out"]) / "provenance.json").write_text(json.dumps(prov, indent=1))
            if noise == 0:
                clip = median_norm(history(cfg))
            rows.append(row(cfg, noise, None if noise == 0 else clip))
            bar.update(1)
    bar.close()
    from fastseq.fed.experiment import ExperimentConfig

    full = ExperimentConfig.from_dict(dict(base))
    meta = dict(prov, model=full.model, task=full.task, rounds=full.rounds, clients=full.clients,
                clients_per_round=full.clients_per_round, noises=noises, methods=METHODS, smoke=a.smoke,
                clip_rule="median of the no-DP run's update_norms (all rounds, all clients), 2 significant digits",
                wall_seconds=time.time() - t0)
    stem = out_dir / ("dp_epsilon_smoke" if a.smoke else "dp_epsilon")
    jrows = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in rows]
    write_results(stem, jrows, meta=meta)
    Path(f"{stem}.md").write_text(markdown(rows, meta))
    plot(rows, meta, Path(f"{stem}.png"))
    print(Path(f"{stem}.md").read_text())
    return {"rows": rows, "meta": meta}


if __name__ == "__main__":
    main()
