"""`fastseq run` with a TOML config + overriding flag, `fastseq compare`, errors, engine dispatch."""

import json

import pytest

import fastseq.flower
from fastseq.cli import build_parser, main

TOML = """
model = "tiny-llama"
task = "synthetic"
max_examples = 80
method = "scl"
r = 4
rounds = 3
clients = 3
clients_per_round = 2
partition = "iid"
min_client_size = 4
local_steps = 4
lr = 1e-2
batch_size = 8
progress = false
"""


def test_run_with_toml_and_override_then_compare(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--config", str(cfg), "--rounds", "1", "--out", str(a)]) == 0
    resolved = json.loads((a / "config.json").read_text())
    assert resolved["rounds"] == 1 and resolved["model"] == "tiny-llama" and resolved["lr"] == 1e-2
    lines = (a / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1]
    assert main(["run", "--config", str(cfg), "--rounds", "1", "--method", "ffa-lora", "--codec", "int8",
                 "--error-feedback", "--out", str(b)]) == 0
    capsys.readouterr()
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(a), str(b), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "scl" in out and "ffa-lora" in out and "accuracy" in out
    assert plot.is_file() and plot.stat().st_size > 0


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('methd = "scl"\n')
    assert main(["run", "--config", str(bad)]) == 2
    assert "unknown config key 'methd' (did you mean 'method'?)" in capsys.readouterr().err
    assert main(["run", "--method", "lora", "--out", str(tmp_path / "x")]) == 2
    assert "fedsa-lora" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["run", "--task", "bbc-news", "--data-path", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2


def test_flower_engine_is_dispatched(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(fastseq.flower, "run_flower", 
                        lambda cfg, resume=False: seen.update(cfg=cfg, resume=resume) or {}, raising=False)
    assert main(["run", "--engine", "flower", "--model", "tiny-llama", "--task", "synthetic",
                 "--deepspeed", '{"zero_stage": 1}', "--out", str(tmp_path / "f")]) == 0
    assert seen["cfg"].engine == "flower" and seen["cfg"].model == "tiny-llama"
    assert seen["cfg"].deepspeed == {"zero_stage": 1} and seen["resume"] is False
    args = build_parser().parse_args(["run", "--engine", "flower"])
    assert args.engine == "flower"


@pytest.mark.parametrize("method,variant,lr", [
    ("fedavg-lora", [], 1e-3), ("ffa-lora", [], 3e-3), ("fedsa-lora", [], 3e-3), ("fedex-lora", [], 1e-3),
    ("scl", [], 1e-2), ("scl", ["--scl-train-compress"], 1e-3),
    ("scl", ["--scl-placement", "residual", "--scl-train-compress"], 3e-3)])
def test_each_method_defaults_to_its_study_chosen_lr_and_config_json_records_it(tmp_path, method, variant, lr):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML.replace("lr = 1e-2\n", ""))
    out = tmp_path / "r"
    assert main(["run", "--config", str(cfg), "--rounds", "1", "--method", method, *variant, "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == lr and saved["head_lr"] == 1e-2
    explicit = tmp_path / "explicit"
    assert main(["run", "--config", str(cfg), "--rounds", "1", "--method", method, *variant, "--lr", "0.02",
                 "--out", str(explicit)]) == 0
    assert json.loads((explicit / "config.json").read_text())["lr"] == 0.02  # an explicit --lr wins


def test_help_shows_each_methods_default_lr(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    assert "fedavg-lora 0.001" in text and "ffa-lora 0.003" in text and "scl 0.01" in text


def test_a_run_that_trained_nothing_exits_4_with_the_clients_reasons(tmp_path, monkeypatch, capsys):
    from fastseq.fed.client import Client

    def fit(self, downlink_blob, round, attack=None):
        raise RuntimeError(f"CUDA out of memory on client {self.client_id} (simulated)")

    monkeypatch.setattr(Client, "fit", fit)
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML)
    out = tmp_path / "nothing"
    assert main(["run", "--config", str(cfg), "--rounds", "2", "--out", str(out)]) == 4
    captured = capsys.readouterr()
    assert "WARNING round 1: every sampled client was dropped" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "trained nothing" in err[0] and "CUDA out of memory on client" in err[0], err
    summary = json.loads((out / "summary.json").read_text())  # the run's files are kept, and say so
    assert summary["aggregated_rounds"] == 0 and summary["failure"]


@pytest.mark.parametrize("engine", ["local", "flower", "flower-sim"])
def test_every_engine_fails_a_run_without_an_aggregated_round(engine, monkeypatch):
    """engines.run checks the summary every engine writes (run_flower and the simulation read
    the ServerApp's summary.json, which the embedded round loop wrote)."""
    import fastseq.engines
    from fastseq.fed.engine import NothingTrained
    from fastseq.fed.experiment import ExperimentConfig

    failed = {"out": "runs/x", "rounds": 3, "aggregated_rounds": 0, "failure": ["client 0: ImportError: boom"]}
    monkeypatch.setattr(fastseq.engines, "_run_engine", lambda cfg, resume, echo, kw: dict(failed))
    with pytest.raises(NothingTrained, match="no round of 3 aggregated.*client 0: ImportError: boom"):
        fastseq.engines.run(ExperimentConfig(engine=engine))
    monkeypatch.setattr(fastseq.engines, "_run_engine", lambda cfg, resume, echo, kw: {**failed, "aggregated_rounds": 1})
    assert fastseq.engines.run(ExperimentConfig(engine=engine))["aggregated_rounds"] == 1


def test_flower_engine_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(fastseq.flower, "run_flower", raising=False)
    assert main(["run", "--engine", "flower", "--model", "tiny-llama", "--task", "synthetic",
                 "--out", str(tmp_path / "f")]) == 2
    assert "flower" in capsys.readouterr().err


def test_topk_flag_is_a_fraction_or_a_count():
    """--topk 100 keeps 100 values (an int count), --topk 0.1 a fraction; both survive the
    Flower run config (which turns other integers into floats)."""
    from fastseq.fed.experiment import ExperimentConfig
    from fastseq.flower.config import from_run_config, to_run_config

    parse = build_parser().parse_args
    assert parse(["run", "--topk", "100"]).topk == 100 and isinstance(parse(["run", "--topk", "100"]).topk, int)
    assert parse(["run", "--topk", "0.1"]).topk == 0.1
    for topk in (100, 0.1):
        cfg = ExperimentConfig(codec="int8", topk=topk)
        back, _ = from_run_config(to_run_config(cfg))
        assert back.topk == topk and type(back.topk) is type(topk)


def test_the_written_out_default_config_is_the_embedded_default():
    """configs/minilm-bbc-news.yaml says it is `fastseq run` with no arguments: every key it sets
    has the default's value, and without an `lr` it leaves each method its own."""
    from pathlib import Path

    from fastseq.fed.experiment import ExperimentConfig, load_config_file

    path = Path(__file__).resolve().parent.parent / "configs" / "minilm-bbc-news.yaml"
    written = load_config_file(path)
    default = ExperimentConfig().to_dict()
    assert {k: v for k, v in written.items()} == {k: default[k] for k in written}
    assert ExperimentConfig.from_dict({**written, "method": "ffa-lora"}).lr == 3e-3


# --- exit codes, --help, third-party banners -------------------------------------------------

def test_plan_nothing_fits_has_its_own_exit_code(capsys):
    """"Nothing fits" is an answer, not fastseq's bug (1) nor the user's error (2)."""
    from fastseq.exit_codes import BUG_EXIT, NOTHING_FITS_EXIT, USAGE_EXIT

    assert NOTHING_FITS_EXIT not in (0, BUG_EXIT, USAGE_EXIT)
    assert main(["plan", "--model", "tiny-llama", "--budget", "1KB"]) == NOTHING_FITS_EXIT
    captured = capsys.readouterr()
    assert "nothing fits in 1.00 KiB" in captured.out and captured.err == ""
    assert main(["plan", "--model", "tiny-llama", "--budget", "1GB"]) == 0


def _help(argv, capsys) -> str:
    try:
        main([*argv, "--help"])
    except SystemExit as e:
        assert e.code == 0
    return capsys.readouterr().out


def test_exit_codes_are_documented_in_help_and_readme(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for argv in ([], ["run"], ["plan"], ["compare"]):
        text = _help(argv, capsys)
        assert "exit codes:" in text, argv
        for code, meaning in (("0", "success"), ("1", "internal error"), ("2", "user error"),
                              ("3", "fastseq plan: nothing fits"), ("4", "no round aggregated"),
                              ("130", "interrupted")):
            assert f"  {code}  " in text and meaning in text, (argv, code)
            assert f"| `{code}` |" in readme, code


def test_run_help_shows_the_real_defaults(capsys):
    from fastseq.cli import build_parser
    from fastseq.fed.experiment import ExperimentConfig

    text = " ".join(_help(["run"], capsys).split())
    d = ExperimentConfig()
    for shown in (f"federated rounds (default: {d.rounds})", f"number of clients (default: {d.clients})",
                  f"(default: {d.model})",
                  f"fedex-lora (default: {d.method})", f"iid | dirichlet | pathological (default: {d.partition})",
                  f"max tokens per text example (default: {d.max_length})", "(default: off: dense)",
                  "cap the dataset size (default: all)", "per-client error feedback on the uplink (default: off)"):
        assert shown in text, shown
    run = build_parser().commands["run"]
    for action in run._actions:
        if action.option_strings and action.dest not in ("help", "config", "resume"):
            assert "default" in action.help, action.option_strings  # every flag says its default ...
            assert "None" not in action.help, action.option_strings  # ... in words, never "None"


def _backbone_folder(tmp_path, name="tiny-bert"):
    """A checkpoint of a tiny backbone alone (no task head), as hub checkpoints such as MiniLM are."""
    from fastseq.models import _tiny_model

    model, _ = _tiny_model(name, "text-classification", 3)
    folder = tmp_path / f"{name}-backbone"
    model.base_model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("id2label", "label2id"):  # a backbone's config names no labels
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class _Records(list):
    def __enter__(self):
        import logging

        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.append(record.getMessage())
        self.loggers = [logging.getLogger(n) for n in ("transformers.modeling_utils", "bitsandbytes.backends.cpu.ops")]
        for logger in self.loggers:
            logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeHandler(self.handler)


def test_a_default_like_run_shows_no_third_party_banners(tmp_path, capfd):
    """A backbone checkpoint loaded for a task (the default run: MiniLM for bbc-news) gets a new
    head on purpose: no LOAD REPORT about it, no PEFT deprecation warning, no bitsandbytes
    kernels notice (logged when PEFT imports bitsandbytes on a CPU with AVX512-BF16)."""
    import logging
    import warnings

    folder = _backbone_folder(tmp_path)
    capfd.readouterr()
    with _Records() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", "--model", str(folder), "--task", "synthetic", "--method",
                     "fedavg-lora", "--max-examples", "40", "--rounds", "1", "--clients", "2", "--clients-per-round",
                     "1", "--partition", "iid", "--local-steps", "1", "--no-progress", "--out",
                     str(tmp_path / "run")]) == 0
        # what bitsandbytes logs at import there, with the filter the run installed
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip "
            "install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
    err = capfd.readouterr().err
    assert "[transformers]" not in err and "LOAD REPORT" not in err and "MISSING" not in err, err
    assert not any("LOAD REPORT" in r or "kernels-community" in r for r in records), records
    assert "another bitsandbytes warning" in records  # only that one notice is dropped
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_a_load_report_about_the_backbone_still_shows(tmp_path):
    """Held back only when it is about heads: a backbone weight missing from the checkpoint is
    the user's concern."""
    from safetensors.torch import load_file, save_file

    from fastseq.models import load_model

    folder = _backbone_folder(tmp_path)
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "encoder.layer.0" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with _Records() as records:
        load_model(str(folder), "text-classification", num_labels=3, processor="unused")
    assert len(records) == 1 and "LOAD REPORT" in records[0] and dropped in records[0], records
    with _Records() as records:
        load_model(str(_backbone_folder(tmp_path / "whole")), "text-classification", num_labels=3,
                   processor="unused")
    assert records == []


def _plan_examples(text: str) -> list[tuple[str, list[str]]]:
    """``($ fastseq plan ... command, the output lines shown)`` of every such example in ``text``."""
    examples, current = [], None
    for block in text.split("```")[1::2]:
        for line in block.splitlines():
            if line.startswith("$ "):
                current = (line[2:], [])
                examples.append(current)
            elif current is not None and line.strip():
                current[1].append(line)
        current = None
    return [(cmd, shown) for cmd, shown in examples if cmd.startswith("fastseq plan ")]


@pytest.mark.parametrize("doc", ["README.md", "docs/quantization.md"])
def test_plan_examples_in_the_docs_are_what_the_tool_prints(doc, capsys):
    """Pasted from the tool and checked here, so that they never drift again ("..." stands for
    lines left out)."""
    import shlex
    from pathlib import Path

    examples = _plan_examples((Path(__file__).resolve().parents[1] / doc).read_text())
    assert len(examples) >= 3
    for cmd, shown in examples:
        argv = shlex.split(cmd, comments=True)[1:]
        rc = main(argv)
        printed = capsys.readouterr().out.splitlines()
        assert rc == (3 if printed[-1].startswith("nothing fits") else 0), cmd
        cut = shown.index("...") if "..." in shown else len(shown)
        head, tail = shown[:cut], shown[cut + 1:]
        assert printed[:len(head)] == head, cmd
        assert printed[-len(tail):] == tail if tail else printed == head, cmd
