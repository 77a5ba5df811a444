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

from .._atomic import atomic_write_bytes
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


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """PEM files of a TLS SuperLink: the CA certificate its clients verify it with, and its own
    certificate (whose subjectAltName must hold the address the clients dial) and private key."""

    ca: Path
    cert: Path
    key: Path


class LocalDeployment:
    """A SuperLink and ``num_supernodes`` SuperNodes on 127.0.0.1. SuperNode ``i`` gets
    ``--node-config "partition-id=i num-partitions=N"``.
    Use as a context manager; ``stop()`` ends every process started here.

    Plaintext (``--insecure``: loopback only) by default. With ``tls`` the SuperLink serves HTTPS
    and every SuperNode verifies it with ``tls.ca``; with ``supernode_keys`` (one OpenSSH EC
    private key per SuperNode, its public key in ``KEY.pub`` as ``ssh-keygen`` writes it) the
    SuperLink runs ``--enable-supernode-auth``, ``start()`` registers each public key with
    ``flwr supernode register`` and SuperNode ``i`` signs with key ``i``.
    ``supernode_command`` replaces the ``flower-supernode`` command (tests use it)."""

    def __init__(self, num_supernodes: int, workdir: str | os.PathLike, *, node_config: dict[str, Any] | None = None,
                 per_node: Sequence[dict[str, Any]] | None = None, start_timeout: float = 60.0,
                 echo: Callable[[str], None] = print, tls: TLSFiles | None = None,
                 supernode_keys: Sequence[str | os.PathLike] | None = None,
                 supernode_command: Sequence[str] | None = None):
        self.n = int(num_supernodes)
        self.workdir = Path(workdir).resolve()
        self.node_config = dict(node_config or {})  # extra node config of every SuperNode
        self.per_node = [dict(d) for d in (per_node or [{}] * self.n)]  # ... and of SuperNode i
        if len(self.per_node) != self.n:
            raise ValueError(f"per_node has {len(self.per_node)} entries for {self.n} SuperNodes")
        self.tls = None if tls is None else TLSFiles(*(Path(p).resolve() for p in (tls.ca, tls.cert, tls.key)))
        self.keys = None if supernode_keys is None else [Path(k).resolve() for k in supernode_keys]
        if self.keys is not None:
            if self.tls is None:  # flwr refuses it too; say so before starting anything
                raise ValueError("SuperNode authentication needs TLS: pass tls=TLSFiles(ca, cert, key)")
            if len(self.keys) != self.n:
                raise ValueError(f"supernode_keys has {len(self.keys)} keys for {self.n} SuperNodes")
            missing = [f"{k}{suffix}" for k in self.keys for suffix in ("", ".pub")
                       if not Path(f"{k}{suffix}").is_file()]
            if missing:
                raise ValueError(f"SuperNode key file(s) not found: {', '.join(missing)} (a private key and its "
                                 f"KEY.pub, e.g. from ssh-keygen -t ecdsa -b 384 -N '' -f KEY)")
        self.supernode_command = list(supernode_command or flower_command("flower-supernode"))
        self.start_timeout = start_timeout
        self.echo = echo
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list[Any] = []
        self.port: int | None = None
        self._ports: set[int] = set()  # handed out here (a port just freed may come back from the kernel)
        self.node_ids: dict[int, int] = {}  # SuperNode i -> the node id its registered key got
        self.flwr_home = self.workdir / "flwr_home"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _spawn(self, name: str, cmd: Sequence[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # a restarted process appends to its log
        self._logs.append(log)
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.workdir, env=flower_env(self.flwr_home), start_new_session=True)
        self.procs.append((name, proc))
        self._write_pids()
        return proc

    def _free_port(self) -> int:
        for _ in range(100):
            port = free_ports(1)[0]
            if port not in self._ports:
                self._ports.add(port)
                return port
        raise FlowerError("found no free port on 127.0.0.1 that this deployment has not used yet")

    def _write_pids(self) -> None:
        # the newest process of each name (a restarted SuperNode replaces its predecessor)
        (self.workdir / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.procs}))

    def start(self) -> "LocalDeployment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = self._free_port()
        try:
            if self.tls is None:
                security = ["--insecure"]
            else:
                security = ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                            "--ssl-keyfile", str(self.tls.key)]
                if self.keys is not None:
                    security.append("--enable-supernode-auth")
            link = self._spawn("superlink", flower_command("flower-superlink") + security + [
                "--disable-runtime-dependency-installation", "--host", LOOPBACK, "--port", str(self.port)])
            wait_for_port(LOOPBACK, self.port, self.start_timeout, link)
            write_connection(self.flwr_home, self.address, insecure=self.tls is None,
                             root_certificates=None if self.tls is None else str(self.tls.ca))
            for i in range(self.n):
                if self.keys is not None:
                    self.node_ids[i] = self.register_supernode(Path(str(self.keys[i]) + ".pub"))
                self.start_supernode(i)
            self.echo(f"flower: local deployment: SuperLink {self.address} (pid {link.pid}, "
                      f"{'plaintext' if self.tls is None else 'TLS'}"
                      f"{', SuperNode authentication' if self.keys is not None else ''}), {self.n} SuperNodes "
                      f"(pids {', '.join(str(p.pid) for n, p in self.procs[1:])}); logs in {self.workdir}")
        except BaseException:
            self.stop()
            raise
        return self

    def supernode_node_config(self, i: int) -> dict[str, Any]:
        return {"partition-id": i, "num-partitions": self.n, **self.node_config, **self.per_node[i]}

    def start_supernode(self, i: int) -> subprocess.Popen:
        """Start SuperNode ``i`` (again, after it died: with its registered key it keeps its node id)."""
        key = None if self.keys is None else self.keys[i]
        return self.spawn_supernode(f"supernode_{i}", self.supernode_node_config(i), key=key)

    def spawn_supernode(self, name: str, node_config: dict[str, Any], *, key: str | os.PathLike | None = None,
                        insecure: bool | None = None, max_wait_s: float | None = None) -> subprocess.Popen:
        """A SuperNode process ``name`` (log ``NAME.log``) dialling this SuperLink, on a free
        Runtime API port (``--port``: SuperNodes on one machine need distinct ones).
        ``insecure`` defaults to the SuperLink's mode; ``key`` signs with that private key."""
        insecure = self.tls is None if insecure is None else insecure
        security = ["--insecure"] if insecure else ["--root-certificates", str(self.tls.ca)] if self.tls else []
        if key is not None:
            security += ["--auth-supernode-private-key", str(Path(key).resolve())]
        wait = self.start_timeout if max_wait_s is None else max_wait_s
        return self._spawn(name, self.supernode_command + security + [
            "--superlink", self.address, "--host", LOOPBACK, "--port", str(self._free_port()),
            "--max-wait-time", str(int(wait)),
            "--node-config", " ".join(f"{k}={_node_value(v)}" for k, v in node_config.items())])

    def process(self, name: str) -> subprocess.Popen:
        """The newest process started under ``name`` (``superlink``, ``supernode_0``, ...)."""
        for n, p in reversed(self.procs):
            if n == name:
                return p
        raise KeyError(name)

    def _flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(flower_command("flwr") + list(args), capture_output=True, text=True,
                              env=flower_env(self.flwr_home), timeout=timeout, stdin=subprocess.DEVNULL)

    def register_supernode(self, public_key: str | os.PathLike) -> int:
        """``flwr supernode register``: admit the SuperNode holding this public key (an OpenSSH EC
        public key file); returns its node id."""
        res = self._flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        data = _json_in(res.stdout)
        if res.returncode != 0 or not data.get("success", False) or "node-id" not in data:
            raise FlowerError(f"flwr supernode register {public_key} failed (exit {res.returncode}): "
                              f"{(res.stdout + res.stderr).strip()[-500:]}")
        return int(data["node-id"])

    def supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: the SuperNodes the SuperLink knows (``node-id``, ``status``, ...)."""
        res = self._flwr("supernode", "list", CONNECTION, "--format", "json")
        data = _json_in(res.stdout)
        if res.returncode != 0 or not data.get("success", False):
            raise FlowerError(f"flwr supernode list failed (exit {res.returncode}): "
                              f"{(res.stdout + res.stderr).strip()[-500:]}")
        return list(data.get("nodes", []))

    def check_alive(self) -> None:
        latest = {n: p for n, p in self.procs}  # a SuperNode restarted under its name counts as alive
        for name, p in latest.items():
            if name.startswith(("superlink", "supernode_")) and p.poll() is not None:
                raise FlowerError(f"{name} (pid {p.pid}) exited with {p.returncode}; "
                                  f"see {self.workdir / (name + '.log')}")

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


def _json_in(text: str) -> dict[str, Any]:
    """The JSON object in a ``flwr ... --format json`` output (which may print a line before it)."""
    try:
        data = json.loads(text[text.index("{"):])
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


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
           alive: Callable[[], None] | None = None,
           started: Callable[[str, int], None] | None = None) -> str:
    """``flwr run APP fastseq --stream``; streams the ServerApp log to ``log_path`` and
    ``echo``; returns the run id. Raises FlowerError on failure or timeout; on any abnormal
    exit (also KeyboardInterrupt) the submitted run is stopped with ``flwr stop``.
    ``started(run_id, pid of flwr run)`` is called as soon as the SuperLink has accepted the run."""
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
                if m and run_id is None:
                    run_id = m.group(1)
                    if started is not None:
                        started(run_id, proc.pid)
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
    for run in _json_in(res.stdout).get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown"))
    return "unknown"


RUN_RECORD = "run.json"  # in OUT/flower/: the Flower run that fastseq submitted for OUT


def _record_of(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _started_here(pid: int, words: Sequence[str]) -> bool:
    """``pid`` leads its own session (as every process fastseq starts for Flower does) and its
    command line names one of ``words``: not some unrelated process that reused the pid."""
    try:
        if os.getsid(pid) != pid:
            return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):  # gone, or no /proc (not Linux): leave it alone
        return False
    return any(w in cmdline for w in words)


def _end_session(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM to the process group ``pid`` leads, SIGKILL if it is still there after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.2)
        if not _pid_alive(pid):
            return


def _driver_alive(rec: dict[str, Any]) -> bool:
    """The ``fastseq run`` (or Python session) that wrote ``rec`` still runs on this machine."""
    pid = rec.get("driver_pid")
    if rec.get("host") != socket.gethostname() or pid == os.getpid() or not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return True  # no /proc: assume the pid is still that driver
    return b"python" in cmdline or b"fastseq" in cmdline


def _refuse_live_driver(rec: dict[str, Any], out: Path) -> None:
    if _driver_alive(rec):
        raise FlowerError(f"the `fastseq run` that submitted Flower run {rec.get('run_id')} for {out} is still "
                          f"running (pid {rec.get('driver_pid')}); stop it (Ctrl-C) or let it finish before resuming")


def stop_stale_run(record: Path, superlink: str, flwr_home: str | os.PathLike, out: Path,
                   echo: Callable[[str], None] = print, wait_s: float = 60.0) -> None:
    """Before resuming ``out`` on ``superlink``: stop the run that an earlier ``fastseq run``
    submitted for ``out`` there if it is still going (its driver was killed: the run lives on in
    the SuperLink and would write to ``out`` next to the resumed one), and end that driver's
    orphaned ``flwr run --stream``. Refused while that driver is still alive on this machine."""
    rec = _record_of(record)
    run_id = rec.get("run_id")
    if not run_id or rec.get("superlink") != superlink:
        return
    status = run_status(str(run_id), flwr_home)
    if not status.startswith("finished") and status != "unknown":
        _refuse_live_driver(rec, out)
        echo(f"flower: run {run_id}, submitted for {out} by a `fastseq run` that is gone "
             f"(pid {rec.get('driver_pid')}), is still {status}: stopping it before resuming")
        stop_run(str(run_id), flwr_home)
        deadline = time.monotonic() + wait_s
        status = run_status(str(run_id), flwr_home)  # (flwr stop marks it at once)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(1.0)
            status = run_status(str(run_id), flwr_home)
        if not status.startswith("finished"):
            raise FlowerError(f"could not stop Flower run {run_id} (status {status} after {wait_s:.0f} s); stop it "
                              f"with `flwr stop {run_id}` and resume again")
    pid = rec.get("flwr_run_pid")
    if isinstance(pid, int) and rec.get("host") == socket.gethostname() and _started_here(pid, ["flwr"]):
        _end_session(pid)


def stop_stale_deployment(work: Path, echo: Callable[[str], None] = print) -> None:
    """Before resuming with a new local deployment: end the processes of the one that an earlier,
    killed ``fastseq run`` left behind in ``work`` (``pids.json``; each leads its own session).
    Refused while that driver is still alive on this machine."""
    rec = _record_of(work / RUN_RECORD)
    pids = _record_of(work / "pids.json")
    if rec.get("host") == socket.gethostname():
        pids["flwr run"] = rec.get("flwr_run_pid")
    stale = {name: pid for name, pid in pids.items()
             if isinstance(pid, int) and _started_here(pid, ["flower-super", "flwr"])}
    if not stale:
        return
    _refuse_live_driver(rec, work.parent)
    echo(f"flower: stopping what the earlier `fastseq run` left running for {work.parent}: "
         + ", ".join(f"{n} (pid {p})" for n, p in stale.items()))
    for pid in stale.values():
        _end_session(pid)


def run_flower(cfg, *, superlink: str | None = None, insecure: bool = False, root_certificates: str | None = None,
               resume: bool = False, deepspeed: Any = None, timeout: float | None = None,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cfg`` (an ExperimentConfig) on Flower; returns the summary (as run_experiment).

    superlink: ``None`` starts a local loopback deployment (one SuperNode per client) and
        stops it afterwards; ``"HOST:PORT"`` submits to an existing SuperLink, whose
        ServerApp then writes the outputs to ``cfg.out`` on the SuperLink's machine
        (give an absolute path). The env var ``FASTSEQ_FLOWER_SUPERLINK`` is the default.
    insecure / root_certificates: connection to an existing SuperLink (TLS by default); the env
        vars ``FASTSEQ_FLOWER_INSECURE=1`` / ``FASTSEQ_FLOWER_ROOT_CERTIFICATES=CA.pem`` are the
        defaults (so that ``fastseq run --engine flower`` reaches any SuperLink).
    resume: continue the run in ``cfg.out``. A run that an earlier, killed ``fastseq run`` left
        going into the same ``out`` (``out/flower/run.json``) is stopped first (``flwr stop``; on
        a local deployment, that deployment's processes); the resumed ServerApp waits (up to
        120 s) for the stopped one to let go of ``out``'s run lock.
    deepspeed: a ``DeepSpeedConfig`` (or dict) to train every client under DeepSpeed (the same as
        setting ``cfg.deepspeed``).
    timeout: seconds for the whole run (``None``: no limit).
    """
    from ..fed.experiment import default_out

    superlink = superlink or os.environ.get("FASTSEQ_FLOWER_SUPERLINK") or None
    if superlink is not None:
        insecure = insecure or os.environ.get("FASTSEQ_FLOWER_INSECURE", "").lower() in ("1", "true", "yes")
        root_certificates = root_certificates or os.environ.get("FASTSEQ_FLOWER_ROOT_CERTIFICATES") or None
        if insecure and root_certificates:
            raise FlowerError(f"a plaintext connection (insecure / FASTSEQ_FLOWER_INSECURE) and root certificates "
                              f"{root_certificates} (FASTSEQ_FLOWER_ROOT_CERTIFICATES) exclude each other; "
                              f"give one of them")
        if root_certificates and not Path(root_certificates).is_file():
            raise FlowerError(f"root certificates {root_certificates} (FASTSEQ_FLOWER_ROOT_CERTIFICATES): no such file")
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
    record = work / RUN_RECORD
    t0 = time.time()

    def started(address: str, home: Path) -> Callable[[str, int], None]:
        def write(run_id: str, flwr_pid: int) -> None:
            # what a later `--resume` needs to stop this run if this process dies without stopping it
            atomic_write_bytes(record, json.dumps({
                "run_id": run_id, "superlink": address, "flwr_home": str(home), "host": socket.gethostname(),
                "driver_pid": os.getpid(), "flwr_run_pid": flwr_pid, "started": time.time()}, indent=2).encode())
        return write

    with _sigterm_as_interrupt():
        if superlink is None:
            if flower_keys["resume"]:
                stop_stale_deployment(work, echo)
            with LocalDeployment(cfg.clients, work, echo=echo) as dep:
                run_id = submit(app_dir, dep.flwr_home, timeout=timeout, log_path=work / "run.log", echo=echo,
                                alive=dep.check_alive, started=started(dep.address, dep.flwr_home))
                status = run_status(run_id, dep.flwr_home)
        else:
            home = work / "flwr_home"
            write_connection(home, superlink, insecure=insecure, root_certificates=root_certificates)
            if flower_keys["resume"]:
                stop_stale_run(record, superlink, home, out, echo)
            run_id = submit(app_dir, home, timeout=timeout, log_path=work / "run.log", echo=echo,
                            started=started(superlink, home))
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
