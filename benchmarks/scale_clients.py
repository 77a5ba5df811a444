"""Many clients on the local engine: round time, overhead, peak RSS and per-client state on disk
for 10 / 100 / 1,000 clients (10 sampled per round), for the methods that keep per-client state,
with the round's clients in one process and in worker processes (``--workers 1 2``).

Arms (tiny-llama on the synthetic task, the same 10,000 examples split IID for every size):

* ``fedsa-lora``        FedSA-LoRA: each client keeps its own LoRA B; the personalised evaluation
  scores the default panel (all clients up to 20, else a seeded 20).
* ``scl-int8-ef``       SCL (the default variant) with an int8 uplink and error feedback: each
  client keeps its residual.
* ``scl-int8-ef-bf16down``  the same with a bf16 (lossy, so delta-coded) downlink: each client
  also keeps the global state it holds, and the server its record of it (``server/known/``).

Each configuration runs ``run_experiment`` in a subprocess of its own, so its peak RSS
(``ru_maxrss``) is its own; with workers, ``worker peak RSS`` is the largest worker's (shared
backbone pages are counted in each process's RSS: see side_by_side_flower.py for the process
tree's PSS). Round time is the wall time between the ends of two rounds (the
checkpoint and the state flush included; round 1, which pays one-time costs, is not counted);
``train`` is the time the clients spent in local optimisation (``train_seconds``), ``eval`` the
evaluation (``eval_seconds``), and ``overhead = round - train - eval``: sampling, downlink and
uplink coding, loading and saving client state, aggregation, checkpoint, metrics.

    python benchmarks/scale_clients.py             # 3 arms x 10/100/1,000 clients x 1/2 workers (minutes)
    python benchmarks/scale_clients.py --workers 1 # the sequential engine only
    python benchmarks/scale_clients.py --smoke     # 2 tiny configurations (tests)
    python benchmarks/scale_clients.py --fresh     # rerun everything (default: reuse finished rows)

Writes ``benchmarks/results/scale_clients.{json,csv,md,png}`` (``scale_clients_smoke.*`` with
``--smoke``); the runs go to ``--work-dir`` (default ``runs/scale_clients``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

ARMS = {
    "fedsa-lora": dict(method="fedsa-lora"),
    "scl-int8-ef": dict(method="scl", codec="int8", error_feedback=True),
    "scl-int8-ef-bf16down": dict(method="scl", codec="int8", error_feedback=True, downlink_codec="bf16"),
}
SMOKE_ARMS = {"fedsa-lora-int8-ef-bf16down": dict(method="fedsa-lora", codec="int8", error_feedback=True,
                                                  downlink_codec="bf16")}
FULL = dict(clients=(10, 100, 1000), clients_per_round=10, rounds=5, local_steps=20, num_examples=10000,
            eval_examples=64, workers=(1, 2))
SMOKE = dict(clients=(3, 8), clients_per_round=2, rounds=3, local_steps=2, num_examples=400, eval_examples=16,
             workers=(1, 2))


def run_config(arm: str, clients: int, s: dict, out: Path, workers: int = 1) -> dict:
    """The ExperimentConfig of one configuration (a dict)."""
    arms = {**ARMS, **SMOKE_ARMS}
    return dict(model="tiny-llama", task="synthetic", task_options={"num_examples": s["num_examples"]},
                clients=clients, clients_per_round=min(s["clients_per_round"], clients), rounds=s["rounds"],
                partition="iid", min_client_size=2, local_steps=s["local_steps"], batch_size=8, r=4, lr=1e-2,
                eval_examples=s["eval_examples"], seed=0, out=str(out), progress=False,
                workers=workers, **arms[arm])


# ---------------------------------------------------------------------------------------------
# child: one configuration
# ---------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _files_bytes(root: Path) -> tuple[int, int]:
    if not root.exists():
        return 0, 0
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def child(config_json: str, result_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    from fastseq.fed.engine import Hooks, run_experiment
    from fastseq.fed.experiment import ExperimentConfig

    cfg = ExperimentConfig.from_dict(json.loads(config_json))
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)

    class Clock(Hooks):
        def __init__(self):
            self.rounds = []
            self.last = None

        def on_round_end(self, round, record):
            now = time.perf_counter()
            if self.last is not None:
                self.rounds.append(dict(round=round, wall=now - self.last, train=record["train_seconds"],
                                        eval=record["eval_seconds"], rss=_rss_bytes()))
            else:
                self.rss_round1 = _rss_bytes()
            self.last = now

    clock = Clock()
    t0 = time.perf_counter()
    summary = run_experiment(cfg, hooks=clock, echo=lambda s: None)
    total = time.perf_counter() - t0
    clients_bytes, clients_files = _files_bytes(out / "clients")
    server_bytes, server_files = _files_bytes(out / "server")
    run_bytes, _ = _files_bytes(out)
    with_state = sum(1 for d in (out / "clients").iterdir() if any(d.iterdir())) if (out / "clients").is_dir() else 0
    Path(result_path).write_text(json.dumps(dict(
        rounds=clock.rounds, rss_round1=clock.rss_round1,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        # the largest ended child's: the workers (joined when the run ends), 0 without them
        worker_peak_rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        client_state_bytes=summary["client_state_bytes"], server_state_bytes=summary["server_state_bytes"],
        clients_dir_bytes=clients_bytes, clients_dir_files=clients_files, server_dir_bytes=server_bytes,
        server_dir_files=server_files, run_dir_bytes=run_bytes, clients_with_state=with_state, run_seconds=total,
        final=summary["final"], metric=summary["metric"])))


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def measure(arm: str, clients: int, s: dict, work: Path, workers: int = 1) -> dict:
    name = f"{arm}_{clients}" + (f"_w{workers}" if workers > 1 else "")
    conf = run_config(arm, clients, s, work / name, workers)
    res_path = work / f"{name}.result.json"
    res_path.unlink(missing_ok=True)
    # the child imports this checkout's fastseq (not another installed copy)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(conf), str(res_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not res_path.is_file():
        raise RuntimeError(f"{arm} with {clients} clients and {workers} worker(s) failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    r = json.loads(res_path.read_text())
    rounds = r["rounds"]
    med = lambda k: statistics.median(x[k] for x in rounds)  # noqa: E731
    over = [x["wall"] - x["train"] - x["eval"] for x in rounds]
    wall = med("wall")
    split = {}
    if workers > 1:  # the clients' training seconds add up across workers: no time split of the wall time
        nan = float("nan")
        split = dict(overhead_s=nan, overhead_frac=nan, outside_train_frac=nan, overhead_per_client_ms=nan)
    row = dict(
        arm=arm, clients=clients, workers=workers, clients_per_round=conf["clients_per_round"], rounds=conf["rounds"],
        local_steps=conf["local_steps"], measured_rounds=len(rounds),
        round_s=wall, train_s=med("train"), eval_s=med("eval"), overhead_s=statistics.median(over),
        overhead_frac=statistics.median(o / x["wall"] for o, x in zip(over, rounds)),
        outside_train_frac=statistics.median((x["wall"] - x["train"]) / x["wall"] for x in rounds),
        overhead_per_client_ms=1e3 * statistics.median(over) / conf["clients_per_round"],
        peak_rss_mb=r["peak_rss"] / 2**20,
        worker_peak_rss_mb=r.get("worker_peak_rss", 0) / 2**20 if workers > 1 else 0.0,
        rss_round1_mb=r["rss_round1"] / 2**20,
        rss_last_mb=rounds[-1]["rss"] / 2**20,
        client_state_bytes=r["client_state_bytes"], server_state_bytes=r["server_state_bytes"],
        clients_with_state=r["clients_with_state"],
        state_bytes_per_client=(r["client_state_bytes"] + r["server_state_bytes"]) / max(1, r["clients_with_state"]),
        clients_dir_bytes=r["clients_dir_bytes"], clients_dir_files=r["clients_dir_files"],
        server_dir_bytes=r["server_dir_bytes"], server_dir_files=r["server_dir_files"],
        run_dir_bytes=r["run_dir_bytes"], run_seconds=r["run_seconds"], metric=r["metric"], final=r["final"])
    return {**row, **split}


def settings_key(arm: str, clients: int, s: dict, workers: int = 1) -> str:
    conf = run_config(arm, clients, s, Path("-"), workers)
    conf.pop("workers")  # the sequential rows' keys stay those they were measured under
    key = hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest()[:12]
    return key if workers == 1 else f"{key}-w{workers}"


def _num(x: float, spec: str, unit: str = "") -> str:
    return "-" if x != x else f"{x:{spec}}{unit}"


def write_report(rows: list[dict], stem: Path, s: dict, meta: dict) -> None:
    from provenance import write_results

    write_results(stem, rows, meta=meta, settings=s)
    lines = [f"# Many clients on the local engine ({'smoke' if meta['smoke'] else 'tiny-llama, synthetic'})", "",
             f"{s['clients_per_round']} clients per round, {s['local_steps']} local steps of batch 8, {s['rounds']} "
             f"rounds (medians over rounds 2..{s['rounds']}), one torch thread, each configuration in its own process "
             f"({meta['jobs']} at a time). "
             f"{meta['device_name']}, commit {meta['git_commit']}, {meta['time']}.", "",
             "`overhead` = round - train - eval (sampling, coding, client state I/O, aggregation, checkpoint, "
             "metrics); `outside train` also counts the evaluation. Client state: the newest state of every client "
             "(`client_state_bytes` in summary.json; equal to the files in `clients/`), server: its per-client record "
             "of what each client holds (lossy downlink only, `server/known/`). Only clients that took part have "
             "state, so the disk grows with the clients that took part (at most clients per round x rounds, + the "
             "evaluation panel), by the `per client` figure each; a long run of N clients ends near N x that. With "
             "workers, `train s` is the clients' training time summed over the workers (it can exceed the round), "
             "so the overhead split is not shown.", "",
             "| arm | clients | workers | round s | train s | eval s | overhead s | overhead | outside train "
             "| overhead/client ms | peak RSS MB | worker peak RSS MB | RSS round 1 -> last MB | client state KB "
             "| server state KB | clients with state | per client B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r.get("workers", 1)
        worker_rss = f"{r['worker_peak_rss_mb']:.0f}" if w > 1 else "-"
        lines.append(f"| {r['arm']} | {r['clients']:,} | {w} | {r['round_s']:.2f} | {r['train_s']:.2f} "
                     f"| {r['eval_s']:.2f} "
                     f"| {_num(r['overhead_s'], '.3f')} | {_num(100 * r['overhead_frac'], '.1f', '%')} "
                     f"| {_num(100 * r['outside_train_frac'], '.1f', '%')} "
                     f"| {_num(r['overhead_per_client_ms'], '.1f')} "
                     f"| {r['peak_rss_mb']:.0f} "
                     f"| {worker_rss} "
                     f"| {r['rss_round1_mb']:.0f} -> {r['rss_last_mb']:.0f} | {r['client_state_bytes'] / 1024:,.1f} "
                     f"| {r['server_state_bytes'] / 1024:,.1f} | {r['clients_with_state']:,} "
                     f"| {r['state_bytes_per_client']:,.0f} |")
    by = {}  # the sequential rows: arm -> clients -> row
    for r in rows:
        if r.get("workers", 1) == 1:
            by.setdefault(r["arm"], {})[r["clients"]] = r
    notes = []
    for r in rows:
        base = by.get(r["arm"], {}).get(r["clients"])
        if r.get("workers", 1) > 1 and base is not None:
            notes.append(f"* {r['arm']}, {r['clients']:,} clients, {r['workers']} workers: round "
                         f"{r['round_s']:.2f} s against {base['round_s']:.2f} s in one process "
                         f"({r['round_s'] / base['round_s']:.2f}x); the same final {r['metric']}: "
                         f"{'yes' if r['final'] == base['final'] else 'NO'}.")
    for arm, d in by.items():
        lo, hi = min(d), max(d)
        if lo != hi:
            a, b = d[lo], d[hi]
            notes.append(f"* {arm}: {lo} -> {hi} clients: peak RSS {a['peak_rss_mb']:.0f} -> {b['peak_rss_mb']:.0f} MB "
                         f"({b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x), overhead {1e3 * a['overhead_s']:.0f} -> "
                         f"{1e3 * b['overhead_s']:.0f} ms per round, client state on disk "
                         f"{a['client_state_bytes'] / 1024:,.1f} -> {b['client_state_bytes'] / 1024:,.1f} KB "
                         f"({b['state_bytes_per_client']:,.0f} B per client that took part, client and server side).")
    lines += ["", *notes, ""]
    Path(f"{stem}.md").write_text("\n".join(lines))
    plot(rows, Path(f"{stem}.png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    series = list(dict.fromkeys((r["arm"], r.get("workers", 1)) for r in rows))
    for arm_w in series:
        rs = sorted((r for r in rows if (r["arm"], r.get("workers", 1)) == arm_w), key=lambda r: r["clients"])
        arm = arm_w[0] + (f" ({arm_w[1]} workers)" if arm_w[1] > 1 else "")
        x = [r["clients"] for r in rs]
        line = axes[0].plot(x, [r["round_s"] for r in rs], "o-", label=f"{arm}: round")[0]
        axes[0].plot(x, [r["train_s"] for r in rs], "s--", color=line.get_color(), label=f"{arm}: train")
        axes[1].plot(x, [100 * r["overhead_frac"] for r in rs], "o-", label=arm)
        axes[2].plot(x, [r["peak_rss_mb"] for r in rs], "o-", label=arm)
        axes[3].plot(x, [(r["client_state_bytes"] + r["server_state_bytes"]) / 1024 for r in rs], "o-", label=arm)
    titles = ("seconds per round (median)", "overhead, % of the round", "peak RSS (MB)",
              "per-client state on disk (KB)")
    for ax, t in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("clients (10 per round)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[1].axhline(10, color="grey", ls=":", lw=1)
    axes[2].set_ylim(bottom=0)
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("CONFIG_JSON", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="2 tiny configurations (tests)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS) + list(SMOKE_ARMS))
    ap.add_argument("--clients", nargs="+", type=int, help="numbers of clients (default 10 100 1000)")
    ap.add_argument("--workers", nargs="+", type=int, help="worker processes per configuration (default 1 2)")
    ap.add_argument("--fresh", action="store_true", help="rerun configurations already in the results")
    ap.add_argument("--jobs", type=int, help="configurations at once (default 1, --smoke 2); more than one "
                                             "perturbs the timings, not the RSS or disk figures")
    ap.add_argument("--out-dir", help="default benchmarks/results")
    ap.add_argument("--work-dir", help="where the runs go (default runs/scale_clients)")
    a = ap.parse_args(argv)
    if a.child:
        child(*a.child)
        return
    from tqdm.auto import tqdm

    from provenance import provenance

    s = dict(SMOKE if a.smoke else FULL)
    if a.clients:
        s["clients"] = tuple(a.clients)
    if a.workers:
        s["workers"] = tuple(a.workers)
    arms = a.arms or list(SMOKE_ARMS if a.smoke else ARMS)
    out_dir = Path(a.out_dir or HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / ("scale_clients_smoke" if a.smoke else "scale_clients")
    work = Path(a.work_dir or ROOT / "runs" / ("scale_clients_smoke" if a.smoke else "scale_clients"))
    work.mkdir(parents=True, exist_ok=True)
    prev = {}
    if not a.fresh and Path(f"{stem}.json").is_file():
        prev = {r["key"]: r for r in json.loads(Path(f"{stem}.json").read_text()).get("rows", []) if "key" in r}
    todo = [(arm, n, w) for w in s["workers"] for arm in arms for n in s["clients"]]
    jobs = a.jobs or (2 if a.smoke else 1)
    meta = dict(provenance("cpu"), smoke=a.smoke, jobs=jobs)
    done: dict[tuple[str, int, int], dict] = {}
    keys = {t: settings_key(*t[:2], s, t[2]) for t in todo}
    for t in todo:
        if keys[t] in prev:  # resumable: a finished configuration with the same settings is kept
            done[t] = prev[keys[t]]
    pending = [t for t in todo if t not in done]
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc="configurations", unit="run")

    def one(t):
        arm, n, w = t
        return t, dict(measure(arm, n, s, work, w), key=keys[t], **provenance("cpu"))

    with ThreadPoolExecutor(jobs) as pool:  # threads only wait on the subprocesses
        for (arm, n, w), row in pool.map(one, pending):
            done[arm, n, w] = row
            bar.update()
            rows = [done[t] for t in todo if t in done]
            write_report(rows, stem, s, meta)  # after each configuration: a kill loses only the running ones
            tqdm.write(f"{arm} {n:>5} clients, {w} worker(s): round {row['round_s']:.2f} s, "
                       f"train {row['train_s']:.2f} s, overhead {_num(100 * row['overhead_frac'], '.1f', '%')}, "
                       f"peak RSS {row['peak_rss_mb']:.0f} MB, client state "
                       f"{row['client_state_bytes']:,} B + server {row['server_state_bytes']:,} B")
    bar.close()
    rows = [done[t] for t in todo]
    write_report(rows, stem, s, meta)
    print(Path(f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
