"""Dispatch, frozen weights, recomputation and the saved-for-backward memory of scl_ffn."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fastseq.kernels as K  # noqa: E402
from devices import DEVICE  # noqa: E402
from fastseq.kernels import scl_ffn, scl_ffn_reference  # noqa: E402
from fastseq.kernels.testing import SwiGLU, as_args, count_saved_activations, make_scl_inputs  # noqa: E402

# the tests taking `device` run on `pytest --device` (CUDA: the real Triton compiler); the others test
# CPU dispatch and run on the CPU only
HAS_TRITON = importlib.util.find_spec("triton") is not None and K.triton_available(DEVICE)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason=f"no triton on {DEVICE.type}"))]
KW = dict(ffn_activation="silu", scl_activation="silu", scale=1.0)


# ---------------------------------------------------------------- dispatch
def test_triton_without_cuda_or_interpreter_raises_clear_error(monkeypatch):
    monkeypatch.setattr(K, "triton_available", lambda device=None: False)
    inp = make_scl_inputs(5, 8, 12, 2)
    with pytest.raises(RuntimeError, match=r"backend='torch'.*TRITON_INTERPRET=1"):
        scl_ffn(*as_args(inp), checkpoint_level=1, backend="triton", **KW)
    # auto falls back to the torch path instead of failing
    assert K.resolve_backend("auto", "cpu") == "torch"
    scl_ffn(*as_args(inp), checkpoint_level=1, backend="auto", **KW)


def test_interpreter_env_off_means_unavailable_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K.triton_available("cpu") is False
    with pytest.raises(RuntimeError, match="neither CUDA nor the Triton interpreter"):
        K.resolve_backend("triton", "cpu")


def test_auto_never_picks_interpreter_on_cpu():
    assert K.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("bad", [dict(checkpoint_level=3), dict(backend="cuda"),
                                 dict(ffn_activation="tanh"), dict(scl_activation="swish")])
def test_bad_arguments(bad):
    inp = make_scl_inputs(5, 8, 12, 2)
    kw = dict(KW, checkpoint_level=1, backend="torch")
    kw.update(bad)
    with pytest.raises(ValueError):
        scl_ffn(*as_args(inp), **kw)


def test_import_without_triton_does_not_import_triton():
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import fastseq.kernels as K\n"
            "assert not K.triton_available('cpu')\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip().endswith("ok"), out.stderr


# ---------------------------------------------------------------- frozen weights, recompute
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [1, 2])
def test_frozen_weights_get_no_grad(backend, level, device):
    inp = make_scl_inputs(9, 16, 24, 3, bias=True, device=device)
    frozen = [nn.Parameter(inp[k].detach().clone(), requires_grad=False)
              for k in ("up_weight", "up_bias", "gate_weight", "gate_bias", "down_weight", "down_bias")]
    args = list(as_args(inp))
    args[1:7] = frozen
    y = scl_ffn(*args, checkpoint_level=level, backend=backend, **KW)
    y.sum().backward()
    assert all(p.grad is None for p in frozen)
    for k in ("x", "compress_weight", "compress_bias", "expand_weight", "expand_bias"):
        assert inp[k].grad is not None and torch.isfinite(inp[k].grad).all()


class _Dequant:
    """A bitsandbytes-like frozen weight: each call 'dequantizes' into one shared buffer that
    other layers overwrite; counts its calls."""

    def __init__(self, w, buf):
        self.w, self.buf, self.calls = w, buf, 0

    def __call__(self):
        self.calls += 1
        return self.buf[: self.w.numel()].view_as(self.w).copy_(self.w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_callable_weights_recomputed_and_shared_buffer_safe(backend, device):
    inp = make_scl_inputs(11, 16, 24, 3, bias=False, device=device)
    ref = scl_ffn_reference(*as_args(inp), **KW)
    dy = torch.randn(ref.shape, device=device)
    g_ref = torch.autograd.grad(ref, [inp["x"], inp["compress_weight"], inp["expand_weight"]], dy)
    calls = {}
    for level in (1, 2):
        # torch path: every weight may share one buffer (used right after each call);
        # the fused Triton kernel reads gate and up together: one buffer per role
        bufs = ([torch.empty(16 * 24, device=device)] if backend == "torch"
                else [torch.empty(16 * 24, device=device) for _ in range(3)])
        ws = {k: _Dequant(inp[k].detach(), bufs[i % len(bufs)])
              for i, k in enumerate(("up_weight", "gate_weight", "down_weight"))}
        args = list(as_args(dict(inp, **ws)))
        y = scl_ffn(*args, checkpoint_level=level, backend=backend, **KW)
        for buf in bufs:
            buf.fill_(float("nan"))  # another layer reuses the buffers before backward
        g = torch.autograd.grad(y, [inp["x"], inp["compress_weight"], inp["expand_weight"]], dy)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        calls[level] = {k: w.calls for k, w in ws.items()}
    # level 2 recomputes the frozen gate/up GEMMs in backward: one more call each
    assert calls[2]["gate_weight"] == calls[1]["gate_weight"] + 1
    assert calls[2]["up_weight"] == calls[1]["up_weight"] + 1
    assert calls[2]["down_weight"] == calls[1]["down_weight"]


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_triton_rejects_gate_and_up_sharing_one_buffer(device):
    inp = make_scl_inputs(5, 8, 12, 2, device=device)
    buf = torch.empty(8 * 12, device=device)
    ws = {k: _Dequant(inp[k].detach(), buf) for k in ("up_weight", "gate_weight")}
    with pytest.raises(ValueError, match="same buffer"):
        scl_ffn(*as_args(dict(inp, **ws)), checkpoint_level=1, backend="triton", **KW)


def test_level1_does_not_recompute_frozen_gemms(monkeypatch):
    """Level 1's backward redoes no frozen GEMM: count F.linear calls made in backward."""
    import fastseq.kernels.scl_ffn_torch as mod
    inp = make_scl_inputs(9, 16, 24, 3)
    counts = {"n": 0}
    real = mod.F.linear

    def counting(*a, **k):
        counts["n"] += 1
        return real(*a, **k)

    for level, expected in ((1, 0), (2, 2)):
        y = scl_ffn(*as_args(inp), checkpoint_level=level, backend="torch", **KW)
        monkeypatch.setattr(mod.F, "linear", counting)
        counts["n"] = 0
        y.sum().backward()
        monkeypatch.setattr(mod.F, "linear", real)
        assert counts["n"] == expected, (level, counts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [1, 2])
def test_everything_saved_goes_through_save_for_backward(backend, level, device):
    """A pack hook that moves saved tensors elsewhere (offloading) must see all of them: with
    the hook returning copies and the originals scribbled over, gradients stay right."""
    inp = make_scl_inputs(9, 16, 24, 3, bias=True, train_down=True, device=device)
    ref = scl_ffn_reference(*as_args(inp), **KW)
    keys = ["x", "compress_weight", "expand_weight", "down_weight"]
    dy = torch.randn(ref.shape, device=device)
    g_ref = torch.autograd.grad(ref, [inp[k] for k in keys], dy)
    packed = []

    def pack(t):
        packed.append(t)
        return t.detach().clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = scl_ffn(*as_args(inp), checkpoint_level=level, backend=backend, **KW)
    with torch.no_grad():
        for t in packed:
            if not any(t.data_ptr() == inp[k].data_ptr() for k in inp if inp[k] is not None):
                t.fill_(float("nan"))
    g = torch.autograd.grad(y, [inp[k] for k in keys], dy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- memory: saved bytes

def saved_bytes_table(T=512, d=2048, f=5632, r=16, dtype=torch.float32):
    """Saved activation bytes per FFN: SCL levels 0/1/2 and PEFT LoRA r on up+down."""
    torch.manual_seed(0)
    inp = make_scl_inputs(T, d, f, r, dtype=dtype)
    weights = [v for k, v in inp.items() if k != "x" and v is not None]
    out = {}
    for level in (0, 1, 2):
        s = count_saved_activations(
            lambda: scl_ffn(*as_args(inp), checkpoint_level=level, backend="torch", **KW), weights)
        out[f"scl_l{level}"] = s
    try:
        import peft
    except ImportError:  # pragma: no cover
        return out
    mlp = SwiGLU(d, f).to(dtype)
    for p in mlp.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(mlp, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                    target_modules=["up_proj", "down_proj"]))
    x = inp["x"]
    out["peft_lora"] = count_saved_activations(lambda: model(x), list(model.parameters()))
    return out


def test_saved_bytes_tinyllama_layer():
    T, d, f, r = 512, 2048, 5632, 16
    tab = saved_bytes_table(T, d, f, r)
    l0, l1, l2 = tab["scl_l0"], tab["scl_l1"], tab["scl_l2"]
    for k, s in tab.items():
        print(f"{k:10s} saved {s.bytes / 2**20:8.2f} MiB in {s.tensors} tensors "
              f"(level0/this = {l0.bytes / s.bytes:.2f}x)")
    if "peft_lora" in tab:
        lo = tab["peft_lora"]
        print(f"peft_lora/scl_l1 = {lo.bytes / l1.bytes:.2f}x, peft_lora/scl_l2 = {lo.bytes / l2.bytes:.2f}x")
        assert l2.bytes < lo.bytes and l1.bytes < lo.bytes
    # level 2: only x [T, d] and p [T, r] (+ O(d r))
    assert l2.elements <= T * (d + r) + 4 * d * r
    assert l2.elements >= T * (d + r)
    assert l0.bytes >= 8 * l2.bytes
    # level 1: g, u, p (x is not needed: no frozen GEMM is redone, no frozen weight grad)
    assert l1.elements <= T * (2 * f + r) + 4 * d * r
    assert l1.bytes < l0.bytes
