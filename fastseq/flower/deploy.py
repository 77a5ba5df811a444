"""Run a fastseq experiment on Flower: a local loopback deployment, or an existing SuperLink.

``run_flower(cfg)`` with no ``superlink`` starts a SuperLink and one SuperNode per client on
127.0.0.1 (free ports, ``--insecure``: loopback only), submits the experiment with
``flwr run``, and stops every process it started (process groups of the PIDs it spawned,
also on errors and KeyboardInterrupt). With ``superlink="HOST:PORT"`` it only submits the
run to that deployment (TLS unless ``insecure=True``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import project_toml, to_run_config

LOOPBACK = "127.0.0.1"
CONNECTION = "fastseq"


class FlowerError(RuntimeError):
    """The Flower deployment or the run failed; the message points at the logs."""


def flower_env(flwr_home: str | os.PathLike | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # torch.distributed rendezvous variables belong to one process (e.g. this one after a
    # DeepSpeed client ran here); a ClientApp must not inherit a MASTER_PORT already in use.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # flwr-serverapp / flwr-clientapp of this env
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_command(script: str) -> list[str]:
    """A Flower console script of THIS environment (next to ``sys.executable``)."""
    path = Path(sys.executable).parent / script
    if path.is_file() and os.access(path, os.X_OK):
        return [str(path)]
    found = shutil.which(script)
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return [found]
    modules = {"flower-superlink": "flwr.superlink.cli:flower_superlink",
               "flower-supernode": "flwr.supernode.cli:flower_supernode", "flwr": "flwr.cli.app:app"}
    mod, fn = modules[script].split(":")
    return [sys.executable, "-c", f"import sys; from {mod} import {fn} as f; sys.argv[0] = {script!r}; sys.exit(f())"]


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct ports that are free on ``host`` right now."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FlowerError(f"process {proc.pid} exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise FlowerError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process we started (in its own session) together with the children it spawned
    (flwr-serverapp / flwr-clientapp): SIGTERM to its process group, SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
    try:  # children that outlived their parent in the same group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class LocalDeployment:
    """A SuperLink and ``num_supernodes`` SuperNodes on 127.0.0.1 (``--insecure``: loopback
    only). SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N"``.
    Use as a context manager; ``stop()`` ends every process started here."""

    def __init__(self, num_supernodes: int, workdir: str | os.PathLike, *, node_config: dict[str, Any] | None = None,
                 per_node: Sequence[dict[str, Any]] | None = None, start_timeout: float = 60.0,
                 echo: Callable[[str], None] = print):
        self.n = int(num_supernodes)
        self.workdir = Path(workdir).resolve()
        self.node_config = dict(node_config or {})  # extra node config of every SuperNode
        self.per_node = [dict(d) for d in (per_node or [{}] * self.n)]  # ... and of SuperNode i
        if len(self.per_node) != self.n:
            raise ValueError(f"per_node has {len(self.per_node)} entries for {self.n} SuperNodes")
        self.start_timeout = start_timeout
        self.echo = echo
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list[Any] = []
        self.port: int | None = None
        self.flwr_home = self.workdir / "flwr_home"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _spawn(self, name: str, cmd: Sequence[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        self._logs.append(log)
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.workdir, env=flower_env(self.flwr_home), start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self) -> "LocalDeployment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        ports = free_ports(1 + self.n)
        self.port = ports[0]
        try:
            link = self._spawn("superlink", flower_command("flower-superlink") + [
                "--insecure", "--disable-runtime-dependency-installation", "--host", LOOPBACK,
                "--port", str(self.port)])
            wait_for_port(LOOPBACK, self.port, self.start_timeout, link)
            for i in range(self.n):
                nc = {"partition-id": i, "num-partitions": self.n, **self.node_config, **self.per_node[i]}
                self._spawn(f"supernode_{i}", flower_command("flower-supernode") + [
                    "--insecure", "--superlink", self.address, "--host", LOOPBACK, "--port", str(ports[1 + i]),
                    "--max-wait-time", str(int(self.start_timeout)),
                    "--node-config", " ".join(f"{k}={_node_value(v)}" for k, v in nc.items())])
            write_connection(self.flwr_home, self.address, insecure=True)
            (self.workdir / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.procs}))
            self.echo(f"flower: local deployment: SuperLink {self.address} (pid {link.pid}), "
                      f"{self.n} SuperNodes (pids {', '.join(str(p.pid) for n, p in self.procs[1:])}); "
                      f"logs in {self.workdir}")
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise FlowerError(f"{name} (pid {p.pid}) exited with {p.returncode}; see {self.workdir / (name + '.log')}")

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            try:
                stop_process(p)
            except Exception:  # keep stopping the others
                pass
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> "LocalDeployment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _node_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_connection(flwr_home: str | os.PathLike, address: str, *, insecure: bool,
                     root_certificates: str | None = None, name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection ``name``."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f"address = {json.dumps(address)}",
             f"insecure = {'true' if insecure else 'false'}"]
    if root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_project(app_dir: str | os.PathLike, run_config: dict[str, Any]) -> Path:
    """A ``flwr run`` project (pyproject.toml + README) whose components are fastseq's apps."""
    d = Path(app_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(project_toml(run_config))
    (d / "README.md").write_text("Generated by fastseq.flower.run_flower; see docs/deployment.md.\n")
    return d


def submit(app_dir: str | os.PathLike, flwr_home: str | os.PathLike, *, timeout: float | None,
           log_path: str | os.PathLike, echo: Callable[[str], None] = print,
           alive: Callable[[], None] | None = None) -> str:
    """``flwr run APP fastseq --stream``; streams the ServerApp log to ``log_path`` and
    ``echo``; returns the run id. Raises FlowerError on failure or timeout; on any abnormal
    exit (also KeyboardInterrupt) the submitted run is stopped with ``flwr stop``."""
    cmd = flower_command("flwr") + ["run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
    run_id = None
    t0 = time.monotonic()
    finished = False
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=flower_env(flwr_home), text=True, bufsize=1, start_new_session=True)
        try:
            import selectors

            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                if timeout is not None and time.monotonic() - t0 > timeout:
                    raise FlowerError(f"flwr run did not finish within {timeout:.0f} s; log: {log_path}")
                if alive is not None:
                    alive()
                if not sel.select(timeout=1.0):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    if proc.poll() is not None:
                        break
                    continue
                logf.write(line)
                logf.flush()
                m = re.search(r"started run (\d+)", line)
                if m:
                    run_id = m.group(1)
                echo(line.rstrip("\n"))
            proc.wait(timeout=30)
            finished = True
        finally:
            stop_process(proc)
            if not finished and run_id is not None:
                stop_run(run_id, flwr_home)
    if proc.returncode != 0:
        raise FlowerError(f"flwr run exited with {proc.returncode}; log: {log_path}")
    if run_id is None:
        raise FlowerError(f"flwr run did not start a run; log: {log_path}")
    return run_id


def stop_run(run_id: str, flwr_home: str | os.PathLike) -> None:
    """``flwr stop RUN_ID`` (best effort: the SuperLink may already be gone)."""
    try:
        subprocess.run(flower_command("flwr") + ["stop", str(run_id), CONNECTION], capture_output=True,
                       env=flower_env(flwr_home), timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the deployment is cleaned up."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_status(run_id: str, flwr_home: str | os.PathLike) -> str:
    """The run's status as ``flwr list`` reports it (e.g. ``finished:completed``)."""
    cmd = flower_command("flwr") + ["list", CONNECTION, "--run-id", str(run_id), "--format", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=flower_env(flwr_home), timeout=60)
    try:
        data = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        return "unknown"
    for run in data.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown"))
    return "unknown"


def run_flower(cfg, *, superlink: str | None = None, insecure: bool = False, root_certificates: str | None = None,
               resume: bool = False, deepspeed: Any = None, timeout: float | None = None,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cfg`` (an ExperimentConfig) on Flower; returns the summary (as run_experiment).

    superlink: ``None`` starts a local loopback deployment (one SuperNode per client) and
        stops it afterwards; ``"HOST:PORT"`` submits to an existing SuperLink, whose
        ServerApp then writes the outputs to ``cfg.out`` on the SuperLink's machine
        (give an absolute path). The env var ``FASTSEQ_FLOWER_SUPERLINK`` is the default.
    insecure / root_certificates: connection to an existing SuperLink (TLS by default).
    deepspeed: a ``DeepSpeedConfig`` (or dict) to train every client under DeepSpeed (the same as
        setting ``cfg.deepspeed``).
    timeout: seconds for the whole run (``None``: no limit).
    """
    from ..fed.experiment import default_out

    superlink = superlink or os.environ.get("FASTSEQ_FLOWER_SUPERLINK") or None
    cfg = dataclasses.replace(cfg)
    cfg.validate()
    if cfg.out is None:
        cfg.out = default_out(cfg)
    if superlink is None or not os.path.isabs(cfg.out):
        cfg.out = os.path.abspath(cfg.out)
    out = Path(cfg.out)
    if deepspeed is not None:
        from ..fed.deepspeed_client import DeepSpeedConfig

        cfg.deepspeed = dataclasses.asdict(deepspeed) if isinstance(deepspeed, DeepSpeedConfig) else dict(deepspeed)
        cfg.validate()
    with contextlib.ExitStack() as stack:
        flower_keys: dict[str, Any] = {"resume": bool(resume)}
        if superlink is None:
            # This machine runs the ServerApp and every SuperNode: the run directory is locked
            # and checked here, as the embedded engine does, before anything is written; the
            # ServerApp re-enters this lock (a remote SuperLink's ServerApp takes its own).
            from ..fed.engine import check_before_writing

            lock = stack.enter_context(check_before_writing(cfg, out, resume, echo=echo))
            flower_keys.update({"client-state-dir": str(out / "clients"), "node-wait-s": 120, "run-lock": lock.token})
        return _run_flower(cfg, out, superlink, insecure, root_certificates, flower_keys, timeout, echo)


def _run_flower(cfg, out: Path, superlink: str | None, insecure: bool, root_certificates: str | None,
                flower_keys: dict[str, Any], timeout: float | None, echo: Callable[[str], None]) -> dict[str, Any]:
    work = out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    rc = to_run_config(dataclasses.replace(cfg, engine="flower", progress=False), **flower_keys)
    app_dir = write_project(work / "app", rc)
    t0 = time.time()
    with _sigterm_as_interrupt():
        if superlink is None:
            with LocalDeployment(cfg.clients, work, echo=echo) as dep:
                run_id = submit(app_dir, dep.flwr_home, timeout=timeout, log_path=work / "run.log", echo=echo,
                                alive=dep.check_alive)
                status = run_status(run_id, dep.flwr_home)
        else:
            home = work / "flwr_home"
            write_connection(home, superlink, insecure=insecure, root_certificates=root_certificates)
            run_id = submit(app_dir, home, timeout=timeout, log_path=work / "run.log", echo=echo)
            status = run_status(run_id, home)
    echo(f"flower: run {run_id} {status}")
    if "fail" in status or "stop" in status:
        raise FlowerError(f"Flower run {run_id} ended with status {status}; log: {work / 'run.log'}")
    summary_path = out / "summary.json"
    if summary_path.is_file() and summary_path.stat().st_mtime >= t0 - 1:
        summary = json.loads(summary_path.read_text())
    elif superlink is None:
        raise FlowerError(f"the Flower run {run_id} wrote no {summary_path}; log: {work / 'run.log'}")
    else:
        summary = {"engine": "flower", "out": str(out), "note": "outputs are on the SuperLink's machine"}
    summary["flower_run_id"] = run_id
    summary["flower_status"] = status
    return summary
