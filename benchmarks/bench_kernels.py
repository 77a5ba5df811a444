"""pytest-benchmark suite: fwd+bwd of one FFN layer, SCL (eager / recompute / fused) vs the
frozen SwiGLU MLP and PEFT LoRA on up+down (r=16, and at SCL's budget). Shapes: TinyLlama and Gemma-2B FFNs.

    pytest benchmarks/bench_kernels.py --benchmark-enable                 # CPU: T=64
    pytest benchmarks/bench_kernels.py --benchmark-enable -k tinyllama

Providers that cannot run here (Triton without CUDA, PEFT not installed) are skipped with
the reason; their CPU twins (``scl_torch_l1/l2``) always run. Each benchmark records the
saved-activation bytes, device name, torch version and git commit in ``extra_info``.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_sweep as ks  # noqa: E402
from provenance import provenance  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOKENS = [2048] if DEVICE.type == "cuda" else [64]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", list(ks.SHAPES))
@pytest.mark.parametrize("provider", ks.PROVIDERS)
def test_ffn_fwd_bwd(benchmark, provider, shape, tokens):
    if not ks.available(provider, DEVICE):
        why = "the fused Triton path is benchmarked on CUDA only" if "triton" in provider else "peft is not installed"
        pytest.skip(f"{provider} unavailable on {DEVICE.type}: {why}")
    d, f = ks.SHAPES[shape]
    built = ks.build(provider, d, f, ks.RANK, tokens, DTYPE, DEVICE)
    x, step, n_train = built.x, built.step, built.trainable_params
    dy = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE)
    saved = ks.count_saved_activations(step, built.exclude)

    def fwd_bwd():
        x.grad = None
        step().backward(dy)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(saved_bytes=saved.bytes, trainable_params=n_train,
                                **provenance(DEVICE), dtype=str(DTYPE))
    benchmark.pedantic(fwd_bwd, rounds=3, iterations=1, warmup_rounds=1)
    assert x.grad is not None and torch.isfinite(x.grad).all()
