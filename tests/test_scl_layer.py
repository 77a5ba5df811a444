"""The SCL FFN (reference path) against a hand-written docs/design.md §1 formula: outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseq
from fastseq import SCLConfig
from tiny_models import PLAIN_SCL


class GatedMLP(nn.Module):  # Llama's MLP, structurally
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.act_fn = nn.Linear(f, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):  # SigLIP's MLP, structurally
    def __init__(self, d, f):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.activation_fn = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


def formula(m, x, scale):
    """c = h + s * E(sigma(C h)); y = c Wd^T (+ bd), written out by hand."""
    if isinstance(m, GatedMLP):
        h = F.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)
        sigma, down = F.silu, m.down_proj
    else:
        h = F.gelu(x @ m.fc1.weight.T + m.fc1.bias, approximate="tanh")
        sigma, down = (lambda t: F.gelu(t, approximate="tanh")), m.fc2
    scl = m.scl
    p = h @ scl.compress.weight.to(x.dtype).T + scl.compress.bias.to(x.dtype)
    c = h + scale * (sigma(p) @ scl.expand.weight.to(x.dtype).T + scl.expand.bias.to(x.dtype))
    y = c @ down.weight.T
    return y + down.bias if down.bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [GatedMLP, PlainMLP])
def test_reference_matches_formula(cls, dtype):
    torch.manual_seed(0)
    m = cls(12, 20).to(dtype)
    fastseq.get_scl_model(m, SCLConfig(r=3, scale=0.7, bias=True, checkpoint_level=0, **PLAIN_SCL))
    with torch.no_grad():  # a non-trivial E and biases
        for p in m.scl.parameters():
            p.normal_()
    x = torch.randn(5, 12, dtype=dtype, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    got = [x.grad] + [p.grad for p in m.scl.parameters()]
    assert all(p.grad.dtype == torch.float32 for p in m.scl.parameters())  # fp32 adapter on any backbone

    x2 = x.detach().clone().requires_grad_(True)
    for p in m.scl.parameters():
        p.grad = None
    y2 = formula(m, x2, 0.7)
    y2.backward(gy)
    want = [x2.grad] + [p.grad for p in m.scl.parameters()]
    if dtype == torch.float32:
        torch.testing.assert_close(y, y2, rtol=0, atol=0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return
    # bf16: the module may round differently from the formula (fused bias adds); bound its error
    # against an fp64 evaluation by a multiple of the same-precision formula's own error.
    m64 = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_(True)
    y64 = formula(m64, x64, 0.7)
    y64.backward(gy.double())
    exact = [x64.grad] + [p.grad for p in m64.scl.parameters()]
    for a, b, e in zip([y] + got, [y2] + want, [y64] + exact):
        err_module, err_formula = (a.double() - e).abs().max(), (b.double() - e).abs().max()
        assert err_module <= 2 * err_formula + 1e-2 * e.abs().max(), (err_module, err_formula)


def test_expand_is_zero_and_compress_is_kaiming_at_init():
    m = GatedMLP(8, 16)
    fastseq.get_scl_model(m, SCLConfig(r=4, checkpoint_level=0, **PLAIN_SCL))
    assert torch.count_nonzero(m.scl.expand.weight) == 0
    bound = 1 / 16 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    w = m.scl.compress.weight
    assert w.abs().max() <= bound and w.std() > bound / 4
