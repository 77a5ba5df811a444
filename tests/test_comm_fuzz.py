"""Property-based fuzzing of fastseq.comm.decode: any bytes in, either a valid Update
or a PayloadError out, never another exception, never a hang."""

from __future__ import annotations

import json
import struct

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fastseq.comm as C

FUZZ = settings(max_examples=300, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SMALL = settings(FUZZ, max_examples=150)


def _valid_blobs():
    g = torch.Generator().manual_seed(0)
    x = {"a": torch.randn(4, 33, generator=g), "b": torch.randn(5, generator=g).half(),
         "s": torch.tensor(2.0)}
    out = []
    for codec, kw in [("none", {}), ("bf16", {}), ("int8", {"block_size": 32}),
                      ("int8", {"double_quant": True, "block_size": 16}), ("nf4", {"block_size": 16}),
                      ("fp4", {"topk": 0.3}), ("int8", {"topk": 5, "stochastic": True, "seed": 0}),
                      ("nf4", {"double_quant": False, "topk": 0.5})]:
        out.append(C.encode(x, codec, round=1, client_id="c", method="scl", extra={"k": [1, 2]}, **kw))
    return out


VALID = _valid_blobs()
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


def check(blob):
    """decode() must return a consistent Update or raise PayloadError; nothing else."""
    try:
        upd = C.decode(blob, max_elements=1 << 20)
    except C.PayloadError as e:
        # every rejection must come from an explicit check, not from decode()'s last-resort
        # wrapper around an unexpected internal exception
        assert str(e) and not str(e).startswith("undecodable payload"), str(e)
        return None
    assert isinstance(upd, C.Update)
    assert upd.nbytes == len(blob)
    assert upd.header_nbytes + sum(upd.tensor_nbytes.values()) == len(blob)
    for ent in upd.header["tensors"]:
        t = upd.tensors[ent["name"]]
        assert list(t.shape) == ent["shape"]
        assert str(t.dtype) == "torch." + ent["dtype"]
        assert bool(torch.isfinite(t).all())
    return upd


def test_valid_blobs_decode():
    for b in VALID:
        assert check(b) is not None


OPS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]),
                         st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


def _mutate(blob, ops, limit=None):
    b = bytearray(blob)
    for op, pos, val in ops:
        n = len(b) if limit is None else min(len(b), limit)
        if n == 0:
            break
        p = pos % n
        if op == "flip":
            b[p] ^= 1 << (val % 8)
        elif op == "set":
            b[p] = val
        elif op == "insert":
            b.insert(p, val)
        else:
            del b[p]
    return bytes(b)


@FUZZ
@given(st.sampled_from(VALID), OPS)
def test_mutated_blobs(blob, ops):
    check(_mutate(blob, ops))


@FUZZ
@given(st.sampled_from(VALID), OPS)
def test_mutated_headers(blob, ops):
    # mutations inside the JSON header
    (hlen,) = struct.unpack("<Q", blob[:8])
    check(_mutate(blob, ops, limit=8 + hlen))


@FUZZ_SMALL
@given(st.sampled_from(VALID), st.integers(0, 1 << 20))
def test_truncated_blobs(blob, n):
    cut = blob[: n % len(blob)]
    try:
        C.decode(cut)
    except C.PayloadError:
        return
    raise AssertionError("a truncated blob decoded")


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    check(data)


@FUZZ_SMALL
@given(st.integers(0, 1 << 64 - 1) | st.integers(0, 300), st.binary(max_size=600))
def test_random_bytes_with_length_prefix(hlen, rest):
    check(struct.pack("<Q", hlen % (1 << 64)) + rest)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 10_000), JSON, st.booleans())
def test_semantic_header_fuzz(blob, which, value, delete):
    """Replace (or delete) one value anywhere in a valid fastseq header, checksum recomputed:
    the header checks themselves must hold."""
    h = C.read_header(blob)
    paths = [p for p in _paths(h) if p]
    _set_or_delete(h, paths[which % len(paths)], value, delete)
    try:
        meta = json.dumps(h)
        h["sha256"] = C.payload_digest(st_load(blob), h)
        meta = json.dumps(h)
    except (TypeError, ValueError):
        return
    check(st_save(st_load(blob), metadata={"fastseq": meta}))


def _set_or_delete(h: dict, path: tuple, value, delete: bool) -> None:
    """Replace (or delete) the value at ``path`` in a nested header, in place."""
    for k in path[:-1]:
        h = h[k]
    if delete:
        del h[path[-1]]
    else:
        h[path[-1]] = value


def _canonical(h):
    return json.dumps({k: v for k, v in h.items() if k != "sha256"}, sort_keys=True)


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 10_000), JSON, st.booleans())
def test_header_mutation_breaks_the_checksum(blob, which, value, delete):
    """Replace (or delete) any header value but the digest, keeping the old digest: decode
    must raise PayloadError (the header is under the sha256), never return an update."""
    h = C.read_header(blob)
    paths = [p for p in _paths(h) if p and p != ("sha256",)]
    path = paths[which % len(paths)]
    before = _canonical(h)
    _set_or_delete(h, path, value, delete)
    try:
        changed = _canonical(h) != before
        meta = json.dumps(h)
    except (TypeError, ValueError):
        return
    assume(changed)
    mutated = st_save(st_load(blob), metadata={"fastseq": meta})
    try:
        C.decode(mutated, max_elements=1 << 20)
    except C.PayloadError:
        return
    raise AssertionError(f"header change at {path} decoded")


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32,
           torch.int64, torch.float64]


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 100), st.sampled_from(_DTYPES), st.binary(max_size=512),
       st.booleans())
def test_stored_tensor_fuzz(blob, which, dtype, raw, same_shape):
    """Replace one stored tensor by arbitrary data (checksum recomputed): the codec checks must hold."""
    tens = st_load(blob)
    h = C.read_header(blob)
    name = sorted(tens)[which % len(tens)]
    item = torch.empty(0, dtype=dtype).element_size()
    raw = raw[: len(raw) // item * item]
    t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    if same_shape and t.numel() >= tens[name].numel():
        t = t[: tens[name].numel()].reshape(tens[name].shape)
    tens[name] = t.clone()
    h["sha256"] = C.payload_digest(tens, h)
    check(st_save(tens, metadata={"fastseq": json.dumps(h)}))


@FUZZ_SMALL
@given(st.dictionaries(st.text(max_size=6), JSON, max_size=5), st.binary(max_size=64))
def test_random_safetensors_table(table, data):
    hb = json.dumps(table).encode()
    check(struct.pack("<Q", len(hb)) + hb + data)
