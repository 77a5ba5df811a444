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


def flower_config(out, **kw) -> ExperimentConfig:
    """tiny-bert on the synthetic task, 2 rounds of 3 steps: the Flower engines' tests (each
    file passes its own clients / clients_per_round)."""
    base = dict(model="tiny-bert", task="synthetic", rounds=2, local_steps=3, batch_size=8, max_examples=64,
                eval_examples=32, min_client_size=4, partition="iid", seed=0,
                out=None if out is None else str(out), progress=False)
    base.update(kw)
    return ExperimentConfig(**base)


def history(out) -> list[dict]:
    with open(f"{out}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def assert_same_run(local_out, other_out, *, rounds: int, clients=None, frozen_c: bool = False,
                    drop_reasons: bool = True) -> None:
    """``other_out`` (a run on another engine) computed what the local engine's ``local_out``
    did: the same sampling, bytes, metrics, final adapter and last checkpoint.
    ``drop_reasons=False``: the same clients dropped, whatever the reasons given."""
    from pathlib import Path

    import pytest
    import torch
    from safetensors.torch import load_file

    local_out, other_out = Path(local_out), Path(other_out)
    a, b = history(local_out), history(other_out)
    assert [r["round"] for r in b] == list(range(rounds + 1))
    assert [r["clients"] for r in b] == [r["clients"] for r in a]
    if clients is not None:
        assert [r["clients"] for r in b] == clients
    for ra, rb in zip(a, b):
        for k in ("uplink_bytes", "downlink_bytes", "examples", "skipped"):
            assert ra[k] == rb[k], k
        if drop_reasons:
            assert ra["dropped"] == rb["dropped"]
        else:
            assert [d["client"] for d in ra["dropped"]] == [d["client"] for d in rb["dropped"]]
        for k in ("eval_loss", "accuracy", "train_loss"):
            if ra.get(k) is None:
                assert rb.get(k) is None
            else:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), k
    fa = sorted((local_out / "adapter").glob("*.safetensors"))
    assert fa, "the local engine wrote no adapter"
    for f in fa:
        x, y = load_file(f), load_file(other_out / "adapter" / f.name)
        assert set(x) == set(y)
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6)
            if ".scl.compress." in k and frozen_c:
                assert torch.equal(y[k], x[k]), k  # a frozen C: bit for bit
    x = load_file(local_out / "checkpoints" / f"round_{rounds}" / "server.safetensors")
    y = load_file(other_out / "checkpoints" / f"round_{rounds}" / "server.safetensors")
    assert set(x) == set(y)
    assert not frozen_c or not any(".scl.compress." in k for k in x)  # a frozen C is no global state
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6)


TIMING = ("seconds", "eval_seconds", "train_seconds", "workers", "client_worker")


def run_rows(out, skip=()) -> list[dict]:
    """A run's metrics rows without what differs between identical runs (timing, worker ids) and ``skip``."""
    return [{k: v for k, v in r.items() if k not in TIMING and k not in skip} for r in history(out)]


def run_tensors(out) -> dict:
    """Every safetensors file of a run (adapter, checkpoints, client and server state), by path."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = Path(out)
    return {str(p.relative_to(out)): load_file(p) for p in sorted(out.rglob("*.safetensors"))}


def assert_bit_identical(a, b, skip=()) -> None:
    """Two runs computed the same: metrics rows (but ``skip``) and every tensor they wrote."""
    import torch

    assert run_rows(a, skip) == run_rows(b, skip)
    ta, tb = run_tensors(a), run_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for f in ta:
        assert ta[f].keys() == tb[f].keys(), f
        for k in ta[f]:
            assert torch.equal(ta[f][k], tb[f][k]), (f, k)
