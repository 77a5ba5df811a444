"""DeepSpeed client (ZeRO 2, one process, gloo on CPU) against the plain PyTorch client."""

import dataclasses

import os

import pytest
import torch

pytest.importorskip("deepspeed")

from fastseq.comm import decode  # noqa: E402
from fastseq.fed.deepspeed_client import DeepSpeedClient, DeepSpeedConfig  # noqa: E402
from fastseq.fed.experiment import ExperimentConfig, build_client, build_runtime, build_server  # noqa: E402


def _cfg(**kw):
    base = dict(model="tiny-bert", task="synthetic", clients=2, clients_per_round=2, rounds=1, local_steps=4,
                batch_size=4, grad_accum=2, max_examples=48, eval_examples=8, min_client_size=4, partition="iid",
                lr=1e-2, seed=3, progress=False)
    base.update(kw)
    return ExperimentConfig(**base)


def _record_losses(rt):
    seen = []
    orig = rt.task.loss

    def loss(model, batch):
        out = orig(model, batch)
        seen.append(float(out.detach()))
        return out

    rt.task.loss = loss
    return seen


def test_deepspeed_config_validation_and_ds_dict():
    ds = DeepSpeedConfig()
    assert ds.zero_stage == 2 and ds.bf16 == "auto" and not ds.offload_optimizer
    tc = _cfg().train_config()
    d = ds.ds_config(tc, torch.device("cpu"))
    assert d["zero_optimization"] == {"stage": 2}
    assert d["bf16"] == {"enabled": False}  # auto: no bf16 on CPU
    assert d["train_micro_batch_size_per_gpu"] == 4 and d["gradient_accumulation_steps"] == 2
    d = DeepSpeedConfig(offload_optimizer=True, config={"zero_optimization": {"overlap_comm": False}}).ds_config(
        tc, torch.device("cpu"))
    assert d["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert d["zero_optimization"]["overlap_comm"] is False and d["zero_optimization"]["stage"] == 2
    assert DeepSpeedConfig.from_json(ds.to_json()) == ds
    with pytest.raises(ValueError):
        DeepSpeedConfig(zero_stage=5)
    with pytest.raises(ValueError):
        DeepSpeedConfig.from_dict({"stage": 2})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero2_losses_match_plain_client(tmp_path):
    cfg = _cfg()
    rt = build_runtime(cfg, echo=lambda s: None)
    server = build_server(cfg, rt)
    plan = server.configure_round(1)
    cid, down = plan[0]

    seen = _record_losses(rt)
    plain = build_client(cfg, rt, cid, tmp_path / "plain")
    up_plain, m_plain = plain.fit(down, 1)
    plain_losses = list(seen)
    seen.clear()

    # The config's deepspeed table makes build_client build DeepSpeed clients.
    ds_client = build_client(dataclasses.replace(cfg, deepspeed={"zero_stage": 2}), rt, cid, tmp_path / "ds")
    assert isinstance(ds_client, DeepSpeedClient)
    up_ds, m_ds = ds_client.fit(down, 1)
    ds_losses = list(seen)

    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert torch.distributed.get_backend() == "gloo"
    assert len(plain_losses) == len(ds_losses) == cfg.local_steps * cfg.grad_accum
    # The first micro-batch sees identical weights; later ones the weights after each step.
    assert ds_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5)
    assert m_ds["train_loss"] == pytest.approx(m_plain["train_loss"], rel=1e-4)
    assert m_ds["deepspeed_zero_stage"] == 2 and m_ds["steps"] == m_plain["steps"] == cfg.local_steps
    a, b = decode(up_plain), decode(up_ds)
    assert a.example_count == b.example_count and set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        torch.testing.assert_close(b.tensors[k], a.tensors[k], rtol=1e-3, atol=1e-5)
    # The engine's gradient hooks are gone: a plain fit afterwards still matches the first one.
    seen.clear()
    again = build_client(cfg, rt, cid, tmp_path / "plain2")
    up_again, _ = again.fit(down, 1)
    assert seen == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    for k in a.tensors:
        torch.testing.assert_close(decode(up_again).tensors[k], a.tensors[k])
