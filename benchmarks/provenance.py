"""Where a benchmark number came from, and how result tables are written.

Every result file of ``benchmarks/`` and ``scripts/`` carries :func:`provenance`: the device and
its name, the versions of the libraries that shape the numbers, and the commit, marked
``+dirty`` when the measured code (``fastseq/``, ``benchmarks/``, ``scripts/``) had
uncommitted changes. :func:`write_results` writes one table as ``<stem>.csv`` and ``<stem>.json``.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MEASURED_CODE = ("fastseq", "benchmarks", "scripts")
VERSIONED = ("transformers", "peft", "triton", "bitsandbytes", "flwr")


def git_commit() -> str:
    """The commit (``+dirty`` with uncommitted changes to the measured code); outside a git
    checkout (an sdist, a copied working tree such as a lent GPU machine's) the one given in
    ``FASTSEQ_GIT_COMMIT``, else "unknown"."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no", "--", *MEASURED_CODE],
                                        cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        given = os.environ.get("FASTSEQ_GIT_COMMIT", "").strip()
        return f"{given} (given)" if given else "unknown"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(device: torch.device | str) -> dict:
    """The tags every result row or file carries."""
    return dict(device=torch.device(device).type, device_name=device_name(device), git_commit=git_commit(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **versions())


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """One row per dict; columns: the union of their keys, first-seen order."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_results(stem: str | Path, rows: list[dict], **extra) -> None:
    """``<stem>.csv`` (see :func:`write_csv`) and ``<stem>.json`` (``extra`` plus ``rows``)."""
    write_csv(f"{stem}.csv", rows)
    Path(f"{stem}.json").write_text(json.dumps(dict(extra, rows=rows), indent=1, default=str))

