"""pytest-benchmark suite: encode / decode of a TinyLlama-shaped SCL payload per codec.

Payload: 22 layers x (C [16, 5632] + E [5632, 16]) fp32 (3.96M values, 15.9 MB raw), the
delta one SCL client uploads per round. Codecs: none, bf16, int8 (block 256), nf4 / fp4
(block 64, double-quantized scales), int8 + top-10%.

    python -m pytest benchmarks/bench_comm.py --benchmark-enable

``extra_info`` records the encoded size (bytes, compression vs fp32), device name, torch
version and git commit.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from provenance import provenance  # noqa: E402
from comm_bytes import CODECS  # noqa: E402
from fastseq import comm  # noqa: E402

LAYERS, F, R = 22, 5632, 16


@pytest.fixture(scope="module")
def payload():
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(LAYERS):
        t[f"layers.{i}.mlp.scl.compress.weight"] = torch.randn(R, F, generator=g) * 0.01
        t[f"layers.{i}.mlp.scl.expand.weight"] = torch.randn(F, R, generator=g) * 0.01
    return t


def _info(benchmark, blob, payload):
    raw = sum(v.numel() * v.element_size() for v in payload.values())
    benchmark.extra_info.update(encoded_bytes=len(blob), raw_bytes=raw, compression=raw / len(blob),
                                values=sum(v.numel() for v in payload.values()),
                                **provenance(torch.device("cpu")))


@pytest.mark.parametrize("codec", list(CODECS))
def test_encode(benchmark, payload, codec):
    name, params = CODECS[codec]
    blob = benchmark.pedantic(lambda: comm.encode(payload, name, method="scl", **params), rounds=3, iterations=1,
                              warmup_rounds=1)
    _info(benchmark, blob, payload)


@pytest.mark.parametrize("codec", list(CODECS))
def test_decode(benchmark, payload, codec):
    name, params = CODECS[codec]
    blob = comm.encode(payload, name, method="scl", **params)
    expected = {"tensors": {k: (tuple(v.shape), v.dtype) for k, v in payload.items()}}
    upd = benchmark.pedantic(lambda: comm.decode(blob, expected=expected), rounds=3, iterations=1, warmup_rounds=1)
    _info(benchmark, blob, payload)
    assert set(upd.tensors) == set(payload)
