"""Wire format of fastseq.comm: header, validation errors, byte sizes, compression ratios."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open  # noqa: F401  (the blob is a standard safetensors file)
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fastseq.comm as C


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.C": torch.randn(16, 300, generator=g),
        "layers.0.E": torch.randn(300, 16, generator=g),
        "head.bias": torch.randn(7, generator=g).bfloat16(),
    }


def rebuild(blob, header_fn=None, tensors_fn=None, fix_hash=True, metadata=None):
    """Re-save a valid blob with a modified header and/or stored tensors."""
    st = st_load(blob)
    h = C.read_header(blob)
    if tensors_fn is not None:
        st = tensors_fn(st)
    if header_fn is not None:
        h = header_fn(h) or h
    if fix_hash:
        h["sha256"] = C.payload_digest(st, h)
    meta = metadata if metadata is not None else {"fastseq": json.dumps(h)}
    return st_save(st, metadata=meta)


def _set(path, value):
    def fn(h):
        d = h
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return h
    return fn


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("codec", ["none", "bf16", "int8", "nf4", "fp4"])
def test_header_and_roundtrip(codec):
    x = _tensors()
    blob = C.encode(x, codec, round=3, client_id="client-7", method="scl", direction="up",
                    example_count=120, extra={"loss": 0.5, "tags": ["a"]})
    assert isinstance(blob, bytes)
    # a standard safetensors file whose metadata holds exactly one key
    (hlen,) = struct.unpack("<Q", blob[:8])
    raw = json.loads(blob[8:8 + hlen])
    assert list(raw["__metadata__"]) == ["fastseq"]
    st_load(blob)
    upd = C.decode(blob, {"round": 3, "method": "scl", "client_id": "client-7", "direction": "up",
                          "codecs": [codec],
                          "tensors": {k: (tuple(v.shape), v.dtype) for k, v in x.items()}})
    h = upd.header
    assert h["version"] == C.FORMAT_VERSION == 2 and h["round"] == 3 and h["client_id"] == "client-7"
    assert h["method"] == "scl" and h["direction"] == "up" and h["example_count"] == 120
    assert h["extra"] == {"loss": 0.5, "tags": ["a"]}
    assert h["codec"]["name"] == codec and isinstance(h["codec"]["params"], dict)
    assert [t["name"] for t in h["tensors"]] == list(x)
    assert len(h["sha256"]) == 64
    assert upd.nbytes == len(blob)
    assert upd.header_nbytes + sum(upd.tensor_nbytes.values()) == len(blob)
    assert (upd.round, upd.client_id, upd.method, upd.example_count, upd.codec) == (3, "client-7", "scl", 120, codec)
    for k, v in x.items():
        assert upd.tensors[k].dtype == v.dtype and upd.tensors[k].shape == v.shape


def test_odd_inputs_roundtrip():
    x = {"ünïcode/name": torch.tensor(1.5), "empty": torch.zeros(0, 3), "one": torch.ones(1)}
    for codec in ("none", "int8", "nf4"):
        upd = C.decode(C.encode(x, codec))
        assert set(upd.tensors) == set(x)
        assert upd.tensors["empty"].shape == (0, 3)
        assert upd.tensors["ünïcode/name"].shape == ()
    upd = C.decode(C.encode({}))
    assert upd.tensors == {}


def test_encode_argument_errors():
    with pytest.raises(ValueError):
        C.encode({"a": torch.ones(2)}, direction="sideways")
    with pytest.raises(ValueError):
        C.encode({"a": torch.ones(2)}, round=-1)
    with pytest.raises(ValueError):
        C.encode({"a": torch.ones(2)}, extra={"x": object()})
    with pytest.raises(TypeError):
        C.decode(C.encode({"a": torch.ones(2)}), {"rund": 1})


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def blob():
    return C.encode(_tensors(), "int8", round=2, client_id="c", method="scl", example_count=5)


def test_truncated(blob):
    for n in (0, 5, 8, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(C.TruncatedPayload):
            C.decode(blob[:n])
    with pytest.raises(C.TruncatedPayload, match="bytes"):
        C.decode(blob[:-100])


def test_bitflip_checksum(blob):
    b = bytearray(blob)
    b[-50] ^= 0x01
    with pytest.raises(C.CorruptedPayload, match="checksum"):
        C.decode(bytes(b))
    with pytest.raises(C.CorruptedPayload, match="checksum"):
        C.decode(rebuild(blob, fix_hash=False, tensors_fn=lambda st: {**st, "0.q": -st["0.q"]}))


def _v1_blob(tensors, **header):
    """A blob as fastseq's format version 1 wrote it: the digest over the stored tensors only."""
    import hashlib

    blob = C.encode(tensors, "int8", **header)
    st, h = st_load(blob), C.read_header(blob)
    digest = hashlib.sha256()
    for name in sorted(st):
        t = st[name]
        meta = ({torch.float32: "F32", torch.int8: "I8", torch.uint8: "U8"}[t.dtype] + json.dumps(list(t.shape))).encode()
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for part in (name.encode(), meta, data):
            digest.update(struct.pack("<Q", len(part)) + part)
    h.update(version=1, sha256=digest.hexdigest())
    return st_save(st, metadata={"fastseq": json.dumps(h)})


@pytest.mark.parametrize("path,value", [
    (("round",), 4), (("client_id",), "client-8"), (("method",), "fedavg-lora"), (("direction",), "down"),
    (("example_count",), 121), (("extra", "loss"), 0.25), (("tensors", 0, "name"), "layers.0.X"),
    (("codec", "params", "block_size"), 128),
])
def test_checksum_covers_the_header(blob, path, value):
    """Every header field is under the sha256: a changed field with the old digest is corrupt."""
    with pytest.raises(C.CorruptedPayload, match="checksum"):
        C.decode(rebuild(blob, _set(path, value), fix_hash=False))


def test_header_change_with_a_matching_digest_decodes(blob):
    upd = C.decode(rebuild(blob, _set(("round",), 4), fix_hash=True))
    assert upd.round == 4


def test_checksum_ignores_header_formatting(blob):
    """The digest is over the header's canonical JSON: key order and whitespace do not matter."""
    h = C.read_header(blob)
    reordered = json.dumps(dict(reversed(list(h.items()))), indent=2)
    C.decode(st_save(st_load(blob), metadata={"fastseq": reordered}))


def test_version_1_is_refused_clearly():
    x = _tensors()
    old = _v1_blob(x, round=3, client_id="7", method="scl")
    with pytest.raises(C.VersionMismatch, match="version 1 comes from an older fastseq.*same fastseq version"):
        C.decode(old)
    # the helper writes what version 1 wrote: relabelled as version 2, only the digest is off
    (hlen,) = struct.unpack("<Q", old[:8])
    h = json.loads(json.loads(old[8:8 + hlen])["__metadata__"]["fastseq"])
    h["version"] = 2
    relabelled = st_save(st_load(old), metadata={"fastseq": json.dumps(h)})
    with pytest.raises(C.CorruptedPayload, match="checksum"):
        C.decode(relabelled)
    C.decode(rebuild(relabelled, fix_hash=True))


def test_oversized_checked_before_parsing(blob):
    with pytest.raises(C.OversizedPayload, match=str(len(blob) - 1)):
        C.decode(blob, max_bytes=len(blob) - 1)
    with pytest.raises(C.OversizedPayload):
        C.decode(blob, C.Expected(max_bytes=100))
    # garbage over the limit is rejected for its size, without being parsed
    with pytest.raises(C.OversizedPayload):
        C.decode(b"\xff" * 5000, max_bytes=4096)
    C.decode(blob, max_bytes=len(blob))


def test_decoded_size_bomb_is_refused(blob):
    small = C.encode({"w": torch.ones(10)}, "none", topk=1)
    bomb = rebuild(small, _set(("tensors", 0, "shape"), [1 << 20, 1 << 20]))
    with pytest.raises(C.OversizedPayload, match="max_elements"):
        C.decode(bomb)
    with pytest.raises(C.OversizedPayload):
        C.decode(blob, max_elements=1000)


def test_version_mismatch(blob):
    with pytest.raises(C.VersionMismatch, match="version 3"):
        C.decode(rebuild(blob, _set(("version",), 3)))
    with pytest.raises(C.CorruptedPayload, match="version"):
        C.decode(rebuild(blob, _set(("version",), "1")))


def test_unknown_codec(blob):
    with pytest.raises(C.UnknownCodec, match="int3"):
        C.decode(rebuild(blob, _set(("codec", "name"), "int3")))
    with pytest.raises(C.SchemaMismatch, match="not accepted"):
        C.decode(blob, {"codecs": ["nf4", "none"]})
    with pytest.raises(C.CorruptedPayload):
        C.decode(rebuild(blob, _set(("codec", "params", "block_size"), -4)))


@pytest.mark.parametrize("field,value", [
    ("round", 3), ("method", "fedavg-lora"), ("client_id", "d"), ("direction", "down"),
])
def test_schema_mismatch_header_fields(blob, field, value):
    with pytest.raises(C.SchemaMismatch, match=field):
        C.decode(blob, {field: value})


def test_schema_mismatch_tensors(blob):
    x = _tensors()
    good = {k: (tuple(v.shape), v.dtype) for k, v in x.items()}
    C.decode(blob, {"tensors": good})
    with pytest.raises(C.SchemaMismatch, match="missing"):
        C.decode(blob, {"tensors": {**good, "extra.w": ((3,), torch.float32)}})
    renamed = dict(good)
    renamed["layers.0.X"] = renamed.pop("layers.0.C")
    with pytest.raises(C.SchemaMismatch, match="layers.0.X"):
        C.decode(blob, {"tensors": renamed})
    with pytest.raises(C.SchemaMismatch, match="shape"):
        C.decode(blob, {"tensors": {**good, "layers.0.C": ((300, 16), torch.float32)}})
    with pytest.raises(C.SchemaMismatch, match="dtype"):
        C.decode(blob, {"tensors": {**good, "head.bias": ((7,), torch.float32)}})
    # dtype None = any; a torch.Size alone is accepted too
    C.decode(blob, C.Expected(tensors={**good, "head.bias": ((7,), None), "layers.0.E": torch.Size([300, 16])}))


def test_nonfinite():
    for codec in ("none", "bf16", "int8", "nf4", "fp4"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = torch.randn(300)
            x[17] = bad
            with pytest.raises(C.NonFiniteUpdate, match="NaN/Inf"):
                C.decode(C.encode({"w": x}, codec))
    # top-k keeps NaN rather than silently dropping it
    x = torch.randn(300)
    x[5] = float("nan")
    with pytest.raises(C.NonFiniteUpdate):
        C.decode(C.encode({"w": x}, "int8", topk=3))
    # finite fp32 values that overflow the declared fp16 dtype
    b = C.encode({"w": torch.ones(4)}, "none")
    big = rebuild(b, _set(("tensors", 0, "dtype"), "float16"),
                  tensors_fn=lambda st: {"0.v": torch.full((4,), 1e6)})
    with pytest.raises(C.NonFiniteUpdate):
        C.decode(big)
    # a crafted NaN scale
    b = C.encode({"w": torch.randn(100)}, "int8")
    nan_scale = rebuild(b, tensors_fn=lambda st: {**st, "0.scale": torch.tensor([float("nan")])})
    with pytest.raises(C.NonFiniteUpdate):
        C.decode(nan_scale)


def test_garbage_and_non_bytes():
    for g in (b"", b"hello world, definitely not safetensors", bytes(range(256)) * 4,
              b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"):
        with pytest.raises(C.PayloadError):
            C.decode(g)
    with pytest.raises(C.CorruptedPayload, match="JSON"):
        C.decode(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at al}")
    for obj in (None, "a string", 12, [1, 2]):
        with pytest.raises(C.PayloadError):
            C.decode(obj)
    # a plain safetensors file (no fastseq metadata)
    with pytest.raises(C.CorruptedPayload, match="fastseq"):
        C.decode(st_save({"w": torch.ones(3)}))
    # deep JSON nesting must not escape as RecursionError
    deep = b"[" * 100000 + b"]" * 100000
    with pytest.raises(C.CorruptedPayload):
        C.decode(struct.pack("<Q", len(deep)) + deep)


def test_header_not_json(blob):
    with pytest.raises(C.CorruptedPayload, match="not valid JSON"):
        C.decode(rebuild(blob, metadata={"fastseq": "{this is not json"}))
    with pytest.raises(C.CorruptedPayload, match="JSON object"):
        C.decode(rebuild(blob, metadata={"fastseq": "[1, 2, 3]"}))
    with pytest.raises(C.CorruptedPayload, match="lacks field"):
        C.decode(rebuild(blob, metadata={"fastseq": json.dumps({"version": C.FORMAT_VERSION})}))


def test_header_lying_about_shapes(blob):
    # numel inconsistent with the stored codes
    with pytest.raises(C.CorruptedPayload, match="part 'q'"):
        C.decode(rebuild(blob, _set(("tensors", 0, "shape"), [32, 300])))
    with pytest.raises(C.CorruptedPayload):
        C.decode(rebuild(blob, _set(("tensors", 0, "shape"), [-16, 300])))
    with pytest.raises(C.CorruptedPayload):
        C.decode(rebuild(blob, _set(("tensors", 0, "shape"), "16x300")))
    # parts pointing at a missing / another tensor's stored data
    with pytest.raises(C.CorruptedPayload, match="missing"):
        C.decode(rebuild(blob, _set(("tensors", 0, "parts", "q"), "9.q")))
    with pytest.raises(C.CorruptedPayload):
        C.decode(rebuild(blob, _set(("tensors", 0, "parts", "q"), "1.q")))
    # a stored tensor the header does not describe
    with pytest.raises(C.CorruptedPayload, match="not described"):
        C.decode(rebuild(blob, tensors_fn=lambda st: {**st, "zz": torch.ones(2)}))
    # the safetensors table itself lying about a shape (offsets no longer match)
    (hlen,) = struct.unpack("<Q", blob[:8])
    raw = json.loads(blob[8:8 + hlen])
    raw["0.q"]["shape"] = [raw["0.q"]["shape"][0] * 2]
    hb = json.dumps(raw).encode()
    with pytest.raises(C.CorruptedPayload, match="data_offsets"):
        C.decode(struct.pack("<Q", len(hb)) + hb + blob[8 + hlen:])


def test_topk_index_tampering():
    b = C.encode({"w": torch.randn(100)}, "none", topk=5)
    for idx in ([0, 1, 2, 3, 100], [-1, 1, 2, 3, 4], [3, 3, 4, 5, 6], [5, 4, 3, 2, 1]):
        bad = rebuild(b, tensors_fn=lambda st, idx=idx: {**st, "0.idx": torch.tensor(idx, dtype=torch.int32)})
        with pytest.raises(C.CorruptedPayload, match="indices"):
            C.decode(bad)
    bad = rebuild(b, tensors_fn=lambda st: {**st, "0.idx": st["0.idx"].long()})
    with pytest.raises(C.CorruptedPayload, match="int32"):
        C.decode(bad)


def test_all_errors_are_valueerrors():
    for cls in (C.TruncatedPayload, C.CorruptedPayload, C.OversizedPayload, C.VersionMismatch,
                C.UnknownCodec, C.SchemaMismatch, C.NonFiniteUpdate):
        assert issubclass(cls, C.PayloadError) and issubclass(cls, ValueError)


# ----------------------------------------------------------------------------- bytes


def test_byte_count_equals_blob_size():
    x = _tensors()
    for codec in ("none", "bf16", "int8", "nf4", "fp4"):
        blob = C.encode(x, codec)
        bd = C.byte_breakdown(blob)
        assert bd["total"] == len(blob)
        assert bd["header"] + sum(bd["tensors"].values()) == len(blob)
        upd = C.decode(blob)
        assert upd.tensor_nbytes == bd["tensors"] and upd.header_nbytes == bd["header"]
    # exact sizes for the raw codec: values only
    bd = C.byte_breakdown(C.encode(x, "none"))
    assert bd["tensors"] == {"layers.0.C": 16 * 300 * 4, "layers.0.E": 300 * 16 * 4, "head.bias": 7 * 2}


def test_compression_ratios_tinyllama_scl():
    """22 layers, f=5632, r=16: C [16, 5632] and E [5632, 16] per layer (3.96M floats)."""
    g = torch.Generator().manual_seed(0)
    x = {}
    for i in range(22):
        x[f"model.layers.{i}.mlp.scl.compress.weight"] = torch.randn(16, 5632, generator=g) * 1e-3
        x[f"model.layers.{i}.mlp.scl.expand.weight"] = torch.randn(5632, 16, generator=g) * 1e-3
    raw = sum(t.numel() * 4 for t in x.values())
    sizes = {c: len(C.encode(x, c)) for c in ("none", "bf16", "int8", "nf4", "fp4")}
    sizes["int8+topk10%"] = len(C.encode(x, "int8", topk=0.1))
    ratios = {c: raw / n for c, n in sizes.items()}
    print("\nfp32 payload %d bytes; compression vs fp32 (scales + header included):" % raw)
    for c, r in ratios.items():
        print(f"  {c:14s} {sizes[c]:>10d} bytes  {r:6.2f}x")
    assert sizes["none"] > raw  # fp32 plus the header
    assert ratios["bf16"] > 1.99
    assert ratios["int8"] >= 3.8
    assert ratios["nf4"] >= 6.5
    assert ratios["fp4"] >= 6.5
    assert ratios["int8+topk10%"] >= 7.5
