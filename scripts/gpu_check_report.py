"""The files of scripts/gpu_check.py: the goals judged from the step results, gpu_check.json,
gpu_check.md, gpu_check.png and the CSV tables. Everything here reads results; nothing measures."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from provenance import provenance, write_csv

GIB = 2**30
# (key, goal, target, direction): docs/kernels.md and ../shared/DESIGN.md. Memory in GiB
# (binary, as GPU memory and `fastseq plan --budget` read "4 GB").
GOALS = (
    ("fused_l1_vs_lora", "fused level 1 >= 1.25x PEFT LoRA fwd+bwd speed at the matched budget", 1.25, ">="),
    ("fused_l2_vs_lora", "fused level 2 >= 0.9x PEFT LoRA fwd+bwd speed at the matched budget", 0.9, ">="),
    ("frozen_gemm_roofline", "frozen GEMMs >= 60% of the measured bf16 matmul ceiling (fused L1 forward)", 0.6, ">="),
    ("nf4_tinyllama_4gb", "nf4 TinyLlama client within 4 GB at batch 4 x 512 (best fused level)", 4 * GIB, "<="),
    ("gemma_2b_6gb", "Gemma-2B client within 6 GB (batch 4 x 512, the planner's choice)", 6 * GIB, "<="),
)


def new_results(out: Path, dry: bool, argv: list, budget: float) -> dict:
    meta = dict(provenance("cpu" if dry else "cuda"), dry_run=dry, argv=list(argv), budget_s=budget, out=str(out))
    return dict(meta=meta, steps={}, goals=[])


def _rows(results: dict, step: str) -> list[dict]:
    return results["steps"].get(step, {}).get("rows") or []


def _judge(value, target, direction):
    if value is None:
        return None
    return value >= target if direction == ">=" else value <= target


def goals(results: dict) -> list[dict]:
    """Each goal with the worst measured value (speed: the slowest block; memory: the best
    level), whether it is met (None: not measured, as every goal of a dry run) and the per-case
    values (a dry run keeps them, for the record only)."""
    sweep = _rows(results, "sweep")
    by = {}
    for r in sweep:
        by.setdefault((r["variant"], r["shape"], r["tokens"]), {})[r["provider"]] = r
    out = []
    for key, text, target, direction in GOALS:
        for variant in (("plain", "default") if key in ("fused_l1_vs_lora", "fused_l2_vs_lora",
                                                        "frozen_gemm_roofline") else (None,)):
            cases = {}
            if key in ("fused_l1_vs_lora", "fused_l2_vs_lora"):
                prov = "scl_triton_l1" if key.endswith("l1_vs_lora") else "scl_triton_l2"
                for (v, shape, T), block in by.items():
                    if v == variant and prov in block and "peft_lora_matched" in block:
                        cases[f"{shape} T={T}"] = block["peft_lora_matched"]["ms_median"] / block[prov]["ms_median"]
            elif key == "frozen_gemm_roofline":
                for (v, shape, T), block in by.items():
                    row = block.get("scl_triton_l1")
                    if v == variant and row and row.get("fwd_frac_ceiling") is not None:
                        cases[f"{shape} T={T}"] = row["fwd_frac_ceiling"]
            elif key == "nf4_tinyllama_4gb":
                for r in _rows(results, "train_step"):
                    if r["backbone"] == "nf4" and r["provider"].startswith("scl") and r.get("cuda_peak_alone_bytes"):
                        cases[r["provider"]] = r["cuda_peak_alone_bytes"]
            else:
                g = results["steps"].get("gemma_memory", {})
                if g.get("measured_bytes"):
                    cases[f"{g['quantization']} L{g['checkpoint_level']} micro-batch {g['micro_batch']}"] = \
                        g["measured_bytes"]
            if not cases:
                value = None
            elif key.startswith(("nf4", "gemma")):
                value = min(cases.values())
            else:
                value = min(cases.values())  # the slowest / least efficient case decides
            name = key if variant is None else f"{key}[{variant}]"
            if results["meta"]["dry_run"]:  # CPU and the interpreter measure nothing a goal is about
                value = None
            out.append(dict(key=name, goal=text + (f", SCL {variant}" if variant else ""), target=target,
                            direction=direction, value=value, met=_judge(value, target, direction), cases=cases))
    return out


def _fmt(key: str, v) -> str:
    if v is None:
        return "not measured"
    if key.startswith(("nf4", "gemma")):
        return f"{v / GIB:.2f} GiB"
    if key.startswith("frozen_gemm"):
        return f"{100 * v:.0f}%"
    return f"{v:.2f}x"


def _num(v, spec=".2f", scale=1.0) -> str:
    return "" if v is None else format(v * scale, spec)


def _table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A markdown section with one table; nothing when there are no rows."""
    if not rows:
        return []
    return (["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def markdown(results: dict) -> str:
    m = results["meta"]
    env = results["steps"].get("env", {})
    lines = [f"# GPU check: {m['device_name']}", ""]
    if m["dry_run"]:
        lines += ["**DRY RUN on the CPU** (tiny shapes, the Triton interpreter): this rehearses the steps and "
                  "files; its numbers measure nothing and its goals say nothing about a GPU.", ""]
    lines += [f"commit {m['git_commit']}, {m['time']}, torch {m['torch']}, triton {m['triton']}, transformers "
              f"{m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}; budget {m['budget_s']:.0f} s, "
              f"took {m.get('seconds', '?')} s", ""]
    if env.get("matmul_tflops"):
        lines += [f"Ceilings measured here: copy {env['copy_gbps']:.0f} GB/s (read + write), {env['matmul_shape']} "
                  f"matmul {env['matmul_tflops']:.1f} TFLOP/s.", ""]
    lines += ["## Steps", "", "| step | status | seconds (budget) | note |", "|---|---|---|---|"]
    for name, r in results["steps"].items():
        failed_units = [f"{u}: {d['error']}" for u, d in (r.get("units") or {}).items() if d["status"] != "ok"]
        note = "; ".join(([r["error"]] if r.get("error") else []) + failed_units)
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} ({r.get('budget_s', '')}) | "
                     f"{note.replace('|', '/')[:400]} |")
    lines += ["", "## Goals", "", "| goal | value | met | cases |", "|---|---|---|---|"]
    for g in results["goals"]:
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        cases = ", ".join(f"{k}: {_fmt(g['key'], v)}" for k, v in g["cases"].items())
        lines.append(f"| {g['goal']} | {_fmt(g['key'], g['value'])} | {met} | {cases} |")
    c = results["steps"].get("correctness", {})
    if c.get("counts"):
        lines += ["", "## Correctness", "", f"`{c.get('command', '')}`", "", f"{c['counts']}", ""]
        lines += [f"* FAILED {f}" for f in c.get("failed", [])]
        lines += [f"* skipped x{n}: {why}" for why, n in (c.get("skip_reasons") or {}).items()]
    lines += _table("Kernel sweep (one FFN layer, bf16, fwd+bwd)",
                    ["variant", "shape", "T", "provider", "rank", "ms (median)", "vs LoRA matched", "TFLOP/s",
                     "of ceiling", "fwd of ceiling", "saved MiB", "peak MiB"],
                    [[r["variant"], r["shape"], r["tokens"], r["provider"], r["rank"], f"{r['ms_median']:.3f}",
                      f"{_num(r.get('speedup_vs_lora'))}x", f"{r['tflops']:.1f}", _num(r.get("frac_ceiling"), ".0%"),
                      _num(r.get("fwd_frac_ceiling"), ".0%"), f"{r['saved_bytes'] / 2**20:.1f}",
                      _num(r.get("peak_bytes"), ".1f", 2**-20)] for r in _rows(results, "sweep")])
    lines += _table("Training steps",
                    ["model", "backbone", "provider", "tokens", "tokens/s", "vs LoRA", "peak alone GiB", "planner GiB",
                     "planner / measured"],
                    [[f"{r['model']} ({r['layers']} layers)", r["backbone"], r["provider"], r["tokens"],
                      f"{r['tokens_per_s']:.0f}", _num(r.get("tokens_per_s_vs_lora")),
                      _num(r.get("cuda_peak_alone_bytes"), ".3f", 1 / GIB),
                      _num(r.get("plan_estimate_bytes"), ".3f", 1 / GIB), _num(r.get("plan_vs_cuda_peak"))]
                     for r in _rows(results, "train_step") + _rows(results, "gemma_memory")])
    g = results["steps"].get("gemma_memory", {})
    if g.get("plan"):
        lines += ["", f"Gemma-2B planner (6 GiB, batch 4 x {g.get('seq')}): {g['plan']}"]
    fed = results["steps"].get("federated", {})
    if fed.get("runs"):
        lines += ["", f"## Federated round (backend {fed.get('backend')})", ""]
        for r in fed["runs"]:
            lines.append(f"* {r['method']}: {r['rounds']} round in {r['seconds']} s, {r['metric']} {_num(r['initial'], '.4f')} "
                         f"-> {_num(r['final'], '.4f')}, up {r['uplink_bytes']:,} B, down {r['downlink_bytes']:,} B, dropped "
                         f"{r['dropped'] or 'none'}" + (f", CUDA peak {r['cuda_peak_bytes'] / 2**20:.0f} MiB"
                                                         if r.get("cuda_peak_bytes") else ""))
    fleet = results["steps"].get("fleet", {})
    if fleet.get("tiers"):
        lines += _table("Fleet: each tier's planned step, measured",
                        ["tier", "rank", "quantization", "level", "micro-batch", "estimated MiB", "measured MiB",
                         "budget MiB", "within"],
                        [[t["tier"], t.get("rank", "-"), t.get("quantization", "-"), t.get("checkpoint_level", "-"),
                          t.get("micro_batch", "-"), _num(t.get("estimated_bytes"), ".1f", 2**-20),
                          _num(t.get("measured_bytes"), ".1f", 2**-20), _num(t.get("budget"), ".1f", 2**-20),
                          t.get("within_budget", t.get("reason", "-"))] for t in fleet["tiers"]])
    wk = results["steps"].get("workers", {})
    lines += _table("Workers: one run with 1 and 4 worker processes sharing the backbone (spawned on a GPU)",
                    ["workers", "backbone", "round s", "rounds 2+ s", "client peak MiB", "engine peak MiB",
                     "device used MiB", "final"],
                    [[r["workers"], r.get("quantization", "none"),
                      ", ".join(f"{x:.2f}" for x in r["round_seconds"]),
                      _num(r.get("round_s_after_first"), ".2f"), _num(r.get("client_cuda_peak_bytes"), ".0f", 2**-20),
                      _num(r.get("engine_cuda_peak_bytes"), ".0f", 2**-20),
                      _num(r.get("device_used_peak_bytes"), ".0f", 2**-20), _num(r.get("final"), ".4f")]
                     for r in wk.get("runs", [])])
    if wk.get("round_time_ratio") is not None:
        lines += ["", f"4 workers / 1: round time {wk['round_time_ratio']:.2f}x after round 1; the same final "
                      f"metric: {wk.get('same_final')}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    sweep = _rows(results, "sweep")
    keys = list(dict.fromkeys((r["variant"], r["shape"], r["tokens"]) for r in sweep))
    labels = [f"{v}\n{s}\nT={t}" for v, s, t in keys]
    for ax, (metric, provs, title) in zip(axes[:2], (
            ("speedup_vs_lora", ("scl_eager", "scl_triton_l1", "scl_triton_l2"), "fwd+bwd speed vs PEFT LoRA (matched)"),
            ("fwd_frac_ceiling", ("frozen_mlp", "scl_triton_l1", "scl_triton_l2"), "forward TFLOP/s / bf16 ceiling"))):
        width = 0.8 / len(provs)
        for i, p in enumerate(provs):
            vals = [next((r.get(metric) for r in sweep if (r["variant"], r["shape"], r["tokens"]) == k
                          and r["provider"] == p), None) for k in keys]
            ax.bar([x + i * width for x in range(len(keys))], [v if v is not None else float("nan") for v in vals],
                   width, label=p)
        for y, style in ((1.25, "--"), (0.9, ":")) if metric == "speedup_vs_lora" else ((0.6, "--"),):
            ax.axhline(y, color="k", linestyle=style, linewidth=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    train = _rows(results, "train_step") + _rows(results, "gemma_memory")
    if train:
        labels = [f"{r['model'].split('-')[0]}\n{r['backbone']}\n{r['provider']}" for r in train]
        measured = [(r.get("cuda_peak_alone_bytes") or r["est_peak_bytes"]) / GIB for r in train]
        est = [(r.get("plan_estimate_bytes") or float("nan")) / GIB for r in train]
        xs = range(len(train))
        cuda = any(r.get("cuda_peak_alone_bytes") for r in train)
        ax.bar([x - 0.2 for x in xs], measured, 0.4, label="max_memory_allocated (alone)" if cuda else
               "params+grads+optimizer+saved (CPU)")
        ax.bar([x + 0.2 for x in xs], est, 0.4, label="planner estimate")
        for y in (4, 6):
            ax.axhline(y, color="k", linestyle="--", linewidth=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6)
        ax.legend(fontsize=7)
    ax.set_title("training step memory (GiB)", fontsize=9)
    m = results["meta"]
    fig.suptitle(f"{'DRY RUN (CPU): not a measurement; ' if m['dry_run'] else ''}{m['device_name']}, torch {m['torch']}, "
                 f"triton {m['triton']}, {m['git_commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(results: dict, out: Path, log) -> None:
    """Rewrite every output file from ``results`` (after each step, so that a run stopped from
    outside keeps what it had). A file that cannot be written is reported, never fatal."""
    results["goals"] = goals(results)
    results["meta"]["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = out / ".gpu_check.json"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "gpu_check.json")
    writers = (("gpu_check.md", lambda p: p.write_text(markdown(results))),
               ("kernel_sweep.csv", lambda p: write_csv(p, _rows(results, "sweep"))),
               ("train_step.csv", lambda p: write_csv(p, _rows(results, "train_step") + _rows(results, "gemma_memory"))),
               ("gpu_check.png", lambda p: plot(results, p)))
    for name, write in writers:
        try:
            write(out / name)
        except Exception as e:
            log(f"could not write {name}: {type(e).__name__}: {e}")


def final_table(results: dict) -> str:
    """The last lines of the output (the device tool returns the end of it)."""
    lines = ["", "step          status   seconds"]
    for name, r in results["steps"].items():
        lines.append(f"{name:13s} {r['status']:8s} {r.get('seconds', '')}")
    c = results["steps"].get("correctness", {}).get("counts")
    if c:
        lines.append(f"correctness: {c['passed']} passed, {c['failures']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped")
    lines.append("goals" + (" (DRY RUN: not a measurement)" if results["meta"]["dry_run"] else "") + ":")
    for g in results["goals"]:
        met = {True: "met", False: "MISSED", None: "-"}[g["met"]]
        lines.append(f"  {met:7s} {_fmt(g['key'], g['value']):>14s}  {g['goal']}")
    return "\n".join(lines)
