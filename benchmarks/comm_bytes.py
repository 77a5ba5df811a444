"""Bytes per round: SCL vs the LoRA methods' shared tensors, per codec, uplink and downlink.

Every number is ``len(blob)`` of a real :func:`fastseq.comm.encode` of tensors with the
shapes each method shares (scales, top-k indices and the JSON header included), for one
client and one round:

* ``scl``          shares C [r, f] and E [f, r] per layer (up and down); the variants
  ``scl-frozenC`` (E only: C is frozen at a seed-derived init and never sent),
  ``scl-parallel`` (C and P [d, r]) and ``scl-parallel-frozenC`` (P only), all at rank r.
* ``fedavg-lora``  shares A [r, in] and B [out, r] of every LoRA module (up and down).
* ``ffa-lora``     shares B only (A is frozen at a seed-shared init).
* ``fedsa-lora``   shares A only (B stays local on each client).
* ``fedex-lora``   uplink A, B; downlink A, B plus the exact-aggregation residual
  ``sum_k p_k B_k A_k - B_bar A_bar``, a full-rank [out, in] matrix per LoRA module.
  The residual's bytes are extrapolated from encoding one layer's residuals (the
  blob for all layers would be up to 2 GB fp32 for TinyLlama); the rows say so.

Shapes (one FFN site per layer): TinyLlama (22 layers, d 2048, f 5632) and all-MiniLM-L6-v2
(6 layers, d 384, f 1536). Budgets: ``matched`` = LoRA on up+down at the rank whose
``2 r_lora (d + f)`` per layer is closest to SCL's ``2 f r``; ``authors`` = LoRA r=16 on
up_proj only (the authors' repository's setting; fewer parameters than SCL r=16).

With ``--accuracy benchmarks/results/accuracy_<task>.json`` (written by
``scripts/accuracy_study.py``), also reports the cumulative bytes each method actually sent
(counted by the runtime) until its mean accuracy first reached a target.

    python benchmarks/comm_bytes.py                   # both shapes, all codecs
    python benchmarks/comm_bytes.py --smoke           # MiniLM shape only, 2 codecs (tests)
    python benchmarks/comm_bytes.py --target-only --accuracy benchmarks/results/accuracy_bbc-news_quick.json

Writes ``benchmarks/results/comm_bytes.{csv,json,png}`` (and ``comm_to_target_<task>.*``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from provenance import provenance, write_results  # noqa: E402
from fastseq import comm  # noqa: E402
from fastseq import SCLConfig  # noqa: E402
from fastseq.fed.methods import matched_lora_rank  # noqa: E402  (the runtime's own budget rule)

SHAPES = {"tinyllama": dict(layers=22, d=2048, f=5632), "minilm": dict(layers=6, d=384, f=1536)}
SCL_RANK = 16
# SCL variants (label -> SCLConfig fields), all at SCL_RANK
SCL_VARIANTS = {"scl": dict(placement="residual", train_compress=True),
                "scl-frozenC": dict(placement="residual", train_compress=False),
                "scl-parallel": dict(placement="parallel", train_compress=True),
                "scl-parallel-frozenC": dict(placement="parallel", train_compress=False)}  # the default
METHODS = (*SCL_VARIANTS, "fedavg-lora", "ffa-lora", "fedsa-lora", "fedex-lora")
CODECS = {  # label -> (codec name, params)
    "none": ("none", {}), "bf16": ("bf16", {}), "int8": ("int8", {}), "nf4": ("nf4", {}),
    "fp4": ("fp4", {}), "topk10+int8": ("int8", {"topk": 0.1}),
}


def lora_modules(budget: str, d: int, f: int) -> tuple[int, list[tuple[str, int, int]]]:
    """(rank, [(module name, in_features, out_features)]) per layer for a LoRA budget."""
    if budget == "matched":
        return matched_lora_rank(2 * f * SCL_RANK, d, f), [("up_proj", d, f), ("down_proj", f, d)]
    if budget == "authors":
        return 16, [("up_proj", d, f)]
    raise ValueError(budget)


def shared_shapes(method: str, direction: str, shape: dict, budget: str):
    """{name: shape} the method sends in one direction (without the fedex residual)."""
    L, d, f = shape["layers"], shape["d"], shape["f"]
    out: dict[str, tuple[int, ...]] = {}
    if method in SCL_VARIANTS:
        cfg = SCLConfig(r=SCL_RANK, **SCL_VARIANTS[method])
        for i in range(L):
            if cfg.train_compress:
                out[f"layers.{i}.mlp.scl.compress.weight"] = (SCL_RANK, f)
            if cfg.placement == "residual":
                out[f"layers.{i}.mlp.scl.expand.weight"] = (f, SCL_RANK)
            else:
                out[f"layers.{i}.mlp.scl.project.weight"] = (d, SCL_RANK)
        return out, SCL_RANK
    r, mods = lora_modules(budget, d, f)
    share_a = method in ("fedavg-lora", "fedsa-lora", "fedex-lora")
    share_b = method in ("fedavg-lora", "ffa-lora", "fedex-lora")
    for i in range(L):
        for name, fin, fout in mods:
            if share_a:
                out[f"layers.{i}.mlp.{name}.lora_A.weight"] = (r, fin)
            if share_b:
                out[f"layers.{i}.mlp.{name}.lora_B.weight"] = (fout, r)
    return out, r


def trainable_per_client(method: str, shape: dict, budget: str) -> int:
    L, d, f = shape["layers"], shape["d"], shape["f"]
    if method in SCL_VARIANTS:
        return L * SCLConfig(r=SCL_RANK, **SCL_VARIANTS[method]).adapter_params_per_layer(d, f)
    r, mods = lora_modules(budget, d, f)
    per = sum(r * (fin + fout) for _, fin, fout in mods)
    if method == "ffa-lora":
        per = sum(r * fout for _, _, fout in mods)
    return L * per


def _tensors(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}


def payload_bytes(shapes: dict, codec_label: str, method: str, direction: str) -> int:
    name, params = CODECS[codec_label]
    blob = comm.encode(_tensors(shapes), name, method=method, direction=direction, round=1, client_id="0",
                       example_count=100, **params)
    return len(blob)


def fedex_residual_bytes(shape: dict, budget: str, codec_label: str) -> int:
    """Bytes of the fedex-lora downlink residuals for all layers, extrapolated from one layer."""
    _, mods = lora_modules(budget, shape["d"], shape["f"])
    one = {f"layers.0.mlp.{n}.residual": (fout, fin) for n, fin, fout in mods}
    name, params = CODECS[codec_label]
    blob = comm.encode(_tensors(one, seed=1), name, method="fedex-lora", direction="down", **params)
    tensor_bytes = sum(comm.byte_breakdown(blob)["tensors"].values())
    return shape["layers"] * tensor_bytes


def run(shapes=None, codecs=None, budgets=None, out_dir=None, accuracy=None, target=None, smoke=False):
    shapes = shapes or (["minilm"] if smoke else list(SHAPES))
    codecs = codecs or (["none", "int8"] if smoke else list(CODECS))
    budgets = budgets or (["matched"] if smoke else ["matched", "authors"])
    meta = dict(provenance("cpu"), scl_rank=SCL_RANK)
    rows = []
    for sname in shapes:
        shape = SHAPES[sname]
        for budget in budgets:
            for method in METHODS:
                if method in SCL_VARIANTS and budget != budgets[0]:
                    continue  # SCL's payload does not depend on the LoRA budget
                for codec_label in codecs:
                    row = dict(meta, shape=sname, layers=shape["layers"], d=shape["d"], f=shape["f"],
                               budget="scl" if method in SCL_VARIANTS else budget, method=method, codec=codec_label)
                    for direction in ("up", "down"):
                        sh, r = shared_shapes(method, direction, shape, budget)
                        b = payload_bytes(sh, codec_label, method, direction)
                        extrapolated = False
                        if method == "fedex-lora" and direction == "down":
                            b += fedex_residual_bytes(shape, budget, codec_label)
                            extrapolated = True
                        row[f"{direction}link_bytes"] = b
                        row[f"{direction}link_values"] = sum(int(torch.Size(s).numel()) for s in sh.values())
                        if extrapolated:
                            _, mods = lora_modules(budget, shape["d"], shape["f"])
                            row["downlink_values"] += shape["layers"] * sum(fi * fo for _, fi, fo in mods)
                        row["rank"] = r
                        row["downlink_extrapolated"] = extrapolated
                    row["trainable_params"] = trainable_per_client(method, shape, budget)
                    row["round_bytes_per_client"] = row["uplink_bytes"] + row["downlink_bytes"]
                    rows.append(row)
                    print(f"{sname:9s} {row['budget']:8s} {method:12s} r={row['rank']:3d} {codec_label:12s} "
                          f"up {row['uplink_bytes']:>13,d}  down {row['downlink_bytes']:>15,d}"
                          + ("  (residual extrapolated)" if row["downlink_extrapolated"] else ""), flush=True)
    # ratios vs SCL with the same shape and codec
    for row in rows:
        ref = next(r for r in rows if r["shape"] == row["shape"] and r["codec"] == row["codec"] and r["method"] == "scl")
        row["uplink_vs_scl"] = row["uplink_bytes"] / ref["uplink_bytes"]
        row["round_vs_scl"] = row["round_bytes_per_client"] / ref["round_bytes_per_client"]
        fp32 = next(r for r in rows if r["shape"] == row["shape"] and r["method"] == row["method"]
                    and r["budget"] == row["budget"] and r["codec"] == codecs[0])
        row["uplink_vs_first_codec"] = row["uplink_bytes"] / fp32["uplink_bytes"]
    out_dir = Path(out_dir or HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / "comm_bytes"
    write_results(stem, rows, meta=meta, smoke=smoke)
    plot(rows, f"{stem}.png")
    print(f"wrote {stem}.csv/.json/.png")
    if accuracy:
        bytes_to_target(accuracy, target, out_dir)
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["shape"], r["budget"]) for r in rows if r["budget"] != "scl"})
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    for ax, (shape, budget) in zip(axes[0], groups):
        sel = [r for r in rows if r["shape"] == shape and r["budget"] in ("scl", budget)]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        width = 0.8 / len(codecs)
        for i, c in enumerate(codecs):
            vals = [next(r["round_bytes_per_client"] for r in sel if r["method"] == m and r["codec"] == c) / 2**20
                    for m in methods]
            ax.bar([x + i * width for x in range(len(methods))], vals, width, label=c)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(methods))])
        ax.set_xticklabels(methods, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("uplink + downlink per client per round (MiB)")
        ax.set_title(f"{shape}, LoRA budget: {budget}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"SCL r={SCL_RANK} vs LoRA methods; fedex-lora downlink includes the full-rank residual "
                 f"({rows[0]['git_commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bytes_to_target(accuracy_json, target, out_dir):
    """Cumulative bytes (uplink + downlink, all clients) until the mean metric over seeds first
    reaches the target. Default target, per alpha: 90% of the best final mean of any arm (method x
    codec) at that alpha, so a hard split is not judged by what IID reaches."""
    data = json.loads(Path(accuracy_json).read_text())
    curves = data["curves"]  # written by scripts/accuracy_study.py
    task = data.get("task", "task")
    alphas = list(dict.fromkeys(str(c["alpha"]) for c in curves))
    targets = {al: target if target is not None else
               0.9 * max(c["accuracy_mean"][-1] for c in curves if str(c["alpha"]) == al) for al in alphas}
    rows = []
    for c in curves:
        codec, goal = c.get("codec", "none"), targets[str(c["alpha"])]
        hit = next((i for i, a in enumerate(c["accuracy_mean"]) if a >= goal), None)
        rows.append(dict(task=task, method=c["method"], codec=codec, alpha=c["alpha"], target_accuracy=goal,
                         round_reached=None if hit is None else c["rounds"][hit],
                         cumulative_bytes=None if hit is None else c["cumulative_bytes_mean"][hit],
                         final_accuracy=c["accuracy_mean"][-1], total_bytes=c["cumulative_bytes_mean"][-1],
                         git_commit=data.get("meta", {}).get("git_commit")))
        print(f"{c['method']:12s} {codec:5s} alpha={c['alpha']!s:5s} target {goal:.3f}: "
              + ("not reached" if hit is None else f"round {c['rounds'][hit]}, {c['cumulative_bytes_mean'][hit]:,.0f} B"))
    stem = Path(out_dir) / f"comm_to_target_{task}"
    write_results(stem, rows, source=str(accuracy_json), targets=targets)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.5 * len(alphas), 4), squeeze=False, sharey=True)
    for ax, al in zip(axes[0], alphas):
        for c in (c for c in curves if str(c["alpha"]) == al):
            codec = c.get("codec", "none")
            ax.plot([b / 2**20 for b in c["cumulative_bytes_mean"]], c["accuracy_mean"], marker=".",
                    label=c["method"] + ("" if codec == "none" else f" [{codec}]"))
        ax.axhline(targets[al], color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title("IID" if al == "iid" else f"alpha={al}", fontsize=9)
        ax.set_xlabel("cumulative bytes, up + down, all clients (MiB)")
    axes[0][0].set_ylabel(f"mean {data.get('meta', {}).get('metric', 'accuracy')} (dotted: target)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)
    print(f"wrote {stem}.csv/.json/.png")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="MiniLM shape, codecs none/int8, matched budget (seconds)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES))
    ap.add_argument("--codecs", nargs="+", choices=list(CODECS))
    ap.add_argument("--budgets", nargs="+", choices=["matched", "authors"])
    ap.add_argument("--accuracy", help="accuracy_<task>.json from scripts/accuracy_study.py")
    ap.add_argument("--target", type=float, help="target accuracy (default: 0.9 x best final mean accuracy)")
    ap.add_argument("--out-dir")
    ap.add_argument("--target-only", action="store_true", help="with --accuracy: skip the per-codec byte table")
    a = ap.parse_args(argv)
    if a.target_only:
        if not a.accuracy:
            ap.error("--target-only needs --accuracy")
        bytes_to_target(a.accuracy, a.target, Path(a.out_dir or HERE / "results"))
        return
    run(shapes=a.shapes, codecs=a.codecs, budgets=a.budgets, out_dir=a.out_dir, accuracy=a.accuracy,
        target=a.target, smoke=a.smoke)


if __name__ == "__main__":
    main()
