"""The runtime's SCL variants, model-selection split and per-role learning rates, on tiny models
with real training steps."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastseq.comm import decode
from fastseq.config import ConfigError
from fastseq.fed.client import optimizer_groups
from fastseq.fed.engine import run_experiment
from fastseq.fed.experiment import ExperimentConfig, build_client, build_runtime, build_server, is_test_round

from fed_helpers import history, tiny_config


def _cfg(tmp_path, name="run", **kw):
    return tiny_config(tmp_path, name, **{"max_examples": 120, **kw})


_history = history


def _compress(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".scl.compress." in n}


@pytest.mark.parametrize("placement", ["residual", "parallel"])
def test_frozen_compress_run_learns_and_never_sends_or_changes_c(tmp_path, placement):
    cfg = _cfg(tmp_path, scl_train_compress=False, scl_placement=placement, rounds=3)
    rt = build_runtime(cfg, echo=lambda s: None)
    c0 = _compress(rt.model)
    assert c0 and not any(n in rt.method.shared_names() for n in c0)
    out_name = "expand" if placement == "residual" else "project"
    assert {n.rsplit(".scl.", 1)[1] for n in rt.method.shared_names() if ".scl." in n} == {f"{out_name}.weight"}

    # One real round by hand: the uplink holds no C, and C is untouched on client and server.
    server = build_server(cfg, rt)
    cid, down = server.configure_round(1)[0]
    blob, _ = build_client(cfg, rt, cid).fit(down, 1)
    assert not any(".compress." in n for n in decode(blob).tensors)
    assert all(torch.equal(c0[n], p) for n, p in _compress(rt.model).items())

    run_experiment(cfg, echo=lambda s: None)
    hist = _history(cfg.out)
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]
    saved = load_file(f"{cfg.out}/adapter/adapter_model.safetensors")
    assert all(torch.equal(saved[n], c0[n]) for n in c0)  # the final adapter carries the same C
    info = json.loads((tmp_path / "run" / "config.json").read_text())["method_info"]
    assert info["adapter_params"] == info["adapter_trainable_params"] == info["shared_params"] - info["head_params"]


def test_frozen_compress_is_bit_identical_in_another_process(tmp_path):
    """What a Flower SuperNode does: build the runtime from the same config in its own process
    (other global RNG state, other import order) and get the same C bit for bit."""
    cfg = _cfg(tmp_path, scl_train_compress=False, seed=5)
    rt = build_runtime(cfg, echo=lambda s: None)
    mine = _compress(rt.model)
    code = """
import json, sys, torch
from safetensors.torch import save_file
torch.manual_seed(1234); torch.rand(99)
from fastseq.fed.experiment import ExperimentConfig, build_runtime
rt = build_runtime(ExperimentConfig.from_dict(json.loads(sys.argv[1])), echo=lambda s: None)
save_file({n: p.detach().contiguous() for n, p in rt.model.named_parameters() if ".scl.compress." in n}, sys.argv[2])
"""
    subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(tmp_path / "c.safetensors")],
                   check=True)
    theirs = load_file(str(tmp_path / "c.safetensors"))
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[n], mine[n]) for n in mine)


@pytest.mark.parametrize("split", ["clients", "pooled"])
def test_validation_is_held_out_and_scored_every_round(tmp_path, split):
    cfg = _cfg(tmp_path, validation_fraction=0.2, validation_split=split, rounds=5, test_every=2)
    rt = build_runtime(cfg, echo=lambda s: None)
    train_idx = [i for part in rt.parts for i in part]
    n = len(rt.data.train)
    assert len(set(train_idx)) == len(train_idx)
    val_ids = {id(e) for e in rt.val_examples}
    assert not val_ids & {id(rt.data.train[i]) for i in train_idx}  # disjoint from every client's data
    assert len(rt.val_examples) + len(train_idx) == n
    assert abs(len(rt.val_examples) - 0.2 * n) <= cfg.clients  # rounding per client
    assert not {id(e) for e in rt.eval_examples} & val_ids
    run_experiment(cfg, echo=lambda s: None)
    hist = _history(cfg.out)
    assert all("val_accuracy" in h and "val_eval_loss" in h for h in hist)
    tested = [h["round"] for h in hist if "accuracy" in h]
    assert tested == [0, 2, 3, 4, 5] == [r for r in range(6) if is_test_round(cfg, r)]


def test_clients_validation_keeps_every_client_training(tmp_path):
    cfg = _cfg(tmp_path, validation_fraction=0.3, partition="dirichlet", alpha=0.3)
    rt = build_runtime(cfg, echo=lambda s: None)
    assert all(len(p) >= 1 for p in rt.parts)


def test_personalised_method_scores_validation_too(tmp_path):
    cfg = _cfg(tmp_path, method="fedsa-lora", validation_fraction=0.2, rounds=2)
    run_experiment(cfg, echo=lambda s: None)
    hist = _history(cfg.out)
    assert hist[-1]["personalized"] and "val_accuracy" in hist[-1] and "accuracy" in hist[-1]
    assert "global_accuracy" in hist[-1]  # the personal models on the global test set, beside their own


def test_personalised_evaluation_uses_each_clients_own_distribution(tmp_path):
    """FedSA-LoRA's authors score each client on its local distribution: the client's own held-out
    examples and a test split drawn with its label proportions; the global test set beside it."""
    from collections import Counter

    cfg = _cfg(tmp_path, method="fedsa-lora", validation_fraction=0.2, partition="dirichlet", alpha=0.2,
               max_examples=160)
    rt = build_runtime(cfg, echo=lambda s: None)
    keys, test_keys = rt.data.partition_keys, rt.data.test_partition_keys
    assert test_keys is not None and len(test_keys) == len(rt.data.test)
    n_test = len(rt.eval_examples)
    own_sizes = 0
    for cid in range(cfg.clients):
        val, test = rt.own_examples(str(cid))
        assert val == [rt.data.train[i] for i in rt.val_parts[cid]] and val  # its own held-out examples
        mine = Counter(keys[i] for i in rt.parts[cid] + rt.val_parts[cid])
        got = Counter(e["label"] for e in test)
        assert set(got) <= set(mine)  # never a label the client does not have
        top = mine.most_common(1)[0][0]
        assert got[top] == max(got.values())  # its commonest label is its test split's commonest
        assert rt.own_examples(str(cid))[1] is test  # drawn once (seeded), the same every round
        own_sizes += len(test)
    assert abs(own_sizes - n_test) <= cfg.clients  # the test set's size, shared by the clients' data sizes
    # evaluate(client=...) scores the own split, and the global test set as global_<metric>
    ev = rt.evaluate(0, client="0")
    val, test = rt.own_examples("0")
    want = rt.task.evaluate(rt.model, test, rt.processor, batch_size=cfg.eval_batch_size)
    assert ev["accuracy"] == want["accuracy"]
    assert ev["global_accuracy"] == rt.evaluate(0)["accuracy"]


def test_client_test_split_follows_the_key_proportions():
    from fastseq.fed.experiment import client_test_indices

    test_keys = [0] * 50 + [1] * 50 + [2] * 3
    idx = client_test_indices([0] * 6 + [1] * 3 + [2] * 1, test_keys, 20, seed=7)
    assert len(idx) == len(set(idx)) == 20  # 12 + 6 + 2, without replacement
    assert [test_keys[i] for i in idx].count(0) == 12 and [test_keys[i] for i in idx].count(1) == 6
    odd = client_test_indices([0] * 1 + [1] * 1 + [2] * 1, test_keys, 4, seed=0)  # 4/3 each: largest remainder
    assert len(odd) == 4
    assert idx == client_test_indices([0] * 6 + [1] * 3 + [2] * 1, test_keys, 20, seed=7)  # seeded
    assert idx != client_test_indices([0] * 6 + [1] * 3 + [2] * 1, test_keys, 20, seed=8)
    few = client_test_indices([2] * 5, test_keys, 10, seed=0)  # more asked than the test set holds
    assert sorted(few) == [100, 101, 102]
    # keys the test set lacks do not count: the share goes to the keys it has; none of them: empty
    assert [test_keys[i] for i in client_test_indices([0] + [9] * 9, test_keys, 4, seed=0)] == [0] * 4
    assert client_test_indices([9] * 3, test_keys, 4, seed=0) == []


def test_head_and_compress_learning_rates(tmp_path):
    cfg = _cfg(tmp_path, model="tiny-bert", lr=1e-3, head_lr=5e-2, scl_compress_lr=1e-4, scl_train_compress=True,
               scl_placement="residual")
    rt = build_runtime(cfg, echo=lambda s: None)
    groups = {g["role"]: g for g in optimizer_groups(rt.method, cfg.train_config())}
    assert {k: g["lr"] for k, g in groups.items()} == {"head": 5e-2, "compress": 1e-4, "adapter": 1e-3}
    assert all("classifier" in n for n, p in rt.model.named_parameters() if any(p is q for q in groups["head"]["params"]))
    # a real step: each group moves by about its lr (AdamW's first step is lr * sign(grad))
    before = {n: p.detach().clone() for n, p in rt.model.named_parameters() if p.requires_grad}
    client = build_client(cfg, rt, "0")
    client.train(1, client.batches(1), None)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in rt.model.named_parameters() if n in before}
    head = max(v for n, v in moved.items() if "classifier" in n)
    expand = max(v for n, v in moved.items() if ".scl.expand." in n)
    assert head == pytest.approx(5e-2, rel=1e-3) and expand == pytest.approx(1e-3, rel=1e-3)
    assert all(v == 0 for n, v in moved.items() if ".scl.compress." in n)  # dC = 0 while E = 0


@pytest.mark.parametrize("bad", [dict(scl_placement="serial"), dict(scl_train_compress="no"), dict(head_lr=0),
                                 dict(scl_compress_lr=-1.0), dict(validation_fraction=0.6),
                                 dict(validation_split="random"), dict(test_every=0), dict(scl_layers=[]),
                                 dict(scl_layers=[-1])])
def test_bad_variant_config_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ExperimentConfig.from_dict(bad)


def test_cli_variant_flags(tmp_path, capsys):
    from fastseq.cli import main

    out = tmp_path / "cli"
    rc = main(["run", "--model", "tiny-bert", "--task", "synthetic", "--rounds", "1", "--clients", "2",
               "--clients-per-round", "2", "--local-steps", "2", "--max-examples", "60", "--partition", "iid",
               "--no-scl-train-compress", "--scl-placement", "parallel", "--scl-layers", "1", "--head-lr", "0.02",
               "--validation-fraction", "0.1", "--out", str(out), "--no-progress"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["scl_train_compress"], cfg["scl_placement"], cfg["scl_layers"], cfg["head_lr"]) == (False, "parallel",
                                                                                                  [1], 0.02)
    names = load_file(str(out / "adapter" / "adapter_model.safetensors")).keys()
    assert {n.split(".scl.")[1] for n in names if ".scl." in n} == {"compress.weight", "project.weight"}
    assert all(".layer.1." in n for n in names if ".scl." in n)
