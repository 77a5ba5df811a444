"""SCL injection on every registered architecture: identity at init, what trains, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fastseq
from fastseq import SCLConfig
from fastseq.adapters import AdapterError, UnsupportedModelError

from tiny_models import BUILDERS, HEADS, PLAIN_SCL, build, hf_trainer_steps, inputs, loss_of, output_tensor

ARCHS = sorted(BUILDERS)
LEVELS = (0, 1, 2)


def inject(arch: str, level: int = 0, **kw):
    model = build(arch)
    # Frozen like the adapted model: nn.MultiheadAttention (SigLIP's head) takes a different
    # fast path when no parameter requires grad, which changes the last bits.
    base = copy.deepcopy(model).requires_grad_(False)
    config = SCLConfig(r=4, checkpoint_level=level, backend="torch", **{**PLAIN_SCL, **kw})
    fastseq.get_scl_model(model, config, trainable_modules=HEADS.get(arch, ()))
    return base, model, config


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch, level):
    base, model, _ = inject(arch, level)
    x = inputs(arch)
    with torch.no_grad():
        expected = output_tensor(arch, base(**x))
        got = output_tensor(arch, model(**x))
    if level == 0:
        assert torch.equal(got, expected)
    else:  # the fused path reorders the same arithmetic
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _train_steps(model, arch, steps=2, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(arch, model(**inputs(arch, seed=step))).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return grads


@pytest.mark.parametrize("arch", ARCHS)
def test_only_intended_parameters_change_and_all_scl_params_learn(arch):
    base, model, config = inject(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _train_steps(model, arch)
    trainable = set(fastseq.scl_parameter_names(model))
    heads = HEADS.get(arch, ())
    scl = {n for n in trainable if ".scl." in n}
    assert scl and all(n.split(".scl.")[1] in ("compress.weight", "expand.weight") for n in scl)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert trainable - scl == {n for n in trainable if any(f"{h}." in n for h in heads)}
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name
    # E gets a gradient at once; C only once E is non-zero (dC = dp^T h, dp ~ E): step 2.
    for name in scl:
        assert name in grads[1] and grads[1][name].abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_is_2fr_per_layer(arch):
    _, model, config = inject(arch)
    sites = model.fastseq_adapter.sites
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".scl." not in n)
    count = fastseq.count_parameters(model)
    assert count.trainable == sum(2 * s.d_ffn * config.r for s in sites) + head
    assert count.total == sum(p.numel() for p in model.parameters())

    _, biased, config = inject(arch, bias=True)
    extra = sum(config.r + s.d_ffn for s in biased.fastseq_adapter.sites)
    assert fastseq.count_parameters(biased).trainable == count.trainable + extra


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_reproduces_logits(arch, tmp_path):
    _, model, _ = inject(arch)
    _train_steps(model, arch)
    fastseq.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["scl_config"]["r"] == 4 and (tmp_path / "adapter_model.safetensors").is_file()

    fresh = fastseq.load_adapter(build(arch), tmp_path)
    x = inputs(arch, seed=5)
    with torch.no_grad():
        assert torch.equal(output_tensor(arch, fresh(**x)), output_tensor(arch, model(**x)))
    assert set(fastseq.scl_parameter_names(fresh)) == set(fastseq.scl_parameter_names(model))


def test_train_down_proj_trains_and_saves_down(tmp_path):
    base, model, config = inject("llama", train_down_proj=True)
    names = fastseq.scl_parameter_names(model)
    assert "model.layers.0.mlp.down_proj.weight" in names
    f, d = 48, 32
    assert fastseq.count_parameters(model).trainable == 2 * (2 * f * 4 + d * f)
    _train_steps(model, "llama")
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)
    fastseq.save_adapter(model, tmp_path)
    fresh = fastseq.load_adapter(build("llama"), tmp_path)
    x = inputs("llama")
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, model(**x).logits)


def test_layers_selects_ffns():
    _, model, _ = inject("llama", layers=[1])
    assert [s.name for s in model.fastseq_adapter.sites] == ["model.layers.1.mlp"]
    assert all("layers.1." in n for n in fastseq.scl_parameter_names(model))
    with pytest.raises(AdapterError, match=r"layers \[5\]"):
        fastseq.get_scl_model(build("llama"), SCLConfig(r=2, layers=[5]))


def test_siglip_pooling_head_mlp_is_adapted():
    _, model, _ = inject("siglip")
    assert "head.mlp" in [s.name for s in model.fastseq_adapter.sites]


def test_hf_trainer_step_runs(tmp_path):
    _, model, _ = inject("bert")
    model.train()
    before = model.bert.encoder.layer[0].intermediate.scl.expand.weight.detach().clone()
    hf_trainer_steps(model, tmp_path)
    assert not torch.equal(before, model.bert.encoder.layer[0].intermediate.scl.expand.weight)


# --- errors ---------------------------------------------------------------------------------

def test_unsupported_model_error_lists_supported():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="llama.*|Registered model types"):
        fastseq.get_scl_model(model, SCLConfig(r=2))


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=2.5), dict(scale=float("nan")), dict(checkpoint_level=3),
                                 dict(backend="cuda"), dict(activation="tanh"), dict(layers=[]), dict(layers=[-1]),
                                 dict(bias="yes")])
def test_bad_config_values(bad):
    with pytest.raises(fastseq.ConfigError):
        SCLConfig(**bad)


def test_config_json_round_trip_and_unknown_field():
    cfg = SCLConfig(r=8, activation="relu", layers=[0, 2], checkpoint_level=2)
    assert SCLConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(fastseq.ConfigError, match="unknown SCLConfig field"):
        SCLConfig.from_dict({"r": 4, "rank": 4})


def test_double_injection_and_missing_head_rejected():
    _, model, _ = inject("llama")
    with pytest.raises(AdapterError, match="already has SCL"):
        fastseq.get_scl_model(model, SCLConfig(r=2))
    with pytest.raises(AdapterError, match="'classifier' not found"):
        fastseq.get_scl_model(build("llama"), SCLConfig(r=2), trainable_modules=["classifier"])


def test_mismatched_adapter_rejected_before_touching_model(tmp_path):
    _, model, _ = inject("llama")
    fastseq.save_adapter(model, tmp_path / "llama")
    other = build("bert")
    with pytest.raises(AdapterError, match="model_type 'llama'.*this model is 'bert'"):
        fastseq.load_adapter(other, tmp_path / "llama")
    assert getattr(other, "fastseq_adapter", None) is None
    assert not any(".scl." in n for n, _ in other.named_parameters())

    import transformers as tf
    from tiny_models import TEXT

    wider = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **dict(TEXT, intermediate_size=64)))
    with pytest.raises(AdapterError, match="d_ffn=64"):
        fastseq.load_adapter(wider, tmp_path / "llama")


def test_adapter_config_records_the_base():
    """adapter_config.json names the base's model_type, FFN style and FFN activation."""
    import tempfile

    for arch, style, act in [("llama", "llama-mlp", "silu"), ("gemma", "llama-mlp", "gelu_tanh"),
                             ("bert", "bert-split", "gelu"), ("gpt2", "gpt2-conv1d", "gelu_tanh")]:
        _, model, _ = inject(arch)
        with tempfile.TemporaryDirectory() as d:
            meta = json.loads((fastseq.save_adapter(model, d) / "adapter_config.json").read_text())
        assert (meta["base_model_type"], meta["ffn_style"], meta["ffn_activation"]) == (arch, style, act)


def test_adapter_for_another_base_with_matching_ffns_is_refused(tmp_path):
    """A Llama adapter and a Gemma base: same FFN names and widths, another model (type and
    activation): refused unless strict=False, which loads it with a warning."""
    _, model, _ = inject("llama")
    fastseq.save_adapter(model, tmp_path / "llama")
    gemma = build("gemma")
    with pytest.raises(AdapterError, match=r"model_type 'llama'.*'gemma'.*activation 'silu'.*'gelu_tanh'.*strict=False"):
        fastseq.load_adapter(gemma, tmp_path / "llama")
    assert getattr(gemma, "fastseq_adapter", None) is None
    with pytest.warns(UserWarning, match="different base .*strict=False.*'llama'"):
        fastseq.load_adapter(gemma, tmp_path / "llama", strict=False)
    saved = fastseq.adapters.adapter_state_dict(model)
    loaded = fastseq.adapters.adapter_state_dict(gemma)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # strict=False does not make impossible loads possible: the FFNs must still match
    with pytest.raises(AdapterError, match="does not have"), pytest.warns(UserWarning, match="'bert'"):
        fastseq.load_adapter(build("bert"), tmp_path / "llama", strict=False)


def test_adapter_config_without_base_fields_still_loads(tmp_path):
    """adapter_config.json files written before ffn_style / ffn_activation (and without a
    model_type) load as before."""
    _, model, _ = inject("llama")
    fastseq.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    for key in ("ffn_style", "ffn_activation"):
        del meta[key]
    path.write_text(json.dumps(meta))
    fastseq.load_adapter(build("llama"), tmp_path)
    with pytest.raises(AdapterError, match="model_type 'llama'"):
        fastseq.load_adapter(build("gemma"), tmp_path)
    meta["base_model_type"] = None
    path.write_text(json.dumps(meta))
    fastseq.load_adapter(build("gemma"), tmp_path)


def test_missing_and_damaged_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastseq.load_adapter(build("llama"), tmp_path / "nowhere")
    _, model, _ = inject("llama")
    fastseq.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="cannot read"):
        fastseq.load_adapter(build("llama"), tmp_path / "a")
