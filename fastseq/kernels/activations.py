"""Activation functions and their derivatives, in PyTorch.

The Triton twins live in ``scl_ffn_triton.py`` (``_act`` / ``_act_grad``) so that this
module imports torch only. Every derivative here is written out by hand (no autograd):
the recompute paths call them inside ``backward``.
"""
from __future__ import annotations

import math

import torch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

#: integer codes used as ``tl.constexpr`` in the Triton kernels
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(name: str) -> str:
    if name not in ACT_CODES:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return name


def act(x: torch.Tensor, name: str) -> torch.Tensor:
    """``act(x)`` for ``name`` in :data:`ACTIVATIONS` (same math as torch.nn.functional)."""
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "relu":
        return torch.relu(x)
    check_activation(name)
    raise AssertionError  # unreachable


def act_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    """``d act(x) / dx``, elementwise."""
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return cdf + x * pdf
    if name == "gelu_tanh":
        x2 = x * x
        t = torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x2))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x2)
    if name == "relu":
        return (x > 0).to(x.dtype)
    check_activation(name)
    raise AssertionError  # unreachable


def act_and_grad(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(x), act'(x))``; computed in fp32 for half inputs, returned in x.dtype."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return act(xf, name).to(x.dtype), act_grad(xf, name).to(x.dtype)
