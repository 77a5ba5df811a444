"""pytest-benchmark suite: one federated round on the embedded engine, per method and codec.

One round = server.configure_round (sampling + downlink encode) + every sampled client's
fit (decode, local training, encode of its delta) + server.aggregate (decode, validate,
aggregate) + server.evaluate. Setup (model, task, data, partition) is excluded.

CPU configuration (small, so the suite stays short): the built-in ``tiny-bert`` on the
``synthetic`` text task, 4 clients, 2 per round, 3 local steps of batch 8, SCL r=8 and
LoRA at the matched budget. With a GPU, point ``FASTSEQ_BENCH_MODEL`` / ``FASTSEQ_BENCH_TASK``
at a real model and task (e.g. ``all-MiniLM-L6-v2`` / ``bbc-news``).

    python -m pytest benchmarks/bench_fl_round.py --benchmark-enable

``extra_info``: bytes up / down of the measured rounds, trainable / shared parameter counts,
device name, torch version, git commit.
"""
import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from provenance import provenance  # noqa: E402

fed = pytest.importorskip("fastseq.fed.experiment", reason="the federated runtime (fastseq.fed) is not installed")

MODEL = os.environ.get("FASTSEQ_BENCH_MODEL", "tiny-bert")
TASK = os.environ.get("FASTSEQ_BENCH_TASK", "synthetic")
METHODS = ["scl", "fedavg-lora", "ffa-lora", "fedsa-lora", "fedex-lora"]


def _round_fn(cfg):
    rt = fed.build_runtime(cfg, echo=lambda *_: None)
    server = fed.build_server(cfg, rt, logger=lambda *_: None)
    clients = {cid: fed.build_client(cfg, rt, cid) for cid in server.client_ids}
    counter = itertools.count(1)
    last = {}

    def one_round():
        r = next(counter)
        results = [(cid, clients[cid].fit(down, r)[0]) for cid, down in server.configure_round(r)]
        rec = server.aggregate(r, results, [])
        rec.update(server.evaluate(r))
        server.finish_round(rec)
        last.update(rec)
        return rec

    return rt, one_round, last


@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("method", METHODS)
def test_fl_round(benchmark, method, codec, tmp_path):
    cfg = fed.ExperimentConfig(model=MODEL, task=TASK, method=method, rounds=10, clients=4, clients_per_round=2,
                               local_steps=3, batch_size=8, codec=codec, downlink_codec=codec, max_examples=256,
                               eval_examples=64, progress=False, out=str(tmp_path), seed=0)
    rt, one_round, last = _round_fn(cfg)
    benchmark.pedantic(one_round, rounds=3, iterations=1, warmup_rounds=1)
    info = rt.method.info
    benchmark.extra_info.update(model=MODEL, task=TASK, uplink_bytes=last.get("uplink_bytes"),
                                downlink_bytes=last.get("downlink_bytes"),
                                trainable_params=info.get("trainable_params"), shared_params=info.get("shared_params"),
                                **provenance(rt.device))
    assert not last.get("dropped"), last.get("dropped")
