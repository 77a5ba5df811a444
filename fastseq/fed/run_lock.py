"""One process writes a run directory at a time.

``run_lock(out)`` holds ``out/run.lock`` with ``fcntl.flock`` for the body: the kernel drops the
lock when its process ends, however it ends, so a lock left by a killed run is never mistaken
for a live one (it is taken over, with a note). The file names the holder (pid, host, start
time) for the message a second process gets. ``fastseq run``, ``--resume`` and the Flower
engines take it before they check or write anything. Flower's ServerApp runs the round loop on
behalf of the process that launched it: it is given that process's token (the Flower key
``run-lock``) and re-enters its lock instead of being refused by it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..config import ConfigError

LOCK_NAME = "run.lock"


class RunLocked(ConfigError):
    """Another live process is writing the run directory; nothing was changed."""


@dataclass
class RunLock:
    """A held lock on ``out``. ``created``: the folders taking it made (``out`` and its missing
    parents), removed again on release while empty. ``owner`` False: a parent process (or this
    process, further out) holds it and releases it."""

    out: Path
    token: str
    created: list[Path] = field(default_factory=list)
    owner: bool = True
    fd: int | None = None

    @property
    def path(self) -> Path:
        return self.out / LOCK_NAME


_HELD: dict[str, RunLock] = {}  # token -> lock held by this process (flower-sim's ServerApp thread re-enters)
_HELD_GUARD = threading.Lock()


def _read_holder(path: Path, wait: float = 1.0) -> dict:
    """The holder's record; a holder writes it right after taking the lock, so an empty file is
    read again for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            text = path.read_text()
        except OSError:
            text = ""
        if text.strip() or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    """``pid N (started T)``, with the host when it is not this one."""
    who = f"pid {info.get('pid', '?')}"
    if info.get("host") and info["host"] != socket.gethostname():
        who += f" on host {info['host']}"
    return who + (f" (started {info['started']})" if info.get("started") else "")


def _missing_folders(out: Path) -> list[Path]:
    created = []
    for p in (out, *out.parents):
        if p.exists():
            break
        created.append(p)
    return created


def _open_locked(path: Path, out: Path) -> tuple[int | None, dict]:
    """``(fd, {})`` with the flock held on the file now at ``path``, or ``(None, holder)`` when a
    live process holds it."""
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a run that failed there just now
            out.mkdir(parents=True, exist_ok=True)
            continue
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None, _read_holder(path)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise ConfigError(f"cannot lock {out}: its file system does not support file locks ({e.strerror}); "
                                  f"pass an --out on a local disk") from None
            raise
        # The holder before us may have removed the file between our open and our flock: then
        # we hold a lock on a file nobody else can find, and must lock the new one.
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return fd, {}
        os.close(fd)
    raise ConfigError(f"cannot lock {out}: {path} keeps changing; is another program deleting it?")


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, *, token: str | None = None,
             echo: Callable[[str], None] = print, wait_s: float = 0.0) -> Iterator[RunLock]:
    """Hold the lock on run directory ``out`` (created if missing) for the body; released at the
    end, on errors and on Ctrl-C. Raises :class:`RunLocked` (a ConfigError: one line, nothing
    changed) when a live process holds it, unless ``token`` is that holder's token (the process
    that launched this one holds it for us); with ``wait_s``, only if it still holds it after
    that many seconds (a resumed Flower run waits for the stopped ServerApp it continues). A
    lock left by a process that is gone is taken over with a note through ``echo``."""
    out = Path(out)
    if token:
        with _HELD_GUARD:
            held = _HELD.get(token)
        if held is not None:  # further out in this process (flower-sim's ServerApp thread)
            yield RunLock(out, token, list(held.created), owner=False)
            return
    created = _missing_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd, holder = _open_locked(path, out)
    if fd is None and wait_s > 0 and not (token and holder.get("token") == token):
        echo(f"waiting up to {wait_s:.0f} s for {describe_holder(holder) if holder else 'another process'}, which "
             f"is still writing {out}")
        deadline = time.monotonic() + wait_s
        while fd is None and time.monotonic() < deadline:
            time.sleep(0.5)
            fd, holder = _open_locked(path, out)
    if fd is None:
        if token and holder.get("token") == token:  # the launching process holds it for us
            yield RunLock(out, token, [], owner=False)
            return
        raise RunLocked(f"{out} is being written by {describe_holder(holder) if holder else 'another process'}; "
                        f"wait for it or pass another --out")
    lock = RunLock(out, uuid.uuid4().hex, created, owner=True, fd=fd)
    try:
        with os.fdopen(os.dup(fd), "r+") as f:
            previous = f.read()
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": lock.token,
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            f.flush()
        if previous.strip():  # a holder that did not release: killed, or its machine went down
            try:
                stale = json.loads(previous)
            except ValueError:
                stale = {}
            echo(f"note: took over the lock on {out} left by {describe_holder(stale) if stale else 'an earlier run'}, "
                 f"which is no longer running")
        with _HELD_GUARD:
            _HELD[lock.token] = lock
    except BaseException:
        _release(lock)
        raise
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(lock.token, None)
        _release(lock)


def _release(lock: RunLock) -> None:
    """Remove the lock file (if it is still ours), drop the flock, then remove the folders the
    lock created while they are empty (a run that failed before writing anything)."""
    try:
        try:
            now, mine = os.stat(lock.path), os.fstat(lock.fd)
            if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                lock.path.unlink()
        except FileNotFoundError:
            pass
    finally:
        os.close(lock.fd)
    for folder in lock.created:
        try:
            folder.rmdir()
        except OSError:  # not empty: the run's files, or another run's since
            break
