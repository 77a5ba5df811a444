"""Security and faults of a real Flower deployment, on 127.0.0.1: a TLS SuperLink with SuperNode
authentication (only registered SuperNodes take part), a SuperNode killed mid-round (dropped with
the true reason, rejoins after a restart), and the `fastseq run` driving a run killed mid-run
(`fastseq run --resume` finishes it with the uninterrupted run's result)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from fed_helpers import assert_same_run, flower_config, history  # noqa: E402
from flower_helpers import (FAST_HEARTBEAT_SUPERNODE, HEARTBEAT_S, alive, count_in, exit_status,  # noqa: E402
                            kill_group, make_supernode_key, make_tls, wait_until)

from fastseq.flower.app import RECORD, RemoteClient, RemoteClientError, discover_nodes  # noqa: E402
from fastseq.flower.deploy import (FlowerError, LocalDeployment, run_flower, run_status,  # noqa: E402
                                   stop_stale_deployment)

CONNECTED = r"SuperNode ID: \d+"  # what flower-supernode logs once the SuperLink has admitted it


# ---------------------------------------------------------------------------------------------
# Unit tests (no deployment)
# ---------------------------------------------------------------------------------------------
class _Grid:
    """A Grid that answers every message with ``answer(message)``, in reverse order, after
    giving the messages ids as Flower's grids do when they push them."""

    def __init__(self, answer, nodes=()):
        self.answer, self.nodes, self.sent = answer, list(nodes), []

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, *, timeout=None):
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"{len(self.sent) + i:064x}"
        self.sent += messages
        return [r for r in (self.answer(m) for m in reversed(messages)) if r is not None]


@pytest.fixture
def in_a_serverapp(monkeypatch):
    """Messages are made inside a ServerApp, whose process knows its run and node."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _unavailable(request, waited_s):
    """What the SuperLink itself sends back for a node that missed its heartbeats."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    request.metadata.created_at = time.time() - waited_s
    return create_message_error_unavailable_res_message(request.metadata, "node_unavail")


def _trained(request):
    from flwr.app import ConfigRecord, Message, RecordDict

    rec = ConfigRecord({"blob": b"uplink", "metrics": json.dumps({"train_loss": 0.5})})
    return Message(RecordDict({RECORD: rec}), reply_to=request)


def test_a_node_the_superlink_reports_unavailable_is_named_with_the_reason_and_when(in_a_serverapp):
    """The SuperLink's NODE_UNAVAILABLE reply carries the SuperLink's id as its source: replies are
    matched to requests by the id they reply to, and the recorded reason says what happened."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    grid = _Grid(lambda m: _unavailable(m, 51) if m.metadata.dst_node_id == 222 else _trained(m))
    ok, gone = RemoteClient(grid, 111, "0", timeout=3600), RemoteClient(grid, 222, "1", timeout=3600)
    outcomes = RemoteClient.fit_many([(ok, b"down"), (gone, b"down")], round=2)
    assert outcomes[0] == (b"uplink", {"train_loss": 0.5})
    assert isinstance(outcomes[1], RemoteClientError)
    reason = str(outcomes[1])
    assert re.match(r"node 222 unavailable \(SuperLink reported NODE_UNAVAILABLE after 51 s", reason), reason
    assert "did not reply" not in reason and f"node {SUPERLINK_NODE_ID} " not in reason
    # a lone request (evaluate, or fit outside a round's batch) says the same
    with pytest.raises(RemoteClientError, match=r"node 222 unavailable \(SuperLink reported NODE_UNAVAILABLE"):
        gone.evaluate(b"down", 2)
    # ... and a node that really is silent still times out as before
    silent = RemoteClient(_Grid(lambda m: None), 333, "2", timeout=7)
    [outcome] = RemoteClient.fit_many([(silent, b"down")], round=1)
    assert "client 2 (node 333) did not reply to train of round 1 within 7 s" in str(outcome)


def test_discovery_names_an_unavailable_node_by_its_own_id(in_a_serverapp):
    from flwr.app import ConfigRecord, Message, RecordDict

    def answer(m):
        if m.metadata.dst_node_id == 222:
            return _unavailable(m, 20)
        return Message(RecordDict({RECORD: ConfigRecord({"partition-id": 0, "num-partitions": 1})}), reply_to=m)

    said = []
    assert discover_nodes(_Grid(answer, nodes=[111, 222]), 1, wait_s=5, echo=said.append) == {"0": 111}
    assert said and said[0].startswith("flower: ignoring node 222: node 222 unavailable"), said


def test_a_resumed_serverapp_waits_for_the_run_lock_of_the_one_it_continues(tmp_path):
    """A resumed run's ServerApp must not write next to the stopped one's: it waits (a bounded
    time) for that one's lock on out, which goes with its holder however it ends (SIGKILL here)."""
    from fastseq.fed.run_lock import RunLocked, run_lock

    out, flag = tmp_path / "run", tmp_path / "locked"
    code = (f"import time; from pathlib import Path; from fastseq.fed.run_lock import run_lock\n"
            f"with run_lock(Path({str(out)!r}), echo=print):\n"
            f"    Path({str(flag)!r}).touch(); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        wait_until(flag.exists, 60, "the first holder to take the lock", 0.1, fail_fast=_exited(holder))
        said = []
        t0 = time.monotonic()
        with pytest.raises(RunLocked, match=rf"is being written by pid {holder.pid}"):
            with run_lock(out, wait_s=1.0, echo=said.append):
                pass
        assert time.monotonic() - t0 >= 1.0
        assert said and said[0].startswith(f"waiting up to 1 s for pid {holder.pid}"), said
        # the holder dies while the next one waits: that one gets the lock then
        threading.Timer(1.0, kill_group, [holder.pid]).start()
        with run_lock(out, wait_s=30.0, echo=said.append) as lock:
            assert lock.owner and holder.poll() is not None
    finally:
        if holder.poll() is None:  # (a reaped pid may belong to someone else by now)
            kill_group(holder.pid)
        holder.wait(timeout=10)


def _exited(proc: subprocess.Popen, log: Path | None = None):
    """For wait_until's fail_fast: fail at once when ``proc`` has exited (with its log's end)."""
    def check():
        if proc.poll() is not None:
            tail = f":\n{log.read_text()[-4000:]}" if log is not None else ""
            raise AssertionError(f"{proc.args[:4]} (pid {proc.pid}) exited with {proc.returncode}{tail}")
    return check


def _sleeper(name: str, session: bool, procs: list) -> subprocess.Popen:
    """A process whose command line names ``name``, that has begun to run it."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", name], start_new_session=session)
    procs.append(p)
    # (a process's command line is empty for a moment after the fork)
    wait_until(lambda: Path(f"/proc/{p.pid}/cmdline").read_bytes(), 10, f"pid {p.pid} to start", 0.05)
    return p


def test_resume_ends_the_local_deployment_a_killed_driver_left(tmp_path):
    """`fastseq run --engine flower` killed with SIGKILL leaves its SuperLink and SuperNodes running
    (each in a session of its own); resuming ends them (and nothing that merely reused a pid)."""
    work = tmp_path / "run" / "flower"
    work.mkdir(parents=True)
    procs: list = []
    try:
        stale = _sleeper("flower-superlink", True, procs)
        stranger = _sleeper("flower-supernode", False, procs)  # not a session leader
        (work / "pids.json").write_text(json.dumps({"superlink": stale.pid, "supernode_0": stranger.pid}))
        said = []
        stop_stale_deployment(work, echo=said.append)
        assert stale.wait(timeout=15) is not None
        assert stranger.poll() is None
        assert said and f"superlink (pid {stale.pid})" in said[0] and "supernode_0" not in said[0]
        # a deployment whose driver is still running is not taken over
        running = _sleeper("flower-superlink", True, procs)
        (work / "pids.json").write_text(json.dumps({"superlink": running.pid}))
        (work / "run.json").write_text(json.dumps({"run_id": "7", "host": socket.gethostname(),
                                                   "driver_pid": stranger.pid}))
        with pytest.raises(FlowerError, match=rf"still running \(pid {stranger.pid}\)"):
            stop_stale_deployment(work, echo=said.append)
        assert running.poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_local_deployment_checks_its_security_settings(tmp_path):
    from fastseq.flower.deploy import TLSFiles

    key = make_supernode_key(tmp_path / "k0")
    with pytest.raises(ValueError, match="SuperNode authentication needs TLS"):
        LocalDeployment(1, tmp_path / "d", supernode_keys=[key])
    tls = TLSFiles(tmp_path / "ca.crt", tmp_path / "s.pem", tmp_path / "s.key")
    with pytest.raises(ValueError, match="has 1 keys for 2 SuperNodes"):
        LocalDeployment(2, tmp_path / "d", tls=tls, supernode_keys=[key])
    Path(str(key) + ".pub").unlink()
    with pytest.raises(ValueError, match=r"k0\.pub"):
        LocalDeployment(1, tmp_path / "d", tls=tls, supernode_keys=[key])
    assert not (tmp_path / "d").exists()  # nothing started, nothing written


def test_connection_settings_from_the_environment_are_checked(tmp_path, monkeypatch):
    cfg = flower_config(tmp_path / "run", clients=2, clients_per_round=1, engine="flower")
    monkeypatch.setenv("FASTSEQ_FLOWER_SUPERLINK", "127.0.0.1:9")
    monkeypatch.setenv("FASTSEQ_FLOWER_ROOT_CERTIFICATES", str(tmp_path / "missing-ca.crt"))
    with pytest.raises(FlowerError, match="missing-ca.crt.*no such file"):
        run_flower(cfg, echo=lambda s: None)
    monkeypatch.setenv("FASTSEQ_FLOWER_INSECURE", "1")
    with pytest.raises(FlowerError, match="exclude each other"):
        run_flower(cfg, echo=lambda s: None)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# One TLS deployment with SuperNode authentication, one run through every fault
# ---------------------------------------------------------------------------------------------
def _online(dep) -> set[str]:
    return {n["node-id"] for n in dep.supernodes() if n["status"] == "online"}


def _rounds_done(out: Path) -> int:
    try:
        return len(history(out)) - 1
    except (OSError, ValueError):
        return -1


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A SuperLink on 127.0.0.1 with TLS (certificates made here) and --enable-supernode-auth,
    and two SuperNodes whose keys were registered with `flwr supernode register`."""
    root = tmp_path_factory.mktemp("secure")
    tls = make_tls(root / "certs")
    keys = [make_supernode_key(root / "keys" / f"supernode_{i}") for i in range(2)]
    dep = LocalDeployment(2, root / "deployment", tls=tls, supernode_keys=keys,
                          supernode_command=FAST_HEARTBEAT_SUPERNODE,
                          node_config={"state-dir": str(root / "client-state")}, echo=lambda s: None)
    try:
        dep.start()
        registered = {str(n) for n in dep.node_ids.values()}
        wait_until(lambda: _online(dep) == registered, 90, "both registered SuperNodes online")
        yield dep
    finally:
        dep.stop()
    assert not [(n, p.pid) for n, p in dep.procs if alive(p.pid)]


@pytest.fixture(scope="module")
def faults(secure, tmp_path_factory):
    """One run (2 clients, both in every round, 3 rounds) through the faults, the way a user meets
    them: rogue SuperNodes knock; SuperNode 1 is killed (SIGKILL to its process group) while it
    holds round 1's train message and restarted once round 1 has ended without it; then the
    `fastseq run` driving the run is killed (the run lives on in the SuperLink) and
    `fastseq run --resume` finishes it. One run serves the tests below (each run costs a minute)."""
    dep, root = secure, tmp_path_factory.mktemp("faults")
    spawned: list[subprocess.Popen] = []  # process groups to end whatever happens
    old: dict = {}  # the first driver's run.json
    env = {**os.environ, "FASTSEQ_FLOWER_SUPERLINK": dep.address, "FASTSEQ_FLOWER_ROOT_CERTIFICATES": str(dep.tls.ca),
           "OMP_NUM_THREADS": "1"}
    env.pop("FASTSEQ_FLOWER_INSECURE", None)

    def fastseq_run(args, log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:  # as a user's shell starts it
            proc = subprocess.Popen([sys.executable, "-m", "fastseq", "run", *args], stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        spawned.append(proc)
        return proc

    try:
        # Rogues claiming the registered nodes' partitions: were one admitted, the ServerApp would
        # find two nodes for one partition and fail the run.
        rogue_key = make_supernode_key(root / "rogue_key")
        unregistered = dep.spawn_supernode("rogue_unregistered", {"partition-id": 1, "num-partitions": 2},
                                           key=rogue_key)
        plaintext = dep.spawn_supernode("rogue_plaintext", {"partition-id": 0, "num-partitions": 2}, insecure=True,
                                        max_wait_s=120)
        spawned += [unregistered, plaintext]

        cfg = flower_config(root / "run", engine="flower", clients=2, clients_per_round=2, rounds=3)
        out = Path(cfg.out)
        (root / "config.json").write_text(json.dumps(cfg.to_dict()))
        log1, train = dep.workdir / "supernode_1.log", r"Receiving: train message"
        before = count_in(log1, train)
        first_log = root / "first.log"
        first = fastseq_run(["--config", str(root / "config.json")], first_log)
        wait_until(lambda: count_in(log1, train) > before, 200, "SuperNode 1 receiving round 1's train message",
                   interval=0.2, fail_fast=_exited(first, first_log))
        victim = dep.process("supernode_1")
        kill_group(victim.pid)
        victim.wait(timeout=10)
        wait_until(lambda: _rounds_done(out) >= 1, 120, "round 1 to end without SuperNode 1",
                   fail_fast=_exited(first, first_log))
        plaintext_knocked_all_along = exit_status(plaintext) is None
        dep.start_supernode(1)

        old = json.loads((out / "flower" / "run.json").read_text())
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        status_after_kill = run_status(old["run_id"], dep.flwr_home)

        resume_log = root / "resume.log"
        resumed = fastseq_run(["--resume", str(out)], resume_log)
        resume_rc = resumed.wait(timeout=300)
        unregistered_status = exit_status(unregistered)
        for rogue in (unregistered, plaintext):  # with what they left in their groups (flwr-superexec)
            kill_group(rogue.pid)
            rogue.wait(timeout=30)
        new = json.loads((out / "flower" / "run.json").read_text())
        # the uninterrupted run: the local engine (which the Flower engine matches, tests/test_flower.py)
        # with client 1 failing in the rounds where the Flower run dropped it
        drops = {r["round"] for r in history(out) if "1" in [d["client"] for d in r["dropped"]]}
        local = _local_run_dropping(flower_config(root / "local", clients=2, clients_per_round=2, rounds=3),
                                    "1", drops)
        yield SimpleNamespace(
            dep=dep, out=out, local=local, old=old, new=new, status_after_kill=status_after_kill,
            old_status=run_status(old["run_id"], dep.flwr_home), new_status=run_status(new["run_id"], dep.flwr_home),
            resume_rc=resume_rc, resume_log=resume_log.read_text(), unregistered_status=unregistered_status,
            plaintext_knocked_all_along=plaintext_knocked_all_along, node1=str(dep.node_ids[1]))
    finally:
        for proc in spawned:
            if proc.poll() is None:  # (a reaped pid may belong to someone else by now)
                kill_group(proc.pid)
        for proc in spawned:
            proc.wait(timeout=30)
        # the killed driver's `flwr run --stream` (not our child): the resume ends it; in case not
        pid = old.get("flwr_run_pid")
        try:
            if pid and alive(pid) and b"flwr" in Path(f"/proc/{pid}/cmdline").read_bytes():
                kill_group(pid)
        except OSError:  # gone meanwhile
            pass


def _local_run_dropping(cfg, cid: str, rounds: set[int]) -> Path:
    from fastseq.fed.engine import run_experiment
    from fastseq.fed.experiment import build_client

    def factory(cfg, rt, client_id, state_dir):
        client = build_client(cfg, rt, client_id, state_dir)
        if client_id == cid:
            fit = client.fit

            def fit_unless_killed(blob, round, **kw):
                if round in rounds:
                    raise RuntimeError("its SuperNode was killed")
                return fit(blob, round, **kw)

            client.fit = fit_unless_killed
        return client

    run_experiment(cfg, client_factory=factory, echo=lambda s: None)
    return Path(cfg.out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_only_registered_supernodes_take_part(faults):
    """A SuperNode whose key was never registered and a plaintext one are refused: neither ever
    gets a node id; the run's records name only the registered nodes."""
    dep = faults.dep
    registered = {str(n) for n in dep.node_ids.values()}
    assert faults.unregistered_status not in (None, 0)  # it gave up by itself: its key could not activate
    assert faults.plaintext_knocked_all_along  # still retrying while the run discovered its nodes
    for name in ("supernode_0", "supernode_1"):
        assert count_in(dep.workdir / f"{name}.log", CONNECTED) >= 1  # (what admission looks like)
    for name in ("rogue_unregistered", "rogue_plaintext"):
        assert count_in(dep.workdir / f"{name}.log", CONNECTED) == 0, name
    assert {n["node-id"] for n in dep.supernodes()} == registered
    conf = json.loads((faults.out / "config.json").read_text())
    assert set(conf["flower"]["nodes"].values()) == registered


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_supernode_killed_mid_round_is_dropped_with_the_superlinks_reason(faults):
    """The round ends without client 1, recorded with what the SuperLink said (it answers for the
    dead node, under its own id), within a few heartbeats rather than after reply-timeout-s."""
    r1 = history(faults.out)[1]
    assert r1["clients"] == ["0"] and [d["client"] for d in r1["dropped"]] == ["1"] and not r1["skipped"]
    assert set(r1["client_train_loss"]) == {"0"} and r1["examples"] > 0
    reason = r1["dropped"][0]["reason"]
    m = re.search(rf"node {faults.node1} unavailable \(SuperLink reported NODE_UNAVAILABLE after (\d+) s", reason)
    assert m and "did not reply" not in reason, reason
    # heartbeats every <= HEARTBEAT_S, two missed: the SuperLink knew within a minute (not 3600 s)
    assert int(m.group(1)) <= 3 * HEARTBEAT_S + 30, reason


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_restarted_supernode_rejoins_under_its_node_id(faults):
    hist = history(faults.out)
    assert [r["round"] for r in hist] == [0, 1, 2, 3] and not any(r["skipped"] for r in hist)
    assert hist[3]["clients"] == ["0", "1"] and hist[3]["dropped"] == []
    assert faults.node1 in _online(faults.dep)
    conf = json.loads((faults.out / "config.json").read_text())
    assert conf["flower"]["nodes"] == {"0": str(faults.dep.node_ids[0]), "1": faults.node1}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_driver_is_resumed_to_the_uninterrupted_result(faults):
    """The run outlives its killed driver; `fastseq run --resume` stops it, resumes from the newest
    checkpoint and ends where the uninterrupted run does."""
    said = faults.resume_log
    assert faults.status_after_kill == "running"
    assert faults.resume_rc == 0, said[-4000:]
    assert f"flower: run {faults.old['run_id']}" in said and "stopping it before resuming" in said, said[-4000:]
    assert re.search(r"resumed from \S+round_[12] \(round [12]\)", said), said[-4000:]
    assert faults.old_status == "finished:stopped"
    assert faults.new["run_id"] != faults.old["run_id"] and faults.new_status == "finished:completed"
    # (the `flwr run --stream` it had started dies at its next write to the dead driver's pipe, or
    # of the resume)
    assert not alive(faults.old["flwr_run_pid"])
    assert_same_run(faults.local, faults.out, rounds=3, drop_reasons=False)
