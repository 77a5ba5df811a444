"""Whole injected models, fused vs reference: the same losses and gradients over training steps."""

from __future__ import annotations

import pytest
import torch

import fastseq
from fastseq import SCLConfig

from tiny_models import HEADS, build, inputs, loss_of

CASES = [(level, backend) for level in (1, 2) for backend in ("torch", "triton")]


def _train(arch, level, backend, steps=3, train_down_proj=False):
    model = build(arch)
    cfg = SCLConfig(r=4, checkpoint_level=level, backend=backend, bias=True, train_down_proj=train_down_proj)
    fastseq.get_scl_model(model, cfg, trainable_modules=HEADS.get(arch, ()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, grads = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of(arch, model(**inputs(arch, seed=step)))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return losses, grads


@pytest.mark.parametrize("level,backend", CASES)
@pytest.mark.parametrize("arch", ["llama", "siglip", "bert"])
def test_fused_training_matches_reference(arch, level, backend):
    ref_losses, ref_grads = _train(arch, 0, "torch")
    losses, grads = _train(arch, level, backend)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for ref, got in zip(ref_grads, grads):
        assert ref.keys() == got.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_train_down_proj_matches_reference(backend):
    ref_losses, ref_grads = _train("llama", 0, "torch", steps=2, train_down_proj=True)
    losses, grads = _train("llama", 2, backend, steps=2, train_down_proj=True)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert "model.layers.0.mlp.down_proj.weight" in grads[-1]
    for name in ref_grads[-1]:
        torch.testing.assert_close(grads[-1][name], ref_grads[-1][name], rtol=1e-4, atol=1e-6, msg=name)
