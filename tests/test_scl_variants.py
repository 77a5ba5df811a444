"""SCL variants (``placement`` residual/parallel x ``train_compress``) on every registered
architecture: identity at init, what trains, trainable counts, save/load, and a frozen C that is
the same bit for bit wherever it is built (fused == reference: test_fused_models.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq import SCLConfig

from tiny_models import BUILDERS, HEADS, build, inputs, output_tensor, train_steps

ARCHS = sorted(BUILDERS)
# (placement, train_compress); ("residual", True) is plain SCL, covered by test_adapters.py
VARIANTS = [("parallel", True), ("residual", False), ("parallel", False)]
VARIANT_IDS = [f"{p}-{'C' if t else 'frozenC'}" for p, t in VARIANTS]


def inject(arch, placement, train_compress, level=0, backend="torch", **kw):
    model = build(arch)
    base = copy.deepcopy(model).requires_grad_(False)
    cfg = SCLConfig(r=4, placement=placement, train_compress=train_compress, checkpoint_level=level,
                    backend=backend, **kw)
    fastseq.get_scl_model(model, cfg, trainable_modules=HEADS.get(arch, ()))
    return base, model, cfg


@pytest.mark.parametrize("level", (0, 1, 2))
@pytest.mark.parametrize("placement,train_compress", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch, placement, train_compress, level):
    base, model, _ = inject(arch, placement, train_compress, level)
    x = inputs(arch)
    with torch.no_grad():
        expected = output_tensor(arch, base(**x))
        got = output_tensor(arch, model(**x))
    if level == 0 and placement == "residual":
        assert torch.equal(got, expected)
    else:  # the parallel branch adds an exact 0.0; the fused path reorders the same arithmetic
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement,train_compress", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_counts_and_only_intended_parameters_learn(arch, placement, train_compress):
    _, model, cfg = inject(arch, placement, train_compress)
    sites = model.fastseq_adapter.sites
    names = set(fastseq.scl_parameter_names(model))
    out = "expand" if placement == "residual" else "project"
    scl = {n for n in names if ".scl." in n}
    assert {n.split(".scl.")[1] for n in scl} == ({f"{out}.weight"} | ({"compress.weight"} if train_compress else set()))
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".scl." not in n)
    per_site = [(s.d_ffn if placement == "residual" else s.d_model) * 4 + (s.d_ffn * 4 if train_compress else 0)
                for s in sites]
    assert [cfg.adapter_params_per_layer(s.d_model, s.d_ffn) for s in sites] == per_site
    assert fastseq.count_parameters(model).trainable == sum(per_site) + head

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, grads = train_steps(model, arch)
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in names), n
    for n in scl:  # P / E at once, C from the second step on (dC ~ E)
        assert grads[1][n].abs().sum() > 0, n
    if not train_compress:
        assert not any(".compress." in n for g in grads for n in g)


@pytest.mark.parametrize("placement,train_compress", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, placement, train_compress, tmp_path):
    _, model, _ = inject(arch, placement, train_compress, bias=True, init_seed=3)
    train_steps(model, arch)
    fastseq.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["scl_config"]["placement"] == placement
    assert meta["scl_config"]["train_compress"] is train_compress and meta["scl_config"]["init_seed"] == 3
    # a frozen C is saved (the adapter needs it) but is not trainable after loading either
    assert any(".scl.compress.weight" in n for n in meta["tensors"])
    fresh = build(arch)
    torch.manual_seed(99)  # C comes from the file, whatever the RNG holds
    fastseq.load_adapter(fresh, tmp_path)
    x = inputs(arch, seed=5)
    with torch.no_grad():
        assert torch.equal(output_tensor(arch, fresh(**x)), output_tensor(arch, model(**x)))
    assert set(fastseq.scl_parameter_names(fresh)) == set(fastseq.scl_parameter_names(model))


def test_parallel_reference_is_the_formula():
    model = build("llama")
    fastseq.get_scl_model(model, SCLConfig(r=3, scale=0.7, bias=True, placement="parallel", checkpoint_level=0))
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for p in mlp.scl.parameters():
            p.normal_()
    x = torch.randn(5, 32)
    h = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    p = h @ mlp.scl.compress.weight.T + mlp.scl.compress.bias
    y = h @ mlp.down_proj.weight.T + 0.7 * (F.silu(p) @ mlp.scl.project.weight.T + mlp.scl.project.bias)
    torch.testing.assert_close(mlp(x), y)


def test_init_seed_gives_the_same_compress_anywhere():
    """A frozen C is never sent, so every process must build it bit for bit: it depends on
    (init_seed, FFN name) only, not on torch's global RNG or on what was built before."""
    def compress(seed_before, init_seed=7, arch="llama"):
        torch.manual_seed(seed_before)
        torch.rand(13)  # consume some global RNG
        model = build(arch, seed=seed_before)
        fastseq.get_scl_model(model, SCLConfig(r=4, train_compress=False, init_seed=init_seed))
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".scl.compress." in n}

    a, b = compress(0), compress(123)
    assert a.keys() == b.keys() and len(a) == 2
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(*a.values())  # each FFN its own draw
    c = compress(0, init_seed=8)
    assert not any(torch.equal(a[n], c[n]) for n in a)
    bound = 1 / 48 ** 0.5  # Kaiming uniform like LoRA's A: U(-1/sqrt(f), 1/sqrt(f)), f = 48
    assert all(t.abs().max() <= bound for t in a.values())


@pytest.mark.parametrize("bad", [dict(placement="serial"), dict(train_compress="no"), dict(init_seed=1.5),
                                 dict(init_seed=True)])
def test_bad_variant_values(bad):
    with pytest.raises(fastseq.ConfigError, match=next(iter(bad))):
        SCLConfig(**bad)
