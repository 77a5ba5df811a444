"""Codecs, error feedback, downlink state and byte accounting of fastseq.comm."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fastseq.comm as C
from fastseq.comm.codecs import DQ_GROUP, FP4_CODE, NF4_CODE

try:
    import bitsandbytes.functional as bnbf  # noqa: F401

    HAVE_BNB = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_BNB = False


def _adversarial():
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "random": r(1000),
        "matrix": r(16, 300),
        "zeros": torch.zeros(513),
        "const": torch.full((257,), 3.25),
        "neg_const": torch.full((70,), -1e-3),
        "huge": r(300) * 1e30,
        "tiny": r(300) * 1e-30,
        "mixed_mag": torch.cat([r(300) * 1e30, r(300) * 1e-30, r(300)]),
        "odd": r(1001),
        "odd_small": r(65),
        "scalar": torch.tensor(-2.5),
        "one": torch.tensor([0.7]),
        "empty": torch.zeros(0, 4),
        "bf16": r(333).bfloat16(),
        "fp16": (r(10, 33) * 100).half(),
        "f64": r(50).double(),
        "spiky": torch.where(torch.arange(1000) % 97 == 0, torch.tensor(1e4), torch.tensor(1e-4)),
    }


CONFIGS = [
    ("none", {}),
    ("none", {"topk": 0.1}),
    ("bf16", {}),
    ("bf16", {"stochastic": True, "seed": 0}),
    ("bf16", {"topk": 7}),
    ("int8", {}),
    ("int8", {"block_size": 64}),
    ("int8", {"double_quant": True}),
    ("int8", {"stochastic": True, "seed": 3}),
    ("int8", {"topk": 0.05}),
    ("int8", {"topk": 0.25, "stochastic": True, "seed": 5, "double_quant": True}),
    ("nf4", {}),
    ("nf4", {"double_quant": False}),
    ("nf4", {"block_size": 128, "use_bnb": False}),
    ("nf4", {"stochastic": True, "seed": 1}),
    ("nf4", {"topk": 0.1}),
    ("fp4", {}),
    ("fp4", {"double_quant": False, "block_size": 32}),
    ("fp4", {"topk": 3, "stochastic": True, "seed": 2}),
]


def _ids(cfg):
    name, kw = cfg
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_roundtrip_within_stated_bound(cfg):
    name, kw = cfg
    codec = C.get_codec(name, **kw)
    xs = _adversarial()
    blob = C.encode(xs, codec, round=1)
    upd = C.decode(blob)
    assert list(upd.tensors) == list(xs)
    for k, x in xs.items():
        y = upd.tensors[k]
        assert y.dtype == x.dtype and y.shape == x.shape, k
        assert torch.isfinite(y).all(), k
        err = (y.double() - x.double()).abs()
        bound = codec.error_bound(x).double()
        if x.dtype == torch.float64:  # float64 values are carried as fp32 by every codec
            bound = bound + x.abs().double() * 2.0**-24 if name != "none" else bound
        assert bool((err <= bound).all()), (k, float((err - bound).max()))
        if name == "none" and x.dtype != torch.float64 and "topk" not in kw:
            assert torch.equal(y, x), k


def _block_absmax(x: torch.Tensor, bs: int) -> torch.Tensor:
    v = x.reshape(-1).float()
    nb = math.ceil(v.numel() / bs)
    v = torch.cat([v, v.new_zeros(nb * bs - v.numel())]).view(nb, bs)
    return v.abs().amax(1).repeat_interleave(bs)[: x.numel()].view(x.shape)


@pytest.mark.parametrize("key", ["random", "odd", "huge", "tiny", "mixed_mag", "spiky", "const"])
def test_stated_scalar_bounds_independently(key):
    """The docstring figures, checked against an independent absmax computation."""
    x = _adversarial()[key].float()
    slack = 1 + 1e-5
    # int8: |err| <= s / 254 (deterministic), <= s / 127 (stochastic)
    for bs in (256, 100):
        y = C.get_codec("int8", block_size=bs).roundtrip(x)
        s = _block_absmax(x, bs)
        assert bool(((y - x).abs() <= s / 254 * slack + 1e-44).all())
        y = C.get_codec("int8", block_size=bs, stochastic=True, seed=0).roundtrip(x)
        assert bool(((y - x).abs() <= s / 127 * slack + 1e-44).all())
    # nf4 / fp4 without double quant: half the widest gap of the table
    s = _block_absmax(x, 64)
    for name, half_gap in (("nf4", 0.1519), ("fp4", 0.16667)):
        y = C.get_codec(name, double_quant=False).roundtrip(x)
        assert bool(((y - x).abs() <= s * half_gap * slack + 1e-44).all()), name
    # bf16: relative 2**-8
    y = C.get_codec("bf16").roundtrip(x)
    assert bool(((y - x).abs() <= x.abs() * 2.0**-8).all())


def test_4bit_tables_and_half_gaps():
    assert max(b - a for a, b in zip(sorted(NF4_CODE), sorted(NF4_CODE)[1:])) / 2 == pytest.approx(0.15190, abs=1e-4)
    assert max(b - a for a, b in zip(sorted(FP4_CODE), sorted(FP4_CODE)[1:])) / 2 == pytest.approx(1 / 6, abs=1e-6)


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes not installed")
def test_4bit_tables_match_bitsandbytes_and_paths_agree():
    import bitsandbytes.functional as F

    assert torch.equal(F.get_4bit_type("nf4", device="cpu").float(), torch.tensor(NF4_CODE))
    assert torch.equal(F.get_4bit_type("fp4", device="cpu").float(), torch.tensor(FP4_CODE))
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(0))
    for name in ("nf4", "fp4"):
        for dq in (False, True):
            a = C.get_codec(name, use_bnb=True, double_quant=dq)
            b = C.get_codec(name, use_bnb=False, double_quant=dq)
            # same values (bnb may pick the -0 code where the torch path picks +0 for fp4)
            assert torch.equal(a.roundtrip(x), b.roundtrip(x)), (name, dq)
            # and bnb's own dequantization agrees with our pure-torch decoder
            if not dq:
                q, st = F.quantize_4bit(x, blocksize=64, quant_type=name, compress_statistics=False)
                ref = F.dequantize_4bit(q, st).reshape(-1)
                assert torch.allclose(b.roundtrip(x), ref, rtol=1e-6, atol=1e-7)


def test_double_quant_scale_error_is_relative():
    # scales spanning a factor ~4 inside a group: relative scale error <= 2**(step/2) - 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 512, generator=g) * (1 + 3 * torch.rand(64 * 512, generator=g))
    a = C.get_codec("nf4", double_quant=True).roundtrip(x)
    b = C.get_codec("nf4", double_quant=False).roundtrip(x)
    assert float((a - b).abs().max()) < 0.02 * float(x.abs().max())
    # one huge and one tiny block in the same group: the tiny block is not wiped out
    y = torch.cat([torch.randn(64, generator=g) * 1e30, torch.randn(64, generator=g) * 1e-30])
    z = C.get_codec("int8", block_size=64, double_quant=True).roundtrip(y)
    assert float(((z - y).abs()[64:] / y[64:].abs().max()).max()) < 0.5
    assert DQ_GROUP == 256


def test_topk_exact_k_largest():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 25, generator=g)
    for topk, k in ((0.1, 100), (37, 37), (1.0, 1000), (5000, 1000)):
        for name in ("none", "bf16"):
            y = C.get_codec(name, topk=topk).roundtrip(x)
            nz = y.reshape(-1) != 0
            assert int(nz.sum()) == k, (topk, name)
            kept = x.reshape(-1).abs()[nz]
            dropped = x.reshape(-1).abs()[~nz]
            if dropped.numel():
                assert float(kept.min()) >= float(dropped.max())
            assert torch.equal(torch.sort(x.reshape(-1).abs().topk(k).indices).values, nz.nonzero().reshape(-1))
    # composable: top-k then int8 of the kept values
    y = C.get_codec("int8", topk=0.1).roundtrip(x)
    assert int((y != 0).sum()) <= 100
    assert int((y != 0).sum()) >= 95


def test_topk_wire_layout():
    x = {"w": torch.randn(1000)}
    blob = C.encode(x, "int8", topk=0.1)
    st = st_load(blob)
    assert st["0.idx"].dtype == torch.int32 and st["0.idx"].numel() == 100
    assert st["0.q"].dtype == torch.int8 and st["0.q"].numel() == 100


@pytest.mark.parametrize("name", ["int8", "nf4", "fp4", "bf16"])
def test_stochastic_rounding_unbiased(name):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, generator=g)
    x[0] = 4.0  # absmax fixed, so the grid is the same every time
    codec = C.get_codec(name, stochastic=True, seed=123)
    n = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(n):
        acc += codec.roundtrip(x).double()
    mean_err = (acc / n - x.double()).abs()
    det_err = (C.get_codec(name).roundtrip(x).double() - x.double()).abs()
    step = {"int8": 4.0 / 127, "nf4": 4.0 * 0.3038, "fp4": 4.0 * 0.3334}.get(name)
    if step is None:
        step = float(x.abs().max()) * 2.0**-7
    # std of one stochastic draw <= step / 2; of the mean <= step / 2 / sqrt(n)
    assert float(mean_err.max()) <= 5 * step / 2 / math.sqrt(n)
    assert float(mean_err.mean()) < float(det_err.mean()) / 3


def test_stochastic_seed_reproducible():
    x = {"w": torch.randn(3000)}
    a = C.encode(x, "int8", stochastic=True, seed=9)
    b = C.encode(x, "int8", stochastic=True, seed=9)
    c = C.encode(x, "int8", stochastic=True, seed=10)
    assert a == b and a != c


def test_codec_parameter_validation():
    with pytest.raises(C.UnknownCodec):
        C.get_codec("int3")
    with pytest.raises(ValueError):
        C.get_codec("int8", block_size=0)
    with pytest.raises(ValueError):
        C.get_codec("int8", topk=1.5)
    with pytest.raises(ValueError):
        C.get_codec("int8", topk=0)
    with pytest.raises(TypeError):
        C.get_codec("bf16", block_size=64)
    with pytest.raises(TypeError):
        C.encode({"a": torch.ones(2)}, C.get_codec("int8"), block_size=4)
    with pytest.raises(TypeError):
        C.encode({"a": torch.ones(2, dtype=torch.int64)}, "none")


# ------------------------------------------------------------------------- error feedback


def _ef_run(codec, rounds=200, n=4096, feedback=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ef = C.ErrorFeedback()
    true_sum = torch.zeros(n, dtype=torch.float64)
    dec_sum = torch.zeros(n, dtype=torch.float64)
    drift, res = [], []
    for r in range(rounds):
        delta = {"w": torch.randn(n, generator=g) * 0.01}
        true_sum += delta["w"].double()
        if feedback:
            blob = ef.encode(delta, codec, round=r, client_id="c0")
        else:
            blob = C.encode(delta, codec, round=r, client_id="c0")
        dec_sum += C.decode(blob).tensors["w"].double()
        drift.append(float((true_sum - dec_sum).norm()))
        res.append(ef.residual_norm())
    return drift, res, ef


@pytest.mark.parametrize("codec", [
    C.get_codec("int8"), C.get_codec("nf4"), C.get_codec("none", topk=0.05),
    C.get_codec("int8", topk=0.1),
], ids=["int8", "nf4", "topk5%", "int8-topk10%"])
def test_error_feedback_bounded_drift(codec):
    drift, res, _ = _ef_run(codec)
    drift_nf, _, _ = _ef_run(codec, feedback=False)
    one_delta = 0.01 * math.sqrt(4096)
    # with feedback the drift IS the residual (telescoping sum), and it stays bounded
    assert abs(drift[-1] - res[-1]) < 1e-3 * max(1.0, drift[-1])
    assert max(drift[100:]) < 1.5 * max(drift[:100]) + 1e-9
    assert max(drift) < (6 if codec.topk else 0.5) * one_delta
    assert drift[-1] <= drift_nf[-1]
    if codec.topk:
        assert drift[-1] < 0.25 * drift_nf[-1], (drift[-1], drift_nf[-1])


def test_error_feedback_state_dict_roundtrip():
    codec = C.get_codec("int8", topk=0.2)
    _, _, ef = _ef_run(codec, rounds=5, n=500)
    state = ef.state_dict()
    assert set(state) == {"w"} and state["w"].dtype == torch.float32
    restored = C.ErrorFeedback()
    restored.load_state_dict(st_load(st_save(state)))
    d = {"w": torch.randn(500)}
    assert ef.encode(d, codec, round=5) == restored.encode(d, codec, round=5)
    assert torch.equal(ef.state_dict()["w"], restored.state_dict()["w"])
    with pytest.raises(ValueError):
        ef.compensate({"w": torch.randn(3)})


# ------------------------------------------------------------------------- downlink


def test_downlink_deltas_track_global_state():
    g = torch.Generator().manual_seed(5)
    shapes = {"a": (16, 200), "b": (200, 16), "bias": (200,)}
    glob = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    server = C.DownlinkState("int8", full_codec="none")
    client = {}
    blob = server.encode_for("c1", glob, round=0, method="scl")
    upd = C.decode(blob, {"client_id": "c1", "direction": "down", "round": 0})
    assert upd.full and upd.header["extra"]["full"] is True
    client = C.apply_downlink(client, upd)
    for k in glob:
        assert torch.equal(client[k], glob[k])
    for r in range(1, 30):
        glob = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in glob.items()}
        blob = server.encode_for("c1", glob, round=r)
        upd = C.decode(blob)
        assert not upd.full and upd.header["direction"] == "down"
        client = C.apply_downlink(client, upd)
        known = server.client_state("c1")
        for k in glob:
            # the server knows exactly what the client holds ...
            assert torch.equal(client[k], known[k])
            # ... and it stays within one int8 step of the global state: no accumulation
            s = (glob[k] - known[k]).abs().max()
            assert float(s) <= 0.05 * 5 / 127
    # a second client starts with the full state; forgetting re-sends the full state
    assert C.decode(server.encode_for("c2", glob, round=30)).full
    server.forget("c1")
    assert C.decode(server.encode_for("c1", glob, round=30)).full


def test_apply_downlink_rejects_unknown_names():
    upd = C.decode(C.encode({"x": torch.ones(2)}, direction="down", extra={"full": False}))
    with pytest.raises(C.SchemaMismatch):
        C.apply_downlink({"y": torch.ones(2)}, upd)
    with pytest.raises(C.SchemaMismatch):
        C.apply_downlink({"x": torch.ones(3)}, upd)
    out = C.apply_downlink({"x": torch.ones(2, dtype=torch.bfloat16)}, upd)
    assert out["x"].dtype == torch.bfloat16 and torch.equal(out["x"].float(), torch.full((2,), 2.0))


# ------------------------------------------------------------------------- accounting


def test_byte_counter_exact():
    ctr = C.ByteCounter()
    g = torch.Generator().manual_seed(0)
    sizes = {}
    for r in range(2):
        for cid in ("a", "b"):
            t = {"C": torch.randn(16, 100, generator=g), "E": torch.randn(100, 16, generator=g)}
            blob = C.encode(t, "int8", round=r, client_id=cid, direction="up")
            bd = C.byte_breakdown(blob)
            assert bd["total"] == len(blob) == bd["header"] + sum(bd["tensors"].values())
            assert ctr.record(blob) == len(blob)
            sizes[(r, cid, "up")] = len(blob)
            down = C.encode(t, "nf4", round=r, client_id=cid, direction="down")
            ctr.record(C.decode(down))  # an Update counts the same as its blob
            sizes[(r, cid, "down")] = len(down)
    ctr.record(b"garbage", round=1, client_id="b", direction="up")
    with pytest.raises(C.PayloadError):
        ctr.record(b"garbage")
    s0 = ctr.summary(0, per_tensor=True)
    assert s0["uplink_bytes"] == sizes[(0, "a", "up")] + sizes[(0, "b", "up")]
    assert s0["downlink_bytes"] == sizes[(0, "a", "down")] + sizes[(0, "b", "down")]
    assert s0["clients"]["a"]["uplink_bytes"] == sizes[(0, "a", "up")]
    assert s0["uplink_messages"] == 2
    assert sum(s0["uplink_tensor_bytes"].values()) + s0["uplink_header_bytes"] == s0["uplink_bytes"]
    # two clients, each 1600 int8 codes + 7 fp32 block scales for "C"
    assert s0["uplink_tensor_bytes"]["C"] == 2 * (1600 + 7 * 4)
    s1 = ctr.summary(1)
    assert s1["uplink_rejected_bytes"] == 7 and s1["clients"]["b"]["rejected_bytes"] == 7
    tot = ctr.totals()
    assert tot["total_bytes"] == sum(sizes.values())
    assert ctr.rounds() == [0, 1]


def test_works_without_bitsandbytes(monkeypatch):
    """nf4/fp4 fall back to the pure-torch path (same format) when bitsandbytes is missing."""
    import sys

    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    with_default = {n: C.get_codec(n).roundtrip(x) for n in ("nf4", "fp4", "int8")}
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    for n, ref in with_default.items():
        c = C.get_codec(n)
        assert torch.equal(c.roundtrip(x), ref), n
        assert C.decode(C.encode({"w": x}, c)).tensors["w"].shape == x.shape
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        C.get_codec("nf4", use_bnb=True).encode(x)
