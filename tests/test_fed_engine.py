"""End-to-end runs on a tiny model through the local engine: every method, resume, failures, codecs."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fastseq.comm import encode
from fastseq.config import ConfigError
from fastseq.fed.client import Client
from fastseq.fed.engine import Hooks, run_experiment
from fastseq.fed.experiment import ExperimentConfig, build_client, build_runtime

from fed_helpers import history, tiny_config

KEYS = {"round", "method", "train_loss", "eval_loss", "accuracy", "uplink_bytes", "downlink_bytes", "clients",
        "dropped", "seconds"}


_cfg, _history = tiny_config, history


@pytest.mark.parametrize("method", ["scl", "fedavg-lora", "ffa-lora", "fedsa-lora", "fedex-lora"])
def test_method_runs_and_learns(tmp_path, method):
    cfg = _cfg(tmp_path, method=method)
    summary = run_experiment(cfg, echo=lambda s: None)
    hist = _history(cfg.out)
    assert [h["round"] for h in hist] == [0, 1, 2, 3]
    for h in hist:
        assert KEYS <= set(h)
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]
    assert all(h["uplink_bytes"] > 0 and h["downlink_bytes"] > 0 for h in hist[1:])
    assert summary["method"] == method
    for f in ("config.json", "summary.json", "curves.png", "adapter"):
        assert (tmp_path / "run" / f).exists()
    if method == "fedsa-lora":
        assert hist[-1]["personalized"] and len(hist[-1]["per_client_accuracy"]) == 3
    if method == "ffa-lora":  # A never changes: the trained adapter's A is the seeded init
        rt = build_runtime(cfg, echo=lambda s: None)
        saved = load_file(f"{cfg.out}/adapter/adapter_model.safetensors")
        init = {n.replace(".default", ""): p for n, p in rt.model.named_parameters() if "lora_A" in n}
        assert init and all(torch.equal(saved[n], p.detach()) for n, p in init.items())
        b_saved = [v for k, v in saved.items() if "lora_B" in k]
        assert any(v.abs().sum() > 0 for v in b_saved)


class Crash(Hooks):
    def __init__(self, after: int = 1):
        self.after = after

    def on_round_end(self, round, record):
        if round == self.after:
            raise KeyboardInterrupt(f"simulated kill after round {round}")


@pytest.mark.parametrize("method", ["scl", "fedsa-lora"])
def test_resume_is_bit_exact(tmp_path, method):
    kw = dict(method=method, codec="int8", error_feedback=True, server_opt="fedadam")
    full = _cfg(tmp_path, "full", **kw)
    run_experiment(full, echo=lambda s: None)
    crashed = _cfg(tmp_path, "crashed", **kw)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(crashed, hooks=Crash(), echo=lambda s: None)
    assert len(_history(crashed.out)) == 2
    run_experiment(_cfg(tmp_path, "crashed", **kw), resume=True, echo=lambda s: None)
    name = "adapter_model.safetensors"
    a, b = load_file(f"{full.out}/adapter/{name}"), load_file(f"{crashed.out}/adapter/{name}")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = _history(full.out), _history(crashed.out)
    assert [h["accuracy"] for h in ha] == [h["accuracy"] for h in hb]
    assert [h["uplink_bytes"] for h in ha] == [h["uplink_bytes"] for h in hb]


def test_a_finished_run_trained_further_equals_a_longer_run(tmp_path):
    """``--resume DIR --rounds N`` on a finished run continues it: the result is the run that was
    asked for N rounds from the start (the accuracy study extends its runs this way)."""
    kw = dict(method="scl", codec="int8", error_feedback=True, server_opt="fedadam")
    longer = _cfg(tmp_path, "longer", rounds=4, **kw)
    run_experiment(longer, echo=lambda s: None)
    run_experiment(_cfg(tmp_path, "shorter", rounds=2, **kw), echo=lambda s: None)
    extended = _cfg(tmp_path, "shorter", rounds=4, **kw)
    with pytest.raises(KeyboardInterrupt):  # killed after round 3: no summary says the run finished
        run_experiment(extended, resume=True, hooks=Crash(after=3), echo=lambda s: None)
    assert not (tmp_path / "shorter" / "summary.json").exists()
    run_experiment(extended, resume=True, echo=lambda s: None)
    assert json.loads((tmp_path / "shorter" / "summary.json").read_text())["rounds"] == 4
    name = "adapter_model.safetensors"
    a, b = load_file(f"{longer.out}/adapter/{name}"), load_file(f"{extended.out}/adapter/{name}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = _history(longer.out), _history(extended.out)
    assert [h["round"] for h in hb] == [0, 1, 2, 3, 4]
    for key in ("train_loss", "accuracy", "uplink_bytes", "clients"):
        assert [h[key] for h in ha] == [h[key] for h in hb], key
    assert json.loads((tmp_path / "shorter" / "config.json").read_text())["rounds"] == 4


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot resume: .* does not exist"):
        run_experiment(_cfg(tmp_path, "empty"), resume=True, echo=lambda s: None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(_cfg(tmp_path, "empty").to_dict()))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        run_experiment(_cfg(tmp_path, "empty"), resume=True, echo=lambda s: None)


class Faulty(Client):
    def fit(self, downlink_blob, round):
        if self.client_id == "0":
            raise RuntimeError("out of memory (simulated)")
        up, m = super().fit(downlink_blob, round)
        if self.client_id == "1":
            bad = {n: torch.full_like(t, math.nan) for n, t in self.rt.method.shared_state().items()}
            up = encode(bad, "none", round=round, client_id="1", method=self.rt.method.name, direction="up",
                        example_count=5)
        return up, m


def test_failing_and_nan_clients_are_dropped(tmp_path):
    cfg = _cfg(tmp_path, rounds=1, clients_per_round=3)
    logs = []

    def factory(cfg, rt, cid, state_dir):
        c = build_client(cfg, rt, cid, state_dir)
        return Faulty(c.client_id, rt, c.examples, c.train_cfg, state_dir)

    run_experiment(cfg, client_factory=factory, echo=logs.append)
    rec = _history(cfg.out)[1]
    assert rec["clients"] == ["2"]
    reasons = {d["client"]: d["reason"] for d in rec["dropped"]}
    assert "RuntimeError" in reasons["0"] and "NonFinite" in reasons["1"]
    assert any("dropped client 1" in line for line in logs)
    assert math.isfinite(rec["accuracy"])


def test_a_round_that_drops_every_client_says_so_and_the_run_records_it(tmp_path):
    """Round 1: every client fails; round 2 trains. The run counts one aggregated round."""
    logs = []

    class FailsInRoundOne(Client):
        def fit(self, downlink_blob, round):
            if round == 1:
                raise RuntimeError(f"no GPU memory left on {self.client_id} (simulated)")
            return super().fit(downlink_blob, round)

    def factory(cfg, rt, cid, state_dir):
        c = build_client(cfg, rt, cid, state_dir)
        return FailsInRoundOne(c.client_id, rt, c.examples, c.train_cfg, state_dir)

    summary = run_experiment(_cfg(tmp_path, rounds=2), client_factory=factory, echo=logs.append)
    warned = [line for line in logs if line.startswith("WARNING round")]
    assert len(warned) == 1 and warned[0].startswith("WARNING round 1: every sampled client was dropped")
    assert "no GPU memory left on" in warned[0]
    assert _history(summary["out"])[1]["skipped"] is True
    assert summary["aggregated_rounds"] == 1 and "failure" not in summary


def test_int8_error_feedback_uses_fewer_uplink_bytes(tmp_path):
    none = run_experiment(_cfg(tmp_path, "none", rounds=1), echo=lambda s: None)
    int8 = run_experiment(_cfg(tmp_path, "int8", rounds=1, codec="int8", error_feedback=True), echo=lambda s: None)
    assert int8["uplink_bytes"] < none["uplink_bytes"] / 2


def test_bad_config_values_list_valid_ones():
    with pytest.raises(ConfigError, match="valid keys"):
        ExperimentConfig.from_dict({"nope": 1})
    with pytest.raises(ConfigError, match="fedavg-lora"):
        ExperimentConfig.from_dict({"method": "lora"})
    with pytest.raises(ConfigError, match="does not exist"):
        ExperimentConfig.from_dict({"data_path": "/no/such/dir/x.csv"})
