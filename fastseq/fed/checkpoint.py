"""Atomic checkpoint I/O: safetensors for tensors, json for the rest (never pickle)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .._atomic import atomic_write_bytes


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True).encode())


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None, fsync: bool = True) -> None:
    """Write ``path`` atomically (tmp file + os.replace). ``fsync=False`` leaves flushing it to disk
    to the caller (per-client state: :func:`.state_store.fsync_files` flushes a round's files at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata or {}))
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def split_prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries of ``tensors`` whose key starts with ``prefix + '/'``, with the prefix removed."""
    p = prefix + "/"
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def join_prefixed(**groups: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, ts in groups.items():
        for k, v in ts.items():
            out[f"{prefix}/{k}"] = v
    return out
