"""The device of the device-aware tests, chosen by ``pytest --device cpu|cuda`` (conftest.py).

A test is device-aware when it takes the ``device`` fixture: it builds its tensors there. On
``cuda`` the Triton kernels run through the real compiler (``TRITON_INTERPRET=0``, set before
anything imports triton); on ``cpu`` (the default) through the interpreter.
"""
from __future__ import annotations

import os

import torch

DEVICE = torch.device("cpu")
UNAVAILABLE: str | None = None  # why --device cuda cannot run on this machine


def cuda_missing_reason() -> str | None:
    if torch.version.cuda is None:
        return f"CUDA is not available: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "CUDA is not available: torch sees no GPU (driver, CUDA_VISIBLE_DEVICES?)"
    return None


def configure(name: str) -> None:
    global DEVICE, UNAVAILABLE
    if name != "cuda":
        return
    UNAVAILABLE = cuda_missing_reason()
    if UNAVAILABLE is None:
        os.environ["TRITON_INTERPRET"] = "0"  # the real compiler; read when the kernels are first imported
        DEVICE = torch.device("cuda")
