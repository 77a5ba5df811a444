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
    assert "valid keys" in capsys.readouterr().err
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
