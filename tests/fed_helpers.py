"""Small federated runs on tiny models, shared by the engine tests."""

import json

from fastseq.fed.experiment import ExperimentConfig


def tiny_config(tmp_path, name="run", **kw) -> ExperimentConfig:
    """tiny-llama on the synthetic task, 3 clients (2 per round), 3 rounds of 6 steps."""
    base = dict(model="tiny-llama", task="synthetic", max_examples=80, rounds=3, clients=3, clients_per_round=2,
                partition="iid", min_client_size=4, local_steps=6, lr=1e-2, batch_size=8, r=4,
                out=str(tmp_path / name), progress=False, eval_batch_size=64)
    base.update(kw)
    return ExperimentConfig.from_dict(base)


def history(out) -> list[dict]:
    with open(f"{out}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]
