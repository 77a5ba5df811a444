"""``fastseq run|compare|plan``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

# flag -> (config key, type, help)
RUN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "model: hub id, local folder, all-MiniLM-L6-v2 or a tiny-* model"),
    ("--task", "task", str, "task name (bbc-news, synthetic, medquad, dolly, ...)"),
    ("--data-path", "data_path", str, "local data file/folder or hub id for the task"),
    ("--method", "method", str, "scl | fedavg-lora | ffa-lora | fedsa-lora | fedex-lora"),
    ("--rounds", "rounds", int, "federated rounds"),
    ("--clients", "clients", int, "number of clients"),
    ("--clients-per-round", "clients_per_round", int, "clients sampled per round"),
    ("--min-clients", "min_clients", int, "valid updates needed to aggregate a round"),
    ("--partition", "partition", str, "iid | dirichlet | pathological"),
    ("--alpha", "alpha", float, "Dirichlet concentration (smaller = more skewed)"),
    ("--classes-per-client", "classes_per_client", int, "keys per client (pathological)"),
    ("--local-steps", "local_steps", int, "local optimizer steps per round"),
    ("--local-epochs", "local_epochs", float, "local epochs per round (instead of steps)"),
    ("--r", "r", int, "SCL rank (and the budget LoRA's rank is matched to)"),
    ("--scl-placement", "scl_placement", str, "SCL placement: residual (Wd (h + s E sigma(C h))) | parallel "
                                              "(Wd h + s P sigma(C h))"),
    ("--lora-r", "lora_r", int, "explicit LoRA rank (default: matched to SCL's budget)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (default 2*lora_r)"),
    ("--lr", "lr", float, "client AdamW learning rate"),
    ("--head-lr", "head_lr", float, "the task head's learning rate (default: --lr)"),
    ("--scl-compress-lr", "scl_compress_lr", float, "SCL C's learning rate (default: --lr)"),
    ("--batch-size", "batch_size", int, "client micro-batch size"),
    ("--grad-accum", "grad_accum", int, "gradient accumulation steps"),
    ("--codec", "codec", str, "uplink codec: none | bf16 | int8 | nf4 | fp4"),
    ("--downlink-codec", "downlink_codec", str, "downlink codec"),
    ("--topk", "topk", float, "top-k sparsification of the uplink (fraction or count)"),
    ("--seed", "seed", int, "seed of every RNG"),
    ("--engine", "engine", str, "local | flower"),
    ("--out", "out", str, "output directory (default runs/<timestamp>-<method>)"),
    ("--quantization", "quantization", str, "backbone quantization: none | int8 | nf4"),
    ("--max-length", "max_length", int, "max tokens per text example"),
    ("--max-examples", "max_examples", int, "cap the dataset size"),
    ("--eval-examples", "eval_examples", int, "cap the test set size"),
    ("--validation-fraction", "validation_fraction", float, "hold out this fraction of the training data for "
                                                            "model selection (scored as val_* every round)"),
    ("--validation-split", "validation_split", str, "clients (from each client's data) | pooled (before "
                                                    "partitioning)"),
    ("--test-every", "test_every", int, "score the test split every N rounds (and the last 3)"),
    ("--server-opt", "server_opt", str, "fedavg | fedavgm | fedadam"),
    ("--server-lr", "server_lr", float, "server learning rate (default 1.0, fedadam 0.01)"),
    ("--prox-mu", "prox_mu", float, "FedProx mu (0 = off)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--dtype", "dtype", str, "backbone dtype: float32 | bfloat16 | float16"),
]


def _json_table(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as {\"zero_stage\": 2}")
    return value


def add_run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run a federated experiment",
                       description="Run a federated experiment. With no arguments: MiniLM + SCL on bbc-news.")
    p.add_argument("--config", help="a .toml / .yaml / .json config file (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last complete round")
    for flag, key, typ, hlp in RUN_FLAGS:
        p.add_argument(flag, dest=key, type=typ, default=None, help=hlp)
    p.add_argument("--deepspeed", dest="deepspeed", type=_json_table, default=None, metavar="JSON",
                   help='train clients under DeepSpeed, e.g. \'{"zero_stage": 2}\' (see docs/deployment.md)')
    p.add_argument("--scl-layers", dest="scl_layers", type=int, nargs="+", default=None, metavar="I",
                   help="adapt only these layer indices with SCL (default: every FFN)")
    p.add_argument("--scl-train-compress", dest="scl_train_compress", action=argparse.BooleanOptionalAction,
                   default=None, help="train SCL's C (--no-scl-train-compress: C frozen at a seed-derived init, "
                                      "never sent; only E or P trains)")
    p.add_argument("--error-feedback", dest="error_feedback", action=argparse.BooleanOptionalAction,
                   default=None, help="per-client error feedback on the uplink")
    p.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [k for _, k, _, _ in RUN_FLAGS] + ["error_feedback", "progress", "deepspeed", "scl_layers",
                                              "scl_train_compress"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_run(args: argparse.Namespace) -> int:
    from .fed.engine import run_experiment
    from .fed.experiment import ExperimentConfig, load_config_file

    over = _overrides(args)
    if args.resume:
        d = Path(args.resume)
        if not (d / "config.json").is_file():
            raise _UserError(f"cannot resume: {d} has no config.json (is it a fastseq run directory?)")
        base = json.loads((d / "config.json").read_text())
        base = {k: v for k, v in base.items() if k in ExperimentConfig.keys()}
        if args.config:
            base.update(load_config_file(args.config))
        base.update(over)
        base["out"] = str(d)
        cfg = ExperimentConfig.from_dict(base)
        run_experiment(cfg, resume=True)
        return 0
    base = load_config_file(args.config) if args.config else {}
    base.update(over)
    cfg = ExperimentConfig.from_dict(base)
    run_experiment(cfg)
    return 0


def add_compare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="compare several runs (table + joint plot)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("--plot", default="compare.png", help="where to write the joint plot (default compare.png)")
    return p


def load_history(d: Path) -> list[dict]:
    path = d / "metrics.jsonl"
    if not path.is_file():
        raise _UserError(f"{d} has no metrics.jsonl; pass directories written by `fastseq run`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cmd_compare(args: argparse.Namespace) -> int:
    from .fed.plots import plot_runs

    rows, hists = [], []
    for d in map(Path, args.dirs):
        hist = load_history(d)
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        metric = "accuracy" if any(isinstance(h.get("accuracy"), (int, float)) for h in hist) else "eval_loss"
        first, last = hist[0].get(metric), hist[-1].get(metric)
        up = sum(h.get("uplink_bytes", 0) for h in hist)
        down = sum(h.get("downlink_bytes", 0) + h.get("eval_downlink_bytes", 0) for h in hist)
        secs = sum(h.get("seconds", 0) or 0 for h in hist)
        label = f"{d.name} ({cfg.get('method', hist[-1].get('method', '?'))})"
        rows.append([d.name, str(cfg.get("method", hist[-1].get("method"))), str(hist[-1]["round"]), metric,
                     _fmt(first), _fmt(last), _fmt(last - first if _num(first) and _num(last) else None),
                     f"{up / 1e6:.3f}", f"{down / 1e6:.3f}", f"{secs:.1f}"])
        hists.append((label, hist))
    header = ["run", "method", "rounds", "metric", "round0", "final", "gain", "up MB", "down MB", "seconds"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    plot_runs(hists, args.plot)
    print(f"plot written to {args.plot}")
    return 0


def _num(x) -> bool:
    return isinstance(x, (int, float))


def _fmt(x) -> str:
    return f"{x:.4f}" if _num(x) else "-"


class _UserError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseq", description="federated fine-tuning with SCL and LoRA baselines")
    sub = parser.add_subparsers(dest="command")
    add_run_parser(sub)
    add_compare_parser(sub)
    try:
        from .memory import add_plan_parser
    except ImportError:
        pass
    else:
        add_plan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("FASTSEQ_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .config import ConfigError
    from .data import DataError

    try:
        from .models import ModelLoadError
    except ImportError:  # pragma: no cover
        ModelLoadError = ConfigError  # type: ignore[misc]
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "compare":
            return cmd_compare(args)
        func = getattr(args, "func", None)
        if func is None:
            parser.error(f"unknown command {args.command!r}")
        return int(func(args) or 0)
    except (_UserError, ConfigError, DataError, ModelLoadError, FileNotFoundError) as e:
        print(f"fastseq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
