"""Third-party messages that say nothing to a fastseq user, silenced one by one where they arise.

* bitsandbytes' CPU backend, imported (by PEFT or a quantized load) on a CPU with AVX512-BF16,
  tries a Hub kernel package and logs "Failed to load CPU gemm_4bit_forward from
  kernels-community ... pip install kernels" when it is absent; bitsandbytes then uses its own
  kernel. Only that message of that logger is dropped.
* PEFT asks a transformers 5 model ``is_gradient_checkpointing``, which warns (FutureWarning) that
  the name is deprecated: PEFT's to change, not the user's. Ignored around ``get_peft_model``.
* transformers' LOAD REPORT lists the task head as MISSING whenever a backbone checkpoint is
  loaded for a task: fastseq adds that head and trains it on purpose. The report is held back
  while the model loads and passed on unless only heads differ from the checkpoint (a missing
  or mismatched backbone weight still shows it).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator

log = logging.getLogger("fastseq.models")

BNB_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes_kernel_notice() -> None:
    """Drop bitsandbytes' kernels-community notice; call before anything imports bitsandbytes
    (it is logged at import). Idempotent."""
    logger = logging.getLogger(BNB_KERNELS_LOGGER)
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice(BNB_KERNELS_NOTICE))


@contextlib.contextmanager
def quiet_peft_gradient_checkpointing_notice() -> Iterator[None]:
    """Ignore transformers' ``is_gradient_checkpointing`` deprecation warning for the body."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


class _HoldReports(logging.Filter):
    # transformers 5 logs one "<Class> LOAD REPORT" record; 4.x "Some weights of ..." records
    MARKS = ("LOAD REPORT", "Some weights of")

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if any(m in str(record.msg) for m in self.MARKS):
            self.held.append(record)
            return False
        return True


def only_heads_differ(model: Any, info: dict) -> bool:
    """Whether every key transformers reported (missing, unexpected, mismatched) lies outside the
    backbone: the new task head, or another task's head dropped from the checkpoint."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if base is None or info.get("error_msgs") or info.get("conversion_errors"):
        return False
    # a key names the backbone by its prefix (the model's naming) or by one of its parts (a
    # checkpoint saved from the backbone alone)
    backbone = {prefix} | {n for n, _ in base.named_children()} | {n for n, _ in base.named_parameters(recurse=False)}
    keys = [*info.get("missing_keys", ()), *info.get("unexpected_keys", ()),
            *(m[0] for m in info.get("mismatched_keys", ()))]
    return all(str(k).split(".", 1)[0] not in backbone for k in keys)


@contextlib.contextmanager
def held_load_report() -> Iterator[_HoldReports]:
    """Hold transformers' load reports for the body (a ``from_pretrained`` with
    ``output_loading_info=True``); the caller calls :func:`pass_on` with what to do. On an error
    the reports are passed on: they may explain it."""
    logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldReports()
    logger.addFilter(hold)
    try:
        yield hold
    except BaseException:
        logger.removeFilter(hold)
        pass_on(hold, keep=True)
        raise
    logger.removeFilter(hold)


def pass_on(hold: _HoldReports, keep: bool) -> None:
    """Log the held reports (``keep``) or drop them."""
    logger = logging.getLogger("transformers.modeling_utils")
    for record in hold.held if keep else ():
        logger.handle(record)
    hold.held.clear()
