"""``fastseq run|compare|plan|eval``.

Every command reports a user error (config, flags, paths, devices, data, models, tokenizers,
budgets, resume targets, a run directory another process is writing) as one line on stderr
that names the problem and the fix, with exit code 2; an unexpected exception keeps its
traceback and says it is a bug to report (exit 1). A run that finished without aggregating
any client update exits 4 with the clients' reasons. :mod:`fastseq.exit_codes` lists them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from .exit_codes import BUG_EXIT, EXIT_CODES, INTERRUPT_EXIT, NOTHING_FITS_EXIT, NOTHING_TRAINED_EXIT, USAGE_EXIT


class CLIError(Exception):
    """A user error found by the command line itself (flags, paths)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fastseq run``; the message says how to continue the run."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage block first)."""

    def error(self, message: str):
        raise CLIError(f"{message}; see `{self.prog} --help`")


def _topk(text: str) -> int | float:
    """--topk: an integer is a count of values, anything else a fraction in (0, 1]."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a fraction in (0, 1] such as 0.1 or a "
                                         f"count such as 1000") from None

def _task_list(text: str) -> list[str]:
    """--harness-tasks: comma-separated lm-eval task names."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _harness_limit(text: str) -> int | float:
    from .data.harness import parse_limit

    return parse_limit(text)


def _fleet_file(path: str) -> dict:
    from .config import ConfigError
    from .fed.fleet import read_fleet_file

    try:
        return read_fleet_file(path)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _workers(text: str) -> int | str:
    if text == "auto":
        return text  # explicit: overrides a config file's number (config value null)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a number of workers >= 1 or auto")
    return n


# flag -> (config key, type, help)
RUN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "model: hub id, local folder, all-MiniLM-L6-v2 or a tiny-* model"),
    ("--task", "task", str, "task name (bbc-news, synthetic, medquad, dolly, ...)"),
    ("--data-path", "data_path", str, "local data file/folder or hub id for the task"),
    ("--method", "method", str, "scl | fedsa-scl | fedavg-lora | ffa-lora | fedsa-lora | fedex-lora"),
    ("--rounds", "rounds", int, "federated rounds"),
    ("--clients", "clients", int, "number of clients"),
    ("--clients-per-round", "clients_per_round", int, "clients sampled per round"),
    ("--min-clients", "min_clients", int, "valid updates needed to aggregate a round"),
    ("--partition", "partition", str, "iid | dirichlet | pathological"),
    ("--alpha", "alpha", float, "Dirichlet concentration (smaller = more skewed)"),
    ("--classes-per-client", "classes_per_client", int, "keys per client (pathological)"),
    ("--min-client-size", "min_client_size", int, "examples every client must get from the partition"),
    ("--partitioner", "partitioner", str, "a flwr-datasets partitioner class instead of --partition, e.g. "
                                          "DirichletPartitioner, PathologicalPartitioner, ShardPartitioner, "
                                          "NaturalIdPartitioner (its num_partitions, alpha, seed, "
                                          "num_classes_per_partition and min_partition_size come from --clients, "
                                          "--alpha, --seed, --classes-per-client and --min-client-size; the rest "
                                          "from --partitioner-options)"),
    ("--partition-by", "partition_by", str, "partition by this column of the data (--task hf: any scalar column "
                                            "of --dataset, e.g. a user id)"),
    ("--local-steps", "local_steps", int, "local optimizer steps per round"),
    ("--local-epochs", "local_epochs", float, "local epochs per round (instead of steps)"),
    ("--r", "r", int, "SCL rank (and the budget LoRA's rank is matched to)"),
    ("--scl-placement", "scl_placement", str, "SCL placement: residual (Wd (h + s E sigma(C h))) | parallel "
                                              "(Wd h + s P sigma(C h))"),
    ("--lora-r", "lora_r", int, "explicit LoRA rank (default: matched to SCL's budget)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (default 2*lora_r)"),
    ("--lr", "lr", float, "client AdamW learning rate (default: the method's own, chosen on validation by the "
                          "accuracy study: {default_lrs})"),
    ("--head-lr", "head_lr", float, "the task head's learning rate (default 1e-2 for every method; head_lr: null in a config follows --lr)"),
    ("--scl-compress-lr", "scl_compress_lr", float, "SCL C's learning rate (default: --lr)"),
    ("--batch-size", "batch_size", int, "client micro-batch size"),
    ("--grad-accum", "grad_accum", int, "gradient accumulation steps"),
    ("--codec", "codec", str, "uplink codec: none | bf16 | int8 | nf4 | fp4"),
    ("--downlink-codec", "downlink_codec", str, "downlink codec"),
    ("--topk", "topk", _topk, "top-k sparsification of the uplink: a fraction in (0, 1] or a count >= 1"),
    ("--aggregator", "aggregator", str, "mean | median | trimmed-mean | norm-clip (robust aggregation)"),
    ("--trim-fraction", "trim_fraction", float, "trimmed-mean: drop this fraction at each end per coordinate"),
    ("--norm-bound", "norm_bound", float, "norm-clip: L2 bound on each client's delta"),
    ("--byzantine", "byzantine", int, "hostile clients per round (local engine simulation)"),
    ("--attack", "attack", str, "the hostile clients' attack: sign-flip | scale | noise | nan"),
    ("--attack-scale", "attack_scale", float, "sign-flip / scale factor, noise std in units of the delta's RMS"),
    ("--secagg-shares", "secagg_shares", float, "SecAgg+: key shares per client, a fraction of the round's clients"),
    ("--secagg-threshold", "secagg_threshold", float, "SecAgg+: shares needed to rebuild a key, a fraction of the "
                                                      "shares"),
    ("--secagg-clip-range", "secagg_clip_range", float, "SecAgg+: clip each weighted delta value to +-this before "
                                                        "quantizing (2^22 levels)"),
    ("--dp", "dp", str, "client-level differential privacy: none | central (server clips + noises the mean) | "
                        "local (each client clips + noises its delta); see docs/privacy.md"),
    ("--dp-clip", "dp_clip", float, "DP: L2 bound on each client's shared delta (default: none, --dp central / "
                                    "local needs one; adaptive clipping starts at 0.1)"),
    ("--dp-noise", "dp_noise", float, "DP: noise multiplier z (noise std z*clip/n on the mean; local: z*clip)"),
    ("--dp-delta", "dp_delta", float, "DP: the delta of (epsilon, delta) (default 1/clients)"),
    ("--dp-clipping", "dp_clipping", str, "DP: fixed | adaptive (central only, quantile-based, Andrew et al. 2021)"),
    ("--dp-target-clipped-quantile", "dp_target_clipped_quantile", float, "adaptive DP clipping: the fraction of "
                                                                          "updates to clip (default 0.5)"),
    ("--dp-clip-norm-lr", "dp_clip_norm_lr", float, "adaptive DP clipping: the clip's geometric learning rate "
                                                    "(default 0.2)"),
    ("--dp-clipped-count-stddev", "dp_clipped_count_stddev", float, "adaptive DP clipping: noise std on the count "
                                                                    "of unclipped updates (default "
                                                                    "clients_per_round/20)"),
    ("--seed", "seed", int, "seed of every RNG"),
    ("--workers", "workers", _workers, "local engine: worker processes that train a round's clients in parallel on "
                                       "one shared backbone (default auto: on a CPU one per core when the round's "
                                       "clients fill them evenly, else 1; on a GPU 1); see docs/federated.md"),
    ("--worker-start", "worker_start", str, "local engine: how workers start: fork (CPU: after the backbone "
                                            "loaded, copy-on-write), spawn (torch.multiprocessing: the backbone's "
                                            "tensors shared as handles, CUDA IPC on a GPU), auto (default: fork on "
                                            "a CPU, spawn on a GPU)"),
    ("--engine", "engine", str, "local (one process, one shared backbone) | flower (SuperLink + SuperNodes) | "
                                "flower-sim (Flower's Simulation Engine, Ray actors)"),
    ("--client-cpus", "client_cpus", float, "flower-sim: CPUs per virtual client (Ray actor)"),
    ("--client-gpus", "client_gpus", float, "flower-sim: GPU fraction per virtual client, e.g. 0.25"),
    ("--out", "out", str, "output directory (default runs/<timestamp>-<method>)"),
    ("--report-to", "report_to", str, "experiment trackers, comma-separated: tensorboard, mlflow, wandb, trackio, "
                                      "or none (default none); each writes locally (offline) by default, see "
                                      "README 'Tracking'"),
    ("--quantization", "quantization", str, "backbone quantization: none | int8 | nf4"),
    ("--max-length", "max_length", int, "max tokens per text example"),
    ("--max-examples", "max_examples", int, "cap the dataset size"),
    ("--eval-examples", "eval_examples", int, "cap the test set size"),
    ("--validation-fraction", "validation_fraction", float, "hold out this fraction of the training data for "
                                                            "model selection (scored as val_* every round)"),
    ("--validation-split", "validation_split", str, "clients (from each client's data) | pooled (before "
                                                    "partitioning)"),
    ("--test-every", "test_every", int, "score the test split every N rounds (and the last 3)"),
    ("--personal-eval-clients", "personal_eval_clients", int, "fedsa-lora: score this many clients' own states "
                                                              "each round, a seeded panel (default: all up to 20, "
                                                              "else 20)"),
    ("--harness-tasks", "harness_tasks", _task_list, "lm-evaluation-harness tasks (comma-separated) that score the "
                                                     "global model in the server's evaluation (round 0, every "
                                                     "--harness-every rounds, the last; default: none); see "
                                                     "`fastseq eval`"),
    ("--harness-every", "harness_every", int, "score --harness-tasks every N rounds"),
    ("--harness-limit", "harness_limit", _harness_limit, "documents per --harness-tasks task: a count, or a "
                                                         "fraction in (0, 1)"),
    ("--server-opt", "server_opt", str, "fedavg | fedavgm | fedadam"),
    ("--server-lr", "server_lr", float, "server learning rate (default 1.0, fedadam 0.01)"),
    ("--prox-mu", "prox_mu", float, "FedProx mu (0 = off)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--dtype", "dtype", str, "backbone dtype: float32 | bfloat16 | float16"),
    ("--fleet", "fleet", _fleet_file, "a heterogeneous fleet: a .toml / .yaml file of tiers (memory, uplink, share "
                                      "or clients); each client plans its own rank, quantization, checkpoint level, "
                                      "micro-batch and codec (see README, Heterogeneous fleets)"),
    ("--hetero-aggregation", "hetero_aggregation", str, "a fleet's nested-rank aggregation: holders | zero-pad "
                                                        "(SCL with C frozen, ffa-lora) | hetlora | flexlora "
                                                        "(fedavg-lora)"),
    ("--fleet-misfit", "fleet_misfit", str, "a fleet tier nothing fits: refuse (the run) | drop (its clients)"),
]


# What a None default means, for --help (the others show their value).
NONE_MEANS: dict[str, str] = {
    "data_path": "the task's own data",
    "max_examples": "all",
    "eval_examples": "the whole test split",
    "local_epochs": "off: --local-steps counts the local work",
    "topk": "off: dense",
    "norm_bound": "none, --aggregator norm-clip needs one",
    "attack": "none",
    "dtype": "as transformers loads the checkpoint (its saved dtype from transformers 5 on); tiny models "
             "float32",
    "deepspeed": "off: plain PyTorch",
    "scl_train_compress": "off",
    "secagg": "off",
    "error_feedback": "off",
    "harness_limit": "every document",
    "fleet": "off: every client runs the run's own configuration",
    "hetero_aggregation": "holders for scl with C frozen and ffa-lora, hetlora for the others",
    "partitioner": "fastseq's own, --partition",
    "partition_by": "the task's key: its label or category",
}

# --task hf's column flags: task options (ExperimentConfig.task_options)
TASK_COLUMN_FLAGS = (("--text-column", "text_column", "classification: the column holding the text"),
                     ("--label-column", "label_column", "classification: the column holding the label"),
                     ("--prompt-column", "prompt_column", "instruction tuning: the column holding the prompt"),
                     ("--response-column", "response_column", "instruction tuning: the column holding the response"))


def _config_default(key: str) -> Any:
    from .fed.experiment import ExperimentConfig

    f = {f.name: f for f in dataclasses.fields(ExperimentConfig)}[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _with_default(key: str, text: str) -> str:
    """``text`` + the run's real default for ``key`` (ExperimentConfig's), unless ``text`` says
    it already; a None default in words (what None means), never "None"."""
    if "default" in text:
        return text
    if key in NONE_MEANS:
        return f"{text} (default: {NONE_MEANS[key]})"
    value = _config_default(key)
    if value is None:
        raise ValueError(f"--help: say in NONE_MEANS what {key}=None means")
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f"{text} (default: {value})"


def _json_table(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as {\"zero_stage\": 2}")
    return value


def add_run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run a federated experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a federated experiment. With no arguments: MiniLM + SCL on bbc-news.\n"
                                   "The defaults shown are fastseq's; a --config file's values replace them and "
                                   "flags override both.",
                       epilog=EXIT_CODES)
    p.add_argument("--config", help="a .toml / .yaml / .json config file (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last complete round (its "
                                                   "config.json gives the defaults)")
    from .fed.methods import default_lrs_text

    for flag, key, typ, hlp in RUN_FLAGS:
        p.add_argument(flag, dest=key, type=typ, default=None,
                       help=_with_default(key, hlp.replace("{default_lrs}", default_lrs_text())))
    p.add_argument("--dataset", dest="data_path", default=None, metavar="PATH_OR_ID",
                   help="--task hf: a save_to_disk folder, a parquet/json/jsonl/csv file or folder, or a hub id (the "
                        "same setting as --data-path; default: none)")
    for flag, key, hlp in TASK_COLUMN_FLAGS:
        p.add_argument(flag, dest=key, default=None, metavar="COLUMN",
                       help=f"--task hf, {hlp} (a task option; default: none)")
    p.add_argument("--partitioner-options", dest="partitioner_options", type=_json_table, default=None,
                   metavar="JSON", help="the --partitioner's other arguments, e.g. '{\"num_shards_per_partition\": 2}' "
                                        "or '{\"self_balancing\": true}' (default: {}, the class's own defaults)")
    p.add_argument("--deepspeed", dest="deepspeed", type=_json_table, default=None, metavar="JSON",
                   help=_with_default("deepspeed", 'train clients under DeepSpeed, e.g. \'{"zero_stage": 2}\' '
                                                   '(see docs/deployment.md)'))
    p.add_argument("--scl-layers", dest="scl_layers", type=int, nargs="+", default=None, metavar="I",
                   help="adapt only these layer indices with SCL (default: every FFN)")
    p.add_argument("--scl-train-compress", dest="scl_train_compress", action=argparse.BooleanOptionalAction,
                   default=None, help=_with_default("scl_train_compress", "train SCL's C (--no-scl-train-compress: "
                                                    "C frozen at a seed-derived init, never sent; only E or P "
                                                    "trains)"))
    p.add_argument("--secagg", dest="secagg", action=argparse.BooleanOptionalAction, default=None,
                   help=_with_default("secagg", "secure aggregation with Flower's SecAgg+ (--engine flower): the "
                                                "server sees only the weighted mean of the clients' deltas"))
    p.add_argument("--error-feedback", dest="error_feedback", action=argparse.BooleanOptionalAction,
                   default=None, help=_with_default("error_feedback", "per-client error feedback on the uplink"))
    p.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: only when stderr is a terminal)")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [k for _, k, _, _ in RUN_FLAGS] + ["error_feedback", "progress", "deepspeed", "scl_layers",
                                              "scl_train_compress", "secagg", "partitioner_options"]
    over = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if over.get("workers") == "auto":
        over["workers"] = None
    return over


def cmd_run(args: argparse.Namespace) -> int:
    from .fed.engine import read_run_config
    from .fed.experiment import ExperimentConfig

    over = _overrides(args)
    if args.resume:
        d = Path(args.resume)
        if "out" in over and Path(over["out"]) != d:
            raise CLIError(f"--resume {d} continues the run in {d}; leave out --out {over['out']}")
        base = {k: v for k, v in read_run_config(d).items() if k in ExperimentConfig.keys()}
        base.pop("progress", None)  # a resumed run decides afresh whether it is on a terminal
        if args.config:
            base.update(_read_config(args.config))
        base.update(over)
        _add_task_columns(base, args)
        base["out"] = str(d)
        _run(ExperimentConfig.from_dict(base), resume=True)
        return 0
    base = _read_config(args.config)
    base.update(over)
    _add_task_columns(base, args)
    _run(ExperimentConfig.from_dict(base), resume=False)
    return 0


def _read_config(path: str | None) -> dict[str, Any]:
    """A run config file's table; its ``fleet`` may be a table or the path of a fleet file."""
    from .fed.experiment import load_config_file
    from .fed.fleet import read_fleet_file

    base = load_config_file(path) if path else {}
    if isinstance(base.get("fleet"), str):
        fleet = Path(base["fleet"])
        base["fleet"] = read_fleet_file(str(fleet if fleet.is_absolute() else Path(path).parent / fleet))
    return base


def _add_task_columns(base: dict[str, Any], args: argparse.Namespace) -> None:
    """--text-column & co. into the config's task_options (over a config file's, key by key)."""
    cols = {key: getattr(args, key) for _, key, _ in TASK_COLUMN_FLAGS if getattr(args, key, None) is not None}
    if cols:
        opts = base.get("task_options") or {}
        base["task_options"] = {**opts, **cols} if isinstance(opts, dict) else opts  # not a table: validate says so


def _run(cfg, resume: bool) -> None:
    """Run ``cfg``; Ctrl-C becomes a RunInterrupted that says how to continue the run."""
    from .engines import run
    from .fed.experiment import default_out

    if cfg.out is None:
        cfg.out = default_out(cfg)  # chosen here, so that the message names it
    try:
        run(cfg, resume=resume)
    except KeyboardInterrupt:
        raise RunInterrupted(_how_to_continue(cfg)) from None


def _how_to_continue(cfg) -> str:
    """What an interrupted run left in ``cfg.out`` and the exact command that continues it."""
    from .config import ConfigError
    from .fed.engine import CKPT_RE, latest_checkpoint, read_run_config

    out = Path(cfg.out)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return f"no round was saved in {out}; run the command again to start over"
    done = int(CKPT_RE.fullmatch(ckpt.name).group(1))
    if done >= cfg.rounds and (out / "summary.json").is_file():
        return f"the run had finished; its outputs are in {out}"
    cmd = ["fastseq", "run", "--resume", str(out)]
    try:
        recorded = read_run_config(out).get("rounds")
    except ConfigError:
        recorded = None
    if recorded != cfg.rounds:  # interrupted before config.json took the new round count
        cmd += ["--rounds", str(cfg.rounds)]
    return f"round {done} of {cfg.rounds} is saved; continue with: {shlex.join(cmd)}"


def add_compare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="compare several runs (table + joint plot)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("--plot", default="compare.png", help="where to write the joint plot (default compare.png)")
    return p


def load_history(d: Path) -> list[dict]:
    if not d.is_dir():
        raise CLIError(f"{d} does not exist; pass directories written by `fastseq run`" if not d.exists()
                       else f"{d} is a file; pass directories written by `fastseq run`")
    path = d / "metrics.jsonl"
    if not path.is_file():
        raise CLIError(f"{d} has no metrics.jsonl; pass directories written by `fastseq run`")
    hist = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
            raise CLIError(f"{path} line {i} is not a metrics record (JSON with a round); the run directory is damaged")
        hist.append(rec)
    if not hist:
        raise CLIError(f"{path} is empty: the run has not finished its first round")
    return hist


def _run_config(d: Path) -> dict:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):  # the method name is read from metrics.jsonl then
        return {}
    return cfg if isinstance(cfg, dict) else {}


def cmd_compare(args: argparse.Namespace) -> int:
    from .fed.engine import run_seconds
    from .fed.plots import plot_runs

    plot = Path(args.plot)
    if plot.is_dir():
        raise CLIError(f"--plot {plot} is a directory; pass a file name such as {plot / 'compare.png'}")
    if not plot.parent.is_dir():
        raise CLIError(f"cannot write --plot {plot}: the folder {plot.parent} does not exist; create it or pass "
                       f"another path")
    rows, hists = [], []
    for d in map(Path, args.dirs):
        hist = load_history(d)
        cfg = _run_config(d)
        metric = "accuracy" if any(isinstance(h.get("accuracy"), (int, float)) for h in hist) else "eval_loss"
        first, last = hist[0].get(metric), hist[-1].get(metric)
        up = sum(h.get("uplink_bytes", 0) for h in hist)
        down = sum(h.get("downlink_bytes", 0) + h.get("eval_downlink_bytes", 0) for h in hist)
        label = f"{d.name} ({cfg.get('method', hist[-1].get('method', '?'))})"
        rows.append([d.name, str(cfg.get("method", hist[-1].get("method"))), str(hist[-1]["round"]), metric,
                     _fmt(first), _fmt(last), _fmt(last - first if _num(first) and _num(last) else None),
                     f"{up / 1e6:.3f}", f"{down / 1e6:.3f}", f"{run_seconds(hist):.1f}"])
        hists.append((label, hist))
    header = ["run", "method", "rounds", "metric", "round0", "final", "gain", "up MB", "down MB", "seconds"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    _print_harness(args.dirs)
    plot_runs(hists, plot)
    print(f"plot written to {plot}")
    return 0


def _print_harness(dirs) -> None:
    """The runs' `fastseq eval` results (lm-evaluation-harness), if any, as a second table."""
    from .data.harness import HARNESS_HEADER, metric_rows

    rows = [r for d in dirs for r in metric_rows(d)]
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows + [HARNESS_HEADER]) for i in range(len(HARNESS_HEADER))]
    print()
    for r in [HARNESS_HEADER] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _num(x) -> bool:
    return isinstance(x, (int, float))


def _fmt(x) -> str:
    return f"{x:.4f}" if _num(x) else "-"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastseq", description="federated fine-tuning with SCL and LoRA baselines",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command")
    parser.commands = {"run": add_run_parser(sub), "compare": add_compare_parser(sub)}
    try:
        from .memory import add_plan_parser
    except ImportError:
        pass
    else:
        plan = parser.commands["plan"] = add_plan_parser(sub)
        plan.add_argument("--fleet", type=_fleet_file, default=None, metavar="FILE",
                          help="plan every client of a heterogeneous fleet (a .toml / .yaml file of tiers) for the "
                               "run that --config, --model, --method, --r and --batch-size describe, and print "
                               "each tier's plan; --budget is then not needed")
        plan.add_argument("--config", default=None, help="with --fleet: the run's config file")
        plan.add_argument("--method", default=None, help="with --fleet: the run's method (default: the config's)")
        for action in plan._actions:
            if action.dest == "budget":
                action.required = False
        plan.set_defaults(func=cmd_plan)
    from .harness import add_eval_parser  # lm-eval itself is imported only when `fastseq eval` runs

    parser.commands["eval"] = add_eval_parser(sub)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    """``fastseq plan``: one budget (fastseq.memory), or with --fleet every tier of a fleet as the
    run would plan it (the model and task loaded, nothing trained or written)."""
    from .memory import run_plan

    if args.fleet is None:
        if args.budget is None:
            raise CLIError("fastseq plan needs --budget (e.g. 8GB) or --fleet FILE")
        return run_plan(args)
    from .fed.experiment import ExperimentConfig, build_runtime
    from .fed.fleet import FleetMisfit

    base = _read_config(args.config)
    base.update(fleet=args.fleet, model=args.model, progress=False)
    base.update({k: v for k, v in (("method", args.method), ("batch_size", args.batch_size), ("r", args.r),
                                   ("max_length", args.seq_len)) if v is not None})
    cfg = ExperimentConfig.from_dict(base)

    def echo(line: str) -> None:
        if line.startswith(("fleet", "  ", "method")):
            print(line)

    from .fed.engine import library_progress_bars

    try:
        with library_progress_bars(False):
            build_runtime(cfg, echo=echo)
    except FleetMisfit as e:
        print(f"fastseq plan: {_one_line(e)}")
        return NOTHING_FITS_EXIT
    from .flower.simulation import ray_init_args
    from .flower.tier_pools import describe, tier_pools

    ray = ray_init_args(cfg)
    pools = tier_pools(cfg, float(ray["num_cpus"]), float(ray.get("num_gpus") or 0))
    if pools:  # the tiers' own Ray resources: the actor pools flower-sim would build on this machine
        print(f"flower-sim actor pools here ({ray['num_cpus']} CPUs, {ray.get('num_gpus') or 0} GPUs): "
              f"{describe(pools)}")
    return 0



def _unrecognized(parser: argparse.ArgumentParser, command: str | None, unknown: list[str]) -> CLIError:
    """One line naming the unknown arguments, with the closest flag for each misspelt one."""
    where = f"fastseq {command}" if command else "fastseq"
    sub = parser.commands.get(command, parser)
    flags = [f for f in sub._option_string_actions if f.startswith("--")]
    said = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.75) if arg.startswith("--") else []
        said.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return CLIError(f"unrecognized arguments: {' '.join(said)}; see `{where} --help`")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input is wrong" (each message says what to do);
    anything else is a bug."""
    from .adapters import AdapterError, UnsupportedModelError
    from .comm import PayloadError
    from .config import ConfigError
    from .data import DataError
    from .models import ModelLoadError

    types: list[type[BaseException]] = [CLIError, ConfigError, DataError, ModelLoadError, AdapterError,
                                        UnsupportedModelError, PayloadError, OSError]
    for module, name in (("quant", "QuantizationError"), ("memory", "MemoryModelError"),
                         ("flower.deploy", "FlowerError")):
        try:
            mod = __import__(f"{__package__}.{module}", fromlist=[name])
        except ImportError:  # an optional part missing from this installation
            continue
        types.append(getattr(mod, name))
    return tuple(types)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        text += "; check the path and its permissions"
    return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("FASTSEQ_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    prog = "fastseq"
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            prog = f"fastseq {args.command}" if args.command else prog
            raise _unrecognized(parser, args.command, unknown)
        if args.command is None:
            parser.print_help()
            return 0
        prog = f"fastseq {args.command}"
        if args.command == "run":
            return cmd_run(args)
        if args.command == "compare":
            return cmd_compare(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        how = f"; {e}" if isinstance(e, RunInterrupted) and str(e) else ""
        print(f"{prog}: interrupted{how}", file=sys.stderr)
        return INTERRUPT_EXIT
    except Exception as e:
        from .fed.engine import NothingTrained

        from .fed.fleet import FleetMisfit

        if isinstance(e, NothingTrained):
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return NOTHING_TRAINED_EXIT
        if isinstance(e, FleetMisfit):
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return NOTHING_FITS_EXIT
        if isinstance(e, user_errors()):
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return USAGE_EXIT
        traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__} is a bug in fastseq, not a problem with your input; "
              f"please report it with the command line and the traceback above", file=sys.stderr)
        return BUG_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
