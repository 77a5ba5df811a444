"""scl_ffn levels 1/2 (torch recompute and Triton) against the level-0 reference.

Triton runs on CPU under the interpreter: TRITON_INTERPRET must be set before triton is
imported, hence the first lines; `pytest --device cuda` runs every test here on the GPU with
the real compiler instead (conftest.py). fp32 is compared tightly; fp16/bf16 FlashAttention
style: the kernel's error against an fp64 reference must stay within a small multiple of the
error of the same-precision PyTorch reference.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from devices import DEVICE  # noqa: E402
from fastseq.kernels import scl_ffn, scl_ffn_reference, triton_available  # noqa: E402
from fastseq.kernels.testing import ARG_ORDER, as_args, make_scl_inputs  # noqa: E402

T, D, F, R = 37, 48, 80, 5
HAS_TRITON = importlib.util.find_spec("triton") is not None and triton_available(DEVICE)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"triton not available on {DEVICE.type} (CUDA or the "
                                  "interpreter); the torch-backend twin of every case runs anyway")

GRAD_KEYS = ("x", "compress_weight", "compress_bias", "expand_weight", "expand_bias",
             "down_weight", "down_bias")

# (gated, ffn_activation, scl_activation)
ACTS = [
    (True, "silu", "silu"),
    (True, "gelu_tanh", "gelu_tanh"),
    (False, "gelu", "gelu"),
    (False, "gelu_tanh", "silu"),
    (False, "relu", "relu"),
    (False, "silu", "gelu"),
]


def _run(inp, *, level, backend, gated, ffn_act, scl_act, callable_w=False, scale=0.7, dy=None,
         placement="residual"):
    args = list(as_args(inp))
    if callable_w:  # frozen weights as zero-arg callables (bitsandbytes style)
        for i, k in enumerate(ARG_ORDER):
            if k in ("up_weight", "gate_weight", "down_weight") and args[i] is not None and not args[i].requires_grad:
                w = args[i]
                args[i] = (lambda w=w: w)
    if level == 0:
        y = scl_ffn_reference(*args, ffn_activation=ffn_act, scl_activation=scl_act, scale=scale,
                              placement=placement)
    else:
        y = scl_ffn(*args, ffn_activation=ffn_act, scl_activation=scl_act, scale=scale,
                    checkpoint_level=level, backend=backend, placement=placement)
    leaves = [k for k in GRAD_KEYS if inp[k] is not None and inp[k].requires_grad]
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, [inp[k] for k in leaves], dy.to(y.device, y.dtype))
    return {"y": y.detach(), **{k: g for k, g in zip(leaves, grads)}}


def _inputs(gated, bias, train_down, dtype, param_dtype=None, device="cpu", **variant):
    return make_scl_inputs(T, D, F, R, gated=gated, bias=bias, train_down=train_down,
                           dtype=dtype, param_dtype=param_dtype, seed=hash((gated, bias, train_down)) % 1000,
                           device=device, **variant)


def _check(backend, level, gated, ffn_act, scl_act, bias, train_down, dtype, callable_w, param_dtype=None,
           placement="residual", train_compress=True, x_grad=True, device="cpu"):
    """``train_compress`` / ``x_grad`` False: C, bc / x need no gradient (a frozen-C SCL, the
    first adapted layer), and the kernel must neither return nor need one."""
    kw = dict(gated=gated, ffn_act=ffn_act, scl_act=scl_act, placement=placement)
    variant = dict(placement=placement, train_compress=train_compress, x_grad=x_grad)
    inp = _inputs(gated, bias, train_down, dtype, param_dtype, device, **variant)
    out = _run(inp, level=level, backend=backend, callable_w=callable_w, **kw)
    for k, g in out.items():
        ref_dtype = inp[k].dtype if k in inp else dtype
        assert g.dtype == ref_dtype, (k, g.dtype, ref_dtype)
    if dtype == torch.float32 and param_dtype in (None, torch.float32):
        ref = _run(inp, level=0, backend="torch", **kw)
        assert out.keys() == ref.keys()
        for k in ref:
            scale = max(1.0, ref[k].abs().max().item())
            err = (out[k] - ref[k]).abs().max().item()
            assert err <= 1e-5 * scale, f"{k}: max err {err:.3g} (scale {scale:.3g})"
        return
    # half precision: bound by the same-precision reference's error against fp64
    inp64 = make_scl_inputs(T, D, F, R, gated=gated, bias=bias, train_down=train_down,
                            dtype=torch.float64, seed=hash((gated, bias, train_down)) % 1000, device=device, **variant)
    ref64 = _run(inp64, level=0, backend="torch", **kw)
    ref_lp = _run(inp, level=0, backend="torch", **kw)
    for k in ref64:
        scale = max(1.0, ref64[k].abs().max().item())
        err_kernel = (out[k].double() - ref64[k]).abs().max().item()
        err_ref = (ref_lp[k].double() - ref64[k]).abs().max().item()
        # eps: one unit of the output dtype at the output's scale (the final rounding alone
        # can cost half of it, and the same-precision reference may happen to round luckily)
        eps = torch.finfo(dtype).eps * scale
        assert err_kernel <= 3 * err_ref + eps, (
            f"{k}: kernel err {err_kernel:.3g} > 3 x reference err {err_ref:.3g} + eps")


# ---------------------------------------------------------------- both backends, full matrix
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("gated,ffn_act,scl_act", ACTS)
@pytest.mark.parametrize("bias,train_down,callable_w", [(False, False, False), (True, True, True),
                                                       (True, False, False), (False, True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backend_matches_reference(backend, level, gated, ffn_act, scl_act, bias, train_down, callable_w, dtype, device):
    _check(backend, level, gated, ffn_act, scl_act, bias, train_down, dtype, callable_w, device=device)


# SCL variants: the parallel placement (y += s P sigma(C h), P [d, r]) and a frozen C, alone
# and together, with and without a gradient for x (the first adapted layer needs none)
VARIANTS = [("parallel", True, True), ("parallel", False, True), ("residual", False, True),
            ("parallel", False, False), ("residual", False, False), ("parallel", True, False)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("placement,train_compress,x_grad", VARIANTS)
@pytest.mark.parametrize("gated,ffn_act,scl_act", [ACTS[0], ACTS[2]])
@pytest.mark.parametrize("bias,train_down", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_variants_match_reference(backend, level, placement, train_compress, x_grad, gated, ffn_act, scl_act,
                                  bias, train_down, dtype, device):
    _check(backend, level, gated, ffn_act, scl_act, bias, train_down, dtype, callable_w=bias,
           placement=placement, train_compress=train_compress, x_grad=x_grad, device=device)


@needs_triton
def test_every_tile_config_matches_reference(device):
    """Each autotune config (CUDA: five GEMM tilings, four for the rank-r kernel; the
    interpreter has one) on the training dtype, both levels and placements, fwd and bwd: the
    other tests pin one config (conftest.py), autotuning may pick any of them."""
    from fastseq.kernels.scl_ffn_triton import GEMM_CONFIGS, P_CONFIGS, pinned_configs

    for i in range(max(len(GEMM_CONFIGS), len(P_CONFIGS))):
        with pinned_configs(gemm=i % len(GEMM_CONFIGS), p=i % len(P_CONFIGS)):
            for level, placement in ((1, "residual"), (2, "parallel")):
                _check("triton", level, True, "silu", "silu", True, False, torch.bfloat16, callable_w=True,
                       placement=placement, device=device)


def test_parallel_reference_is_the_formula(device):
    inp = make_scl_inputs(T, D, F, R, gated=False, bias=True, placement="parallel", dtype=torch.float64,
                          device=device)
    a = {k: (v.detach() if v is not None else None) for k, v in inp.items()}
    y = scl_ffn_reference(*as_args(a), ffn_activation="gelu", scl_activation="silu", scale=0.5,
                          placement="parallel")
    h = torch.nn.functional.gelu(a["x"] @ a["up_weight"].t() + a["up_bias"])
    p = h @ a["compress_weight"].t() + a["compress_bias"]
    branch = torch.nn.functional.silu(p) @ a["expand_weight"].t() + a["expand_bias"]
    torch.testing.assert_close(y, h @ a["down_weight"].t() + a["down_bias"] + 0.5 * branch)


@pytest.mark.parametrize("placement", ["residual", "parallel"])
def test_expand_shape_is_checked_per_placement(placement):
    inp = make_scl_inputs(T, D, F, R, placement="residual" if placement == "parallel" else "parallel")
    with pytest.raises(ValueError, match=f"{placement} placement"):
        scl_ffn(*as_args(inp), ffn_activation="silu", scl_activation="silu", placement=placement)


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("placement", ["residual", "parallel"])
def test_torch_backend_gradcheck_fp64(level, gated, placement, device):
    inp = make_scl_inputs(7, 6, 10, 3, gated=gated, bias=True, train_down=True, dtype=torch.float64,
                          placement=placement, device=device)
    names = [k for k in ARG_ORDER if inp[k] is not None and inp[k].requires_grad]

    def fn(*tensors):
        a = dict(inp)
        a.update(zip(names, tensors))
        return scl_ffn(*as_args(a), ffn_activation="gelu_tanh" if gated else "gelu",
                       scl_activation="silu", scale=0.5, checkpoint_level=level, backend="torch",
                       placement=placement)

    assert torch.autograd.gradcheck(fn, tuple(inp[k] for k in names))


# ---------------------------------------------------------------- mixed dtypes, shapes
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("level", [1, 2])
def test_mixed_dtype_fp32_adapter_on_bf16_backbone(backend, level, device):
    _check(backend, level, True, "silu", "silu", True, True, torch.bfloat16, False, param_dtype=torch.float32,
           device=device)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_batch_dims_and_non_contiguous(backend, device):
    inp = make_scl_inputs(T, D, F, R, gated=True, bias=True, dtype=torch.float32, device=device)
    x3 = torch.randn(D, 3, 13, generator=torch.Generator().manual_seed(5)).to(device).permute(1, 2, 0)
    x3.requires_grad_(True)
    assert not x3.is_contiguous()
    inp["x"] = x3
    wt = inp["up_weight"].detach().t().contiguous().t()  # same values, transposed storage
    kw = dict(ffn_activation="silu", scl_activation="silu", scale=1.3)
    ref = scl_ffn_reference(*as_args(inp), **kw)
    inp2 = dict(inp, up_weight=wt)
    y = scl_ffn(*as_args(inp2), checkpoint_level=2, backend=backend, **kw)
    assert y.shape == (3, 13, D)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (gx_ref,) = torch.autograd.grad(ref, x3, dy)
    (gx,) = torch.autograd.grad(y, x3, dy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


def test_zero_expand_is_identity_to_base_ffn(device):
    inp = make_scl_inputs(T, D, F, R, gated=True, dtype=torch.float32, device=device)
    with torch.no_grad():
        inp["expand_weight"].zero_()
    y = scl_ffn(*as_args(inp), ffn_activation="silu", scl_activation="silu", scale=1.0,
                checkpoint_level=1, backend="torch")
    x = inp["x"]
    base = (torch.nn.functional.silu(x @ inp["gate_weight"].t()) * (x @ inp["up_weight"].t())) @ inp["down_weight"].t()
    torch.testing.assert_close(y, base, atol=1e-5, rtol=1e-5)
