"""Payload errors raised by :func:`fastseq.comm.decode`.

Every error is a :class:`PayloadError` (itself a :class:`ValueError`), so a server can
drop a bad update with one ``except PayloadError`` and log ``str(err)``, which always
says what is wrong and what was expected.
"""

from __future__ import annotations

__all__ = [
    "PayloadError",
    "TruncatedPayload",
    "CorruptedPayload",
    "OversizedPayload",
    "VersionMismatch",
    "UnknownCodec",
    "SchemaMismatch",
    "NonFiniteUpdate",
]


class PayloadError(ValueError):
    """Base class: the bytes received are not an acceptable fastseq update."""


class TruncatedPayload(PayloadError):
    """The blob ends before the lengths it declares (header length or tensor data)."""


class CorruptedPayload(PayloadError):
    """Unparsable blob, checksum mismatch, or a header inconsistent with its tensors."""


class OversizedPayload(PayloadError):
    """The blob (checked before parsing) or its decoded size exceeds the configured limit."""


class VersionMismatch(PayloadError):
    """The header's format version is not one this decoder understands."""


class UnknownCodec(PayloadError):
    """The header names a codec this decoder does not know."""


class SchemaMismatch(PayloadError):
    """Valid payload, but not the one expected (names, shapes, dtypes, round, method, ...)."""


class NonFiniteUpdate(PayloadError):
    """The decoded update contains NaN or Inf."""
