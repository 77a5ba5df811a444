"""The local engine's worker processes (fastseq.fed.workers): a run with workers is bit-identical to
the sequential one across the engine's features, a dying worker costs only its client's round,
and no worker outlives the run (returned, failed, interrupted or killed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fastseq.config import ConfigError
from fastseq.fed.client import Client
from fastseq.fed.engine import Hooks, run_experiment
from fastseq.fed.experiment import ExperimentConfig, build_client, check_environment
from fastseq.fed.workers import WorkerPool, own_writable_copies, resolve_workers, start_method

from fed_helpers import assert_bit_identical, history, run_rows as _rows, tiny_config

QUIET = dict(echo=lambda s: None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


ENGINE_PID = os.getpid()  # a forked worker sees the same value and another os.getpid()


def _children() -> set[int]:
    """This process's live children, less Python's multiprocessing resource tracker: the first
    spawned worker starts it, it serves this interpreter until it exits (and then exits too)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "multiprocessing.resource_tracker" not in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.Error:  # ended meanwhile
            pass
    return out


@pytest.fixture
def no_new_processes():
    """Whatever the test does, no process it started (a worker) is left when it ends."""
    before = _children()
    yield
    deadline = time.monotonic() + 10
    while _children() - before:
        assert time.monotonic() < deadline, f"processes outlived the run: {_children() - before}"
        time.sleep(0.05)


CASES = {
    "scl": dict(method="scl"),
    "fedavg-lora": dict(method="fedavg-lora"),
    "ffa-lora": dict(method="ffa-lora"),
    "fedsa-lora": dict(method="fedsa-lora", validation_fraction=0.2),  # personalised evaluation in the workers
    "fedex-lora": dict(method="fedex-lora"),
    "int8+error-feedback+bf16-down": dict(method="scl", codec="int8", error_feedback=True, downlink_codec="bf16"),
    "dp-local": dict(method="scl", dp="local", dp_clip=0.5, dp_noise=0.3),
    "byzantine": dict(method="scl", byzantine=1, attack="sign-flip", aggregator="median"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_workers_are_bit_identical_to_the_sequential_engine(tmp_path, case, no_new_processes):
    # eval_batch_size 4: the server's evaluation has several batches, so the workers split it
    kw = {**dict(rounds=2, clients=4, clients_per_round=3, max_examples=96, eval_batch_size=4), **CASES[case]}
    seq = run_experiment(tiny_config(tmp_path, "seq", workers=1, **kw), **QUIET)
    par = run_experiment(tiny_config(tmp_path, "par", workers=2, **kw), **QUIET)
    assert_bit_identical(Path(seq["out"]), Path(par["out"]))
    rows = history(par["out"])
    assert all(r["workers"] == 2 and set(r["client_worker"]) == set(r["clients"]) | {d["client"] for d in r["dropped"]}
               for r in rows[1:])
    assert {w for r in rows[1:] for w in r["client_worker"].values()} == {0, 1}  # both workers trained clients
    assert "workers" not in history(seq["out"])[1]


@pytest.mark.parametrize("case", ["fedex-lora", "fedsa-lora"])
def test_spawned_workers_are_bit_identical_too(tmp_path, case, no_new_processes):
    """--worker-start spawn (a GPU's way: torch.multiprocessing shares the runtime's tensors as
    handles; on a CPU, shared memory): FedEx-LoRA writes the base weights it folds residuals into,
    FedSA-LoRA keeps local state and scores each client's own model in the workers."""
    kw = {**dict(rounds=2, clients=4, clients_per_round=3, max_examples=96, eval_batch_size=4), **CASES[case]}
    seq = run_experiment(tiny_config(tmp_path, "seq", workers=1, **kw), **QUIET)
    logs = []
    par = run_experiment(tiny_config(tmp_path, "par", workers=2, worker_start="spawn", **kw), echo=logs.append)
    assert any("2 spawned processes share the backbone" in line for line in logs)
    assert_bit_identical(Path(seq["out"]), Path(par["out"]))
    assert {w for r in history(par["out"])[1:] for w in r["client_worker"].values()} == {0, 1}


def test_spawned_workers_with_an_unpicklable_client_factory_say_what_to_do(tmp_path, no_new_processes):
    def factory(cfg, rt, cid, state_dir):  # a local function: spawn cannot send it
        return build_client(cfg, rt, cid, state_dir)

    cfg = tiny_config(tmp_path, "local", workers=2, worker_start="spawn", rounds=1, clients=2, clients_per_round=2)
    with pytest.raises(ConfigError, match="pass a module-level client factory"):
        run_experiment(cfg, client_factory=factory, **QUIET)


class _SharedModelJob:
    """A spawned worker's job on a model it got through torch.multiprocessing: it trains (writes
    its trainable weight) and reports both weights as it sees them."""

    def __init__(self, model):
        self.model = model

    def in_spawned_worker(self):
        self.copied = own_writable_copies(self.model)

    def __call__(self, header, blob):
        with torch.no_grad():
            self.model.trainable.add_(1.0)
        return b"", {"frozen": self.model.frozen.tolist(), "trainable": self.model.trainable.tolist(),
                     "copied": self.copied}


def test_spawned_workers_share_the_frozen_weights_and_copy_what_trains(no_new_processes):
    model = torch.nn.Module()
    model.frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    model.trainable = torch.nn.Parameter(torch.zeros(2))
    with WorkerPool(1, 1, _SharedModelJob(model), start="spawn") as pool:
        (first,), _ = pool.run("fit", [("0", b"", {})], round=1)
        with torch.no_grad():
            model.frozen.fill_(7.0)  # the engine's frozen weights, written after the worker started
        (second,), _ = pool.run("fit", [("0", b"", {})], round=2)
    assert first[1] == {"frozen": [0.0] * 4, "trainable": [1.0, 1.0], "copied": 8}
    # the worker sees the engine's frozen storage itself (shared, never copied) ...
    assert second[1]["frozen"] == [7.0] * 4 and second[1]["trainable"] == [2.0, 2.0]
    # ... and trains a copy of its own: the engine's trainable weight is untouched
    assert model.trainable.tolist() == [0.0, 0.0]


def test_fedex_lora_declares_the_base_weights_its_clients_write(tmp_path):
    from fastseq.fed.experiment import build_runtime

    rt = build_runtime(tiny_config(tmp_path, "fx", method="fedex-lora"), **QUIET)
    written = {id(t) for t in rt.method.written_in_fit()}
    trainable = [p for p in rt.model.parameters() if p.requires_grad]
    bases = [rt.model.get_submodule(m).base_layer.weight for m in rt.method.base0]
    assert bases and all(id(t) in written for t in trainable + bases)
    assert len(written) == len(trainable) + len(bases)  # and nothing else of the frozen backbone


class DiesInRoundOne(Client):
    """Client 1's process is SIGKILLed while it trains in round 1 (as the OOM killer would)."""

    def fit(self, downlink_blob, round, attack=None):
        if round == 1 and self.client_id == "1" and os.getpid() != ENGINE_PID:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().fit(downlink_blob, round)


def test_a_killed_worker_costs_only_its_clients_round(tmp_path, no_new_processes):
    cfg = tiny_config(tmp_path, "killed", workers=2, rounds=2, clients=3, clients_per_round=3)

    def factory(cfg, rt, cid, state_dir):
        c = build_client(cfg, rt, cid, state_dir)
        return DiesInRoundOne(c.client_id, rt, c.examples, c.train_cfg, state_dir)

    logs = []
    summary = run_experiment(cfg, client_factory=factory, echo=logs.append)
    r1, r2 = history(cfg.out)[1:]
    assert r1["clients"] == ["0", "2"] and [d["client"] for d in r1["dropped"]] == ["1"]
    reason = r1["dropped"][0]["reason"]
    assert reason.startswith("WorkerDied: worker") and "killed by signal 9" in reason and "client 1" in reason
    assert r2["clients"] == ["0", "1", "2"] and not r2["dropped"]  # the pool was restored for round 2
    assert summary["aggregated_rounds"] == 2


def test_ctrl_c_stops_every_worker_and_the_run_resumes_to_the_same_result(tmp_path, no_new_processes):
    class Interrupt(Hooks):
        def on_round_end(self, round, record):
            if round == 1:
                raise KeyboardInterrupt("Ctrl-C after round 1")

    kw = dict(rounds=3, clients=4, clients_per_round=3, workers=2)
    before = _children()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(tmp_path, "cut", **kw), hooks=Interrupt(), **QUIET)
    assert not _children() - before  # stopped before the exception left the engine
    run_experiment(tiny_config(tmp_path, "cut", **kw), resume=True, **QUIET)
    full = run_experiment(tiny_config(tmp_path, "full", **kw), **QUIET)
    assert _rows(tmp_path / "cut") == _rows(full["out"])
    a, b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"), \
        load_file(Path(full["out"]) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_of_the_run_takes_its_workers_along_and_resume_finishes_it(tmp_path):
    """SIGKILL of the engine's process: its workers die with it (PR_SET_PDEATHSIG), and
    `fastseq run --resume` finishes the run as an uninterrupted one would."""
    out = tmp_path / "killed"
    args = ["--model", "tiny-llama", "--task", "synthetic", "--max-examples", "80", "--rounds", "4", "--clients", "4",
            "--clients-per-round", "3", "--local-steps", "100", "--r", "4", "--workers", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastseq", "run", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "round_1" / "server.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first round"
            time.sleep(0.05)
        workers = [c.pid for c in psutil.Process(proc.pid).children()]
        assert workers, "the run has no worker processes"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers):
        assert time.monotonic() < deadline, "a worker outlived the killed run"
        time.sleep(0.1)
    done = subprocess.run([sys.executable, "-m", "fastseq", "run", "--resume", str(out), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = tmp_path / "ref"
    again = subprocess.run([sys.executable, "-m", "fastseq", "run", *args, "--out", str(ref)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _rows(out) == _rows(ref)
    assert json.loads((out / "summary.json").read_text())["final"] == json.loads((ref / "summary.json").read_text())["final"]


def test_the_servers_evaluation_split_across_workers_is_the_same(tmp_path, monkeypatch):
    """score_in_workers: the batches go to the workers, the records come back and are reduced in
    order; the metrics equal one process's evaluate() exactly."""
    from fastseq.fed.experiment import build_runtime, build_server
    from fastseq.fed.rounds import ClientBuilder, ClientPool, RoundRunner

    cfg = tiny_config(tmp_path, "split", eval_batch_size=4, validation_fraction=0.2, workers=2)
    rt = build_runtime(cfg, **QUIET)
    server = build_server(cfg, rt)
    runner = RoundRunner(cfg, server, ClientPool(lambda c: None, -1, 1), personalized=False, progress=False,
                         echo=lambda s: None, workers=2, threads=1,
                         build=ClientBuilder(build_client, cfg, rt, tmp_path / "clients"))
    runner.server_runtime = rt
    calls = []

    def counting(which, examples, state, round):
        out = runner.score_in_workers(which, examples, state, round)
        calls.append((which, out is not None))
        return out

    try:
        whole = server.evaluate(0)
        rt.scorer = counting
        split = server.evaluate(0)
    finally:
        rt.scorer = None
        runner.close()
    assert calls == [("val", True), ("test", True)]  # both were split
    assert split == whole and "val_accuracy" in whole and "accuracy" in whole


def test_auto_workers_and_bad_values(monkeypatch):
    monkeypatch.setattr("fastseq.fed.workers.usable_cores", lambda: 8)
    assert resolve_workers(None, 3, "cpu") == (3, 1)       # capped by the clients per round, one thread each
    assert resolve_workers(None, 16, "cpu") == (8, 1)      # one per core, two even waves
    assert resolve_workers(None, 20, "cpu") == (1, 1)      # 20 on 8: an uneven last wave, one process is faster
    assert resolve_workers(None, 16, "cuda") == (1, 1)     # a GPU: one process keeps the device
    assert resolve_workers(4, 2, "cpu") == (2, 1)          # never more workers than clients
    monkeypatch.setattr("fastseq.fed.workers.usable_cores", lambda: 2)
    assert resolve_workers(None, 3, "cpu") == (1, 1)       # the default run: 3 clients on 2 cores
    assert resolve_workers(None, 2, "cpu") == (2, 1)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="workers must be (null|an integer)"):
            ExperimentConfig(workers=bad).validate()
    with pytest.raises(ConfigError, match="DeepSpeed"):
        ExperimentConfig(workers=2, deepspeed={"zero_stage": 1}).validate()


def test_workers_on_a_gpu_spawn_and_fork_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr("fastseq.fed.experiment.resolve_device", lambda name: torch.device("cuda"))
    check_environment(ExperimentConfig(model="tiny-llama", task="synthetic", workers=2))  # auto: spawn
    assert start_method("auto", "cuda") == "spawn" and start_method("auto", "cpu") == "fork"
    with pytest.raises(ConfigError, match="a CUDA context cannot be forked; use --worker-start spawn"):
        check_environment(ExperimentConfig(model="tiny-llama", task="synthetic", workers=2, worker_start="fork"))
    monkeypatch.setattr("fastseq.fed.experiment.resolve_device", lambda name: torch.device("mps"))
    with pytest.raises(ConfigError, match="CPU or a CUDA GPU only, not on mps; use --workers 1"):
        check_environment(ExperimentConfig(model="tiny-llama", task="synthetic", workers=2))
    with pytest.raises(ConfigError, match="worker_start must be auto, fork or spawn"):
        ExperimentConfig(worker_start="thread").validate()
