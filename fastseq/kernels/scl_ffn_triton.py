"""Triton kernels of the SCL FFN and their ``torch.autograd.Function`` (levels 1 and 2).

Kernels (one config under ``TRITON_INTERPRET=1``, ``triton.autotune`` over several on CUDA;
the list is chosen when this module is imported):

1. ``_ffn_in_kernel``: the frozen input GEMM(s) ``x Wg^T``/``x Wu^T`` (or ``x W1^T``) with
   bias and the activation product ``h = act(g) * u`` fused in the epilogue. The same kernel
   is the fused *backward* of the input side: with ``BACKWARD`` it recomputes ``g, u`` (level
   2, GEMMs redone) or loads them (level 1), adds the rank-r term ``dh = dy Wd + dp C`` in the
   epilogue and writes ``dg = dh * u * act'(g)``, ``du = dh * act(g)`` (plain: ``da``) and
   ``h`` (needed for ``dC = dp^T h``).
2. ``_lowrank_p_kernel``: ``p = h C^T + bc`` and ``sigma(p)`` (``[T, r]``, r padded to 16).
3. ``_down_kernel``: ``y = h Wd^T + s * sigma(p) M^T + bias`` with ``M = Wd E`` (``[d, r]``)
   and ``bias = bd + s * Wd be``: the compressed path is fused into the down GEMM's epilogue,
   ``c`` is never materialised. The parallel placement is the same kernel with ``M = P`` and
   ``bias = bd + s * bp``.

Backward uses ``torch.matmul`` for the large plain GEMMs (``dy Wd``, ``dx = dg Wg + du Wu``,
``dC``, ``dE``, optional ``dWd``): these are exactly cuBLAS GEMMs without an epilogue to fuse,
so a Triton GEMM would add nothing. All accumulation is fp32; the rank-r parts run in fp32.
Under the interpreter every ``tl.dot`` operand is upcast to fp32 (bf16 ``tl.dot`` is broken
there).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .activations import ACT_CODES, act, act_grad
from .reference import resolve
from .scl_ffn_torch import input_and_frozen_grads, lowrank_epilogue, save_for_recompute, saved_for_recompute

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(x, ACT: tl.constexpr):
    """0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu; x fp32."""
    if ACT == 0:
        y = x * _sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        sg = _sigmoid(x)
        y = sg * (1.0 + x * (1.0 - sg))
    elif ACT == 1:
        y = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 2:
        x2 = x * x
        t = _tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x2))
        y = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x2)
    else:
        y = tl.where(x > 0.0, 1.0, 0.0)
    return y


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ----------------------------------------------------------------------------- configs
def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


if INTERPRET:
    GEMM_CONFIGS = [_cfg(64, 64, 32, 4, 1)]
    P_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
else:  # pragma: no cover - needs CUDA
    GEMM_CONFIGS = [
        _cfg(128, 128, 32, 8, 3),
        _cfg(128, 64, 32, 4, 4),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 3),
        _cfg(128, 128, 64, 8, 3),
    ]
    P_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=3)
        for bm, bk, w in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8))
    ]


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K", "LOAD_PRE", "BACKWARD"])
@triton.jit
def _ffn_in_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    pre1_ptr, pre2_ptr, h_ptr,
    dyw_ptr, dp_ptr, c_ptr, d1_ptr, d2_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_cr, stride_cn,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    LOAD_PRE: tl.constexpr, STORE_PRE: tl.constexpr, STORE_H: tl.constexpr,
    BACKWARD: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    mn_mask = mask_m[:, None] & mask_n[None, :]
    mn_off = rm[:, None] * N + rn[None, :]  # every [T, f] buffer here is contiguous
    if LOAD_PRE:
        a1 = tl.load(pre1_ptr + mn_off, mask=mn_mask, other=0.0).to(tl.float32)
        if GATED:
            a2 = tl.load(pre2_ptr + mn_off, mask=mn_mask, other=0.0).to(tl.float32)
    else:
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w1t = tl.load(w1_ptr + rn[None, :] * stride_w1n + rk[:, None] * stride_w1k,
                          mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc1 = _mm(xt, w1t, acc1, UPCAST, IEEE)
            if GATED:
                w2t = tl.load(w2_ptr + rn[None, :] * stride_w2n + rk[:, None] * stride_w2k,
                              mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc2 = _mm(xt, w2t, acc2, UPCAST, IEEE)
        if HAS_B1:
            acc1 += tl.load(b1_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            if HAS_B2:
                acc2 += tl.load(b2_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        # round like the stored tensors so that levels 1 and 2 see the same values
        a1 = acc1.to(pre1_ptr.dtype.element_ty).to(tl.float32)
        if STORE_PRE:
            tl.store(pre1_ptr + mn_off, a1.to(pre1_ptr.dtype.element_ty), mask=mn_mask)
        if GATED:
            a2 = acc2.to(pre1_ptr.dtype.element_ty).to(tl.float32)
            if STORE_PRE:
                tl.store(pre2_ptr + mn_off, a2.to(pre2_ptr.dtype.element_ty), mask=mn_mask)
    act1 = _act(a1, ACT)
    if GATED:
        h = act1 * a2
    else:
        h = act1
    if STORE_H:
        tl.store(h_ptr + mn_off, h.to(h_ptr.dtype.element_ty), mask=mn_mask)
    if BACKWARD:
        dh = tl.load(dyw_ptr + mn_off, mask=mn_mask, other=0.0).to(tl.float32)
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        dpt = tl.load(dp_ptr + rm[:, None] * R + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        ct = tl.load(c_ptr + rr[:, None] * stride_cr + rn[None, :] * stride_cn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        dh = tl.dot(dpt.to(tl.float32), ct, dh, input_precision="ieee")
        g1 = _act_grad(a1, ACT)
        if GATED:
            tl.store(d1_ptr + mn_off, (dh * a2 * g1).to(d1_ptr.dtype.element_ty), mask=mn_mask)
            tl.store(d2_ptr + mn_off, (dh * act1).to(d2_ptr.dtype.element_ty), mask=mn_mask)
        else:
            tl.store(d1_ptr + mn_off, (dh * g1).to(d1_ptr.dtype.element_ty), mask=mn_mask)


@triton.autotune(configs=P_CONFIGS, key=["M", "N"])
@triton.jit
def _lowrank_p_kernel(
    h_ptr, c_ptr, bc_ptr, p_ptr, sp_ptr,
    M, N, R, stride_cr, stride_cn,
    ACT: tl.constexpr, HAS_BC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < N
        ht = tl.load(h_ptr + rm[:, None] * N + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        ct = tl.load(c_ptr + rr[None, :] * stride_cr + rk[:, None] * stride_cn,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(ht.to(tl.float32), ct.to(tl.float32), acc, input_precision="ieee")
    if HAS_BC:
        acc += tl.load(bc_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    p = acc.to(p_ptr.dtype.element_ty)
    off = rm[:, None] * R + rr[None, :]
    msk = mask_m[:, None] & mask_r[None, :]
    tl.store(p_ptr + off, p, mask=msk)
    tl.store(sp_ptr + off, _act(p.to(tl.float32), ACT), mask=msk)


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _down_kernel(
    h_ptr, wd_ptr, sp_ptr, m_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale,
    stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, N] = h[M, K] Wd[N, K]^T + scale * sp[M, R] Mlr[N, R]^T + bias[N]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        ht = tl.load(h_ptr + rm[:, None] * K + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(wd_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mm(ht, wt, acc, UPCAST, IEEE)
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    spt = tl.load(sp_ptr + rm[:, None] * R + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    mt = tl.load(m_ptr + rn[None, :] * R + rr[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc += scale * tl.dot(spt, mt, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


AUTOTUNED = (_ffn_in_kernel, _lowrank_p_kernel, _down_kernel)


@contextlib.contextmanager
def pinned_configs(gemm: int = 0, p: int = 0):
    """Run the kernels with one tile config each (``GEMM_CONFIGS[gemm]`` for the two GEMM
    kernels, ``P_CONFIGS[p]`` for the rank-r one) instead of autotuning. Autotuning compiles
    and times every config for every new shape, which the many odd shapes of a correctness
    run cannot afford on CUDA; a pinned run checks one config, and looping over the indices
    checks each."""
    saved = [(k, k.configs, dict(k.cache)) for k in AUTOTUNED]
    try:
        for k in AUTOTUNED:
            configs = P_CONFIGS if k is _lowrank_p_kernel else GEMM_CONFIGS
            k.configs = [configs[p if k is _lowrank_p_kernel else gemm]]
            k.cache.clear()
        yield
    finally:
        for k, configs, cache in saved:
            k.configs = configs
            k.cache.clear()
            k.cache.update(cache)


# ----------------------------------------------------------------------------- launchers
def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _weight(w, dt):
    t = resolve(w)
    return t if t.dtype == dt else t.to(dt)


def _pair(gate_w, up_w, dt):
    """Resolve the weights that one fused kernel reads together: (w1, w2) = (gate, up) for a
    gated FFN, (fc1, None) for a plain one. Both live at once, so two callables must not
    return the same buffer (checked)."""
    if gate_w is None:
        return _weight(up_w, dt), None
    w1 = _weight(gate_w, dt)
    ptr1 = w1.untyped_storage().data_ptr()
    w2 = _weight(up_w, dt)
    if w2.untyped_storage().data_ptr() == ptr1:
        raise ValueError(
            "fastseq.kernels (triton): the gate and up weight callables returned the same buffer; "
            "the fused kernel reads both at once, so dequantize them into two buffers "
            "(one buffer per weight role can still be shared by all layers)")
    return w1, w2


def _flags(dt):
    return dict(UPCAST=INTERPRET, IEEE=dt == torch.float32)


def ffn_in(x, w1, b1, w2, b2, ffn_activation, *, pre1=None, pre2=None, store_pre=False,
           backward=None):
    """Launch kernel 1. ``backward`` = (dyw, dp_fp32, C) or None.
    Returns (h, pre1, pre2, d1, d2)."""
    load_pre = pre1 is not None  # level-1 backward: g, u (or a) given, x not needed
    if load_pre:
        (T, N), K = pre1.shape, 0
        gated = pre2 is not None
        dt, dev = pre1.dtype, pre1.device
    else:
        (T, K), N = x.shape, w1.shape[0]
        gated = w2 is not None
        dt, dev = x.dtype, x.device
    h = torch.empty(T, N, device=dev, dtype=dt)
    if not load_pre and store_pre:
        pre1 = torch.empty(T, N, device=dev, dtype=dt)
        pre2 = torch.empty(T, N, device=dev, dtype=dt) if gated else None
    d1 = d2 = None
    dyw = dp = C = None
    R = 1
    if backward is not None:
        dyw, dp, C = backward
        R = dp.shape[1]
        d1 = torch.empty(T, N, device=dev, dtype=dt)
        d2 = torch.empty(T, N, device=dev, dtype=dt) if gated else None
    dummy = h
    x = x if x is not None else dummy
    w1_ = w1 if w1 is not None else dummy
    w2_ = w2 if w2 is not None else w1_
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _ffn_in_kernel[grid](
        x, w1_, b1 if b1 is not None else dummy, w2_, b2 if b2 is not None else dummy,
        pre1 if pre1 is not None else dummy, pre2 if pre2 is not None else dummy, h,
        dyw if dyw is not None else dummy, dp if dp is not None else dummy,
        C if C is not None else dummy, d1 if d1 is not None else dummy, d2 if d2 is not None else dummy,
        T, N, K, R,
        x.stride(0), x.stride(1), w1_.stride(0), w1_.stride(1), w2_.stride(0), w2_.stride(1),
        C.stride(0) if C is not None else 0, C.stride(1) if C is not None else 0,
        ACT=ACT_CODES[ffn_activation], GATED=gated, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        LOAD_PRE=load_pre, STORE_PRE=store_pre and not load_pre, STORE_H=True,
        BACKWARD=backward is not None, BLOCK_R=_block_r(R), **_flags(dt),
    )
    return h, pre1, pre2, d1, d2


def lowrank_p(h, C, bc, scl_activation):
    T, N = h.shape
    R = C.shape[0]
    p = torch.empty(T, R, device=h.device, dtype=h.dtype)
    sp = torch.empty(T, R, device=h.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]),)  # noqa: E731
    _lowrank_p_kernel[grid](
        h, C, bc if bc is not None else C, p, sp, T, N, R, C.stride(0), C.stride(1),
        ACT=ACT_CODES[scl_activation], HAS_BC=bc is not None, BLOCK_R=_block_r(R),
    )
    return p, sp


def down_lowrank(h, wd, sp, E, be, bd, scale, placement="residual"):
    T, K = h.shape
    D = wd.shape[0]
    dt = h.dtype
    Mlr, bias = lowrank_epilogue(wd, E, be, bd, scale, placement, dt)
    Mlr = Mlr.float().contiguous()  # [d, r]
    bias = None if bias is None else bias.float()
    y = torch.empty(T, D, device=h.device, dtype=dt)
    R = sp.shape[1]
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"]))  # noqa: E731
    _down_kernel[grid](
        h, wd, sp, Mlr, bias.contiguous() if bias is not None else Mlr, y,
        T, D, K, R, float(scale), wd.stride(0), wd.stride(1),
        HAS_BIAS=bias is not None, BLOCK_R=_block_r(R), **_flags(dt),
    )
    return y


def _check_device(x):
    if x.is_cuda:
        return
    if not INTERPRET:
        raise RuntimeError(
            "fastseq.kernels: the Triton backend needs a CUDA tensor or the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is first imported); got a tensor on "
            f"{x.device}. Use backend='torch' (same recomputation, no Triton) instead.")


class SCLFFNTriton(torch.autograd.Function):
    """Same inputs, saved tensors and gradients as ``SCLFFNRecompute``; Triton kernels."""

    @staticmethod
    def forward(ctx, x, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be,
                ffn_activation, scl_activation, scale, level, placement):
        _check_device(x)
        dt = x.dtype
        gated = gate_w is not None
        w1, w2 = _pair(gate_w, up_w, dt)
        b1 = gate_b if gated else up_b
        b2 = up_b if gated else None
        h, pre1, pre2, _, _ = ffn_in(x, w1, b1, w2, b2, ffn_activation, store_pre=level == 1)
        del w1, w2
        p, sp = lowrank_p(h, C, bc, scl_activation)
        wd = _weight(down_w, dt)
        y = down_lowrank(h, wd, sp, E, be, down_b, scale, placement)
        del h, sp, wd
        save_for_recompute(ctx, x, pre1, pre2, p, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be,
                           ffn_activation, scl_activation, scale, level, dt, placement)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, pre1, pre2, p, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be = saved_for_recompute(ctx)
        ffn_activation, scl_activation, scale, level, placement = ctx.cfg
        residual = placement == "residual"
        nig = ctx.needs_input_grad
        dt = ctx.dtype
        gated = gate_w is not None
        dy = dy.contiguous().to(dt)
        wd = _weight(down_w, dt)
        Et = E.to(dt)
        need_pre = any(nig[i] for i in (0, 1, 2, 3, 4))
        dyw = dy @ wd if (residual or need_pre) else None  # [T, f]
        # rank-r part in fp32: dz = s dy M (residual: M = Wd E; parallel: M = P), dp = dz * sigma'(p)
        pf = p.float()
        dz = dyw @ Et if residual else dy @ Et
        dp = dz.float().mul_(scale).mul_(act_grad(pf, scl_activation)).contiguous()
        bw = (dyw, dp, C) if need_pre else None
        if level == 2:
            w1, w2 = _pair(gate_w, up_w, dt)
            h, _, _, d1, d2 = ffn_in(x, w1, gate_b if gated else up_b, w2, up_b if gated else None,
                                     ffn_activation, backward=bw)
            del w1, w2
        else:
            h, _, _, d1, d2 = ffn_in(x, None, None, None, None, ffn_activation,
                                     pre1=pre1, pre2=pre2, backward=bw)
        sp = act(pf, scl_activation)
        dC = dbc = dE = dbe = dWd = dbd = None
        if nig[7]:
            dC = (dp.t().to(dt) @ h).to(C.dtype)
        if nig[8]:
            dbc = dp.sum(0).to(bc.dtype)
        g_out = dyw if residual else dy  # what E (or P) sees downstream
        if nig[9]:
            dE = (g_out.t() @ sp.to(dt)).mul_(scale).to(E.dtype)
        if nig[10]:
            dbe = g_out.float().sum(0).mul_(scale).to(be.dtype)
        del dyw, g_out
        if nig[5]:
            if residual:
                c = torch.addmm(h, sp.to(dt), Et.t(), alpha=scale)
                if be is not None:
                    c.add_(be.to(dt), alpha=scale)
            else:  # the parallel branch bypasses Wd
                c = h
            dWd = (dy.t() @ c).to(down_w.dtype)
            del c
        if nig[6]:
            dbd = dy.float().sum(0).to(down_b.dtype)
        del h, wd
        dx = dWu = dbu = dWg = dbg = None
        if need_pre:
            dx, dWu, dbu, dWg, dbg = input_and_frozen_grads(
                (nig[0], nig[1], nig[2], nig[3], nig[4]), x, d1, d2, up_w, up_b, gate_w, gate_b)
        return (dx, dWu, dbu, dWg, dbg, dWd, dbd, dC, dbc, dE, dbe, None, None, None, None, None)
