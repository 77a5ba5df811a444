"""pytest-benchmark suite: one full training step (forward + loss + backward + AdamW step)
of a TinyLlama-shaped causal LM, SCL (eager / recompute levels 1, 2 / fused on CUDA) vs
PEFT LoRA on up+down at the matched parameter budget.

CPU: TinyLlama widths (d 2048, f 5632, 32 heads, 4 KV heads) but 1 layer, vocabulary 4096,
batch 1 x 64 tokens, fp32. CUDA: 22 layers, vocabulary 32000, batch 4 x 512 tokens, bf16.
For the full comparison (fp32/bf16/nf4, equal rank, memory) run ``benchmarks/train_step.py``.

    python -m pytest benchmarks/bench_train_step.py --benchmark-enable
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step as ts  # noqa: E402
from provenance import provenance  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = DEVICE.type == "cpu"
LAYERS, VOCAB, BATCH, SEQ = (1, 4096, 1, 64) if CPU else (22, 32000, 4, 512)
BACKBONE = "fp32" if CPU else "bf16"
PROVIDERS = ["lora_matched", "scl_eager", "scl_recompute_l1", "scl_recompute_l2", "scl_fused_l1", "scl_fused_l2"]


@pytest.fixture(scope="module")
def backbone():
    model, _ = ts.build_backbone(ts.TINYLLAMA, LAYERS, VOCAB, BACKBONE, DEVICE)
    return model


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, backbone, provider):
    why = ts.available(provider, DEVICE)
    if why:
        pytest.skip(f"{provider} unavailable on {DEVICE.type}: {why}")
    runner = ts.Runner(provider, backbone, DEVICE, BATCH, SEQ, VOCAB)
    mem = runner.memory()

    def step():
        loss = runner.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return loss

    benchmark.extra_info.update(tokens=BATCH * SEQ, layers=LAYERS, vocab=VOCAB, backbone=BACKBONE,
                                trainable_params=runner.n_trainable, rank=runner.rank,
                                saved_bytes=mem["saved_bytes"], est_peak_bytes=mem["est_peak_bytes"],
                                **provenance(DEVICE))
    loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
