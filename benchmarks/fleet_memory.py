"""Peak memory of a heterogeneous fleet run on the local engine: one backbone per quantization
in use, not one per client.

Two arms, each in its own subprocess (``ru_maxrss`` of a clean process, one torch thread):

* ``plain``: the run as configured (one backbone, every client at the run's configuration);
* ``fleet``: the same run with ``--fleet FILE``: each client plans itself for its tier, and the
  engine loads one more backbone for every other quantization the plans chose.

The claim checked: ``peak(fleet) - peak(plain)`` stays within the extra backbones' bytes (each
measured as its frozen tensors, quantization constants included) plus one client's training
state (the largest tier's measured step: trainable + optimizer state + saved activations). A
backbone per client would add one per sampled client.

    python benchmarks/fleet_memory.py                         # MiniLM + bbc-news, configs/fleet-3-tiers.toml
    python benchmarks/fleet_memory.py --smoke                 # tiny-llama, seconds

Writes ``benchmarks/results/fleet_memory[_smoke].{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from provenance import provenance  # noqa: E402


def arm(config: dict, result: str) -> None:
    """In the subprocess: run ``config`` and write its peak RSS (and, for a fleet, each extra
    backbone's bytes and each tier's measured step) to ``result``."""
    import torch

    torch.set_num_threads(1)
    try:  # both arms hold the same libraries: a fleet's planning probes bitsandbytes' kernels
        from fastseq.quant import check_device

        check_device("nf4", "cpu")
        check_device("int8", "cpu")
    except Exception:
        pass
    from fastseq.fed.engine import run_experiment
    from fastseq.fed.experiment import ExperimentConfig, build_runtime, tier_clients
    from fastseq.fed.fleet import measure_plan
    from fastseq.memory import frozen_and_trainable_bytes

    cfg = ExperimentConfig.from_dict(config)
    summary = run_experiment(cfg, echo=lambda s: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = dict(peak_rss=peak, seconds=summary.get("seconds"), final=summary.get("final"), metric=summary.get("metric"))
    if cfg.fleet is not None:  # measured after the run, on a runtime of its own
        rt = build_runtime(ExperimentConfig.from_dict({**config, "out": None}), echo=lambda s: None)
        out["backbones"] = {q: frozen_and_trainable_bytes(b.model)[0] for q, b in rt.backbones.items()}
        tiers = {}
        for tier, client in tier_clients(cfg, rt).items():
            m = measure_plan(client)
            tiers[tier] = dict(**client.plan.as_row(), measured_training_state=m.trainable + m.activations,
                               measured_step=m.frozen + m.trainable + m.activations)
        out["tiers"] = tiers
    Path(result).write_text(json.dumps(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--fleet", default=str(ROOT / "configs" / "fleet-3-tiers.toml"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.arm:
        arm(json.loads(a.config), a.result)
        return 0
    from fastseq.fed.fleet import read_fleet_file

    fleet = read_fleet_file(a.fleet)
    base = dict(rounds=a.rounds, workers=1, progress=False, clients=5, clients_per_round=3)
    if a.smoke:
        base.update(model="tiny-llama", task="synthetic", max_examples=80, r=4, min_client_size=4, partition="iid",
                    batch_size=8, local_steps=2, max_length=32)
        fleet = {"rank_ladder": [4, 2], "tiers": [{"name": "small", "share": 0.4, "max_rank": 2,
                                                   "memory": "3MB"}, {"name": "big", "share": 0.6}]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("plain", {}), ("fleet", {"fleet": fleet})):
            cfg = dict(base, **extra, out=str(Path(tmp) / name))
            res = Path(tmp) / f"{name}.json"
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            subprocess.run([sys.executable, __file__, "--arm", name, "--config", json.dumps(cfg), "--result", str(res)],
                           check=True, env=env)
            results[name] = json.loads(res.read_text())
    fl, pl = results["fleet"], results["plain"]
    extra_backbones = sum(b for q, b in fl["backbones"].items() if q != "none")
    one_client = max(t["measured_training_state"] for t in fl["tiers"].values())
    allowed = extra_backbones + one_client
    grown = fl["peak_rss"] - pl["peak_rss"]
    doc = dict(fleet=fleet, plain=pl, fleet_run=fl, extra_backbone_bytes=extra_backbones,
               one_client_training_state=one_client, peak_growth=grown, allowed_growth=allowed,
               within=grown <= allowed, **provenance("cpu"))
    name = "fleet_memory" + ("_smoke" if a.smoke else "")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    mib = 2 ** 20
    lines = [f"# Fleet memory ({'tiny-llama' if a.smoke else 'MiniLM + bbc-news'}, {a.rounds} rounds, one process)", "",
             "| tier | rank | quantization | level | micro-batch | codec | estimated step | measured step |",
             "|---|---|---|---|---|---|---|---|"]
    for t, r in fl["tiers"].items():
        lines.append(f"| {t} | {r['rank']} | {r['quantization']} | {r['checkpoint_level']} | {r['micro_batch']} | "
                     f"{r['codec']} | {r['estimated_bytes'] / mib:.1f} MiB | {r['measured_step'] / mib:.1f} MiB |")
    lines += ["", "* backbones loaded: " + ", ".join(f"{q} {b / mib:.1f} MiB" for q, b in fl["backbones"].items()),
              f"* peak RSS: plain run {pl['peak_rss'] / mib:.0f} MiB, fleet run {fl['peak_rss'] / mib:.0f} MiB "
              f"(+{grown / mib:.0f} MiB)",
              f"* allowed growth: the extra backbones {extra_backbones / mib:.1f} MiB + one client's training state "
              f"{one_client / mib:.1f} MiB = {allowed / mib:.1f} MiB: **{'within' if grown <= allowed else 'OVER'}**"]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
