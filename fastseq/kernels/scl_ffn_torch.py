"""PyTorch recompute path of the SCL FFN (checkpoint levels 1 and 2), no Triton.

A hand-written ``torch.autograd.Function`` (Unsloth ``LoRA_MLP`` / FlashAttention
``FusedDenseSqreluDense`` style). It runs on every device, so the memory saving of the
recompute levels is real on CPU too.

Forward never materialises ``c`` (the compressed path) as a ``[T, f]`` tensor:

    y = h Wd^T + s * sigma(p) M^T + bias,   residual: M = Wd E, bias = bd + s Wd be
                                            parallel: M = P,    bias = bd + s bp

(``M`` is ``[d, r]``; the parallel placement's P is passed where E is.)

What is kept for backward (all through ``ctx.save_for_backward``):

* level 1: ``x``, the gate/up outputs ``g``, ``u`` (gated) or the fc1 pre-activation
  ``a`` (plain), and ``p = h C^T + bc`` ``[T, r]``; backward recomputes ``h`` and
  ``sigma(p)`` elementwise, no frozen GEMM is redone.
* level 2: ``x`` and ``p`` only; backward recomputes the frozen GEMMs (gate/up or fc1).

plus the parameter tensors themselves (no copies). Frozen weights given as zero-argument
callables (bitsandbytes dequantization into a shared buffer) are called again in
backward; their results are never kept across forward/backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .activations import act, act_and_grad
from .reference import resolve


def _c(t: Optional[torch.Tensor], dt: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dt)


def frozen_pre_activations(x, up_w, up_b, gate_w, gate_b):
    """``(pre1, pre2)``: gated -> (x Wg^T + bg, x Wu^T + bu); plain -> (x W1^T + b1, None)."""
    dt = x.dtype
    if gate_w is not None:
        g = F.linear(x, resolve(gate_w).to(dt), _c(gate_b, dt))
        u = F.linear(x, resolve(up_w).to(dt), _c(up_b, dt))
        return g, u
    return F.linear(x, resolve(up_w).to(dt), _c(up_b, dt)), None


def lowrank_epilogue(wd, E, be, bd, scale, placement, dt):
    """``(M, bias)`` of ``y = h Wd^T + s sigma(p) M^T + bias``: ``M = Wd E`` and
    ``bias = bd + s Wd be`` (residual), ``M = P`` and ``bias = bd + s bp`` (parallel)."""
    residual = placement == "residual"
    M = wd @ E.to(dt) if residual else E.to(dt)  # [d, r]
    bias = None
    if be is not None:
        bias = scale * (wd @ be.to(dt) if residual else be.to(dt))
    if bd is not None:
        bias = bd.to(dt) if bias is None else bias + bd.to(dt)
    return M, bias


def down_with_lowrank(h, sp, wd, E, be, bd, scale, placement="residual"):
    """``y = h Wd^T + s sigma(p) M^T + bias`` (see ``lowrank_epilogue``); c never formed."""
    dt = h.dtype
    M, bias = lowrank_epilogue(wd, E, be, bd, scale, placement, dt)
    y = h @ wd.t() if bias is None else torch.addmm(bias, h, wd.t())
    return y.addmm_(sp, M.t(), alpha=scale)


def scl_backward_core(dy, x, pre1, pre2, p, wd, C, bc, E, be, ffn_activation, scl_activation,
                      scale, need, placement="residual"):
    """Shared backward math (torch ops). ``need`` = dict of booleans for
    ``C, bc, E, be, wd, bd, pre`` (pre: whether d pre1 / d pre2 are needed).

    Returns a dict with ``dC, dbc, dE, dbe, dWd, dbd, dpre1, dpre2`` (None where not needed;
    with the parallel placement ``dE`` / ``dbe`` are the gradients of P / bp).
    """
    dt = dy.dtype
    residual = placement == "residual"
    out = dict.fromkeys(("dC", "dbc", "dE", "dbe", "dWd", "dbd", "dpre1", "dpre2"))
    a1, da1 = act_and_grad(pre1, ffn_activation)
    h = a1 * pre2 if pre2 is not None else a1
    sp, dsp = act_and_grad(p, scl_activation)
    Et, Ct = E.to(dt), C.to(dt)
    # dy Wd [T, f]: the gradient reaching h through the frozen down projection (and, for the
    # residual placement, the gradient of c that E and C see)
    dyWd = dy @ wd if (residual or need["pre"]) else None
    # dz = s * dy M ([T, r]): residual M = Wd E, so dy M = (dy Wd) E; parallel M = P.
    # The rank-r part is kept in fp32.
    dz = dyWd @ Et if residual else dy @ Et
    dp = dz.float().mul_(scale).mul_(dsp.float())
    if need["C"]:
        out["dC"] = (dp.t().to(dt) @ h).to(C.dtype)
    if need["bc"]:
        out["dbc"] = dp.sum(0).to(bc.dtype)
    dp = dp.to(dt)
    g_out = dyWd if residual else dy  # what E (or P) sees downstream
    if need["E"]:
        out["dE"] = (g_out.t() @ sp).mul_(scale).to(E.dtype)
    if need["be"]:
        out["dbe"] = g_out.sum(0).mul_(scale).to(be.dtype)
    if need["wd"]:
        if residual:
            c = torch.addmm(h, sp, Et.t(), alpha=scale)
            if be is not None:
                c.add_(be.to(dt), alpha=scale)
        else:  # the parallel branch bypasses Wd
            c = h
        out["dWd"] = dy.t() @ c
        del c
    if need["bd"]:
        out["dbd"] = dy.sum(0)
    if need["pre"]:
        dh = dyWd.addmm_(dp, Ct)  # dy Wd + dp C
        if pre2 is not None:
            out["dpre1"] = da1.mul_(pre2).mul_(dh)
            out["dpre2"] = a1.mul_(dh)
        else:
            out["dpre1"] = da1.mul_(dh)
    return out


def input_and_frozen_grads(ctx_needs, x, dpre1, dpre2, up_w, up_b, gate_w, gate_b):
    """``dx = dg Wg + du Wu`` (gated) or ``da W1`` (plain); frozen-weight grads only if a
    tensor weight itself requires grad (never for callables). Order: dx, dWu, dbu, dWg, dbg."""
    n_x, n_wu, n_bu, n_wg, n_bg = ctx_needs
    dx = dWu = dbu = dWg = dbg = None
    gated = dpre2 is not None
    d_up = dpre2 if gated else dpre1
    dt = d_up.dtype
    if n_x:
        dx = d_up @ resolve(up_w).to(dt)
        if gated:
            dx.addmm_(dpre1, resolve(gate_w).to(dt))
    if n_wu:
        dWu = (d_up.t() @ x).to(up_w.dtype)
    if n_bu:
        dbu = d_up.sum(0).to(up_b.dtype)
    if gated and n_wg:
        dWg = (dpre1.t() @ x).to(gate_w.dtype)
    if gated and n_bg:
        dbg = dpre1.sum(0).to(gate_b.dtype)
    return dx, dWu, dbu, dWg, dbg


def keep_x(level, up_w, up_b, gate_w, gate_b) -> bool:
    """x is needed in backward only to recompute the frozen GEMMs (level 2) or for the
    gradient of a frozen-side tensor that nevertheless requires grad (never in SCL training:
    then level 1 keeps no copy of x at all)."""
    return level == 2 or any(isinstance(t, torch.Tensor) and t.requires_grad
                             for t in (up_w, up_b, gate_w, gate_b))


def _tensor_or_none(w):
    return w if isinstance(w, torch.Tensor) else None


def save_for_recompute(ctx, x, pre1, pre2, p, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be,
                       ffn_activation, scl_activation, scale, level, dtype, placement) -> None:
    """What both recompute Functions (torch and Triton) keep for backward: tensors through
    ``save_for_backward`` (so saved-tensor hooks see them), callables and settings on ctx."""
    if level == 2:
        pre1 = pre2 = None
    ctx.save_for_backward(x if keep_x(level, up_w, up_b, gate_w, gate_b) else None, pre1, pre2, p,
                          _tensor_or_none(up_w), up_b, _tensor_or_none(gate_w), gate_b,
                          _tensor_or_none(down_w), down_b, C, bc, E, be)
    ctx.weights = (up_w, gate_w, down_w)  # originals: tensors (also saved above) or callables
    ctx.dtype = dtype
    ctx.cfg = (ffn_activation, scl_activation, scale, level, placement)


def saved_for_recompute(ctx):
    """``(x, pre1, pre2, p, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be)`` with
    each frozen weight back as the saved tensor or the original callable."""
    (x, pre1, pre2, p, up_wt, up_b, gate_wt, gate_b, down_wt, down_b, C, bc, E, be) = ctx.saved_tensors
    up_w, gate_w, down_w = ctx.weights
    up_w = up_wt if up_wt is not None else up_w
    gate_w = gate_wt if gate_wt is not None else gate_w
    down_w = down_wt if down_wt is not None else down_w
    return x, pre1, pre2, p, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be


class SCLFFNRecompute(torch.autograd.Function):
    """Inputs are 2-D: ``x`` ``[T, d]``. See module docstring."""

    @staticmethod
    def forward(ctx, x, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be,
                ffn_activation, scl_activation, scale, level, placement):
        dt = x.dtype
        pre1, pre2 = frozen_pre_activations(x, up_w, up_b, gate_w, gate_b)
        h = act(pre1, ffn_activation)
        if pre2 is not None:
            h = h.mul_(pre2)  # act() returned a fresh tensor
        p = F.linear(h, C.to(dt), _c(bc, dt))
        sp = act(p, scl_activation)
        wd = resolve(down_w).to(dt)
        y = down_with_lowrank(h, sp, wd, E, be, down_b, scale, placement)
        del h, sp, wd
        save_for_recompute(ctx, x, pre1, pre2, p, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be,
                           ffn_activation, scl_activation, scale, level, dt, placement)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, pre1, pre2, p, up_w, up_b, gate_w, gate_b, down_w, down_b, C, bc, E, be = saved_for_recompute(ctx)
        ffn_activation, scl_activation, scale, level, placement = ctx.cfg
        nig = ctx.needs_input_grad
        dy = dy.contiguous().to(ctx.dtype)
        if level == 2:
            pre1, pre2 = frozen_pre_activations(x, up_w, up_b, gate_w, gate_b)
        wd = resolve(down_w).to(ctx.dtype)
        need_pre = any(nig[i] for i in (0, 1, 2, 3, 4))
        need = dict(C=nig[7], bc=nig[8], E=nig[9], be=nig[10], wd=nig[5], bd=nig[6], pre=need_pre)
        g = scl_backward_core(dy, x, pre1, pre2, p, wd, C, bc, E, be, ffn_activation,
                              scl_activation, scale, need, placement)
        del wd
        dx = dWu = dbu = dWg = dbg = None
        if need_pre:
            dx, dWu, dbu, dWg, dbg = input_and_frozen_grads(
                (nig[0], nig[1], nig[2], nig[3], nig[4]), x, g["dpre1"], g["dpre2"],
                up_w, up_b, gate_w, gate_b)
        dWd = None if g["dWd"] is None else g["dWd"].to(down_w.dtype)
        dbd = None if g["dbd"] is None else g["dbd"].to(down_b.dtype)
        return (dx, dWu, dbu, dWg, dbg, dWd, dbd, g["dC"], g["dbc"], g["dE"], g["dbe"],
                None, None, None, None, None)
