"""Secure aggregation on Flower: fastseq's rounds through Flower's own SecAgg+.

fastseq writes no masking, key agreement or secret sharing: the server side drives
``flwr``'s :class:`SecAggPlusWorkflow` stage by stage (setup, share keys, collect masked
vectors, unmask) and the client side is ``flwr``'s ``secaggplus_mod``.

* Server (:func:`secure_sum`): one round's sampled clients, with the downlink blobs the fastseq
  server encoded for them, go to the workflow through a one-round legacy ``Strategy``: its
  ``configure_fit`` hands each client its blob in a ``FitIns`` config and its ``aggregate_fit``
  receives the unmasked example-weighted mean of the clients' deltas, which is all the
  server learns (with each client's example count and training metrics, which Flower sends in
  the clear).
* Client (``app.secagg_when_asked``, :func:`fit_reply`): messages that carry SecAgg+ configs go
  through ``secaggplus_mod``; in its collect stage the ClientApp trains as usual, decodes its
  own uplink (codec ``none``: the exact float delta) and replies with the delta as the legacy
  ``FitRes`` arrays that the mod weights, quantizes and masks.

Every payload byte of every stage (keys, encrypted shares, masked vectors, metrics) is
counted by a wrapper around the Grid; the downlink blobs are counted by the fastseq server.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState

from ..fed.server import SecureSum
from .app import FITINS_CONFIG

METRICS_KEY = "fastseq-metrics"     # the FitRes metric holding the client's metrics as JSON
STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")


@dataclass
class SecAggSettings:
    """The workflow's parameters (see ``SecAggPlusWorkflow``): ``shares`` and ``threshold`` are
    fractions (of the round's clients, of the shares); ``max_weight`` bounds a client's example
    count (its weight); ``clip_range`` bounds each weighted delta value before quantization."""

    shares: float
    threshold: float
    clip_range: float
    max_weight: float
    timeout: float | None = None

    def workflow(self) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(num_shares=float(self.shares), reconstruction_threshold=float(self.threshold),
                                  max_weight=float(self.max_weight), clipping_range=float(self.clip_range),
                                  timeout=self.timeout)


def payload_bytes(content: RecordDict, skip: tuple[str, str] | None = None) -> int:
    """Bytes of a message's values (not of the transport's framing): bytes and strings at their
    length, numbers at 8 bytes, arrays at their data size. ``skip`` = (record, key) leaves out
    one value (a downlink blob the fastseq server has counted already)."""
    def size(v: Any) -> int:
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        return 8

    n = 0
    for name, rec in list(content.config_records.items()) + list(content.metric_records.items()):
        n += sum(size(v) for k, v in rec.items() if (name, k) != skip)
    for rec in content.array_records.values():
        n += sum(len(a.data) for a in rec.values())
    return n


class CountingGrid:
    """A Grid that counts the payload bytes it sends (downlink) and receives (uplink)."""

    def __init__(self, grid):
        self._grid = grid
        self.uplink_bytes = 0
        self.downlink_bytes = 0

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        self.downlink_bytes += sum(payload_bytes(m.content, skip=(FITINS_CONFIG, "blob")) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.uplink_bytes += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


class RoundStrategy(Strategy):
    """The legacy Strategy the SecAgg+ workflow drives for one fastseq round: it only hands out
    the fastseq requests and keeps what the unmask stage reveals."""

    def __init__(self, requests: list[tuple[int, dict[str, Any]]], grid):
        self.requests, self.grid = requests, grid  # [(node id, FitIns config)]
        self.results: list[tuple[int, FitRes]] | None = None
        self.failures: list = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, run_id=0), FitIns(Parameters(tensors=[], tensor_type=""), config))
                for node, config in self.requests]

    def aggregate_fit(self, server_round, results, failures):
        # Every FitRes carries the same unmasked weighted mean (the workflow's doing).
        self.results = [(proxy.node_id, res) for proxy, res in results]
        self.failures = list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # fastseq evaluates on its own, outside SecAgg+

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_sum(requests: list[tuple[str, int, dict[str, Any]]], grid, round: int,
               settings: SecAggSettings) -> SecureSum:
    """Run one round's fits under SecAgg+. ``requests``: (client id, node id, FitIns config)."""
    counting = CountingGrid(grid)
    node_to_client = {node: cid for cid, node, _ in requests}
    strategy = RoundStrategy([(node, config) for _, node, config in requests], counting)
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                        strategy=strategy)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(round)})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow, state = settings.workflow(), WorkflowState()
    steps = (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage,
             workflow.unmask_stage)
    halted = next((name for name, step in zip(STAGES, steps) if not step(counting, ctx, state)), None)
    info: dict[str, Any] = {"shares": state.num_shares, "threshold": state.threshold,
                            "clip_range": settings.clip_range, "max_weight": settings.max_weight}
    if halted is not None or strategy.results is None:
        info["halted"] = halted
        reason = (f"SecAgg+ halted in its {halted} stage: fewer clients answered than the protocol needs "
                  f"(threshold {state.threshold} of {state.num_shares} shares)")
        return SecureSum(None, failures=[(cid, reason) for cid, _, _ in requests], info=info,
                         uplink_bytes=counting.uplink_bytes, downlink_bytes=counting.downlink_bytes)
    weights, metrics, clipped = {}, {}, []
    for node, res in strategy.results:
        cid = node_to_client[node]
        weights[cid] = float(res.num_examples)
        m = json.loads(str(res.metrics.get(METRICS_KEY, "{}")))
        metrics[cid] = m
        # the mod clips num_examples / max_weight * delta to +-clip_range: say when that bit
        if m.get("max_abs_delta", 0.0) * res.num_examples / settings.max_weight > settings.clip_range:
            clipped.append(cid)
    info["clipped"] = sorted(clipped, key=int)
    arrays = parameters_to_ndarrays(strategy.results[0][1].parameters)
    failures = [(cid, "no masked update reached the server in this SecAgg+ round")
                for cid, _, _ in requests if cid not in weights]
    return SecureSum([torch.from_numpy(a.copy()).float() for a in arrays], weights=weights, metrics=metrics,
                     failures=failures, uplink_bytes=counting.uplink_bytes,
                     downlink_bytes=counting.downlink_bytes, info=info)


# ---------------------------------------------------------------------------------------------
# ClientApp side (app.py's train handler; its mod ``secagg_when_asked`` runs secaggplus_mod)
# ---------------------------------------------------------------------------------------------
def fit_reply(msg: Message, uplink_blob: bytes, metrics: dict[str, Any]) -> Message:
    """The legacy FitRes reply the mod masks: the client's delta (its own codec-``none`` uplink,
    decoded: the exact float tensors, in sorted name order) weighted by its example count."""
    from ..comm import decode

    upd = decode(uplink_blob)
    names = sorted(upd.tensors)
    arrays = [upd.tensors[n].detach().float().cpu().numpy() for n in names]
    metrics = {k: v for k, v in metrics.items() if k != "uplink_bytes"}  # SecAgg+ sends its own bytes
    metrics["max_abs_delta"] = max((float(t.abs().max()) for t in upd.tensors.values() if t.numel()), default=0.0)
    if not math.isfinite(metrics["max_abs_delta"]):
        raise ValueError("the client's delta is not finite; it cannot be sent under SecAgg+")
    res = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                 num_examples=int(upd.example_count), metrics={METRICS_KEY: json.dumps(metrics)})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
