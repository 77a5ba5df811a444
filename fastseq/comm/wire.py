"""Wire format: one safetensors blob per message, never pickle.

Layout (standard safetensors): 8-byte little-endian header length ``N``, ``N`` bytes of
JSON (tensor table + ``__metadata__``), then the raw tensor data. ``__metadata__`` holds
exactly one key, ``"fastseq"``, whose value is a JSON header::

    {"version": 2, "round": 3, "client_id": "7", "method": "scl", "direction": "up",
     "codec": {"name": "int8", "params": {"block_size": 256, ...}},
     "tensors": [{"name": "layers.0.C", "shape": [16, 5632], "dtype": "float32",
                  "parts": {"q": "0.q", "scale": "0.scale"}}, ...],
     "example_count": 120, "extra": {}, "sha256": "<hex>"}

``sha256`` covers the header (every field but ``sha256`` itself, as canonical JSON) and
every stored tensor (sorted by name: name, dtype, shape, data, each length-prefixed), so a
changed round, client id or tensor table is caught like a changed byte of data. Version 1
(whose digest left the header out) is refused. :func:`decode` parses the blob itself,
strictly, and raises only :class:`~fastseq.comm.errors.PayloadError` subclasses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from safetensors.torch import save as _st_save

from .codecs import CODECS, Codec, get_codec
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

__all__ = [
    "FORMAT_VERSION",
    "META_KEY",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "Expected",
    "Update",
    "encode",
    "decode",
    "read_header",
    "byte_breakdown",
    "payload_digest",
]

# 2: the sha256 covers the header fields too (version 1 covered the tensors only)
FORMAT_VERSION = 2
META_KEY = "fastseq"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB per message
DEFAULT_MAX_ELEMENTS = 1 << 28  # decoded values per message (1 GiB of fp32)
MAX_DIMS = 16

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_LOGICAL_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_STR = {v: k for k, v in _LOGICAL_DTYPES.items()}


def _dtype_str(dt: Any) -> str:
    if isinstance(dt, torch.dtype):
        if dt not in _DTYPE_STR:
            raise TypeError(f"unsupported dtype {dt}; expected one of {sorted(_LOGICAL_DTYPES)}")
        return _DTYPE_STR[dt]
    s = str(dt).replace("torch.", "")
    if s not in _LOGICAL_DTYPES:
        raise TypeError(f"unsupported dtype {dt!r}; expected one of {sorted(_LOGICAL_DTYPES)}")
    return s


def _digest_update(h, name: str, dtype_code: str, shape: list[int], data) -> None:
    nb = name.encode("utf-8")
    meta = (dtype_code + json.dumps(list(shape))).encode("ascii")
    h.update(struct.pack("<Q", len(nb)))
    h.update(nb)
    h.update(struct.pack("<Q", len(meta)))
    h.update(meta)
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _header_bytes(header: Mapping[str, Any]) -> bytes:
    """The header as the digest sees it: every field but ``sha256``, canonical JSON (sorted
    keys, no whitespace, ASCII), so the same header always hashes the same however it was
    written."""
    fields = {k: v for k, v in header.items() if k != "sha256"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _new_digest(header: Mapping[str, Any]):
    h = hashlib.sha256()
    hb = _header_bytes(header)
    h.update(struct.pack("<Q", len(hb)))
    h.update(hb)
    return h


def payload_digest(stored: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> str:
    """sha256 (hex) as the header's ``sha256`` field defines it: the length-prefixed
    canonical JSON of ``header`` without its ``sha256`` field, then the stored tensors sorted
    by name; for each, length-prefixed name, dtype code + shape, and raw little-endian data."""
    h = _new_digest(header)
    for sname in sorted(stored):
        p = stored[sname]
        if p.dtype not in _ST_NAMES:
            raise TypeError(f"stored tensor {sname!r}: dtype {p.dtype} cannot go on the wire")
        _digest_update(h, sname, _ST_NAMES[p.dtype], list(p.shape), _tensor_bytes(p))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------


@dataclass
class Expected:
    """What the receiver expects; every field left None is not checked.

    ``tensors``: name -> (shape, dtype) (dtype may be None = any floating dtype); the
    names must match exactly. ``codecs``: allowed codec names. ``max_bytes`` /
    ``max_elements`` tighten the limits of :func:`decode`.
    """

    tensors: Mapping[str, tuple] | None = None
    round: int | None = None
    method: str | None = None
    client_id: str | None = None
    direction: str | None = None
    codecs: tuple[str, ...] | list[str] | set[str] | None = None
    max_bytes: int | None = None
    max_elements: int | None = None

    @classmethod
    def coerce(cls, e: "Expected | Mapping | None") -> "Expected":
        if e is None:
            return cls()
        if isinstance(e, Expected):
            return e
        if isinstance(e, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            bad = set(e) - names
            if bad:
                raise TypeError(f"unknown Expected fields {sorted(bad)}; known: {sorted(names)}")
            return cls(**e)
        raise TypeError(f"expected must be an Expected, a dict or None, not {type(e).__name__}")


@dataclass
class Update:
    """A decoded, validated message.

    ``tensors``: name -> tensor with the original shape and dtype; ``header``: the JSON
    header (dict); ``nbytes``: ``len(blob)``; ``tensor_nbytes``: stored bytes attributed
    to each logical tensor; ``header_nbytes``: the rest (length prefix + JSON header).
    """

    tensors: dict[str, torch.Tensor]
    header: dict[str, Any]
    nbytes: int
    tensor_nbytes: dict[str, int] = field(default_factory=dict)
    header_nbytes: int = 0

    @property
    def round(self) -> int:
        return self.header["round"]

    @property
    def client_id(self) -> str:
        return self.header["client_id"]

    @property
    def method(self) -> str:
        return self.header["method"]

    @property
    def direction(self) -> str:
        return self.header["direction"]

    @property
    def example_count(self) -> int:
        return self.header["example_count"]

    @property
    def extra(self) -> dict:
        return self.header["extra"]

    @property
    def codec(self) -> str:
        return self.header["codec"]["name"]

    @property
    def full(self) -> bool:
        return bool(self.header["extra"].get("full", False))


# ----------------------------------------------------------------------------------------


def encode(tensors: Mapping[str, torch.Tensor], codec: str | Codec = "none", *, round: int = 0,
           client_id: str = "", method: str = "", direction: str = "up", example_count: int = 0,
           extra: Mapping[str, Any] | None = None, **codec_params) -> bytes:
    """Encode named floating tensors into one safetensors blob (bytes).

    ``codec`` is a name (``none``, ``bf16``, ``int8``, ``nf4``, ``fp4``; ``codec_params``
    go to :func:`~fastseq.comm.codecs.get_codec`) or a :class:`Codec`.
    """
    c = get_codec(codec, **codec_params)
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise ValueError(f"round must be an int >= 0, got {round!r}")
    if not isinstance(example_count, int) or isinstance(example_count, bool) or example_count < 0:
        raise ValueError(f"example_count must be an int >= 0, got {example_count!r}")
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    extra = dict(extra or {})
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON-serializable: {e}") from None
    stored: dict[str, torch.Tensor] = {}
    entries = []
    for i, (name, t) in enumerate(tensors.items()):
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"tensor {name!r} must be a floating torch.Tensor")
        dt = _dtype_str(t.dtype)
        parts = c.encode(t.detach().cpu())
        refs = {}
        for role, p in parts.items():
            sname = f"{i}.{role}"
            stored[sname] = p.contiguous()
            refs[role] = sname
        entries.append({"name": name, "shape": list(t.shape), "dtype": dt, "parts": refs})
    header = {
        "version": FORMAT_VERSION, "round": round, "client_id": str(client_id),
        "method": str(method), "direction": direction,
        "codec": {"name": c.name, "params": c.params()},
        "tensors": entries, "example_count": example_count, "extra": extra,
    }
    header["sha256"] = payload_digest(stored, header)
    return _st_save(stored, metadata={META_KEY: json.dumps(header, separators=(",", ":"))})


# ----------------------------------------------------------------------------------------
# parsing (strict, bounded)


def _parse_container(blob, limit: int):
    """-> (buffer, data_start, table {name: (dtype_code, shape, begin, end)}, metadata)."""
    if isinstance(blob, memoryview):
        blob = blob.tobytes()
    if not isinstance(blob, (bytes, bytearray)):
        raise CorruptedPayload(f"payload must be bytes, got {type(blob).__name__}")
    n = len(blob)
    if n > limit:
        raise OversizedPayload(f"payload is {n} bytes, over the limit of {limit} bytes")
    if n < 8:
        raise TruncatedPayload(f"payload is {n} bytes; a safetensors blob needs at least 8")
    (hlen,) = struct.unpack_from("<Q", blob, 0)
    if hlen > n - 8:
        raise TruncatedPayload(
            f"header length field says {hlen} bytes but only {n - 8} bytes follow it")
    try:
        raw = json.loads(bytes(blob[8:8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptedPayload(f"safetensors header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CorruptedPayload("safetensors header must be a JSON object")
    meta = raw.pop("__metadata__", None)
    if meta is None:
        raise CorruptedPayload(f"not a fastseq payload: no __metadata__ (expected key {META_KEY!r})")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptedPayload("__metadata__ must map str to str")
    if META_KEY not in meta:
        raise CorruptedPayload(f"not a fastseq payload: __metadata__ lacks key {META_KEY!r}")
    data_len = n - 8 - hlen
    table = {}
    for name, ent in raw.items():
        if not isinstance(ent, dict) or set(ent) != {"dtype", "shape", "data_offsets"}:
            raise CorruptedPayload(f"stored tensor {name!r}: bad entry (need dtype, shape, data_offsets)")
        dt, shape, offs = ent["dtype"], ent["shape"], ent["data_offsets"]
        if not isinstance(dt, str) or dt not in _ST_DTYPES:
            raise CorruptedPayload(f"stored tensor {name!r}: unknown dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise CorruptedPayload(f"stored tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int and o >= 0 for o in offs) or offs[0] > offs[1]):
            raise CorruptedPayload(f"stored tensor {name!r}: bad data_offsets {offs!r}")
        numel = math.prod(shape)
        itemsize = torch.empty(0, dtype=_ST_DTYPES[dt]).element_size()
        if offs[1] - offs[0] != numel * itemsize:
            raise CorruptedPayload(
                f"stored tensor {name!r}: {dt} {shape} needs {numel * itemsize} bytes, "
                f"data_offsets span {offs[1] - offs[0]}")
        table[name] = (dt, shape, offs[0], offs[1])
    pos = 0
    for name, (_, _, b, e) in sorted(table.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if b != pos:
            raise CorruptedPayload(f"stored tensor {name!r}: data starts at {b}, expected {pos} "
                                   "(gap or overlap in the data section)")
        pos = e
    if pos > data_len:
        raise TruncatedPayload(f"tensor data needs {pos} bytes but only {data_len} are present")
    if pos < data_len:
        raise CorruptedPayload(f"{data_len - pos} unexpected trailing bytes after the tensor data")
    return blob, 8 + hlen, table, meta


def _is_int(x) -> bool:
    return type(x) is int


def _parse_header(meta: dict) -> dict:
    try:
        h = json.loads(meta[META_KEY])
    except (ValueError, RecursionError) as e:
        raise CorruptedPayload(f"fastseq header is not valid JSON: {e}") from None
    if not isinstance(h, dict):
        raise CorruptedPayload("fastseq header must be a JSON object")
    if "version" not in h or not _is_int(h["version"]):
        raise CorruptedPayload(f"fastseq header has no integer 'version' (expected {FORMAT_VERSION})")
    if h["version"] == 1:
        raise VersionMismatch(
            f"payload format version 1 comes from an older fastseq (its checksum left the header out); "
            f"this decoder reads version {FORMAT_VERSION} only: run the same fastseq version on the server "
            f"and every client")
    if h["version"] != FORMAT_VERSION:
        raise VersionMismatch(
            f"payload format version {h['version']}, this decoder reads version {FORMAT_VERSION}: run the "
            f"same fastseq version on the server and every client")
    need = {"round": int, "client_id": str, "method": str, "direction": str, "codec": dict,
            "tensors": list, "example_count": int, "extra": dict, "sha256": str}
    for k, typ in need.items():
        if k not in h:
            raise CorruptedPayload(f"fastseq header lacks field {k!r}")
        v = h[k]
        if (typ is int and not _is_int(v)) or not isinstance(v, typ):
            raise CorruptedPayload(f"fastseq header field {k!r} should be {typ.__name__}, got {v!r:.80}")
    if h["round"] < 0 or h["example_count"] < 0:
        raise CorruptedPayload("fastseq header: round and example_count must be >= 0")
    if h["direction"] not in ("up", "down"):
        raise CorruptedPayload(f"fastseq header: direction must be 'up' or 'down', got {h['direction']!r:.40}")
    codec = h["codec"]
    if not isinstance(codec.get("name"), str) or not isinstance(codec.get("params"), dict):
        raise CorruptedPayload("fastseq header: codec must be {'name': str, 'params': dict}")
    if codec["name"] not in CODECS:
        raise UnknownCodec(f"unknown codec {codec['name']!r:.60}; known codecs: {', '.join(CODECS)}")
    return h


def _codec_from_header(codec: dict) -> Codec:
    name, params = codec["name"], dict(codec["params"])
    allowed = {"none": {"topk"}, "bf16": {"topk", "stochastic"}}.get(
        name, {"topk", "stochastic", "block_size", "double_quant"})
    bad = set(params) - allowed
    if bad:
        raise CorruptedPayload(f"codec {name}: unexpected params {sorted(bad)} (allowed {sorted(allowed)})")
    # stochastic only matters when encoding; decode deterministically, without a generator
    params.pop("stochastic", None)
    if "double_quant" in params and not isinstance(params["double_quant"], bool):
        raise CorruptedPayload("codec params: double_quant must be a bool")
    if name in ("nf4", "fp4"):
        params["use_bnb"] = False
    try:
        return get_codec(name, **params)
    except (TypeError, ValueError) as e:
        raise CorruptedPayload(f"codec {name}: invalid params {codec['params']!r:.200}: {e}") from None


def _check_expected(h: dict, exp: Expected) -> None:
    for k in ("round", "method", "client_id", "direction"):
        want = getattr(exp, k)
        if want is not None and h[k] != want:
            raise SchemaMismatch(f"{k} is {h[k]!r:.80}, expected {want!r}")
    if exp.codecs is not None and h["codec"]["name"] not in set(exp.codecs):
        raise SchemaMismatch(
            f"codec {h['codec']['name']!r} not accepted here; allowed: {sorted(set(exp.codecs))}")


def read_header(blob, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Parse and return the fastseq header without checking the checksum or decoding."""
    try:
        _, _, _, meta = _parse_container(blob, max_bytes)
        return _parse_header(meta)
    except PayloadError:
        raise
    except Exception as e:  # defensive: nothing but PayloadError escapes
        raise CorruptedPayload(f"unreadable payload: {type(e).__name__}: {e}") from None


def decode(blob, expected: Expected | Mapping | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
           max_elements: int = DEFAULT_MAX_ELEMENTS) -> Update:
    """Validate and decode a blob made by :func:`encode`.

    Raises only :class:`PayloadError` subclasses for bad input: ``OversizedPayload``
    (checked before parsing), ``TruncatedPayload``, ``CorruptedPayload``,
    ``VersionMismatch``, ``UnknownCodec``, ``SchemaMismatch`` (vs ``expected``),
    ``NonFiniteUpdate``. A malformed ``expected`` argument raises TypeError.
    """
    exp = Expected.coerce(expected)
    limit = max_bytes if exp.max_bytes is None else min(max_bytes, exp.max_bytes)
    elimit = max_elements if exp.max_elements is None else min(max_elements, exp.max_elements)
    exp_tensors = None
    if exp.tensors is not None:
        exp_tensors = {}
        for k, spec in exp.tensors.items():
            shape, dt = (spec, None) if isinstance(spec, torch.Size) else tuple(spec)
            exp_tensors[k] = ([int(d) for d in shape], None if dt is None else _dtype_str(dt))
    try:
        return _decode(blob, exp, exp_tensors, limit, elimit)
    except PayloadError:
        raise
    except Exception as e:  # defensive: nothing but PayloadError escapes
        raise CorruptedPayload(f"undecodable payload: {type(e).__name__}: {e}") from None


def _decode(blob, exp: Expected, exp_tensors, limit: int, elimit: int) -> Update:
    buf, data_start, table, meta = _parse_container(blob, limit)
    h = _parse_header(meta)
    # checksum over the header (all but sha256) and the stored tensors
    try:
        hsh = _new_digest(h)
    except (ValueError, RecursionError) as e:  # NaN/Infinity or nesting encode() would never write
        raise CorruptedPayload(f"fastseq header holds a value JSON cannot carry: {e}") from None
    mv = memoryview(buf)
    for sname in sorted(table):
        dt, shape, b, e = table[sname]
        _digest_update(hsh, sname, dt, shape, mv[data_start + b:data_start + e])
    if hsh.hexdigest() != h["sha256"]:
        raise CorruptedPayload(
            f"checksum mismatch: header says sha256 {h['sha256'][:16]:.16}..., payload hashes to "
            f"{hsh.hexdigest()[:16]}... (header or data corrupted in transit?)")
    _check_expected(h, exp)
    codec = _codec_from_header(h["codec"])
    # logical tensors: names, shapes, dtypes, parts
    entries = h["tensors"]
    seen_names: set[str] = set()
    used: set[str] = set()
    total = 0
    plan = []
    for ent in entries:
        if not isinstance(ent, dict) or set(ent) != {"name", "shape", "dtype", "parts"}:
            raise CorruptedPayload("header tensor entry must have exactly name, shape, dtype, parts")
        name, shape, dt, parts = ent["name"], ent["shape"], ent["dtype"], ent["parts"]
        if not isinstance(name, str) or name in seen_names:
            raise CorruptedPayload(f"header tensor name {name!r:.80} is not a str or is duplicated")
        seen_names.add(name)
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and d >= 0 for d in shape)):
            raise CorruptedPayload(f"tensor {name!r}: bad shape {shape!r:.80}")
        if not isinstance(dt, str) or dt not in _LOGICAL_DTYPES:
            raise CorruptedPayload(f"tensor {name!r}: unsupported dtype {dt!r:.40}")
        if not isinstance(parts, dict) or not all(isinstance(v, str) for v in parts.values()):
            raise CorruptedPayload(f"tensor {name!r}: parts must map role to stored tensor name")
        numel = math.prod(shape)
        total += numel
        if total > elimit:
            raise OversizedPayload(
                f"decoded update would hold more than {elimit} values (limit max_elements)")
        for role, sname in parts.items():
            if sname not in table:
                raise CorruptedPayload(f"tensor {name!r}: part {role!r} refers to missing stored tensor {sname!r:.80}")
            if sname in used:
                raise CorruptedPayload(f"stored tensor {sname!r} is used twice")
            used.add(sname)
        plan.append((name, shape, dt, parts, numel))
    if used != set(table):
        raise CorruptedPayload(f"stored tensors not described by the header: {sorted(set(table) - used)[:5]}")
    if exp_tensors is not None:
        if set(exp_tensors) != seen_names:
            missing = sorted(set(exp_tensors) - seen_names)[:5]
            unexpected = sorted(seen_names - set(exp_tensors))[:5]
            raise SchemaMismatch(f"tensor names differ from expected: missing {missing}, unexpected {unexpected}")
        for name, shape, dt, _, _ in plan:
            eshape, edt = exp_tensors[name]
            if list(shape) != eshape:
                raise SchemaMismatch(f"tensor {name!r}: shape {shape}, expected {eshape}")
            if edt is not None and dt != edt:
                raise SchemaMismatch(f"tensor {name!r}: dtype {dt}, expected {edt}")
    out: dict[str, torch.Tensor] = {}
    tnbytes: dict[str, int] = {}
    for name, shape, dt, parts, numel in plan:
        ptensors = {}
        nb = 0
        for role, sname in parts.items():
            sdt, sshape, b, e = table[sname]
            raw = bytearray(mv[data_start + b:data_start + e])
            nb += e - b
            t = (torch.frombuffer(raw, dtype=_ST_DTYPES[sdt]) if raw
                 else torch.empty(0, dtype=_ST_DTYPES[sdt]))
            ptensors[role] = t.reshape(sshape)
        if set(ptensors) not in (codec.roles(False), codec.roles(True)):
            raise CorruptedPayload(
                f"tensor {name!r}: codec {codec.name} needs parts {sorted(codec.roles(False))} "
                f"(+ 'idx' with top-k), got {sorted(ptensors)}")
        flat = codec.decode(ptensors, numel)
        if flat.numel() != numel:  # codec.decode validated; belt and braces
            raise CorruptedPayload(f"tensor {name!r}: decoded {flat.numel()} values, header says {numel}")
        t = flat.reshape(shape).to(_LOGICAL_DTYPES[dt])
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteUpdate(f"tensor {name!r}: {bad} of {numel} decoded values are NaN/Inf "
                                  "(expected all finite)")
        out[name] = t
        tnbytes[name] = nb
    nbytes = len(buf)
    return Update(tensors=out, header=h, nbytes=nbytes, tensor_nbytes=tnbytes,
                  header_nbytes=nbytes - sum(tnbytes.values()))


def byte_breakdown(blob, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """Exact byte attribution of a blob: ``{"total", "header", "tensors": {name: bytes}}``.

    ``total == len(blob) == header + sum(tensors.values())``; ``header`` is the 8-byte
    length prefix plus the JSON header (tensor table and fastseq metadata).
    """
    try:
        buf, data_start, table, meta = _parse_container(blob, max_bytes)
        h = _parse_header(meta)
        per: dict[str, int] = {}
        for ent in h["tensors"]:
            if not isinstance(ent, dict) or not isinstance(ent.get("parts"), dict):
                raise CorruptedPayload("header tensor entry without parts")
            nb = 0
            for sname in ent["parts"].values():
                if sname not in table:
                    raise CorruptedPayload(f"part refers to missing stored tensor {sname!r:.80}")
                nb += table[sname][3] - table[sname][2]
            per[str(ent.get("name"))] = per.get(str(ent.get("name")), 0) + nb
    except PayloadError:
        raise
    except Exception as e:
        raise CorruptedPayload(f"unreadable payload: {type(e).__name__}: {e}") from None
    total = len(buf)
    return {"total": total, "header": total - sum(per.values()), "tensors": per,
            "round": h["round"], "client_id": h["client_id"], "direction": h["direction"]}
