"""No run is lost: a run directory is locked while a process writes it (a second run or a resume
into it is refused, a killed run's lock is taken over), a resume that does not match its run is
refused before anything is written, and Ctrl-C says how to continue."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastseq.cli import main
from fastseq.fed.run_lock import LOCK_NAME, RunLocked, run_lock

from fed_helpers import flower_config, history

REPO = Path(__file__).resolve().parents[1]

# A run that passes validation in a second or two: tiny-llama on the synthetic task.
TINY = ["--model", "tiny-llama", "--task", "synthetic", "--max-examples", "40", "--clients", "2",
        "--clients-per-round", "1", "--partition", "iid", "--local-steps", "1", "--batch-size", "4", "--no-progress"]

# `fastseq run` in a process of its own whose rounds last ROUND_DELAY seconds more (a sleep after
# each checkpoint), so that a test can act while it runs.
SLOW_CLI = """
import os, sys, time
import fastseq.fed.engine as engine

save = engine.save_checkpoint

def slow(*args, **kwargs):
    path = save(*args, **kwargs)
    time.sleep(float(os.environ["ROUND_DELAY"]))
    return path

engine.save_checkpoint = slow
from fastseq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(argv: list[str], cwd: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               ROUND_DELAY=str(delay), OMP_NUM_THREADS="1")
    # SIGINT as a terminal delivers it: a pytest-xdist worker ignores SIGINT, and a child would
    # inherit that (Python then installs no KeyboardInterrupt handler)
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(what: str, done, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.02)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return out, err


def _one_line(rc: int, err: str, phrase: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert phrase in lines[0], err
    return lines[0]


def _tree_hash(d: Path) -> str:
    """Every path under ``d`` and every file's bytes."""
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(str(p.relative_to(d)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# --- the lock --------------------------------------------------------------------------------

def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes_it(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start(["run", *TINY, "--rounds", "3", "--out", str(out)], tmp_path, delay=1.0)
    _wait_for("lock file", (out / LOCK_NAME).is_file, first)
    rc = main(["run", *TINY, "--rounds", "3", "--lr", "0.05", "--out", str(out)])
    line = _one_line(rc, capsys.readouterr().err, f"{out} is being written by pid {first.pid} (started ")
    assert line.endswith("; wait for it or pass another --out")
    _finish(first)
    assert [h["round"] for h in history(out)] == [0, 1, 2, 3]
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-2  # the first run's, whole
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_resume_of_a_run_that_is_still_training_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start(["run", *TINY, "--rounds", "3", "--out", str(out)], tmp_path, delay=1.0)
    _wait_for("round 1 checkpoint", (out / "checkpoints" / "round_1" / "server.json").is_file, first)
    rc = main(["run", "--resume", str(out)])
    _one_line(rc, capsys.readouterr().err, f"{out} is being written by pid {first.pid}")
    _finish(first)
    rounds = [h["round"] for h in history(out)]
    assert rounds == [0, 1, 2, 3]  # each round trained once


def test_a_killed_runs_lock_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start(["run", *TINY, "--rounds", "3", "--out", str(out)], tmp_path, delay=10.0)
    _wait_for("round 1 checkpoint", (out / "checkpoints" / "round_1" / "server.json").is_file, first)
    first.kill()  # SIGKILL: no chance to release anything
    first.communicate()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
    assert main(["run", "--resume", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"note: took over the lock on {out} left by pid {first.pid} (started " in said
    assert "which is no longer running" in said
    assert [h["round"] for h in history(out)] == [0, 1, 2, 3]
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_file_in_a_new_out_is_taken_over(tmp_path, capsys):
    """A lock file whose process is gone (its pid is not running here) does not block a new run."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                             "started": "2024-01-01 00:00:00"}))
    assert main(["run", *TINY, "--rounds", "1", "--out", str(out)]) == 0
    assert (f"note: took over the lock on {out} left by pid {gone.pid} (started 2024-01-01 00:00:00), which is "
            f"no longer running") in capsys.readouterr().out
    assert (out / "summary.json").is_file() and not (out / LOCK_NAME).exists()


def test_the_lock_is_reentered_only_with_its_token(tmp_path):
    """Flower's ServerApp runs the rounds for the process that launched it: with that process's
    token it enters the held lock (in this process or another); without it, it is refused."""
    out = tmp_path / "run"
    probe = ("import sys; from fastseq.fed.run_lock import run_lock\n"
             "with run_lock(sys.argv[1], token=sys.argv[2] or None, echo=print) as lock:\n"
             "    print('entered', lock.owner)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with run_lock(out, echo=print) as lock:
        assert lock.owner and lock.created == [out]
        with run_lock(out, token=lock.token) as inner:  # flower-sim: a thread of this process
            assert not inner.owner and inner.created == [out]
        with pytest.raises(RunLocked, match=f"{out} is being written by pid {os.getpid()}"):
            with run_lock(out):
                pass
        for token, entered in ((lock.token, True), ("someone-else", False)):
            proc = subprocess.run([sys.executable, "-c", probe, str(out), token], env=env, capture_output=True,
                                  text=True, timeout=120)
            assert ("entered False" in proc.stdout) is entered, proc
            assert ("RunLocked" in proc.stderr) is not entered, proc
        assert (out / LOCK_NAME).is_file()  # the re-entries did not release it
    assert not out.exists()  # nothing was written: the folder the lock made is gone again


@pytest.mark.parametrize("engine", ["flower", "flower-sim"])
def test_flower_engines_honour_the_lock(engine, tmp_path):
    """The Flower engines take the lock before they start anything (a deployment, Ray)."""
    pytest.importorskip("flwr")
    if engine == "flower-sim":
        pytest.importorskip("ray")
    from fastseq.engines import run

    out = tmp_path / "run"
    with run_lock(out, echo=print):
        with pytest.raises(RunLocked, match="wait for it or pass another --out"):
            run(flower_config(out, clients=2, clients_per_round=1, engine=engine), echo=print)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no flower/ work folder, nothing


# --- resume checks before anything is written ------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Path]:
    """Finished 2-round runs of SCL and FFA-LoRA."""
    base = tmp_path_factory.mktemp("finished")
    runs = {}
    for method in ("scl", "ffa-lora"):
        runs[method] = base / method
        assert main(["run", *TINY, "--rounds", "2", "--method", method, "--out", str(runs[method])]) == 0
    return runs


def _edit(d: Path, **changes) -> None:
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))


@pytest.mark.parametrize("run,edits,argv,phrase", [
    ("scl", {"method": "ffa-lora"}, [], "its checkpoint round_2 was trained with method 'scl', not 'ffa-lora' as"),
    ("ffa-lora", {"method": None}, [], "was trained with method 'ffa-lora', not 'scl' ("),
    ("scl", {"model": "tiny-gemma"}, [], "'tiny-gemma' with 'scl' is not the model the run trained (total_params"),
    ("scl", {"r": 8, "method_info": None}, [], "its checkpoint round_2 does not fit 'tiny-llama' with 'scl'"),
    ("scl", {"lr": None}, ["--lr", "0.05"], "with a different config (lr 0.01 (the default) -> 0.05)"),
], ids=["method-edited", "method-missing", "model-edited", "rank-edited", "key-missing-then-changed"])
def test_a_resume_that_does_not_match_its_run_changes_nothing(run, edits, argv, phrase, finished, tmp_path, capsys):
    """config.json is where a resumed config comes from: the checkpoint says what the run was,
    and a mismatch is one line with every byte of the run left as it was."""
    d = tmp_path / "run"
    shutil.copytree(finished[run], d)
    _edit(d, **edits)
    before = _tree_hash(d)
    rc = main(["run", "--resume", str(d), "--rounds", "3", *argv])
    _one_line(rc, capsys.readouterr().err, phrase)
    assert _tree_hash(d) == before


def test_a_matching_resume_still_trains_further(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished["ffa-lora"], d)
    assert main(["run", "--resume", str(d), "--rounds", "3"]) == 0
    assert [h["round"] for h in history(d)] == [0, 1, 2, 3]


# --- Ctrl-C ----------------------------------------------------------------------------------

def test_ctrl_c_names_the_command_that_continues_the_run(tmp_path):
    out = tmp_path / "my run"  # a path the shell must quote
    first = _start(["run", *TINY, "--rounds", "3", "--out", str(out)], tmp_path, delay=3.0)
    _wait_for("round 1 checkpoint", (out / "checkpoints" / "round_1" / "server.json").is_file, first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    command = f"fastseq run --resume {shlex.quote(str(out))}"
    assert err.strip().splitlines()[-1] == f"fastseq run: interrupted; round 1 of 3 is saved; continue with: {command}"
    assert not (out / LOCK_NAME).exists()  # released on Ctrl-C
    assert main(shlex.split(command)[1:]) == 0
    assert [h["round"] for h in history(out)] == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3
