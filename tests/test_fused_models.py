"""Whole injected models, fused vs reference: the same losses and gradients over training steps,
for plain SCL and its variants (parallel placement, frozen C)."""

from __future__ import annotations

import pytest
import torch

import fastseq
from fastseq import SCLConfig

from tiny_models import HEADS, build, train_steps

CASES = [(level, backend) for level in (1, 2) for backend in ("torch", "triton")]


VARIANTS = {"scl": {}, "parallel": dict(placement="parallel"), "frozenC": dict(train_compress=False),
            "parallel-frozenC": dict(placement="parallel", train_compress=False)}


def _train(arch, level, backend, steps=3, train_down_proj=False, variant="scl"):
    model = build(arch)
    cfg = SCLConfig(r=4, checkpoint_level=level, backend=backend, bias=True, train_down_proj=train_down_proj,
                    **VARIANTS[variant])
    fastseq.get_scl_model(model, cfg, trainable_modules=HEADS.get(arch, ()))
    return train_steps(model, arch, steps=steps, lr=0.5, opt_cls=torch.optim.SGD)


@pytest.mark.parametrize("level,backend", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["llama", "siglip", "bert"])
def test_fused_training_matches_reference(arch, variant, level, backend):
    ref_losses, ref_grads = _train(arch, 0, "torch", variant=variant)
    losses, grads = _train(arch, level, backend, variant=variant)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for ref, got in zip(ref_grads, grads):
        assert ref.keys() == got.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", ["scl", "parallel-frozenC"])
def test_fused_train_down_proj_matches_reference(backend, variant):
    ref_losses, ref_grads = _train("llama", 0, "torch", steps=2, train_down_proj=True, variant=variant)
    losses, grads = _train("llama", 2, backend, steps=2, train_down_proj=True, variant=variant)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert "model.layers.0.mlp.down_proj.weight" in grads[-1]
    for name in ref_grads[-1]:
        torch.testing.assert_close(grads[-1][name], ref_grads[-1][name], rtol=1e-4, atol=1e-6, msg=name)
