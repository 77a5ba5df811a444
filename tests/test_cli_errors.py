"""Every bad input to `fastseq run|compare|plan` is one line on stderr that names the problem
(and the fix), exit code 2, no traceback; a failed run leaves no output directory behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastseq.cli import main

REPO = Path(__file__).resolve().parents[1]

# A run that passes validation in a second or two: tiny-llama on the synthetic task.
TINY = ["--model", "tiny-llama", "--task", "synthetic", "--max-examples", "40", "--rounds", "1", "--clients", "2",
        "--clients-per-round", "1", "--partition", "iid", "--local-steps", "1", "--batch-size", "4",
        "--no-progress"]


def _config(tmp: Path, name: str, text: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _model_folder_without_tokenizer(tmp: Path) -> str:
    from fastseq.models import _tiny_model

    model, _ = _tiny_model("tiny-llama", "text-classification", 3)
    model.save_pretrained(tmp / "no-tokenizer")
    return str(tmp / "no-tokenizer")


def _labelled_csv(tmp: Path) -> str:
    rows = ["text,label"] + [f"example number {i},{'abc'[i % 3]}" for i in range(30)]
    return _config(tmp, "data.csv", "\n".join(rows) + "\n")


# (id, argv with {tmp} for the test's folder, a phrase of the message). `run` cases get
# --out {tmp}/out unless they name one, and must leave {tmp}/out absent.
CASES = [
    # flags with an invalid value
    ("rounds-not-int", ["run", "--rounds", "x"], "invalid int value: 'x'"),
    ("rounds-zero", ["run", "--rounds", "0"], "rounds must be an integer >= 1"),
    ("flag-without-value", ["run", "--rounds"], "expected one argument"),
    ("unknown-flag", ["run", "--colour", "red"], "unrecognized arguments: --colour red; see `fastseq run --help`"),
    ("clients-per-round", ["run", "--clients", "2", "--clients-per-round", "3"], "clients_per_round=3 exceeds clients=2"),
    ("lr-negative", ["run", "--lr", "-1"], "lr must be a positive number"),
    ("lr-nan", ["run", "--lr", "nan"], "lr must be a finite number"),
    ("alpha-zero", ["run", "--alpha", "0"], "alpha must be a positive number"),
    ("method", ["run", "--method", "lora"], "method='lora' is not valid; valid values: fedavg-lora"),
    ("partition", ["run", "--partition", "random"], "partition='random' is not valid"),
    ("codec", ["run", "--codec", "int4"], "codec='int4' is not valid"),
    ("downlink-codec", ["run", "--downlink-codec", "zip"], "downlink_codec='zip' is not valid"),
    ("topk-zero", ["run", "--topk", "0"], "topk count must be >= 1"),
    ("topk-fraction", ["run", "--topk", "1.5"], "topk fraction must be in (0, 1]"),
    ("topk-word", ["run", "--topk", "most"], "give a fraction in (0, 1]"),
    ("server-opt", ["run", "--server-opt", "sgd"], "server_opt='sgd' is not valid"),
    ("server-lr", ["run", "--server-lr", "-1"], "server_lr must be null (the default) or a positive number"),
    ("engine", ["run", "--engine", "cloud"], "engine='cloud' is not valid"),
    ("quantization", ["run", "--quantization", "int4"], "quantization='int4' is not valid; valid values: none"),
    ("dtype", ["run", "--dtype", "float8"], "dtype='float8' is not valid"),
    ("device-name", ["run", "--device", "gpu"], "device='gpu' is not valid; valid values: auto, cpu, cuda"),
    ("max-length", ["run", "--max-length", "0"], "max_length must be null (no limit / the default) or an integer >= 1"),
    ("max-examples", ["run", "--max-examples", "0"], "max_examples must be null"),
    ("eval-examples", ["run", "--eval-examples", "0"], "eval_examples must be null"),
    ("local-epochs", ["run", "--local-epochs", "-1"], "local_epochs must be null (the default) or a positive number"),
    ("validation-fraction", ["run", "--validation-fraction", "0.7"], "validation_fraction must be a number in [0, 0.5)"),
    ("validation-split", ["run", "--validation-split", "random"], "validation_split='random' is not valid"),
    ("scl-placement", ["run", "--scl-placement", "middle"], "scl_placement='middle' is not valid"),
    ("scl-layers-negative", ["run", "--scl-layers", "-1"], "scl_layers must be null or a non-empty list"),
    ("scl-layers-missing-layer", ["run", "--scl-layers", "5"], "asks for layers [5] but the model's FFN layers are [0, 1]"),
    ("head-lr", ["run", "--head-lr", "0"], "head_lr must be null (same as lr) or a positive number"),
    ("prox-mu", ["run", "--prox-mu", "-1"], "prox_mu must be >= 0"),
    ("seed", ["run", "--seed", "-1"], "seed must be >= 0"),
    ("batch-size", ["run", "--batch-size", "0"], "batch_size must be an integer >= 1"),
    ("lora-r", ["run", "--method", "fedavg-lora", "--lora-r", "0"], "lora_r must be null"),
    ("test-every", ["run", "--test-every", "0"], "test_every must be an integer >= 1"),
    ("deepspeed-not-json", ["run", "--deepspeed", "zero2"], "argument --deepspeed: not JSON"),
    ("deepspeed-key", ["run", "--deepspeed", '{"zero_stag": 2}'], "'zero_stag' (did you mean 'zero_stage'?)"),
    ("config-unknown-key-unlike-any", ["run", "--config", "{tmp}/foreign.toml"],
     "unknown config key 'colour'; valid keys: model, task"),
    ("flag-typo", ["run", "--rouns", "3"],
     "unrecognized arguments: --rouns (did you mean --rounds?) 3; see `fastseq run --help`"),
    ("aggregator", ["run", "--aggregator", "krum"], "aggregator='krum' is not valid; valid values: mean, median"),
    ("trim-fraction-half", ["run", "--trim-fraction", "0.5"], "trim_fraction must be in [0, 0.5)"),
    ("trim-fraction-trims-none", ["run", "--aggregator", "trimmed-mean", "--clients", "5", "--clients-per-round", "3",
                                  "--trim-fraction", "0.2"], "trims no client of clients_per_round=3; pass --trim-fraction 0.34"),
    ("trimmed-mean-two-clients", ["run", "--aggregator", "trimmed-mean", "--clients-per-round", "2"],
     "trimmed-mean needs --clients-per-round 3 or more"),
    ("norm-clip-without-bound", ["run", "--aggregator", "norm-clip"], "aggregator norm-clip needs --norm-bound B"),
    ("norm-bound-zero", ["run", "--aggregator", "norm-clip", "--norm-bound", "0"], "norm_bound must be a positive number"),
    ("norm-bound-without-norm-clip", ["run", "--norm-bound", "1"], "norm_bound is used only by --aggregator norm-clip"),
    ("byzantine-negative", ["run", "--byzantine", "-1", "--attack", "nan"], "byzantine must be an integer >= 0"),
    ("byzantine-too-many", ["run", "--byzantine", "2", "--attack", "nan"], "byzantine=2 exceeds clients_per_round=1"),
    ("byzantine-without-attack", ["run", "--byzantine", "1"], "byzantine=1 needs --attack (one of sign-flip"),
    ("attack-unknown", ["run", "--byzantine", "1", "--attack", "flip"], "attack='flip' is not valid"),
    ("attack-without-byzantine", ["run", "--attack", "sign-flip"], "attack='sign-flip' needs --byzantine K"),
    ("attack-scale-zero", ["run", "--byzantine", "1", "--attack", "scale", "--attack-scale", "0"],
     "attack_scale must be a positive number"),
    ("byzantine-on-flower", ["run", "--engine", "flower", "--byzantine", "1", "--attack", "nan"],
     "byzantine clients are simulated by the local engine only; use --engine local"),
    ("dp-mode", ["run", "--dp", "global"], "dp='global' is not valid; valid values: none, central, local"),
    ("dp-without-clip", ["run", "--dp", "central"], "--dp central needs --dp-clip C"),
    ("dp-clip-zero", ["run", "--dp", "local", "--dp-clip", "0"], "dp_clip must be a positive number"),
    ("dp-noise-negative", ["run", "--dp", "central", "--dp-clip", "1", "--dp-noise", "-1"], "dp_noise must be a number >= 0"),
    ("dp-central-median", ["run", "--dp", "central", "--dp-clip", "1", "--aggregator", "median"],
     "--dp central adds noise calibrated to the sensitivity of the mean"),
    ("dp-setting-without-dp", ["run", "--dp-clip", "1"], "dp_clip set but dp is 'none'; add --dp central or --dp local"),
    ("dp-adaptive-local", ["run", "--dp", "local", "--dp-clipping", "adaptive"], "use --dp-clipping fixed with --dp local"),
    ("task", ["run", "--task", "nope"], "unknown task 'nope'; known tasks:"),
    # models and tokenizers
    ("model-missing-folder", ["run", "--model", "/nonexistent"], "model folder '/nonexistent' does not exist"),
    ("model-is-a-file", ["run", "--model", "{tmp}/empty.toml"], "is a file, not a model folder"),
    ("model-folder-without-config", ["run", "--model", "{tmp}"], "is not a transformers model folder (no config.json"),
    ("model-relative-folder-missing", ["run", "--model", "emptydir/model"], "model folder 'emptydir/model' does not exist"),
    ("model-typo", ["run", "--model", "tiny-lama"], "did you mean 'tiny-llama'?"),
    ("model-hub-id-offline", ["run", "--model", "nobody/no-such-model"], "cannot load 'nobody/no-such-model'"),
    ("model-without-tokenizer", ["run", "--model", "{no_tokenizer}", "--task", "text-classification",
                                 "--data-path", "{csv}"], "has no tokenizer (one of tokenizer.json"),
    ("device-cuda-without-cuda", ["run", "--device", "cuda"], "use --device cpu (or auto)"),
    # data
    ("data-path-missing", ["run", "--task", "bbc-news", "--data-path", "{tmp}/missing"], "does not exist"),
    ("data-path-for-synthetic", ["run", "--data-path", "{csv}"], "the synthetic task generates its data"),
    ("data-folder-empty", ["run", "--task", "bbc-news", "--data-path", "{tmp}/emptydir"], "no label folders found"),
    ("data-file-wrong-columns", ["run", "--task", "text-classification", "--data-path", "{tmp}/cols.csv"],
     "text"),
    # config files
    ("config-missing", ["run", "--config", "{tmp}/nope.toml"], "does not exist"),
    ("config-is-a-directory", ["run", "--config", "{tmp}/emptydir"], "is a directory"),
    ("config-empty", ["run", "--config", "{tmp}/empty.toml"], "is empty"),
    ("config-not-utf8", ["run", "--config", "{tmp}/binary.yaml"], "is not UTF-8 text"),
    ("config-invalid-json", ["run", "--config", "{tmp}/bad.json"], "invalid JSON"),
    ("config-invalid-toml", ["run", "--config", "{tmp}/bad.toml"], "invalid TOML"),
    ("config-yaml-list", ["run", "--config", "{tmp}/list.yaml"], "the top level must be a table"),
    ("config-wrong-suffix", ["run", "--config", "{tmp}/run.txt"], "use a .toml, .yaml/.yml or .json file"),
    ("config-unknown-key", ["run", "--config", "{tmp}/typo.toml"],
     "unknown config key 'methd' (did you mean 'method'?)"),
    ("config-wrong-type", ["run", "--config", "{tmp}/types.toml"], "prox_mu must be a number, got 'x'"),
    # output and resume targets
    ("out-is-a-file", ["run", "--out", "{tmp}/empty.toml"], "is a file; pass another --out"),
    ("out-under-a-file", ["run", "--out", "{tmp}/empty.toml/run"], "is a file; pass another --out"),
    ("resume-missing", ["run", "--resume", "{tmp}/nothing"], "does not exist"),
    ("resume-a-file", ["run", "--resume", "{tmp}/empty.toml"], "is a file"),
    ("resume-not-a-run", ["run", "--resume", "{tmp}/emptydir"], "has no config.json"),
    ("resume-damaged", ["run", "--resume", "{tmp}/damaged"], "is not valid JSON"),
    ("resume-no-checkpoint", ["run", "--resume", "{tmp}/started"], "has no complete checkpoint"),
    ("resume-finished", ["run", "--resume", "{finished}"], "has already finished all 2 rounds: nothing to resume"),
    ("resume-different-config", ["run", "--resume", "{finished}", "--rounds", "3", "--method", "ffa-lora"],
     "with a different config (method 'scl' -> 'ffa-lora')"),
    ("resume-fewer-rounds", ["run", "--resume", "{finished}", "--rounds", "1"], "has already done 2 rounds"),
    ("resume-with-out", ["run", "--resume", "{finished}", "--out", "{tmp}/elsewhere"], "leave out --out"),
    # compare
    ("compare-nothing", ["compare"], "the following arguments are required: DIR"),
    ("compare-missing", ["compare", "{tmp}/nothing"], "does not exist"),
    ("compare-not-a-run", ["compare", "{tmp}/emptydir"], "has no metrics.jsonl"),
    ("compare-empty-metrics", ["compare", "{tmp}/started"], "metrics.jsonl is empty"),
    ("compare-damaged-metrics", ["compare", "{tmp}/damaged"], "line 1 is not a metrics record"),
    ("compare-plot-folder-missing", ["compare", "{finished}", "--plot", "{tmp}/nope/c.png"], "does not exist"),
    ("compare-plot-is-a-folder", ["compare", "{finished}", "--plot", "{tmp}"], "is a directory"),
    # plan
    ("plan-budget-word", ["plan", "--model", "tiny-llama", "--budget", "lots"], "cannot read 'lots' as a size"),
    ("plan-budget-zero", ["plan", "--model", "tiny-llama", "--budget", "0"], "the budget must be more than 0 bytes"),
    ("plan-budget-negative", ["plan", "--model", "tiny-llama", "--budget=-2GB"], "cannot read '-2GB' as a size"),
    ("plan-budget-missing", ["plan", "--model", "tiny-llama"], "fastseq plan needs --budget (e.g. 8GB) or --fleet FILE"),
    ("plan-model-missing", ["plan", "--model", "/nonexistent", "--budget", "8GB"], "does not exist"),
    ("plan-model-unknown", ["plan", "--model", "nobody/no-such-model", "--budget", "8GB"], "cannot read a config"),
    ("plan-batch-size", ["plan", "--model", "tiny-llama", "--budget", "8GB", "--batch-size", "0"],
     "--batch-size must be an integer >= 1"),
    ("plan-seq-len", ["plan", "--model", "tiny-llama", "--budget", "8GB", "--seq-len", "0"], "--seq-len must be"),
    ("plan-r", ["plan", "--model", "tiny-llama", "--budget", "8GB", "--r", "0"], "--r must be an integer >= 1"),
    ("plan-quantization", ["plan", "--model", "tiny-llama", "--budget", "8GB", "--quantization", "int4"],
     "invalid choice: 'int4'"),
    ("plan-checkpoint-level", ["plan", "--model", "tiny-llama", "--budget", "8GB", "--checkpoint-level", "3"],
     "invalid choice: 3"),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-round run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", *TINY, "--rounds", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def places(tmp_path, finished, monkeypatch) -> dict[str, str]:
    """The files and folders the cases name, in a fresh folder that is also the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    _config(tmp_path, "empty.toml", "# nothing set yet\n")
    _config(tmp_path, "binary.yaml", b"\xff\xfe\x00model: tiny\x80\n")
    _config(tmp_path, "bad.json", '{"model": "tiny-llama",}')
    _config(tmp_path, "bad.toml", 'model = "tiny-llama\n')
    _config(tmp_path, "list.yaml", "- model\n- task\n")
    _config(tmp_path, "run.txt", "model = tiny-llama\n")
    _config(tmp_path, "typo.toml", 'methd = "scl"\n')
    _config(tmp_path, "foreign.toml", 'colour = "red"\n')
    _config(tmp_path, "types.toml", 'prox_mu = "x"\n')
    _config(tmp_path, "cols.csv", "sentence,label\nhello,a\nworld,b\n")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    _config(damaged, "config.json", '{"model": ')
    _config(damaged, "metrics.jsonl", "{not json\n")
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text((finished / "config.json").read_text())
    (started / "metrics.jsonl").write_text("")
    return {"tmp": str(tmp_path), "finished": str(finished), "csv": _labelled_csv(tmp_path),
            "no_tokenizer": _model_folder_without_tokenizer(tmp_path)}


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _assert_one_clear_line(rc: int, err: str, phrase: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastseq"), err
    assert phrase in lines[0], err


@pytest.mark.parametrize("argv,phrase", [pytest.param(a, p, id=i) for i, a, p in CASES])
def test_bad_input_is_one_clear_line(argv, phrase, places, monkeypatch, capsys):
    _no_cuda(monkeypatch)
    for name, value in places.items():
        argv = [a.replace("{" + name + "}", value) for a in argv]
    out = Path(places["tmp"]) / "out"
    if argv[0] == "run" and "--resume" not in argv:
        argv = ["run", *TINY, *argv[1:]]
        if "--out" not in argv:
            argv += ["--out", str(out)]
    before = {p: p.stat().st_mtime_ns for p in Path(places["finished"]).rglob("*")}
    rc = main(argv)
    captured = capsys.readouterr()
    _assert_one_clear_line(rc, captured.err, phrase)
    assert not out.exists()
    assert not (Path(places["tmp"]) / "runs").exists()
    # the finished run is never touched, whatever the command
    assert {p: p.stat().st_mtime_ns for p in Path(places["finished"]).rglob("*")} == before
    if argv[0] == "plan":
        assert captured.out == ""


def test_case_matrix_is_large_enough():
    assert len(CASES) >= 30 and len({i for i, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("cuda_build,gpus,device,phrase", [
    (None, 0, "cuda", "is a CPU-only build; use --device cpu (or auto), or install a CUDA build"),
    ("12.6", 0, "cuda", "torch sees no CUDA GPU"),
    ("12.6", 1, "cuda:3", "has 1 CUDA GPU(s), cuda:0..cuda:0"),
])
def test_cuda_device_this_machine_lacks(cuda_build, gpus, device, phrase, places, monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    rc = main(["run", *TINY, "--device", device, "--out", str(Path(places["tmp"]) / "out")])
    _assert_one_clear_line(rc, capsys.readouterr().err, phrase)
    assert not (Path(places["tmp"]) / "out").exists()


# --- quantization where bitsandbytes cannot run it -------------------------------------------

def test_quantization_where_bitsandbytes_cannot_run_it(places, monkeypatch, capsys):
    """bitsandbytes runs int8 and nf4 on this CPU; a build without the device's kernels fails
    its probe, and that is one line naming the device and what to use instead."""
    import bitsandbytes.functional as bnbf

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnbf, "quantize_4bit", no_kernel)
    monkeypatch.setattr(bnbf, "int8_vectorwise_quant", no_kernel)
    for q in ("nf4", "int8"):
        rc = main(["run", *TINY, "--quantization", q, "--out", str(Path(places["tmp"]) / "out")])
        _assert_one_clear_line(rc, capsys.readouterr().err, f"bitsandbytes cannot run {q} on cpu")
    assert not (Path(places["tmp"]) / "out").exists()


def test_quantization_without_bitsandbytes(places, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    rc = main(["run", *TINY, "--quantization", "nf4", "--out", str(Path(places["tmp"]) / "out")])
    _assert_one_clear_line(rc, capsys.readouterr().err, "pip install 'fastseq[quant]'")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_file(places, capsys):
    path = Path(_config(Path(places["tmp"]), "secret.toml", 'model = "tiny-llama"\n'))
    path.chmod(0)
    rc = main(["run", "--config", str(path)])
    _assert_one_clear_line(rc, capsys.readouterr().err, "cannot read config file")


# --- what works and what is a bug ------------------------------------------------------------

def test_synthetic_task_needs_no_tokenizer(places, capsys):
    out = Path(places["tmp"]) / "ok"
    assert main(["run", *TINY, "--model", places["no_tokenizer"], "--out", str(out)]) == 0
    assert (out / "summary.json").is_file()


def test_internal_error_keeps_its_traceback_and_says_it_is_a_bug(places, monkeypatch, capsys):
    import fastseq.fed.engine as engine

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(engine, "build_runtime", broken)
    rc = main(["run", *TINY, "--out", str(Path(places["tmp"]) / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert "is a bug in fastseq" in err.strip().splitlines()[-1] and "report it" in err


def test_errors_reach_stderr_in_a_real_process(tmp_path):
    """The console entry point: one line on stderr, nothing on stdout, exit code 2."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for argv, phrase in ((["plan", "--model", "tiny-llama", "--budget", "lots"], "cannot read 'lots'"),
                         (["run", "--model", "tiny-llama", "--task", "synthetic", "--rounds", "0"], "rounds must be")):
        proc = subprocess.run([sys.executable, "-c", "import sys; from fastseq.cli import main; sys.exit(main())",
                               *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc
        _assert_one_clear_line(proc.returncode, proc.stderr, phrase)
        assert list(tmp_path.iterdir()) == []
