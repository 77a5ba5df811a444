"""Worker processes that train a round's clients in parallel and share one frozen backbone.

The local engine's backbone is loaded once and shared with the workers, never copied:

* ``fork`` (the default on a CPU): the workers are forked from the engine's process after the
  load, so they see the backbone's tensors through copy-on-write pages that nobody writes (the
  backbone is frozen);
* ``spawn`` (the only way on a GPU: a CUDA context cannot be forked): fresh interpreters get the
  runtime through ``torch.multiprocessing``, whose pickler sends every tensor as a handle (CUDA
  IPC on a GPU, a shared-memory segment on a CPU), not as data. Tensors a client writes (its
  trainable parameters) are then copied once in each worker (:func:`own_writable_copies`), so
  workers never write each other's memory. This pickle never leaves the machine: it is the
  engine talking to its own children, not a payload from the network.

Each worker holds only the adapter and optimizer state of the client it is training. A worker
gets ``(client id, round, downlink blob)`` and returns the client's encoded update blob and its
metrics as JSON, over a pipe of its own (no pickle crosses it); the per-client state (local
parameters, error feedback) stays in the client's files on disk, exactly as in the sequential
engine, so the parent's checkpoint and commit logic is unchanged.

A client's fit is seeded by (seed, round, client) and reloads every trainable tensor first, so
its result does not depend on which process runs it: a run with workers is bit-identical to the
sequential one at the same number of torch threads per client (tested). A worker that dies
(killed, out of memory, a crash) fails only the client it was running, which is dropped with
the reason; the next round forks a new one. No worker outlives the engine's process: each
asks the kernel for SIGKILL when its parent dies, and :meth:`WorkerPool.close` ends them.

On a GPU ``auto`` is one worker until measured otherwise (``scripts/gpu_check.py``'s workers
step); ``--workers N`` there spawns. Spawned workers re-import the engine's main module, so a
script that runs the engine itself needs the usual ``if __name__ == "__main__":`` guard
(``fastseq run`` has it).
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("fastseq.fed")

_PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(requested: int | None, clients_per_round: int, device_type: str) -> tuple[int, int]:
    """``(workers, torch threads per worker)``. A worker runs one torch thread: GNU OpenMP hangs
    in a forked child that starts a parallel region after its parent had one. ``requested``
    None is auto: on a CPU one worker per core, at most the clients per round, when the round's
    clients fill the workers evenly (3 clients on 2 one-thread workers take two waves, slower
    than one process on both cores: measured); otherwise, and on a GPU, 1."""
    if requested is not None:
        return max(1, min(requested, clients_per_round)), 1
    n = max(1, min(clients_per_round, usable_cores()))
    return (n if device_type == "cpu" and clients_per_round % n == 0 else 1), 1


class ClientFailure(Exception):
    """A client failed in a worker; ``str`` is the reason as the sequential engine words it."""


@dataclass
class _Worker:
    index: int
    process: Any
    conn: Any  # the parent's end of the pipe
    busy: str | None = None  # the client id it is training


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned workers)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def start_method(requested: str, device_type: str) -> str:
    """``fork`` or ``spawn`` for ``--worker-start`` (``auto``: fork on a CPU, spawn elsewhere)."""
    if requested == "auto":
        return "fork" if device_type == "cpu" else "spawn"
    return requested


def own_writable_copies(model, written=()) -> int:
    """In a spawned worker: give every tensor a client's fit writes storage of this process's own
    (the parameters that train, the buffers, and ``written``: what the method writes in place,
    see :meth:`fastseq.fed.methods.Method.written_in_fit`), so that training writes neither the
    engine's tensors nor another worker's; the frozen weights stay shared. The tensors keep their
    identity (``.data`` is swapped), so every reference to them stays valid. Returns the bytes
    copied."""
    seen: set[int] = set()
    tensors = [p for p in model.parameters() if p.requires_grad] + list(model.buffers()) + list(written)
    copied = 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        t.data = t.data.clone()
        copied += t.numel() * t.element_size()
    return copied


def _worker_main(conn, close_in_child: list, threads: int, call: Callable[[dict, bytes], tuple],
                 parent_pid: int | None = None):
    """The body of a worker: serve requests until the parent closes the pipe. ``parent_pid``
    (spawned workers): the engine's pid, to exit if it died before this worker started."""
    import torch

    _die_with_parent()
    if parent_pid is not None:
        if os.getppid() != parent_pid:
            return  # the engine died while this worker was starting
        prepare = getattr(call, "in_spawned_worker", None)
        if prepare is not None:
            prepare()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for c in close_in_child:  # the other pipes' parent ends: only the parent may hold them
        c.close()
    torch.set_num_threads(threads)
    while True:
        try:
            header = json.loads(conn.recv_bytes())
            blob = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            up, metrics = call(header, blob)
            reply = {"ok": True, "metrics": metrics}
        except Exception as e:  # the client failed: its reason, as the sequential engine words it
            log.debug("%s of %s failed in a worker", header["op"], header["key"], exc_info=True)
            up, reply = b"", {"ok": False, "reason": f"{type(e).__name__}: {e}"}
        except KeyboardInterrupt as e:  # raised by the client's own code: it stops the run, as in sequence
            up, reply = b"", {"ok": False, "interrupt": True, "reason": f"{type(e).__name__}: {e}"}
        conn.send_bytes(json.dumps(reply).encode())
        conn.send_bytes(up)


class WorkerPool:
    """``n`` forked workers; ``call(header, blob)`` runs in them and returns ``(bytes, JSON
    value)``. ``header`` holds ``op``, ``key`` (a client id, or a shard's name), ``round`` and
    the job's own fields (see :class:`fastseq.fed.rounds.RoundRunner`)."""

    def __init__(self, n: int, threads: int, call: Callable[[dict, bytes], tuple], start: str = "fork"):
        self.n, self.threads, self.call, self.start = n, threads, call, start
        if start == "spawn":
            import torch.multiprocessing as tmp  # its pickler sends tensors as handles (shared, not copied)

            self._ctx = tmp.get_context("spawn")
        else:
            self._ctx = mp.get_context("fork")
        self._workers: list[_Worker | None] = [None] * n
        self.pids_started: list[int] = []  # every worker process this pool started (tests check they end)

    def _start(self, i: int) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        if self.start == "spawn":  # a fresh interpreter inherits no pipe ends
            args = (child_end, [], self.threads, self.call, os.getpid())
        else:
            others = [w.conn for w in self._workers if w is not None] + [parent_end]
            args = (child_end, others, self.threads, self.call)
        p = self._ctx.Process(target=_worker_main, args=args, name=f"fastseq-worker-{i}", daemon=True)
        try:
            p.start()
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            if self.start != "spawn":
                raise
            from ..config import ConfigError

            parent_end.close()
            child_end.close()
            raise ConfigError(f"--worker-start spawn sends the run to its workers by pickle, and part of it cannot be "
                              f"pickled ({type(e).__name__}: {e}); pass a module-level client factory (no lambda or "
                              f"local function), or use --worker-start fork on a CPU or --workers 1") from e
        child_end.close()
        self.pids_started.append(p.pid)
        w = self._workers[i] = _Worker(i, p, parent_end)
        return w

    def _alive(self, i: int) -> _Worker:
        w = self._workers[i]
        if w is None or not w.process.is_alive():
            if w is not None:
                self._reap(w)
            w = self._start(i)
        return w

    def _reap(self, w: _Worker) -> None:
        w.conn.close()
        w.process.join(timeout=5)
        self._workers[w.index] = None

    def run(self, op: str, jobs: list[tuple[str, bytes, dict]], round: int,
            on_done: Callable[[str, int], None] | None = None) -> tuple[list, dict[str, int]]:
        """Run ``op`` for every ``(key, blob, fields)`` in ``jobs``, each on the next free worker.
        Returns the outcomes in job order (``(blob, JSON value)`` or a ClientFailure) and which
        worker ran each key."""
        pending = list(range(len(jobs)))[::-1]
        outcomes: list = [None] * len(jobs)
        ran_on: dict[str, int] = {}
        running: dict[int, int] = {}  # worker index -> job index
        while pending or running:
            for i in range(self.n):
                if i in running or not pending:
                    continue
                w = self._alive(i)
                j = pending.pop()
                cid, blob, fields = jobs[j]
                try:
                    w.conn.send_bytes(json.dumps({**fields, "op": op, "key": cid, "round": round}).encode())
                    w.conn.send_bytes(blob)
                except (BrokenPipeError, OSError):
                    pending.append(j)  # it died between rounds: a fresh one takes the job
                    self._reap(w)
                    continue
                running[i] = j
                ran_on[cid] = i
            ready = mpc.wait([self._workers[i].conn for i in running] +
                             [self._workers[i].process.sentinel for i in running])
            for i in list(running):
                w = self._workers[i]
                if w.conn not in ready and w.process.sentinel not in ready:
                    continue
                j = running.pop(i)
                cid = jobs[j][0]
                try:
                    reply = json.loads(w.conn.recv_bytes())
                    up = w.conn.recv_bytes()
                except (EOFError, OSError):
                    w.process.join(timeout=5)
                    code = w.process.exitcode
                    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    what = jobs[j][2].get("label") or f"{op} of {cid}"
                    outcomes[j] = ClientFailure(f"WorkerDied: worker {i} (pid {w.process.pid}) died ({how}) while "
                                                f"running {what}")
                    self._reap(w)
                else:
                    if reply.get("interrupt"):
                        raise KeyboardInterrupt(f"{op} of {cid} in worker {i}: {reply['reason']}")
                    outcomes[j] = ((up, reply["metrics"]) if reply["ok"] else ClientFailure(reply["reason"]))
                if on_done is not None:
                    on_done(cid, i)
        return outcomes, ran_on

    def close(self) -> None:
        """End every worker (their pipes close; a worker that does not exit is killed)."""
        for w in [w for w in self._workers if w is not None]:
            w.conn.close()
        deadline = time.monotonic() + 5
        for w in [w for w in self._workers if w is not None]:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
        self._workers = [None] * self.n

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
