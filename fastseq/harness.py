"""``fastseq eval``: a run's adapter scored by EleutherAI's lm-evaluation-harness.

The run's model is rebuilt the way the run built it (``config.json``: model, method, rank,
seed, dtype), with the adapter of a round loaded: the final ``adapter/`` folder (SCL through
:func:`fastseq.load_adapter`, the LoRA baselines through PEFT's ``PeftModel.from_pretrained``,
FedEx-LoRA's folded residual added to the base weights), a saved round's
``checkpoints/round_K`` (the server's global state loaded into the method's model) or round 0
(the adapter at its initialisation, which computes the base model exactly). That model goes into
lm-eval's own Hugging Face class ``HFLM`` and ``lm_eval.simple_evaluate`` scores it; fastseq
computes no score itself. Results land in ``<run>/harness/round_<K>.json`` (one file per round,
one entry per task), which ``fastseq compare`` shows.

lm-eval is optional (``pip install "fastseq[harness]"``); only :func:`evaluate_run` imports it
(through :mod:`fastseq.data.harness`, which holds the tasks, the scoring and the results files).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .data.harness import (INSTALL_HINT, HarnessError, HarnessScorer, parse_limit, quiet_lm_eval, require_lm_eval,
                           write_results)
from .exit_codes import EXIT_CODES

KEEP_CHECKPOINTS = 2  # fastseq.fed.engine.save_checkpoint's default: a run keeps its last 2 rounds


# -- the run ----------------------------------------------------------------------------------

def run_config(run: str | os.PathLike):
    """The run's ExperimentConfig from its ``config.json``; a HarnessError when ``run`` is not a
    run directory."""
    from .config import ConfigError  # noqa: PLC0415
    from .fed.engine import read_run_config  # noqa: PLC0415
    from .fed.experiment import ExperimentConfig  # noqa: PLC0415

    try:
        saved = read_run_config(run, doing="evaluate")
    except ConfigError as e:
        raise HarnessError(str(e)) from None
    saved = {k: v for k, v in saved.items() if k in ExperimentConfig.keys()}
    saved.pop("progress", None)
    saved.pop("data_path", None)  # the training data is not needed (and may be gone or elsewhere)
    return ExperimentConfig.from_dict(saved)


def saved_rounds(run: str | os.PathLike) -> list[int]:
    """The rounds whose checkpoint ``run`` holds (complete ones: ``server.json`` written last)."""
    d = Path(run) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir()
                  if (m := re.fullmatch(r"round_(\d+)", p.name)) and (p / "server.json").is_file()
                  and (p / "server.safetensors").is_file())


def final_round(run: str | os.PathLike) -> int | None:
    """The round of the run's final ``adapter/`` (its summary's), None when the run has not
    finished (no adapter or no summary)."""
    d = Path(run)
    if not (d / "adapter" / "adapter_config.json").is_file():
        return None
    try:
        rounds = json.loads((d / "summary.json").read_text()).get("rounds")
    except (OSError, ValueError, AttributeError):
        return None
    return rounds if isinstance(rounds, int) else None


def _available(run: Path) -> str:
    rounds = ["0 (the initial adapter: the base model)"] + [str(r) for r in saved_rounds(run) if r]
    return ", ".join(rounds)


def check_round(run: str | os.PathLike, round: int | None) -> tuple[int, str]:
    """``(round, source)`` of what ``fastseq eval --round`` scores: the final adapter (None), a
    saved checkpoint or round 0; a HarnessError naming the rounds there are otherwise."""
    d = Path(run)
    if round is None:
        final = final_round(d)
        if final is None:
            raise HarnessError(f"{d} has no final adapter (adapter/ and summary.json are written when the run "
                               f"finishes); evaluate a saved round with --round K (saved: {_available(d)}) or "
                               f"finish the run with `fastseq run --resume {d}`")
        return final, "adapter"
    if round < 0:
        raise HarnessError(f"--round {round}: rounds count from 0 (the initial adapter); saved: {_available(d)}")
    if round == 0:
        return 0, "initial"
    if round not in saved_rounds(d):
        raise HarnessError(f"round {round} is not saved in {d}: a run keeps the checkpoints of its last "
                           f"{KEEP_CHECKPOINTS} rounds; saved: {_available(d)}")
    return round, f"checkpoints/round_{round}"


def _check_causal(cfg) -> Any:
    from .fed.experiment import make_task  # noqa: PLC0415

    task = make_task(cfg)
    if task.model_kind != "causal-lm":
        raise HarnessError(f"lm-eval scores causal language models; this run fine-tuned a {task.model_kind} model "
                           f"(task {cfg.task!r}); evaluate runs of an instruction task (instruction, medquad, dolly, "
                           f"chatterbot-qa)")
    return task


def load_run_model(run: str | os.PathLike, round: int | None = None, device: str = "auto"):
    """``(model, tokenizer, info)``: the run's causal LM with the adapter of ``round`` loaded
    (None: the final ``adapter/``; 0: the initial adapter; K: ``checkpoints/round_K``), in eval
    mode on ``device``. ``info``: round, source, method, model."""
    from .fed.experiment import make_method, resolve_device  # noqa: PLC0415
    from .models import load_model  # noqa: PLC0415

    d = Path(run)
    cfg = run_config(d)
    task = _check_causal(cfg)
    k, source = check_round(d, round)
    dev = resolve_device(device)
    quantized = cfg.quantization != "none"
    model, tokenizer = load_model(cfg.model, task.model_kind, dtype=cfg.dtype, quantization=cfg.quantization,
                                  processor="required", device=dev if quantized else None)
    if source == "adapter":
        model = _load_final_adapter(model, d / "adapter")
    else:
        from safetensors.torch import load_file  # noqa: PLC0415

        method = make_method(cfg)
        model = method.prepare(model, task.head_modules_for(model), cfg.seed)
        initial_local = method.local_state()  # what the run's server evaluates with (make_evaluator)
        if source != "initial":
            ckpt = d / source
            meta = json.loads((ckpt / "server.json").read_text())
            if meta.get("method") != cfg.method:
                raise HarnessError(f"{ckpt} was written by method {meta.get('method')!r} but config.json says "
                                   f"{cfg.method!r}; the run directory is damaged")
            tensors = load_file(str(ckpt / "server.safetensors"))
            method.load({name[len("global/"):]: t for name, t in tensors.items() if name.startswith("global/")})
        method.load(initial_local)
    if not quantized:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, {"round": k, "source": source, "method": cfg.method, "model": cfg.model}


def _load_final_adapter(model, adapter: Path):
    """The run's final adapter files into ``model``: fastseq's SCL format or PEFT's."""
    meta = json.loads((adapter / "adapter_config.json").read_text())
    if meta.get("adapter_type") == "scl":
        from .adapters import load_adapter  # noqa: PLC0415

        return load_adapter(model, adapter, is_trainable=False)
    from ._quiet import quiet_bitsandbytes_kernel_notice  # noqa: PLC0415

    quiet_bitsandbytes_kernel_notice()
    import peft  # noqa: PLC0415

    if meta.get("peft_type") == "SCL":  # an SCL adapter written by PEFT's save_pretrained
        from .adapters import peft_method  # noqa: F401, PLC0415  (registers SCL with PEFT)
    model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    residual = adapter / "fedex_residual.safetensors"
    if residual.is_file():  # FedEx-LoRA: the residuals folded into the base weights belong to the model
        import torch  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        with torch.no_grad():
            for name, r in load_file(str(residual)).items():
                w = model.get_submodule(name).base_layer.weight
                w.add_(r.to(device=w.device, dtype=w.dtype))
    return model


# -- evaluation -------------------------------------------------------------------------------

def evaluate_run(run: str | os.PathLike, tasks: Sequence[str], limit: int | float | None = None,
                 round: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                 device: str = "auto", include_paths: Sequence[str | os.PathLike] = (), log_samples: bool = False,
                 echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Score the adapter of ``round`` of ``run`` (None: the final one) on lm-eval ``tasks`` and
    write ``<run>/harness/round_<K>.json`` (and with ``log_samples`` each task's per-sample
    records, ``round_<K>.<task>.samples.jsonl``). Returns what the file holds.

    Every input is checked before the model loads; nothing is written unless the evaluation
    finished."""
    d = Path(run)
    require_lm_eval()
    cfg = run_config(d)
    _check_causal(cfg)
    check_round(d, round)
    scorer = HarnessScorer(tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                           include_paths=include_paths)
    t0 = time.perf_counter()
    model, tokenizer, info = load_run_model(d, round, device)
    echo(f"evaluating {d} round {info['round']} ({_source_text(info['source'])}, {info['method']} on "
         f"{info['model']}) with lm-eval {scorer.lm_eval.__version__} on {', '.join(scorer.names)}"
         + (f", limit {limit}" if limit is not None else ""))
    res = scorer.score(model, tokenizer, log_samples=log_samples)
    seconds = time.perf_counter() - t0
    path, record = write_results(d, info["round"], res, info, scorer, seconds)
    from lm_eval.utils import make_table  # noqa: PLC0415

    echo(make_table(res))
    if res.get("groups"):
        echo(make_table(res, "groups"))
    echo(f"results written to {path} ({seconds:.1f} s)")
    return record


def _source_text(source: str) -> str:
    return {"adapter": "the final adapter/", "initial": "the initial adapter, i.e. the base model"}.get(source, source)


# -- CLI: fastseq eval ------------------------------------------------------------------------

def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``fastseq eval`` to an argparse subparsers object; its handler is ``args.func``."""
    p = subparsers.add_parser(
        "eval", help="score a run's adapter with EleutherAI's lm-evaluation-harness",
        description="Score the final adapter of a run (or a saved round's, --round K; round 0 is the base model) on "
                    "lm-evaluation-harness tasks through lm-eval's own HFLM, and write the results to "
                    "RUN/harness/round_K.json (shown by `fastseq compare`). Needs the harness extra: "
                    + INSTALL_HINT + ". fastseq ships the offline tasks fastseq_medqa_mini (accuracy) and "
                    "fastseq_medqa_mini_ppl (perplexity); hub tasks (mmlu_anatomy, pubmedqa, ...) need the Hugging "
                    "Face hub or its cache.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run directory written by `fastseq run` (a causal-LM task)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names (glob patterns "
                                                  "such as 'mmlu_*' work), e.g. fastseq_medqa_mini,pubmedqa")
    p.add_argument("--limit", type=parse_limit, default=None, help="documents per task: a count, or a fraction in "
                                                              "(0, 1) (default: all)")
    p.add_argument("--round", type=int, default=None, help="score the adapter of this saved round (0: the initial "
                                                           "adapter, i.e. the base model; default: the final "
                                                           "adapter/)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size (default 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of your own lm-eval task YAML files (repeatable)")
    p.add_argument("--log-samples", action="store_true", help="also write each document's prompt, responses and "
                                                              "scores to RUN/harness/round_K.TASK.samples.jsonl")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    quiet_lm_eval()
    evaluate_run(args.run, args.tasks.split(","), limit=args.limit, round=args.round, num_fewshot=args.num_fewshot,
                 batch_size=args.batch_size, device=args.device, include_paths=args.include_path,
                 log_samples=args.log_samples)
    return 0
