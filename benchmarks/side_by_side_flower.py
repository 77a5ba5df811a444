"""fastseq's local engine vs a plain Flower + PEFT simulation: the same FedAvg-LoRA experiment.

Three arms, one invocation, each in its own subprocess (so that each arm's memory is measured
from a clean process tree):

* ``fastseq``: ``fastseq.engines.run`` with ``engine="local"``, ``method="fedavg-lora"``,
  ``workers=1``: one process, one frozen backbone shared by every simulated client, clients
  trained in turn on one thread.
* ``fastseq-<N>w``: the same with ``workers=N`` (``--workers``, default the CPU count): the
  round's clients train in N worker processes forked after the backbone loaded, one torch
  thread each, sharing that backbone.
* ``fastseq-<N>w-mmap<K>`` (with ``--mmap-threshold BYTES``): the workers arm under glibc's
  ``MALLOC_MMAP_THRESHOLD_=BYTES``: each worker's activations get pages of their own that go
  back to the system when freed, instead of a heap that keeps the largest round's (the price:
  page faults on every large allocation). A memory knob for users, measured.
* ``flower``: a plain Flower App built in this file, FlowerTune-style: a ServerApp running
  Flower's own ``FedAvg`` strategy on ``ArrayRecord``s, and a ClientApp that loads the model
  and wraps it with ``peft.get_peft_model(LoraConfig(...))`` in every Ray actor, trains with a
  plain PyTorch loop and returns its trainable weights. It runs on Flower's Simulation Engine
  (``flwr.simulation.run_simulation``), one virtual SuperNode per client, ``--client-cpus`` per
  actor; the ServerApp evaluates the global model centrally (its own model copy), as fastseq's
  server does.

Same model, task, data partition (fastseq's seeded partitioner, so both see the same
examples per client), rounds, clients, clients per round, local steps, lr (adapter and head),
batch size, LoRA rank / alpha / dropout / target modules (read from the fastseq arm's
``config.json``), max length and test examples. What differs: which clients are sampled
(Flower's ``FedAvg`` samples on its own), the order of local batches, the aggregation code, and
that Flower trains the sampled clients in parallel actors (``--ray-cpus`` / ``--client-cpus``)
while the local engine trains them one after another on one thread. Accuracy is reported for
both so that readers can see both train; it is not expected to be equal.

Measured per arm: wall time of the whole arm (start-up, model loads and Ray included), wall time
per round (round r's training + aggregation + evaluation: the local engine's ``seconds``; for
Flower, the time between the ServerApp's evaluations of rounds r-1 and r), peak memory of the
arm's whole process tree (Ray's GCS, raylet and actor processes included) sampled every
``--sample-s`` seconds with psutil as the sum of RSS (shared pages counted once per process)
and of PSS (shared pages split between processes: the fairer total), and CPU seconds of the
tree (sum of each process's largest sampled user+system time).

    python benchmarks/side_by_side_flower.py            # MiniLM + bbc-news, 5 clients, 3 per round
    python benchmarks/side_by_side_flower.py --smoke    # tiny-bert, synthetic, about a minute (tests)
    python benchmarks/side_by_side_flower.py --ray-cpus 1 --tag 1cpu   # Flower on one core too

Writes ``benchmarks/results/side_by_side_flower[_<tag>].{csv,json,md,png}`` (``--out-dir`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEM = "side_by_side_flower"

# lr 1e-3: fedavg-lora's lr chosen on validation by the accuracy study (bbc-news; it collapses at 1e-2).
FULL = dict(model="all-MiniLM-L6-v2", task="bbc-news", clients=5, clients_per_round=3, rounds=10, local_steps=10,
            batch_size=8, lr=1e-3, lora_r=8, max_length=64, eval_examples=200, partition="dirichlet", alpha=0.5)
SMOKE = dict(model="tiny-bert", task="synthetic", clients=3, clients_per_round=2, rounds=2, local_steps=2,
             batch_size=8, lr=1e-2, lora_r=4, max_length=64, eval_examples=32, partition="iid", alpha=0.5,
             max_examples=64, min_client_size=4)


def experiment_config(spec: dict, out: str):
    from fastseq.fed.experiment import ExperimentConfig

    keys = set(ExperimentConfig.keys())
    return ExperimentConfig.from_dict({**{k: v for k, v in spec.items() if k in keys}, "method": "fedavg-lora",
                                       "engine": "local", "out": out, "progress": False, "seed": spec["seed"]})


# ---------------------------------------------------------------------------------------------
# arm 1: fastseq's local engine
# ---------------------------------------------------------------------------------------------
def arm_fastseq(spec: dict, work: Path) -> dict:
    """Runs at ``spec["workers"]`` workers (1: the sequential engine)."""
    from fastseq.engines import run

    cfg = experiment_config(spec, str(work / "run"))
    t0 = time.perf_counter()
    run(cfg, echo=lambda s: None)
    wall = time.perf_counter() - t0
    hist = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((work / "run" / "config.json").read_text())["method_info"]
    return dict(round_seconds=[h["seconds"] for h in hist[1:]], accuracy=[h.get("accuracy") for h in hist],
                workers=max(h.get("workers", 1) for h in hist),
                clients=[h["clients"] for h in hist[1:]], lora_r=info["lora_r"], lora_alpha=info["lora_alpha"],
                lora_targets=info["lora_targets"], trainable_params=info["trainable_params"], arm_wall_s=wall)


# ---------------------------------------------------------------------------------------------
# arm 2: a plain Flower + PEFT simulation (every actor loads its own model)
# ---------------------------------------------------------------------------------------------
_ACTOR: dict[str, Any] = {}  # per process (Ray actor or the ServerApp's process): data, model


def _data(spec: dict):
    """The task's examples and the per-client index lists, as the local engine partitions them."""
    if "data" not in _ACTOR:
        from fastseq.fed.experiment import make_task
        from fastseq.fed.partition import partition

        cfg = experiment_config(spec, "unused")
        task = make_task(cfg)
        data = task.load(data_path=cfg.data_path, seed=cfg.seed, max_examples=cfg.max_examples)
        parts = partition(list(data.partition_keys), cfg.clients, cfg.partition, alpha=cfg.alpha,
                          classes_per_client=cfg.classes_per_client, seed=cfg.seed, min_size=cfg.min_client_size)
        _ACTOR["data"] = (task, data, parts, list(data.test)[:cfg.eval_examples])
    return _ACTOR["data"]


def _peft_model(spec: dict):
    """The model with PEFT LoRA on the same targets, rank and alpha as the fastseq arm."""
    if "model" not in _ACTOR:
        import torch
        from peft import LoraConfig, get_peft_model

        from fastseq.models import load_model

        task, data, _, _ = _data(spec)
        torch.manual_seed(spec["seed"])  # the same head init everywhere (the server sends it anyway)
        model, processor = load_model(spec["model"], task.model_kind, num_labels=data.num_labels,
                                      processor=task.processor_use)
        heads = list(task.head_modules_for(model))
        lcfg = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                          target_modules=spec["lora_targets"], modules_to_save=heads or None)
        model = get_peft_model(model, lcfg)
        _ACTOR["model"] = (model, processor, task, heads)
    return _ACTOR["model"]


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def flower_apps(spec: dict, marks: list, fits: list):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        model, processor, task, heads = _peft_model(spec)
        _, data, parts, _ = _data(spec)
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        examples = [data.train[i] for i in parts[pid]]
        rng = random.Random(spec["seed"] * 1_000_003 + rnd * 1009 + pid)
        head_p = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in heads)]
        lora_p = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in heads)]
        opt = torch.optim.AdamW([{"params": lora_p, "lr": spec["lr"]}, {"params": head_p, "lr": spec["head_lr"]}],
                                weight_decay=0.0)
        model.train()
        order, losses = [], []
        for _ in range(spec["local_steps"]):
            if len(order) < spec["batch_size"]:
                more = list(range(len(examples)))
                rng.shuffle(more)
                order += more
            batch = task.collate([examples[i] for i in order[:spec["batch_size"]]], processor)
            order = order[spec["batch_size"]:]
            loss = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_p + head_p, 1.0)
            opt.step()
            losses.append(float(loss))
        model.eval()
        reply = RecordDict({"arrays": ArrayRecord(_trainable(model)),
                            "metrics": MetricRecord({"num-examples": len(examples),
                                                     "train_loss": sum(losses) / len(losses)})})
        return Message(content=reply, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model, processor, task, _ = _peft_model(spec)  # the ServerApp's copy, for central evaluation
        _, _, _, test = _data(spec)

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            ev = task.evaluate(model, test, processor, batch_size=spec["eval_batch_size"])
            marks.append((rnd, time.perf_counter(), ev.get("accuracy")))
            return MetricRecord({"accuracy": float(ev.get("accuracy", 0.0)), "eval_loss": float(ev["eval_loss"])})

        class CountingFedAvg(FedAvg):
            """Flower's FedAvg, which skips failed replies silently: count them (a round whose
            clients all failed would otherwise look like a fast round that learnt nothing)."""

            def aggregate_train(self, server_round, replies):
                replies = list(replies)
                errors = [f"{r.error.code}: {r.error.reason}"[:500] for r in replies if r.has_error()]
                fits.append(dict(round=server_round, ok=len(replies) - len(errors), errors=errors))
                return super().aggregate_train(server_round, replies)

        k = spec["clients_per_round"]
        strategy = CountingFedAvg(fraction_train=k / spec["clients"], fraction_evaluate=0.0, min_train_nodes=k,
                          min_available_nodes=spec["clients"])
        strategy.start(grid=grid, initial_arrays=ArrayRecord(_trainable(model)), num_rounds=spec["rounds"],
                       train_config=ConfigRecord({}), evaluate_fn=evaluate)

    return server, client


def arm_flower(spec: dict, work: Path) -> dict:
    import logging

    import ray
    from flwr.simulation import run_simulation

    os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0")
    marks: list = []
    fits: list = []
    server, client = flower_apps(spec, marks, fits)
    backend = {"client_resources": {"num_cpus": spec["client_cpus"], "num_gpus": 0.0},
               "init_args": {"num_cpus": spec["ray_cpus"], "include_dashboard": False, "log_to_driver": False,
                             "object_store_memory": 200 * 1024**2, "logging_level": logging.ERROR}}
    t0 = time.perf_counter()
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=spec["clients"], backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - t0
    if len(marks) != spec["rounds"] + 1:
        raise RuntimeError(f"the Flower arm evaluated {len(marks)} times for {spec['rounds']} rounds; see its log")
    failed = [f for f in fits if f["errors"] or f["ok"] != spec["clients_per_round"]]
    if failed:  # the comparison assumes every sampled client trained in both arms
        raise RuntimeError(f"Flower clients failed: {json.dumps(failed)[:3000]}")
    return dict(round_seconds=[b[1] - a[1] for a, b in zip(marks, marks[1:])], accuracy=[m[2] for m in marks],
                fits_ok=[f["ok"] for f in fits], arm_wall_s=wall)


# ---------------------------------------------------------------------------------------------
# the driver: run both arms as subprocesses and watch their process trees
# ---------------------------------------------------------------------------------------------
class TreeSampler(threading.Thread):
    """Peak sum of RSS and PSS over a process and all its descendants, and their CPU seconds."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.cpu: dict[int, float] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        rss = pss = 0
        for p in procs:
            try:
                mem = p.memory_full_info()
                t = p.cpu_times()
            except psutil.Error:
                continue
            rss += mem.rss
            pss += getattr(mem, "pss", mem.rss)
            self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), t.user + t.system)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_arm(arm: str, spec: dict, work: Path, sample_s: float, log=print, label: str | None = None,
            env_extra: dict | None = None) -> dict:
    """Run ``arm`` (fastseq or flower) in a subprocess (``env_extra`` added to its environment); its
    row is called ``label`` (default ``arm``)."""
    label = label or arm
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    t0 = time.perf_counter()
    with open(work / "arm.log", "w") as logf:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--work", str(work)],
                                stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        sampler = TreeSampler(proc.pid, sample_s)
        sampler.sample()
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (work / "arm.log").read_text()[-3000:]
        raise RuntimeError(f"arm {arm} exited with {rc}; log {work / 'arm.log'}:\n{tail}")
    res = json.loads((work / "result.json").read_text())
    res.update(arm=label, process_wall_s=wall, peak_rss_mb=sampler.peak_rss / 2**20, peak_pss_mb=sampler.peak_pss / 2**20,
               peak_processes=sampler.peak_procs, cpu_s=sum(sampler.cpu.values()))
    log(f"{label}: {wall:.1f} s, rounds {[round(s, 2) for s in res['round_seconds']]} s, peak PSS "
        f"{res['peak_pss_mb']:.0f} MB (RSS {res['peak_rss_mb']:.0f} MB, {sampler.peak_procs} processes), "
        f"accuracy {res['accuracy']}")
    return res


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def write_markdown(path: Path, spec: dict, rows: list[dict], ratios: dict, prov: dict) -> None:
    lines = [f"# fastseq local engine vs plain Flower + PEFT simulation ({spec['model']}, {spec['task']})", "",
             f"FedAvg-LoRA r={spec['lora_r']} (alpha {spec['lora_alpha']}) on {len(spec['lora_targets'])} modules, "
             f"{spec['clients']} clients, {spec['clients_per_round']} per round, {spec['rounds']} rounds, "
             f"{spec['local_steps']} local steps of batch {spec['batch_size']}, lr {spec['lr']} (head "
             f"{spec['head_lr']}), max length {spec['max_length']}, {spec['eval_examples']} test examples. "
             f"Flower: Ray with {spec['ray_cpus']} CPUs, {spec['client_cpus']} CPU per actor. "
             f"Device {prov['device_name']}, commit {prov['git_commit']}, flwr {prov.get('flwr')}, "
             f"peft {prov.get('peft')}, torch {prov['torch']}.", "",
             "| arm | mean round s | rounds 2+ s | arm wall s | peak PSS MB | peak RSS MB | processes | CPU s "
             "| accuracy r0 -> final |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['round_s_mean']:.2f} | {_fmt(r['round_s_after_first'], 2)} | "
                     f"{r['process_wall_s']:.1f} | {r['peak_pss_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_processes']} | {r['cpu_s']:.1f} | "
                     f"{_fmt(r['accuracy_r0'])} -> {_fmt(r['accuracy_final'])} |")
    lines += ["", "Ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), "",
              "Round time = training + aggregation + central evaluation of one round. Peak memory is the whole "
              "process tree of the arm (Ray's processes included), sampled; PSS splits shared pages between "
              "processes. The two arms sample different clients and aggregate with different code, so their "
              "accuracies are not expected to be equal.", ""]
    path.write_text("\n".join(lines))


def _fmt(x, digits=3):
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and x == x else "-"


def plot(path: Path, rows: list[dict], spec: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in rows:
        ax[0].plot(range(1, len(r["round_seconds"]) + 1), r["round_seconds"], marker="o", label=r["arm"])
        ax[2].plot(range(len(r["accuracy"])), r["accuracy"], marker="o", label=r["arm"])
    ax[0].set(xlabel="round", ylabel="seconds", title="wall time per round")
    names = [r["arm"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    ax[1].bar([n + "\nPSS" for n in names], [r["peak_pss_mb"] for r in rows], color=colors)
    ax[1].bar([n + "\nRSS" for n in names], [r["peak_rss_mb"] for r in rows], color=colors, alpha=0.5)
    ax[1].set(ylabel="MB", title="peak memory (process tree)")
    ax[2].set(xlabel="round", ylabel="test accuracy", title="central evaluation")
    for a in (ax[0], ax[2]):
        a.legend()
    fig.suptitle(f"FedAvg-LoRA, {spec['model']} on {spec['task']}: {spec['clients']} clients, "
                 f"{spec['clients_per_round']}/round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny-bert on the synthetic task (seconds; tests)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--model")
    ap.add_argument("--task")
    ap.add_argument("--clients", type=int)
    ap.add_argument("--clients-per-round", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--lora-r", type=int)
    ap.add_argument("--max-examples", type=int)
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use (Flower arm)")
    ap.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per Flower actor")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="fastseq's worker processes in its parallel arm (default: the CPU count)")
    ap.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                    help="add the workers arm under MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 524288)")
    ap.add_argument("--sample-s", type=float, default=0.25, help="memory sampling interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", help="suffix of the result files (e.g. 1cpu for --ray-cpus 1)")
    ap.add_argument("--arm", choices=("fastseq", "flower"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.arm:  # a subprocess: run one arm, write its result
        work = Path(args.work)
        spec = json.loads((work / "spec.json").read_text())
        res = arm_fastseq(spec, work) if args.arm == "fastseq" else arm_flower(spec, work)
        (work / "result.json").write_text(json.dumps(res))
        return res

    from provenance import provenance, write_results

    spec = dict(SMOKE if args.smoke else FULL)
    for k in ("model", "task", "clients", "clients_per_round", "rounds", "local_steps", "lora_r", "max_examples"):
        if getattr(args, k) is not None:
            spec[k] = getattr(args, k)
    spec.update(seed=args.seed, ray_cpus=args.ray_cpus, client_cpus=args.client_cpus, workers=1)
    cfg = experiment_config(spec, "unused")  # validates, and fills what the spec leaves to the defaults
    spec.update(head_lr=cfg.head_lr if cfg.head_lr is not None else cfg.lr, lora_dropout=cfg.lora_dropout,
                eval_batch_size=cfg.eval_batch_size, min_client_size=cfg.min_client_size)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
        fast = run_arm("fastseq", spec, Path(tmp) / "fastseq", args.sample_s)
        par = run_arm("fastseq", {**spec, "workers": args.workers}, Path(tmp) / "fastseq-workers", args.sample_s,
                      label=f"fastseq-{args.workers}w")
        lowmem = None
        if args.mmap_threshold:
            lowmem = run_arm("fastseq", {**spec, "workers": args.workers}, Path(tmp) / "fastseq-workers-mmap",
                             args.sample_s, label=f"fastseq-{args.workers}w-mmap{args.mmap_threshold // 1024}k",
                             env_extra={"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)})
        # The Flower arm uses the LoRA the fastseq arm resolved: same rank, alpha and target modules.
        spec.update(lora_r=fast["lora_r"], lora_alpha=fast["lora_alpha"], lora_targets=fast["lora_targets"],
                    parallel_workers=args.workers)
        flower = run_arm("flower", spec, Path(tmp) / "flower", args.sample_s)
    prov = provenance("cpu")
    rows = []
    for r in [fast, par, flower] + ([lowmem] if lowmem else []):
        rows.append(dict(arm=r["arm"], model=spec["model"], task=spec["task"], clients=spec["clients"],
                         clients_per_round=spec["clients_per_round"], rounds=spec["rounds"],
                         local_steps=spec["local_steps"], batch_size=spec["batch_size"], lr=spec["lr"],
                         lora_r=spec["lora_r"], workers=r.get("workers", 1), round_s_mean=_mean(r["round_seconds"]),
                         # Flower's actors load their models in round 1: the rounds after it are the steady state
                         round_s_after_first=_mean(r["round_seconds"][1:]),
                         round_seconds=r["round_seconds"], process_wall_s=r["process_wall_s"],
                         arm_wall_s=r["arm_wall_s"], peak_rss_mb=r["peak_rss_mb"], peak_pss_mb=r["peak_pss_mb"],
                         peak_processes=r["peak_processes"], cpu_s=r["cpu_s"], accuracy=r["accuracy"],
                         accuracy_r0=r["accuracy"][0], accuracy_final=r["accuracy"][-1], **prov))
    seq, par_row, flo = rows[:3]
    ratios = {"round time": flo["round_s_mean"] / seq["round_s_mean"],  # Flower / fastseq (sequential)
              "round time after round 1": flo["round_s_after_first"] / seq["round_s_after_first"],
              "arm wall time": flo["process_wall_s"] / seq["process_wall_s"],
              "peak PSS": flo["peak_pss_mb"] / seq["peak_pss_mb"],
              "peak RSS": flo["peak_rss_mb"] / seq["peak_rss_mb"],
              "CPU seconds": flo["cpu_s"] / seq["cpu_s"],
              # fastseq with workers against itself sequential and against Flower
              "workers round time / sequential": par_row["round_s_mean"] / seq["round_s_mean"],
              "workers round time / Flower (after round 1)": par_row["round_s_after_first"] / flo["round_s_after_first"],
              "workers peak PSS / sequential": par_row["peak_pss_mb"] / seq["peak_pss_mb"],
              "Flower peak PSS / workers": flo["peak_pss_mb"] / par_row["peak_pss_mb"]}
    if lowmem:
        low = rows[3]
        ratios.update({"workers+mmap round time / sequential": low["round_s_mean"] / seq["round_s_mean"],
                       "workers+mmap peak PSS / sequential": low["peak_pss_mb"] / seq["peak_pss_mb"],
                       "Flower peak PSS / workers+mmap": flo["peak_pss_mb"] / low["peak_pss_mb"]})
    stem = out_dir / (STEM + ("_smoke" if args.smoke else "") + (f"_{args.tag}" if args.tag else ""))
    write_results(stem, rows, spec=spec, ratios=ratios, seconds=time.time() - t0, **prov)
    write_markdown(Path(f"{stem}.md"), spec, rows, ratios, prov)
    plot(Path(f"{stem}.png"), rows, spec)
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"wrote {stem}.{{csv,json,md,png}}")
    return dict(rows=rows, ratios=ratios)


if __name__ == "__main__":
    main()
