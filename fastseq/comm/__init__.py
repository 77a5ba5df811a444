"""fastseq.comm: compressed, validated, byte-counted messages (tensors and bytes only).

* :func:`encode` / :func:`decode`: one safetensors blob per message (see :mod:`.wire`).
* Codecs (:func:`get_codec`): ``none``, ``bf16``, ``int8``, ``nf4``, ``fp4``, with top-k,
  stochastic rounding and double quantization options (see :mod:`.codecs`).
* :class:`ErrorFeedback` (per-client residual memory), :class:`DownlinkState` /
  :func:`apply_downlink` (server -> client deltas), :class:`ByteCounter` (accounting).
* Every decoding error is a :class:`PayloadError` (a ValueError).

Imports only torch, numpy (via torch), safetensors and, lazily and optionally, bitsandbytes.
"""

from .accounting import ByteCounter
from .codecs import CODECS, FP4_CODE, NF4_CODE, Codec, get_codec
from .errors import (
    CorruptedPayload,
    NonFiniteUpdate,
    OversizedPayload,
    PayloadError,
    SchemaMismatch,
    TruncatedPayload,
    UnknownCodec,
    VersionMismatch,
)
from .feedback import DownlinkState, ErrorFeedback, apply_downlink
from .wire import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ELEMENTS,
    FORMAT_VERSION,
    META_KEY,
    Expected,
    Update,
    byte_breakdown,
    decode,
    payload_digest,
    encode,
    read_header,
)

__all__ = [
    "encode", "decode", "read_header", "byte_breakdown", "payload_digest", "Expected", "Update",
    "Codec", "get_codec", "CODECS", "NF4_CODE", "FP4_CODE",
    "ErrorFeedback", "DownlinkState", "apply_downlink", "ByteCounter",
    "PayloadError", "TruncatedPayload", "CorruptedPayload", "OversizedPayload",
    "VersionMismatch", "UnknownCodec", "SchemaMismatch", "NonFiniteUpdate",
    "FORMAT_VERSION", "META_KEY", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_ELEMENTS",
]
