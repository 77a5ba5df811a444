"""One federated run per task kind on tiny random models and the shipped fixture data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fastseq.fed.engine import run_experiment
from fastseq.fed.experiment import ExperimentConfig

FIXTURES = Path(__file__).parent / "fixtures" / "data"

CASES = {
    # kind: (model, task, data_path, metric that must be present)
    "text-classification": ("tiny-bert", "bbc-news", FIXTURES / "bbc", "accuracy"),
    "causal-lm": ("tiny-llama", "chatterbot-qa", FIXTURES / "chatterbot", "rougeL_tf"),
    "image-classification": ("tiny-siglip", "brain-tumor", FIXTURES / "brain_tumor", "accuracy"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_federated_run_per_task_kind(tmp_path, kind):
    model, task, data, metric = CASES[kind]
    cfg = ExperimentConfig(model=model, task=task, data_path=str(data), rounds=2, clients=2, clients_per_round=2,
                           partition="iid", min_client_size=1, local_steps=3, batch_size=4, lr=1e-2, r=4,
                           max_length=48, out=str(tmp_path / "run"), progress=False, eval_batch_size=8)
    run_experiment(cfg, echo=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert metric in r and math.isfinite(r["eval_loss"])
    assert all(r["uplink_bytes"] > 0 and math.isfinite(r["train_loss"]) for r in rows[1:])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
