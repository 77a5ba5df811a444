"""Codecs: lossy/lossless encodings of one flat fp32 vector into a few stored tensors.

A codec only maps values to tensors and back; it knows nothing about error feedback
(:mod:`fastseq.comm.feedback`) or transport (:mod:`fastseq.comm.wire`), following GRACE's
compressor / memory / communicator split.

Codecs (``get_codec(name, **params)``), with ``s`` the absmax of an element's block and
all bounds per element, for deterministic rounding:

* ``none``  raw values in the tensor's own dtype: exact.
* ``bf16``  round-to-nearest-even to bfloat16: ``|err| <= 2**-8 * |x|`` (normal range;
  below ~1.2e-38 the error is at most half a bf16 subnormal step, 2**-134).
* ``int8``  blockwise absmax (``block_size`` 256): ``q = round(127 * x / s)``,
  ``|err| <= s / 254``.
* ``nf4``   blockwise 4-bit NormalFloat (``block_size`` 64), bitsandbytes' code table and
  packing: ``|err| <= 0.1519 * s`` (half the widest gap of the table, -1 .. -0.6962).
* ``fp4``   blockwise 4-bit float (``block_size`` 64), bitsandbytes' table:
  ``|err| <= 0.1667 * s`` (half the widest gap, 2/3 .. 1).

Options for every quantizer (``int8``, ``nf4``, ``fp4``):

* ``double_quant`` (default on for nf4/fp4, off for int8): the fp32 block scales are
  themselves stored in 8 bits, in the log2 domain, per group of 256 scales (code 0 =
  zero scale, codes 1..255 evenly spaced between the group's smallest and largest
  log2 scale). The relative error of a scale is ``<= 2**(step/2) - 1`` with
  ``step = (log2 max - log2 min) / 254`` in its group (0.27% when the group's scales
  span a factor 4), which adds ``<= max|code| * (2**(step/2) - 1) * s`` to the bounds
  above. :meth:`Codec.error_bound` returns the exact per-element bound.
* ``stochastic`` (with ``seed``): unbiased stochastic rounding between the two
  neighbouring codes (also for ``bf16``); the bound becomes one full gap
  (``s / 127`` for int8, ``2 * 0.1519 * s`` resp. ``2 * 0.1667 * s`` for nf4/fp4,
  ``2**-7 * |x|`` for bf16).

``topk`` (any codec): keep only the ``k`` largest-magnitude elements (``topk`` a float
in (0, 1] is a fraction of the tensor, an int is a count), stored as int32 indices
(sorted) plus the kept values encoded by the codec; dropped elements decode to 0, so
their error is ``|x|``.

nf4/fp4 quantization uses ``bitsandbytes.functional.quantize_4bit`` when bitsandbytes is
installed (deterministic rounding, supported block sizes); otherwise, and always for
decoding and stochastic rounding, a pure-torch implementation of the same format.
Decoding never needs bitsandbytes.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch

from .errors import CorruptedPayload, UnknownCodec

__all__ = [
    "Codec",
    "CODECS",
    "get_codec",
    "NF4_CODE",
    "FP4_CODE",
    "DQ_GROUP",
]

# bitsandbytes' 4-bit code tables (index = 4-bit code), copied so decoding needs no bnb.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
    0.1666666716337204, 0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)
DQ_GROUP = 256  # scales per double-quantization group
MAX_BLOCK_SIZE = 1 << 20
_BNB_4BIT_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)

# unit roundoff and half the smallest subnormal of the low-precision output dtypes
_ROUNDOFF = {torch.bfloat16: (2.0**-8, 2.0**-134), torch.float16: (2.0**-11, 2.0**-25)}

CODECS = ("none", "bf16", "int8", "nf4", "fp4")


def _nblocks(n: int, bs: int) -> int:
    return (n + bs - 1) // bs


def _blocked(v: torch.Tensor, bs: int) -> torch.Tensor:
    n = v.numel()
    nb = _nblocks(n, bs)
    if nb * bs != n:
        v = torch.cat([v, v.new_zeros(nb * bs - n)])
    return v.view(nb, bs)


def _expand(s: torch.Tensor, bs: int, m: int) -> torch.Tensor:
    """Per-block scales -> per-element scales for m values (no padding allocation)."""
    if m == 0:
        return torch.zeros(0, dtype=torch.float32)
    return s.float()[torch.arange(m) // bs]


def _absmax(v: torch.Tensor, bs: int) -> torch.Tensor:
    b = _blocked(v, bs)
    if b.shape[0] == 0:
        return v.new_zeros(0)
    return b.abs().amax(dim=1)


# ----------------------------------------------------------------------------------------
# Scale (double) quantization: log2 domain, 8 bits, per group of DQ_GROUP scales.


def _dq_encode(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scales (>= 0) -> (uint8 codes [nb], fp32 meta [ngroups, 2] = (lo, step))."""
    nb = s.numel()
    ng = _nblocks(nb, DQ_GROUP)
    s64 = s.double()
    codes = torch.zeros(nb, dtype=torch.uint8)
    meta = torch.zeros(ng, 2, dtype=torch.float32)
    if nb == 0:
        return codes, meta
    g = _blocked(s64, DQ_GROUP)  # padded with zeros (= "zero scale", ignored)
    finite = torch.isfinite(g).all(dim=1)
    pos = (g > 0) & torch.isfinite(g)
    lg = torch.where(pos, torch.log2(torch.where(pos, g, torch.ones_like(g))), torch.zeros_like(g))
    inf = torch.full_like(lg, math.inf)
    lo = torch.where(pos, lg, inf).amin(dim=1)
    hi = torch.where(pos, lg, -inf).amax(dim=1)
    has = pos.any(dim=1)
    lo = torch.where(has, lo, torch.zeros_like(lo))
    hi = torch.where(has, hi, torch.zeros_like(hi))
    step = (hi - lo) / 254.0
    # what the decoder will see: fp32-rounded lo / step
    lo32 = lo.float()
    step32 = step.float()
    # a group with a non-finite scale decodes to NaN (so decode() rejects it)
    lo32 = torch.where(finite, lo32, torch.full_like(lo32, math.nan))
    meta[:, 0] = lo32
    meta[:, 1] = step32
    lo_d = lo32.double()[:, None]
    st_d = step32.double()[:, None]
    safe = torch.where(st_d > 0, st_d, torch.ones_like(st_d))
    c = torch.round((lg - torch.nan_to_num(lo_d)) / safe)
    c = torch.where(st_d > 0, c, torch.zeros_like(c)).clamp(0, 254) + 1
    c = torch.where(pos, c, torch.zeros_like(c))
    codes = c.reshape(-1)[:nb].to(torch.uint8)
    return codes, meta


def _dq_decode(codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    nb = codes.numel()
    if nb == 0:
        return torch.zeros(0, dtype=torch.float32)
    c = codes.long()
    gi = torch.arange(nb) // DQ_GROUP
    lo = meta[gi, 0].double()
    st = meta[gi, 1].double()
    s = torch.exp2(lo + (c - 1).double() * st)
    s = torch.where(c == 0, torch.zeros_like(s), s)
    # a NaN lo marks a group that had non-finite scales
    s = torch.where(torch.isnan(lo), torch.full_like(s, math.nan), s)
    return s.float()


def _dq_rel_bound(s: torch.Tensor) -> torch.Tensor:
    """Per-block bound on |s' - s| / s of the log-domain scale quantization."""
    _, meta = _dq_encode(s)
    nb = s.numel()
    gi = torch.arange(nb) // DQ_GROUP
    st = meta[gi, 1].double()
    # half a step, plus slack for fp32 rounding of lo/step/result and clamping
    return (torch.exp2(st / 2 + 256 * 2.0**-22 * (st + 1)) - 1 + 2.0**-22).float()


# ----------------------------------------------------------------------------------------


class Codec(abc.ABC):
    """One encoding of a flat fp32 vector into named stored tensors ("parts").

    ``encode_values(v) -> dict[role, Tensor]`` and ``decode_values(parts, m) -> Tensor``
    work on 1-D fp32 vectors of ``m`` values; :meth:`encode` / :meth:`decode` add
    top-k sparsification around them. :meth:`decode` validates every part (dtype and
    shape against ``numel``) and raises :class:`CorruptedPayload` on any inconsistency.
    """

    name = "?"
    max_code = 1.0  # largest |code| (scale multiplier) used by error_bound

    def __init__(self, *, topk: float | int | None = None, stochastic: bool = False,
                 seed: int | None = None):
        if topk is not None:
            if isinstance(topk, bool) or not isinstance(topk, (int, float)):
                raise TypeError(f"topk must be a float fraction in (0, 1] or an int count >= 1, got {topk!r}")
            if isinstance(topk, float) and not (0.0 < topk <= 1.0):
                raise ValueError(f"topk fraction must be in (0, 1], got {topk}")
            if isinstance(topk, int) and topk < 1:
                raise ValueError(f"topk count must be >= 1, got {topk}")
        self.topk = topk
        self.stochastic = bool(stochastic)
        self.seed = seed
        self._gen: torch.Generator | None = None
        if self.stochastic:
            self._gen = torch.Generator()
            if seed is None:
                self._gen.seed()
            else:
                self._gen.manual_seed(int(seed))

    # -- description -----------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """JSON-able parameters recorded in the wire header (enough to decode)."""
        return {"topk": self.topk, "stochastic": self.stochastic}

    @property
    def lossless(self) -> bool:
        """Whether decode(encode(x)) == x bit for bit (only ``none`` without top-k)."""
        return False

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"Codec({self.name!r}, {ps})"

    # -- top-k -----------------------------------------------------------------------
    def k_for(self, n: int) -> int:
        if self.topk is None or n == 0:
            return n
        if isinstance(self.topk, float):
            return min(n, max(1, math.ceil(self.topk * n)))
        return min(n, self.topk)

    def select(self, x: torch.Tensor) -> torch.Tensor | None:
        """Sorted int64 indices of the kept elements of flat ``x`` (None = all kept)."""
        n = x.numel()
        k = self.k_for(n)
        if self.topk is None or k >= n:
            return None
        mag = torch.nan_to_num(x.abs(), nan=math.inf)  # NaN is kept, so it is detected
        idx = torch.topk(mag, k, sorted=False).indices
        return torch.sort(idx).values

    # -- whole tensor ----------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Any-shape floating tensor -> parts (flat tensors keyed by role)."""
        flat = x.detach().reshape(-1)
        v = flat if self.name == "none" else flat.float()
        idx = self.select(v)
        if idx is None:
            return self.encode_values(v.contiguous())
        parts = self.encode_values(v[idx].contiguous())
        parts["idx"] = idx.to(torch.int32)
        return parts

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        """Parts -> flat fp32 vector of ``numel`` values (validated)."""
        if "idx" in parts:
            idx = parts["idx"]
            if idx.dtype != torch.int32 or idx.dim() != 1 or idx.numel() > numel:
                raise CorruptedPayload(
                    f"top-k indices: expected a 1-D int32 tensor of at most {numel} entries, "
                    f"got {idx.dtype} {list(idx.shape)}")
            m = idx.numel()
            if m:
                i64 = idx.long()
                if int(i64.min()) < 0 or int(i64.max()) >= numel:
                    raise CorruptedPayload(f"top-k indices out of range [0, {numel})")
                if m > 1 and not bool((i64[1:] > i64[:-1]).all()):
                    raise CorruptedPayload("top-k indices are not strictly increasing")
            rest = {k: v for k, v in parts.items() if k != "idx"}
            vals = self.decode_values(rest, m)
            out = torch.zeros(numel, dtype=torch.float32)
            if m:
                out[idx.long()] = vals.float()
            return out
        return self.decode_values(parts, numel).float()

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) in fp32 with x's shape (advances the stochastic generator)."""
        return self.decode(self.encode(x), x.numel()).view(x.shape)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound on |decode(encode(x)) - x| (fp32, x's shape), for finite x.

        Includes the final rounding to x's dtype when it is bf16 / fp16 (decoded tensors
        come back in their original dtype): ``+ u * (|x| + b)`` with ``u`` its unit
        roundoff, plus half its smallest subnormal.
        """
        flat = x.detach().reshape(-1).float()
        idx = self.select(flat)
        if idx is None:
            b = self.value_bound(flat)
        else:
            b = flat.abs().clone()
            b[idx] = self.value_bound(flat[idx].contiguous())
        if self.name != "none" and x.dtype in _ROUNDOFF:
            u, sub = _ROUNDOFF[x.dtype]
            b = b + (flat.abs() + b) * u + sub
        return b.view(x.shape)

    # -- per-codec -------------------------------------------------------------------
    @abc.abstractmethod
    def encode_values(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        ...

    @abc.abstractmethod
    def decode_values(self, parts: dict[str, torch.Tensor], m: int) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def value_bound(self, v: torch.Tensor) -> torch.Tensor:
        ...

    def roles(self, topk: bool) -> set[str]:
        r = set(self._roles())
        return r | {"idx"} if topk else r

    @abc.abstractmethod
    def _roles(self) -> tuple[str, ...]:
        ...

    def _check(self, parts: dict[str, torch.Tensor], spec: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        if set(parts) != set(spec):
            raise CorruptedPayload(
                f"codec {self.name}: expected parts {sorted(spec)}, got {sorted(parts)}")
        for role, (dt, shape) in spec.items():
            t = parts[role]
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise CorruptedPayload(
                    f"codec {self.name}: part {role!r} should be {str(dt).replace('torch.', '')} "
                    f"{list(shape)}, got {str(t.dtype).replace('torch.', '')} {list(t.shape)}")


class NoneCodec(Codec):
    """Raw values in the tensor's own dtype (fp32 for fp32 deltas). Exact: err = 0."""

    name = "none"

    @property
    def lossless(self) -> bool:
        return self.topk is None

    def params(self):
        return {"topk": self.topk}

    def encode_values(self, v):
        return {"v": v.contiguous()}

    def decode_values(self, parts, m):
        if set(parts) != {"v"}:
            raise CorruptedPayload(f"codec none: expected parts ['v'], got {sorted(parts)}")
        t = parts["v"]
        if not t.is_floating_point() or tuple(t.shape) != (m,):
            raise CorruptedPayload(
                f"codec none: part 'v' should be a floating tensor of shape [{m}], "
                f"got {t.dtype} {list(t.shape)}")
        return t

    def value_bound(self, v):
        return torch.zeros_like(v)

    def _roles(self):
        return ("v",)


class BF16Codec(Codec):
    """bfloat16 values: |err| <= 2**-8 |x| (round to nearest even; 2**-7 |x| stochastic)."""

    name = "bf16"

    def encode_values(self, v):
        if self.stochastic and v.numel():
            bits = v.view(torch.int32)
            r = torch.randint(0, 1 << 16, v.shape, generator=self._gen, dtype=torch.int32)
            rounded = ((bits + r) & -65536).view(torch.float32)
            v = torch.where(torch.isfinite(v), rounded, v)
            return {"v": v.to(torch.bfloat16)}
        return {"v": v.to(torch.bfloat16)}

    def _roles(self):
        return ("v",)

    def decode_values(self, parts, m):
        self._check(parts, {"v": (torch.bfloat16, (m,))})
        return parts["v"].float()

    def value_bound(self, v):
        rel = 2.0**-7 if self.stochastic else 2.0**-8
        return v.abs() * rel + 2.0**-133


class _BlockQuantizer(Codec):
    default_block = 256

    def __init__(self, *, block_size: int | None = None, double_quant: bool = False, **kw):
        super().__init__(**kw)
        bs = self.default_block if block_size is None else block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or not (1 <= bs <= MAX_BLOCK_SIZE):
            raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {bs!r}")
        self.block_size = bs
        self.double_quant = bool(double_quant)

    def params(self):
        p = super().params()
        p.update(block_size=self.block_size, double_quant=self.double_quant)
        return p

    # scales -------------------------------------------------------------------------
    def _scale_parts(self, s: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.double_quant:
            codes, meta = _dq_encode(s)
            return {"scale_q": codes, "scale_meta": meta}
        return {"scale": s.float().contiguous()}

    def _scale_spec(self, nb: int) -> dict:
        if self.double_quant:
            return {"scale_q": (torch.uint8, (nb,)),
                    "scale_meta": (torch.float32, (_nblocks(nb, DQ_GROUP), 2))}
        return {"scale": (torch.float32, (nb,))}

    def _scales(self, parts) -> torch.Tensor:
        if self.double_quant:
            return _dq_decode(parts["scale_q"], parts["scale_meta"])
        return parts["scale"]

    def _roles(self):
        return ("q", "scale_q", "scale_meta") if self.double_quant else ("q", "scale")

    @abc.abstractmethod
    def _half_gap(self) -> float:
        ...

    def value_bound(self, v):
        s = _absmax(v, self.block_size)
        per = self._half_gap() * (2.0 if self.stochastic else 1.0)
        b = s * per
        if self.double_quant:
            b = b + s * self.max_code * _dq_rel_bound(s) + s * per * _dq_rel_bound(s)
        b = b * (1 + 2.0**-20) + 1e-44
        return b.repeat_interleave(self.block_size)[: v.numel()]


class Int8Codec(_BlockQuantizer):
    """Blockwise absmax int8: q = round(127 x / s); |err| <= s/254 (s/127 stochastic)."""

    name = "int8"
    default_block = 256

    def _half_gap(self):
        return 0.5 / 127

    def encode_values(self, v):
        n = v.numel()
        bs = self.block_size
        b = _blocked(v, bs)
        s = b.abs().amax(dim=1) if b.shape[0] else v.new_zeros(0)
        y = b / torch.where(s > 0, s, torch.ones_like(s))[:, None] * 127.0
        if self.stochastic:
            u = torch.rand(y.shape, generator=self._gen)
            q = torch.floor(y + u)
        else:
            q = torch.round(y)
        q = torch.nan_to_num(q).clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
        out = {"q": q.contiguous()}
        out.update(self._scale_parts(s))
        return out

    def decode_values(self, parts, m):
        nb = _nblocks(m, self.block_size)
        spec = {"q": (torch.int8, (m,))}
        spec.update(self._scale_spec(nb))
        self._check(parts, spec)
        s = self._scales(parts)
        return (parts["q"].float() / 127.0) * _expand(s, self.block_size, m)


class FourBitCodec(_BlockQuantizer):
    """Blockwise 4-bit (nf4 / fp4, bitsandbytes tables, two codes per byte, high nibble first)."""

    default_block = 64

    def __init__(self, quant_type: str, *, block_size: int | None = None,
                 double_quant: bool = True, use_bnb: bool | None = None, **kw):
        super().__init__(block_size=block_size, double_quant=double_quant, **kw)
        self.name = quant_type
        table = NF4_CODE if quant_type == "nf4" else FP4_CODE
        self.table = torch.tensor(table, dtype=torch.float32)
        # sorted unique code values and, for each, a code index producing it
        uniq: dict[float, int] = {}
        for i, c in enumerate(table):
            uniq.setdefault(float(c) + 0.0, i)
        vals = sorted(uniq)
        self.sorted_vals = torch.tensor(vals, dtype=torch.float32)
        self.sorted_idx = torch.tensor([uniq[c] for c in vals], dtype=torch.uint8)
        self.mids = (self.sorted_vals[1:] + self.sorted_vals[:-1]) / 2
        self.zero_code = uniq[0.0]
        self.max_code = 1.0
        self._hg = float((self.sorted_vals[1:] - self.sorted_vals[:-1]).max()) / 2
        self.use_bnb = use_bnb

    def _half_gap(self):
        return self._hg

    def _codes_torch(self, y: torch.Tensor) -> torch.Tensor:
        if self.stochastic:
            sv = self.sorted_vals
            j = (torch.bucketize(y, sv, right=True) - 1).clamp_(0, sv.numel() - 2)
            lo, hi = sv[j], sv[j + 1]
            p = ((y - lo) / (hi - lo)).clamp_(0, 1)
            u = torch.rand(y.shape, generator=self._gen)
            j = j + (u < p).long()
        else:
            j = torch.bucketize(y, self.mids)
        return self.sorted_idx[j]

    def _try_bnb(self, v: torch.Tensor):
        if self.stochastic or self.use_bnb is False or self.block_size not in _BNB_4BIT_BLOCKS:
            return None
        if v.numel() == 0 or not bool(torch.isfinite(v).all()):
            return None
        try:
            import bitsandbytes.functional as bnbf  # optional
        except Exception:
            if self.use_bnb:
                raise ImportError("use_bnb=True needs bitsandbytes: pip install bitsandbytes")
            return None
        try:
            packed, state = bnbf.quantize_4bit(v, blocksize=self.block_size, quant_type=self.name,
                                               compress_statistics=False)
        except Exception:
            if self.use_bnb:
                raise
            return None
        return packed.reshape(-1).contiguous(), state.absmax.float().reshape(-1).contiguous()

    def encode_values(self, v):
        n = v.numel()
        got = self._try_bnb(v)
        if got is not None:
            packed, s = got
        else:
            b = _blocked(v, self.block_size)
            s = b.abs().amax(dim=1) if b.shape[0] else v.new_zeros(0)
            y = (b / torch.where(s > 0, s, torch.ones_like(s))[:, None]).reshape(-1)[:n]
            codes = self._codes_torch(torch.nan_to_num(y))
            if n % 2:
                codes = torch.cat([codes, torch.tensor([self.zero_code], dtype=torch.uint8)])
            packed = (codes[0::2] << 4) | codes[1::2]
        out = {"q": packed.to(torch.uint8).contiguous()}
        out.update(self._scale_parts(s))
        return out

    def decode_values(self, parts, m):
        nb = _nblocks(m, self.block_size)
        spec = {"q": (torch.uint8, ((m + 1) // 2,))}
        spec.update(self._scale_spec(nb))
        self._check(parts, spec)
        p = parts["q"]
        codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:m].long()
        vals = self.table[codes]
        return vals * _expand(self._scales(parts), self.block_size, m)


def get_codec(name: str | Codec = "none", **params) -> Codec:
    """Build a codec by name: ``none``, ``bf16``, ``int8``, ``nf4``, ``fp4``.

    Params: ``topk`` (all), ``stochastic``/``seed`` (bf16 and quantizers),
    ``block_size``/``double_quant`` (int8 default 256/False, nf4 and fp4 64/True),
    ``use_bnb`` (nf4/fp4: None = use bitsandbytes if installed).
    """
    if isinstance(name, Codec):
        if params:
            raise TypeError("pass codec parameters either in the Codec or as keywords, not both")
        return name
    if not isinstance(name, str) or name not in CODECS:
        raise UnknownCodec(f"unknown codec {name!r}; known codecs: {', '.join(CODECS)}")
    if name == "none":
        if params.pop("stochastic", False):
            raise ValueError("codec 'none' is exact: stochastic rounding does not apply")
        params.pop("seed", None)
        _no_extra(name, params, {"topk"})
        return NoneCodec(**params)
    if name == "bf16":
        _no_extra(name, params, {"topk", "stochastic", "seed"})
        return BF16Codec(**params)
    if name == "int8":
        _no_extra(name, params, {"topk", "stochastic", "seed", "block_size", "double_quant"})
        return Int8Codec(**params)
    _no_extra(name, params, {"topk", "stochastic", "seed", "block_size", "double_quant", "use_bnb"})
    return FourBitCodec(name, **params)


def _no_extra(name: str, params: dict, allowed: set[str]) -> None:
    extra = set(params) - allowed
    if extra:
        raise TypeError(f"codec {name!r} does not take {sorted(extra)}; it takes {sorted(allowed)}")
