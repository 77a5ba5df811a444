"""Accuracy study: SCL vs FedAvg-LoRA, FFA-LoRA, FedSA-LoRA and FedEx-LoRA at a matched
parameter budget, across Dirichlet label skews and IID, over several seeds.

Protocol (the same for every method):

1. Learning-rate selection (skipped when the grid has one lr). Each method runs every lr of the same grid on the *selection
   seed* at the *selection alpha* (``--select-alpha``; the full mode uses 0.5, where runs are neither
   degenerate, as at 0.1 early in training, nor IID; ``--select-per-alpha`` selects at each alpha instead).
   The lr with the best final-round eval metric wins (ties: the smaller lr). The selection seed is not one
   of the reported seeds.
2. Reported runs. Each method, at its selected lr, runs every alpha x reported seed.
   ``--codecs`` adds compressed runs: each codec (used for the uplink and the downlink)
   runs at the lr its method selected uncompressed.
3. Per method x codec x alpha: mean +- std over seeds of the final-round metric, the best round's
   metric, and the bytes actually sent (uplink + downlink, counted by the runtime,
   including the personalised-evaluation downlink of FedSA-LoRA).

Every run goes through the runtime's Python API (``fastseq.fed.engine.run_experiment`` with an
``ExperimentConfig``, the same path as ``fastseq run``). The budget: SCL rank ``--r``; LoRA's
rank is matched by the runtime to SCL's trainable count (``2 r_lora (d + f) ~ 2 f r``).
Evaluation is on the task's test split (capped by ``--eval-examples``); FedSA-LoRA is
evaluated per client with its own local B (personalised) and averaged, as its paper does:
that is not the same measurement as the global model of the other methods.

Modes (CPU, MiniLM + BBC News; wall times on 2 shared cores):

* ``--quick``: alpha 0.5, lrs {1e-3, 1e-2}, 2 rounds x 3 local steps (batch 8, 64 tokens),
  600 training / 100 eval examples, 5 clients (3 per round). Its one seed IS the selection
  seed (10 runs instead of 15): the quick table reports the selection runs themselves, so
  its lr choice is not validated on a held-out seed. Meant as a smoke-level study: 5.7 min
  wall (326 s CPU) measured while another study shared the 2 cores.
* default (full): alphas 0.1, 0.5, 1.0, IID; lrs {1e-3, 3e-3, 1e-2} selected at alpha 0.5
  on seed 0; reported seeds 1, 2, 3; 6 rounds x 8 local steps (batch 8, 64 tokens); 5 clients,
  3 per round; 1,200 training / 200 eval examples: 75 runs, 73 min measured on the 2-core CPU
  (43-80 s a run, FedSA-LoRA's per-client evaluation the slowest; longer on a loaded machine; the
  JSON records wall and CPU seconds). Pass --rounds / --local-steps for a longer study.
* ``--smoke``: tiny-bert on the synthetic task, 2 methods, 2 rounds (seconds; used by tests).

    python scripts/accuracy_study.py --quick
    python scripts/accuracy_study.py                 # about an hour on a 2-core CPU
    python scripts/accuracy_study.py --methods scl fedavg-lora --alphas 0.5 --codecs none int8 nf4 \\
        --tag codecs                                 # the same runs under compression (reuses the lr selection)
    python scripts/accuracy_study.py --task medquad --model TinyLlama/TinyLlama_v1.1 \\
        --data-path /data/medquad.csv --device cuda  # on a GPU (metric: rougeL_tf / eval_loss)

Writes ``benchmarks/results/accuracy_<task>[_quick].{csv,json,md}``, ``..._rounds.png``
(metric vs round) and ``..._bytes.png`` (metric vs cumulative bytes). Run directories go to
``runs/accuracy/<task>/...`` (git-ignored); a finished run (summary.json present with the same
config) is reused, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fastseq.comm import CODECS

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "benchmarks") not in sys.path:  # only benchmarks/: the root would let kernels/ shadow a PyPI package
    sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance, write_results  # noqa: E402

METHODS = ("scl", "fedavg-lora", "ffa-lora", "fedsa-lora", "fedex-lora")
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "rougeL_tf", "rougeL_gen", "bleu_tf", "bleu_gen")


def parse_alpha(s: str):
    return "iid" if s.lower() == "iid" else float(s)


def presets(a) -> dict:
    if a.smoke:
        p = dict(model="tiny-bert", task="synthetic", methods=["scl", "fedavg-lora"], alphas=[0.5], seeds=[1],
                 lrs=[3e-3], rounds=2, local_steps=1, clients=3, clients_per_round=2, max_examples=60,
                 eval_examples=16, max_length=32, batch_size=4, r=4)
    elif a.quick:
        p = dict(alphas=[0.5], seeds=[0], lrs=[1e-3, 1e-2], rounds=2, local_steps=3, clients=5, clients_per_round=3,
                 max_examples=600, eval_examples=100, max_length=64, batch_size=8, r=8)
    else:
        p = dict(alphas=[0.1, 0.5, 1.0, "iid"], seeds=[1, 2, 3], lrs=[1e-3, 3e-3, 1e-2], select_alpha=0.5, rounds=6,
                 local_steps=8, clients=5, clients_per_round=3, max_examples=1200, eval_examples=200, max_length=64,
                 batch_size=8, r=8)
    p.setdefault("model", "all-MiniLM-L6-v2")
    p.setdefault("task", "bbc-news")
    p.setdefault("methods", list(METHODS))
    p.setdefault("codecs", ["none"])
    p.setdefault("select_alpha", None)
    for k in list(p):  # explicit flags win
        v = getattr(a, k, None)
        if v is not None:
            p[k] = v
    if p["select_alpha"] is None:
        p["select_alpha"] = p["alphas"][0]
    return p


def metric_of(history: list[dict], wanted: str | None) -> str:
    if wanted:
        return wanted
    for k in HIGHER_IS_BETTER:
        if any(isinstance(h.get(k), (int, float)) for h in history):
            return k
    return "eval_loss"


def better(metric: str, a: float, b: float) -> bool:
    """Is a strictly better than b?"""
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return a is not None
    if a is None:
        return False
    return a > b if metric in HIGHER_IS_BETTER else a < b


def run_one(p: dict, method: str, alpha, seed: int, lr: float, runs_dir: Path, device: str, quiet: bool,
            codec: str = "none") -> dict:
    from fastseq.fed.engine import run_experiment
    from fastseq.fed.experiment import ExperimentConfig

    tag = f"{method}_a{alpha}_s{seed}_lr{lr:g}" + ("" if codec == "none" else f"_{codec}")
    out = runs_dir / tag
    cfg = ExperimentConfig(
        model=p["model"], task=p["task"], data_path=p.get("data_path"), method=method, r=p["r"], rounds=p["rounds"],
        clients=p["clients"], clients_per_round=p["clients_per_round"], local_steps=p["local_steps"], lr=lr,
        batch_size=p["batch_size"], partition="iid" if alpha == "iid" else "dirichlet",
        alpha=0.5 if alpha == "iid" else float(alpha), seed=seed, max_examples=p["max_examples"],
        eval_examples=p["eval_examples"], max_length=p["max_length"], device=device, out=str(out), progress=False,
        codec=codec, downlink_codec=codec)
    want = cfg.to_dict()
    done = out / "summary.json"
    if done.is_file() and (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text())
        if all(old.get(k) == v for k, v in want.items()):
            print(f"  reuse {tag}", flush=True)
            r = _load_run(out, tag)
            r["reused"] = True
            return r
    t0 = time.time()
    run_experiment(cfg, echo=(lambda *_: None) if quiet else print)
    gc.collect()
    r = _load_run(out, tag)
    m = metric_of(r["history"], None)  # the study's default metric, not the run summary's headline
    print(f"  {tag}: final {m} {r['history'][-1].get(m)}, {time.time() - t0:.0f} s", flush=True)
    return r


RUNS: dict[str, dict] = {}  # tag -> {"seconds", "reused"} of every run the study used


def _load_run(out: Path, tag: str) -> dict:
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    cfgd = json.loads((out / "config.json").read_text())
    r = dict(tag=tag, history=hist, summary=summary, metric=summary.get("metric"),
             method_info=cfgd.get("method_info", {}), reused=False)
    RUNS[tag] = dict(seconds=summary.get("seconds"), out=str(out))
    return r


def curve(run: dict, metric: str):
    rounds, vals, cum, total = [], [], [], 0
    for h in run["history"]:
        total += (h.get("uplink_bytes") or 0) + (h.get("downlink_bytes") or 0) + (h.get("eval_downlink_bytes") or 0)
        rounds.append(h["round"])
        vals.append(h.get(metric))
        cum.append(total)
    return rounds, vals, cum


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def study(a) -> dict:
    p = presets(a)
    RUNS.clear()
    if a.data_path:
        p["data_path"] = a.data_path
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    suffix = "_smoke" if a.smoke else "_quick" if a.quick else ""
    name = p["task"] + (f"_{a.tag}" if a.tag else suffix)
    runs_dir = Path(a.runs_dir or ROOT / "runs" / "accuracy" / (p["task"] + suffix))
    out_dir = Path(a.out_dir or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start, c_start = time.time(), time.process_time()
    sel_alphas = p["alphas"] if a.select_per_alpha else [p["select_alpha"]]
    print(f"study {name}: model {p['model']}, methods {p['methods']}, alphas {p['alphas']}, reported seeds "
          f"{p['seeds']}, lr grid {p['lrs']} (selection seed {a.selection_seed} at alpha {sel_alphas}), "
          f"{p['rounds']} rounds x {p['local_steps']} local steps, {p['clients']} clients ({p['clients_per_round']} "
          f"per round)", flush=True)
    # 1. lr selection
    selection, chosen, metric = [], {}, a.metric
    for method in p["methods"]:
        for alpha in sel_alphas:
            if len(p["lrs"]) == 1:  # nothing to select
                chosen[(method, alpha)] = p["lrs"][0]
                continue
            best = None
            for lr in p["lrs"]:
                r = run_one(p, method, alpha, a.selection_seed, lr, runs_dir, device, not a.verbose)
                metric = metric_of(r["history"], metric)
                v = r["history"][-1].get(metric)
                selection.append(dict(method=method, alpha=alpha, lr=lr, seed=a.selection_seed, final=v))
                if best is None or better(metric, v, best[1]):
                    best = (lr, v)
            chosen[(method, alpha)] = best[0]
            print(f"selected lr {best[0]:g} for {method} (alpha {alpha}): final {metric} {best[1]}", flush=True)
    # 2. reported runs
    rows, curves, info = [], [], {}
    for method, codec in ((m, c) for m in p["methods"] for c in p["codecs"]):
        for alpha in p["alphas"]:
            lr = chosen[(method, alpha if a.select_per_alpha else sel_alphas[0])]
            runs = [run_one(p, method, alpha, s, lr, runs_dir, device, not a.verbose, codec) for s in p["seeds"]]
            metric = metric_of(runs[0]["history"], metric)
            info[method] = runs[0]["method_info"]
            cs = [curve(r, metric) for r in runs]
            finals = [c[1][-1] for c in cs]
            bests = [(max if metric in HIGHER_IS_BETTER else min)([v for v in c[1] if v is not None]) for c in cs]
            fm, fs = _mean_std(finals)
            bm, bs = _mean_std(bests)
            tot = [c[2][-1] for c in cs]
            up = [sum(h.get("uplink_bytes") or 0 for h in r["history"]) for r in runs]
            mi = runs[0]["method_info"]
            rows.append(dict(task=p["task"], model=p["model"], method=method, codec=codec, alpha=alpha, lr=lr,
                             seeds=len(runs),
                             metric=metric, final_mean=fm, final_std=fs, best_mean=bm, best_std=bs,
                             initial=cs[0][1][0], total_bytes_mean=statistics.fmean(tot),
                             uplink_bytes_mean=statistics.fmean(up),
                             trainable_params=mi.get("trainable_params"), shared_params=mi.get("shared_params"),
                             local_params=mi.get("local_params"), lora_r=mi.get("lora_r"),
                             personalized_eval=method == "fedsa-lora", rounds=p["rounds"],
                             local_steps=p["local_steps"]))
            n = min(len(c[0]) for c in cs)
            curves.append(dict(method=method, codec=codec, alpha=alpha, rounds=cs[0][0][:n],
                               accuracy_mean=[statistics.fmean(c[1][i] for c in cs) for i in range(n)],
                               accuracy_std=[statistics.stdev([c[1][i] for c in cs]) if len(cs) > 1 else 0.0
                                             for i in range(n)],
                               cumulative_bytes_mean=[statistics.fmean(c[2][i] for c in cs) for i in range(n)],
                               metric=metric))
            print(f"{method:12s} {codec:5s} alpha {alpha!s:4s} lr {lr:g}: final {metric} {fm:.4f} +- {fs:.4f} "
                  f"({len(runs)} seeds), bytes {statistics.fmean(tot):,.0f}", flush=True)
    meta = dict(task=p["task"], model=p["model"], **provenance(device), wall_s=time.time() - t_start,
                cpu_s=time.process_time() - c_start, loadavg_1min_end=os.getloadavg()[0],
                selection_seed=a.selection_seed, select_alpha=sel_alphas if a.select_per_alpha else sel_alphas[0],
                select_per_alpha=a.select_per_alpha, metric=metric,
                protocol=p, mode=suffix.strip("_") or "full", tag=a.tag, runs=len(RUNS),
                runs_seconds_total=sum(v["seconds"] or 0 for v in RUNS.values()),
                note="wall_s/cpu_s cover this invocation only; runs reused from an earlier invocation count in "
                     "runs_seconds_total (each run's own wall seconds, from its summary.json)")
    stem = out_dir / f"accuracy_{name}"
    doc = dict(meta=meta, task=name, selection=selection, rows=rows, curves=curves, method_info=info)
    write_results(stem, rows, **{k: v for k, v in doc.items() if k != "rows"})
    Path(f"{stem}.md").write_text(markdown(rows, meta, selection))
    plot(curves, metric, stem, meta)
    print(f"wrote {stem}.csv/.json/.md/_rounds.png/_bytes.png ({meta['wall_s']:.0f} s)")
    return doc


def markdown(rows, meta, selection) -> str:
    p = meta["protocol"]
    alphas = list(dict.fromkeys(str(r["alpha"]) for r in rows))
    arms = list(dict.fromkeys((r["method"], r.get("codec", "none")) for r in rows))
    m = meta["metric"]
    lines = [f"Task {meta['task']}, model {meta['model']}, {p['rounds']} rounds x {p['local_steps']} local steps, "
             f"{p['clients']} clients ({p['clients_per_round']} per round), {len(p['seeds'])} seed(s); final-round "
             f"{m}, mean +- std over seeds; commit {meta['git_commit']}, {meta['device_name']}.", "",
             "| method | lr | trainable | shared | " + " | ".join(f"alpha={a}" for a in alphas) + " | MB sent (mean over alphas) |",
             "|---|---|---|---|" + "---|" * len(alphas) + "---|"]
    for meth, codec in arms:
        rs = {str(r["alpha"]): r for r in rows if r["method"] == meth and r.get("codec", "none") == codec}
        r0 = next(iter(rs.values()))
        cells = [f"{rs[a]['final_mean']:.3f} +- {rs[a]['final_std']:.3f}" if a in rs and rs[a]["final_mean"] is not None
                 else "-" for a in alphas]
        mb = statistics.fmean(r["total_bytes_mean"] for r in rs.values()) / 1e6
        lrs = sorted({r["lr"] for r in rs.values()})
        name = (meth + ("" if codec == "none" else f" [{codec} up+down]")
                + (" (personalised eval)" if r0["personalized_eval"] else ""))
        lines.append(f"| {name} | {', '.join(f'{x:g}' for x in lrs)} | {r0['trainable_params']:,} | "
                     f"{r0['shared_params']:,} | " + " | ".join(cells) + f" | {mb:.2f} |")
    if not selection:
        return "\n".join(lines + ["", "No lr selection: the grid had a single lr, used by every method."]) + "\n"
    lines += ["", "lr selection (selection seed, final-round " + m + "):", "",
              "| method | alpha | lr | final |", "|---|---|---|---|"]
    for s in selection:
        lines.append(f"| {s['method']} | {s['alpha']} | {s['lr']:g} | "
                     + (f"{s['final']:.4f}" if isinstance(s["final"], (int, float)) else str(s["final"])) + " |")
    return "\n".join(lines) + "\n"


def plot(curves, metric, stem, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    alphas = list(dict.fromkeys(str(c["alpha"]) for c in curves))
    for kind, xkey, xlabel in (("rounds", "rounds", "round"),
                               ("bytes", "cumulative_bytes_mean", "cumulative bytes sent, up + down (MB)")):
        fig, axes = plt.subplots(1, len(alphas), figsize=(4.5 * len(alphas), 3.8), squeeze=False, sharey=True)
        for ax, al in zip(axes[0], alphas):
            for c in (c for c in curves if str(c["alpha"]) == al):
                x = c[xkey] if kind == "rounds" else [b / 1e6 for b in c[xkey]]
                ax.errorbar(x, c["accuracy_mean"], yerr=c["accuracy_std"], marker=".", capsize=2,
                            label=c["method"] + ("" if c.get("codec", "none") == "none" else f" [{c['codec']}]"))
            ax.set_title(f"alpha={al}" if al != "iid" else "IID", fontsize=9)
            ax.set_xlabel(xlabel)
            if kind == "bytes":
                ax.set_xscale("symlog", linthresh=0.1)
        axes[0][0].set_ylabel(metric)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{meta['task']} / {meta['model']} ({meta['git_commit']}, {meta['device_name']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{stem}_{kind}.png", dpi=110)
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 alpha, 1 seed, 2 lrs, 3 rounds (minutes)")
    mode.add_argument("--smoke", action="store_true", help="tiny-bert + synthetic, 2 rounds (seconds; tests)")
    ap.add_argument("--task", help="task name (default bbc-news)")
    ap.add_argument("--model", help="model (default all-MiniLM-L6-v2)")
    ap.add_argument("--data-path", help="local data file/folder or hub id for the task")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS))
    ap.add_argument("--alphas", nargs="+", type=parse_alpha, help="Dirichlet alphas and/or 'iid'")
    ap.add_argument("--codecs", nargs="+", choices=list(CODECS),
                    help="payload codecs, each used up and down (default none); every codec runs at the lr "
                         "selected without compression")
    ap.add_argument("--seeds", nargs="+", type=int, help="reported seeds")
    ap.add_argument("--selection-seed", type=int, default=0,
                    help="seed of the lr-selection runs (default 0; the full mode reports seeds 1, 2)")
    ap.add_argument("--select-alpha", type=parse_alpha,
                    help="alpha (or 'iid') of the lr-selection runs (default: 0.5 in the full mode, else the first alpha)")
    ap.add_argument("--select-per-alpha", action="store_true", help="select the lr at every alpha")
    ap.add_argument("--lrs", nargs="+", type=float, help="lr grid (the same for every method)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--clients-per-round", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--r", type=int, help="SCL rank (LoRA's rank is matched to its budget)")
    ap.add_argument("--max-examples", type=int)
    ap.add_argument("--eval-examples", type=int)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--metric", help="history key to select and report on (default: accuracy, rougeL_tf or eval_loss)")
    ap.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--runs-dir", help="where run directories go (default runs/accuracy/<task>)")
    ap.add_argument("--out-dir", help="where results go (default benchmarks/results)")
    ap.add_argument("--tag", help="name the outputs accuracy_<task>_<tag> (default: the mode: quick, smoke or none)")
    ap.add_argument("--verbose", action="store_true", help="print every round of every run")
    a = ap.parse_args(argv)
    study(a)


if __name__ == "__main__":
    main()
