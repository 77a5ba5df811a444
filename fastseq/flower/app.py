"""fastseq's Flower ServerApp and ClientApp (flwr >= 1.40 Message API).

The Flower layer only moves bytes. The ServerApp runs the embedded engine's round loop
(:func:`fastseq.fed.engine.run_experiment`: sampling, aggregation, validation, checkpoints,
metrics, summary, adapter) with a ``client_factory`` whose clients are proxies: a proxy's
``fit(downlink_blob, round)`` sends the blob to the SuperNode that holds that client's
partition and returns the uplink blob the node's :class:`fastseq.fed.client.Client`
produced. Blobs travel unchanged as ``bytes`` values of a ``ConfigRecord`` (no re-encoding,
no pickle); metrics travel as a JSON string.

``make_apps(run_config)`` builds the pair; the module's ``server_app`` / ``client_app`` (named in
``flower_app/pyproject.toml``) read the run config ``flwr run`` gives them, and
``fastseq.flower.simulation`` passes its own to ``make_apps`` (``run_simulation`` gives none).

Client ids are partition ids: a SuperNode started with ``--node-config "partition-id=N
num-partitions=M"`` is fastseq client ``"N"`` of an experiment with ``clients = M``. The
ServerApp discovers the mapping with a ``query`` message to every connected node.

Message layout (record ``"fastseq"``, a ConfigRecord):
  train/evaluate request: ``client-id`` (str), ``round`` (int), ``blob`` (bytes),
      ``discard-after`` (int, -2 = nothing to discard)
  train reply: ``blob`` (bytes), ``metrics`` (JSON str); evaluate reply: ``metrics``
  query reply: ``partition-id``, ``num-partitions`` (int, -1 when not configured)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid, ServerApp

from .config import from_run_config
from .tier_pools import assigned_resources

log = logging.getLogger("fastseq.flower")

RECORD = "fastseq"
NO_DISCARD = -2
FITINS_CONFIG = "fitins.config"  # SecAgg+'s collect stage: the request in a legacy FitIns config


class RemoteClientError(RuntimeError):
    """A SuperNode did not return a valid reply (error reply, timeout, bad content)."""


def _record(msg: Message, request: Message | None = None) -> ConfigRecord:
    """The ``fastseq`` record of a reply to ``request``, or RemoteClientError saying why not.

    Name the node by the request's destination: when a node is gone the SuperLink itself
    answers (NODE_UNAVAILABLE), with its own id as the reply's source."""
    node = request.metadata.dst_node_id if request is not None else msg.metadata.src_node_id
    if msg.has_error():
        if msg.error.code == ErrorCode.NODE_UNAVAILABLE:
            waited = ""
            if request is not None and msg.metadata.created_at and request.metadata.created_at:
                waited = f" after {max(0.0, msg.metadata.created_at - request.metadata.created_at):.0f} s"
            raise RemoteClientError(f"node {node} unavailable (SuperLink reported NODE_UNAVAILABLE{waited}: "
                                    f"{msg.error.reason})")
        raise RemoteClientError(f"node {node} replied with error {msg.error.code}: {msg.error.reason}")
    if RECORD not in msg.content.config_records:
        raise RemoteClientError(f"node {node} replied without a '{RECORD}' record")
    return msg.content.config_records[RECORD]


def _replies_by_request(messages: list[Message], replies) -> list[Message | None]:
    """Each request's reply (None: no reply within the timeout), matched on the message id it
    replies to (a reply's source is the SuperLink, not the node, when the node is gone)."""
    by_id = {r.metadata.reply_to_message_id: r for r in replies}
    return [by_id.get(m.metadata.message_id) for m in messages]


# ---------------------------------------------------------------------------------------------
# ServerApp
# ---------------------------------------------------------------------------------------------
def discover_nodes(grid: Grid, num_clients: int, wait_s: float, echo=print,
                   plans: dict[str, dict] | None = None) -> dict[str, int]:
    """Ask every connected node for its partition id until ``0..num_clients-1`` are all
    covered; returns ``{client_id: node_id}``. ``plans``: filled with each node's fleet plan of
    its client (a heterogeneous fleet: every node plans itself)."""
    mapping: dict[str, int] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + wait_s
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            msgs = [Message(content=RecordDict(), dst_node_id=n, message_type="query") for n in new]
            replies = grid.send_and_receive(msgs, timeout=max(5.0, deadline - time.monotonic()))
            for msg, rep in zip(msgs, _replies_by_request(msgs, replies)):
                node = msg.metadata.dst_node_id
                if rep is None:
                    continue  # asked again next time
                try:
                    rec = _record(rep, msg)
                except RemoteClientError as e:
                    echo(f"flower: ignoring node {node}: {e}")
                    asked.add(node)
                    continue
                asked.add(node)
                pid, num = int(rec["partition-id"]), int(rec["num-partitions"])
                if pid < 0:
                    echo(f"flower: ignoring node {node}: it has no partition-id in its --node-config")
                    continue
                if num not in (-1, num_clients):
                    raise RemoteClientError(f"node {node} has num-partitions={num} but the experiment has "
                                            f"clients={num_clients}")
                if pid >= num_clients:
                    raise RemoteClientError(f"node {node} has partition-id={pid} >= clients={num_clients}")
                cid = str(pid)
                if cid in mapping and mapping[cid] != node:
                    raise RemoteClientError(f"nodes {mapping[cid]} and {node} both claim partition-id={pid}")
                mapping[cid] = node
                if plans is not None and "plan" in rec:
                    plans[cid] = json.loads(rec["plan"])
        missing = [str(i) for i in range(num_clients) if str(i) not in mapping]
        if not missing:
            return mapping
        if time.monotonic() > deadline:
            raise RemoteClientError(f"timed out after {wait_s:.0f} s waiting for SuperNodes with partition-id "
                                    f"{', '.join(missing)} (connected: {sorted(mapping, key=int)})")
        time.sleep(0.5)


class RemoteClient:
    """Stands in for :class:`fastseq.fed.client.Client` inside the embedded round loop: the same
    ``fit``/``evaluate``/``discard_after`` interface, executed on the client's SuperNode."""

    def __init__(self, grid: Grid, node_id: int, client_id: str, timeout: float, secagg=None):
        self.grid, self.node_id, self.client_id, self.timeout = grid, node_id, str(client_id), timeout
        self.secagg = secagg  # SecAggSettings when rounds run under SecAgg+ (see secure_sum)
        self._discard = NO_DISCARD

    def discard_after(self, round: int) -> None:
        # Applied by the node before its next fit/evaluate (its state lives on that machine).
        self._discard = int(round)

    def _request(self, blob: bytes, round: int) -> dict[str, Any]:
        return {"client-id": self.client_id, "round": int(round), "blob": bytes(blob), "discard-after": self._discard}

    def _message(self, kind: str, blob: bytes, round: int) -> Message:
        content = RecordDict({RECORD: ConfigRecord(self._request(blob, round))})
        return Message(content=content, dst_node_id=self.node_id, message_type=kind)

    def _reply(self, kind: str, request: Message, reply: Message | None, round: int) -> ConfigRecord:
        if reply is None:
            raise RemoteClientError(f"client {self.client_id} (node {self.node_id}) did not reply to "
                                    f"{kind} of round {round} within {self.timeout:.0f} s")
        rec = _record(reply, request)
        self._discard = NO_DISCARD
        return rec

    def _call(self, kind: str, blob: bytes, round: int) -> ConfigRecord:
        request = self._message(kind, blob, round)
        [reply] = _replies_by_request([request], self.grid.send_and_receive([request], timeout=self.timeout))
        return self._reply(kind, request, reply, round)

    @staticmethod
    def _fit_result(client: "RemoteClient", rec: ConfigRecord) -> tuple[bytes, dict[str, Any]]:
        blob = rec["blob"]
        if not isinstance(blob, bytes):
            raise RemoteClientError(f"client {client.client_id}: the reply's blob is {type(blob).__name__}, not bytes")
        return blob, json.loads(rec["metrics"])

    def fit(self, downlink_blob: bytes, round: int) -> tuple[bytes, dict[str, Any]]:
        return self._fit_result(self, self._call("train", downlink_blob, round))

    @classmethod
    def fit_many(cls, pairs: list[tuple["RemoteClient", bytes]], round: int) -> list:
        """Send one round's fits to all their SuperNodes at once, so the nodes train concurrently.

        Returns, in the order of ``pairs``, ``(uplink_blob, metrics)`` or the exception of a
        client that failed (the engine drops those)."""
        if not pairs:
            return []
        grid, timeout = pairs[0][0].grid, max(c.timeout for c, _ in pairs)
        messages = [client._message("train", blob, round) for client, blob in pairs]
        replies = _replies_by_request(messages, grid.send_and_receive(messages, timeout=timeout))
        outcomes: list = []
        for (client, _), request, reply in zip(pairs, messages, replies):
            try:
                outcomes.append(cls._fit_result(client, client._reply("train", request, reply, round)))
            except Exception as e:  # noqa: BLE001  (reported to the engine, which drops the client)
                outcomes.append(e)
        return outcomes

    @classmethod
    def secure_sum(cls, pairs: list[tuple["RemoteClient", bytes]], round: int):
        """One round's fits under Flower's SecAgg+ (:mod:`.secagg`): the server gets only the
        example-weighted mean of the deltas (a :class:`fastseq.fed.server.SecureSum`)."""
        from .secagg import secure_sum

        requests = [(c.client_id, c.node_id, c._request(blob, round)) for c, blob in pairs]
        result = secure_sum(requests, pairs[0][0].grid, round, pairs[0][0].secagg)
        for c, _ in pairs:
            c._discard = NO_DISCARD  # the request carried it
        return result

    def evaluate(self, downlink_blob: bytes, round: int) -> dict[str, Any]:
        return json.loads(self._call("evaluate", downlink_blob, round)["metrics"])


OUT_LOCK_WAIT_S = 120.0  # how long a resumed run's ServerApp waits for the one it continues to exit


def run_server(grid: Grid, run_config: dict[str, Any], echo=print) -> dict[str, Any]:
    """The ServerApp body: discover nodes, then run the embedded round loop with remote clients."""
    import dataclasses

    from ..fed.checkpoint import atomic_write_json
    from ..fed.engine import run_experiment
    from ..fed.experiment import default_out
    from ..fed.run_lock import run_lock

    cfg, flower = from_run_config(run_config)
    if cfg.out is None:
        cfg.out = os.path.abspath(default_out(cfg))
    elif not os.path.isabs(cfg.out):
        # relative to this process's working directory (flwr 1.42: where flower-superlink was started)
        echo(f"flower: out={cfg.out!r} is a relative path: the outputs go to {os.path.abspath(cfg.out)} on the "
             f"SuperLink's machine (give an absolute path)")
        cfg.out = os.path.abspath(cfg.out)
    echo(f"flower: waiting for {cfg.clients} SuperNodes (partition-id 0..{cfg.clients - 1})")
    reported: dict[str, dict] = {}
    nodes = discover_nodes(grid, cfg.clients, float(flower["node-wait-s"]), echo=echo, plans=reported)
    plans = None
    if cfg.fleet is not None:  # each node planned its client on its own machine
        from ..fed.fleet import ClientPlan

        missing = [c for c in nodes if c not in reported]
        if missing:
            raise RemoteClientError(f"the nodes of clients {', '.join(missing)} reported no fleet plan")
        plans = {c: ClientPlan(**reported[c]) for c in sorted(reported, key=int)}
    echo("flower: client -> node " + ", ".join(f"{c}->{n}" for c, n in sorted(nodes.items(), key=lambda x: int(x[0]))))
    timeout = float(flower["reply-timeout-s"])

    def factory(_cfg, rt, cid, _state_dir):
        secagg = None
        if cfg.secagg:
            from .secagg import SecAggSettings

            # a client's weight is its example count, at most the largest partition
            secagg = SecAggSettings(cfg.secagg_shares, cfg.secagg_threshold, cfg.secagg_clip_range,
                                    max_weight=float(max(len(p) for p in rt.parts)), timeout=timeout)
        return RemoteClient(grid, nodes[str(cid)], str(cid), timeout, secagg=secagg)

    local_cfg = dataclasses.replace(cfg, engine="local")
    # config.json as the embedded engine writes it, plus how this run is carried out ("flower-sim"
    # when the Simulation Engine carries it, "flower" otherwise), from the start: `fastseq run
    # --resume` of an interrupted run reads its engine there.
    engine = cfg.engine if cfg.engine != "local" else "flower"
    extra = {"engine": engine, "flower": {"nodes": {c: str(n) for c, n in nodes.items()},
                                          **{k: v for k, v in flower.items() if k != "run-lock"}}}
    # The lock is held until the summary is written too (the process that submitted the run holds
    # it already when it gave a token: this re-enters it). Resuming, wait for the ServerApp of the
    # run this one continues: `fastseq run --resume` stopped it (its driver was killed), and it
    # lets go at its next call to the SuperLink.
    wait_s = OUT_LOCK_WAIT_S if flower["resume"] else 0.0
    with run_lock(cfg.out, token=flower["run-lock"] or None, echo=echo, wait_s=wait_s) as lock:
        summary = run_experiment(local_cfg, resume=bool(flower["resume"]), client_factory=factory, echo=echo,
                                 lock_token=lock.token, config_extra=extra, plans=plans)
        summary["engine"] = engine
        atomic_write_json(Path(cfg.out) / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# ClientApp
# ---------------------------------------------------------------------------------------------
_RUNTIME_CACHE: dict[str, Any] = {}


def experiment_key(run_config: dict[str, Any]) -> str:
    """A stable name for an experiment's client state (same config => same folder)."""
    return hashlib.sha256(json.dumps(run_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def client_state_root(context: Context, flower: dict[str, Any]) -> Path:
    node_dir = context.node_config.get("state-dir")
    if node_dir:
        return Path(str(node_dir)).expanduser()
    if flower.get("client-state-dir"):
        return Path(str(flower["client-state-dir"])).expanduser()
    rc = {k: v for k, v in context.run_config.items() if k not in ("progress", "resume", "run-lock")}
    return Path.home() / ".cache" / "fastseq" / "flower" / experiment_key(rc)


def _node_partition(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id: start it with "
                         "--node-config \"partition-id=N num-partitions=M\"")
    return int(context.node_config["partition-id"])


def build_local_client(context: Context, client_id: str):
    """The node's fastseq Client for ``client_id`` (its runtime is cached per process)."""
    from ..fed.experiment import build_client, build_runtime

    cfg, flower = from_run_config(dict(context.run_config))
    if context.node_config.get("data-path"):
        cfg.data_path = str(context.node_config["data-path"])
    key = json.dumps([cfg.to_dict(), context.run_id], sort_keys=True, default=str)
    if key not in _RUNTIME_CACHE:
        _RUNTIME_CACHE.clear()
        _RUNTIME_CACHE[key] = build_runtime(cfg, echo=log.info)
    rt = _RUNTIME_CACHE[key]
    if cfg.fleet is not None:
        from ..fed.experiment import plan_node_client
        from ..fed.fleet import node_tier

        tier = node_tier(dict(context.node_config), client_id)
        planned = rt.plans.get(client_id) if rt.plans else None
        if tier is not None and (planned is None or planned.tier != tier.name or planned.memory_budget != tier.memory
                                 or planned.uplink_budget != tier.uplink):
            plan_node_client(cfg, rt, client_id, tier, echo=log.info)  # on the machine it runs on
    state_dir = client_state_root(context, flower) / f"client_{client_id}"
    return build_client(cfg, rt, client_id, state_dir)


def _handle(msg: Message, context: Context, kind: str) -> Message:
    secure = kind == "train" and FITINS_CONFIG in msg.content.config_records  # SecAgg+'s collect stage
    req = msg.content.config_records[FITINS_CONFIG if secure else RECORD]
    cid = str(req["client-id"])
    pid = _node_partition(context)
    if cid != str(pid):
        raise ValueError(f"message for client {cid} reached the node with partition-id={pid}")
    client = build_local_client(context, cid)
    if int(req["discard-after"]) != NO_DISCARD:
        client.discard_after(int(req["discard-after"]))
    blob, rnd = req["blob"], int(req["round"])
    if kind == "train":
        up, metrics = client.fit(blob, rnd)
        ray_resources = assigned_resources()
        if ray_resources is not None:  # flower-sim: what Ray gave this client's actor (a fleet tier's own)
            metrics["ray_resources"] = ray_resources
        if secure:
            from .secagg import fit_reply

            return fit_reply(msg, up, metrics)
        rec = ConfigRecord({"blob": up, "metrics": json.dumps(metrics)})
    else:
        rec = ConfigRecord({"metrics": json.dumps(client.evaluate(blob, rnd))})
    return Message(content=RecordDict({RECORD: rec}), reply_to=msg)


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round
    (:mod:`.secagg`), the plain handler for everything else."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _query(msg: Message, context: Context) -> Message:
    nc = context.node_config
    rec = ConfigRecord({"partition-id": int(nc.get("partition-id", -1)),
                        "num-partitions": int(nc.get("num-partitions", -1))})
    if "partition-id" in nc and str(context.run_config.get("fleet", "")).strip():
        # a heterogeneous fleet: the node plans its client here, on its own machine (a model load)
        import dataclasses

        client = build_local_client(context, str(nc["partition-id"]))
        rec["plan"] = json.dumps(dataclasses.asdict(client.plan))
    return Message(content=RecordDict({RECORD: rec}), reply_to=msg)


# ---------------------------------------------------------------------------------------------
# The apps
# ---------------------------------------------------------------------------------------------
def _with_run_config(context: Context, base: dict[str, Any] | None) -> Context:
    """``context`` whose run config is ``base`` overridden by the run config the run brought."""
    if not base:
        return context
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=context.state, run_config={**base, **dict(context.run_config)},
                   series_id=getattr(context, "series_id", 0))


def make_apps(run_config: dict[str, Any] | None = None) -> tuple[ServerApp, ClientApp]:
    """fastseq's ServerApp and ClientApp.

    ``flwr run`` hands the apps the project's run config in their Context; Flower's
    ``flwr.simulation.run_simulation`` hands them an empty one, so the simulation runner passes
    its run config here (the run's own keys, if any, still win)."""
    server, client = ServerApp(), ClientApp()

    @server.main()
    def _server_main(grid: Grid, context: Context) -> None:
        run_server(grid, dict(_with_run_config(context, run_config).run_config))

    @client.train(mods=[secagg_when_asked])
    def _client_train(msg: Message, context: Context) -> Message:
        return _handle(msg, _with_run_config(context, run_config), "train")

    @client.evaluate()
    def _client_evaluate(msg: Message, context: Context) -> Message:
        return _handle(msg, _with_run_config(context, run_config), "evaluate")

    @client.query()
    def _client_query(msg: Message, context: Context) -> Message:
        return _query(msg, _with_run_config(context, run_config))

    return server, client


# The components named in flower_app/pyproject.toml (and in the projects run_flower generates).
# One plain assignment each: `flwr run` finds components by parsing this file (ast.Assign to a name).
_APPS = make_apps()
server_app = _APPS[0]
client_app = _APPS[1]
