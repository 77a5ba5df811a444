"""Several SCL adapters on one model, through PEFT and through fastseq's own API: each adapter
(and each row of a mixed batch) computes what that adapter computes alone, outputs and
gradients; and the PEFT-specific behaviour PEFT's generic tests do not pin down (merge refused,
target_modules, init_weights, autocast_adapter_dtype, frozen C as buffers, old files)."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

import fastseq  # noqa: E402
from fastseq import SCLConfig  # noqa: E402
from fastseq.adapters import AdapterError  # noqa: E402
from fastseq.adapters.peft_method import SCLTunerLayer  # noqa: E402

from tiny_models import build, inputs, output_tensor  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# Two adapters that differ in everything that can differ per adapter (placement, C trained or
# not, rank, path). BERT's FFN is split over two modules, GPT-2's uses Conv1D: both are covered.
PEFT_ADAPTERS = {
    "a": dict(r=4, placement="parallel", checkpoint_level=1, backend="torch"),
    "b": dict(r=2, placement="residual", train_compress=True, checkpoint_level=0),
}
ROWS = ["a", "b", "__base__", "a"]  # the mixed batch: adapter of each row


def _peft_two_adapters(arch):
    model = peft.get_peft_model(build(arch), fastseq.SCLPeftConfig(init_weights=False, **PEFT_ADAPTERS["a"]),
                                adapter_name="a")
    model.add_adapter("b", fastseq.SCLPeftConfig(init_weights=False, **PEFT_ADAPTERS["b"]))
    model.base_model.set_requires_grad(["a", "b"], True)  # gradients of both, to compare
    return model.eval()


def _loss(output: torch.Tensor) -> torch.Tensor:
    return (output.float() ** 2).mean()  # a mean over rows: row groups weigh in by their share


def _rows(batch: dict, rows: list[int]) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def _scl_grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if ".scl_" in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_peft_mixed_batch_rows_match_each_adapter_alone(arch):
    model = _peft_two_adapters(arch)
    batch = inputs(arch, batch=len(ROWS), seed=4)
    mixed = output_tensor(arch, model(**batch, adapter_names=ROWS))
    _loss(mixed).backward()
    mixed_grads = _scl_grads(model)

    alone = {}
    for name in ("a", "b", "__base__"):
        rows = [i for i, n in enumerate(ROWS) if n == name]
        if name == "__base__":
            with model.disable_adapter(), torch.no_grad():
                out = output_tensor(arch, model(**_rows(batch, rows)))
        else:
            model.set_adapter(name)
            model.base_model.set_requires_grad(["a", "b"], True)
            out = output_tensor(arch, model(**_rows(batch, rows)))
            # loss_of is a mean over the whole batch: weight this adapter's rows as in the mixed loss
            (_loss(out) * len(rows) / len(ROWS)).backward()
            grads = _scl_grads(model)
            assert grads and all(f".{name}." in n for n in grads)
            for n, g in grads.items():
                torch.testing.assert_close(mixed_grads[n], g, rtol=1e-4, atol=1e-7)
        alone[name] = out.detach()
        torch.testing.assert_close(mixed[rows].detach(), out.detach(), rtol=1e-5, atol=1e-6)
    # each adapter had its gradients, and the adapters do change the output
    assert {n.split(".scl_")[1].split(".")[1] for n in mixed_grads} == {"a", "b"}
    assert not torch.allclose(alone["a"][0], alone["__base__"][0], atol=1e-4)


def test_peft_mixed_batch_errors_say_what_to_do():
    model = _peft_two_adapters("llama")
    batch = inputs("llama", batch=2)
    with pytest.raises(AdapterError, match=r"\['c'\].*it has \['a', 'b'\]"):
        model(**batch, adapter_names=["a", "c"])
    with pytest.raises(AdapterError, match="2 rows; give one adapter name"):
        model(**batch, adapter_names=["a", "b", "a"])
    model.train()
    with pytest.raises(AdapterError, match=r"model.eval\(\)"):
        model(**batch, adapter_names=["a", "b"])


def test_peft_several_active_adapters_add_their_branches():
    model = _peft_two_adapters("llama")
    layer = next(m for m in model.modules() if isinstance(m, SCLTunerLayer))
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))

    def run(active):
        layer.set_adapter(active)
        with torch.no_grad():
            return layer(x)

    base, a, b, both = run([]), run(["a"]), run(["b"]), run(["a", "b"])
    assert not torch.allclose(a, base) and not torch.allclose(b, base)
    # residual and parallel branches both enter linearly after sigma: the deltas add, as LoRA's
    torch.testing.assert_close(both - base, (a - base) + (b - base), rtol=1e-4, atol=1e-6)


def test_peft_delete_adapter_drops_its_tensors():
    model = _peft_two_adapters("llama")
    layer = next(m for m in model.modules() if isinstance(m, SCLTunerLayer))
    gone = weakref.ref(layer.scl_out["b"].weight)
    model.delete_adapter("b")
    gc.collect()
    assert gone() is None
    assert set(layer.scl_forward) == set(layer.scl_out) == set(layer.scl_compress) == {"a"}
    model.add_adapter("b", fastseq.SCLPeftConfig(**PEFT_ADAPTERS["b"]))  # the name is free again
    assert set(layer.scl_forward) == {"a", "b"}


def test_peft_save_selected_adapters_and_load_them_by_name(tmp_path):
    model = _peft_two_adapters("llama")
    batch = inputs("llama", seed=6)
    want = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        with torch.no_grad():
            want[name] = model(**batch).logits
    model.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert sorted(p.name for p in (tmp_path / "only_b").iterdir() if p.is_dir()) == ["b"]  # PEFT: a folder per name
    loaded = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / "only_b" / "b"), adapter_name="b")
    model.save_pretrained(tmp_path / "all")
    loaded.load_adapter(str(tmp_path / "all" / "a"), adapter_name="a")
    for name in ("a", "b"):
        loaded.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, want[name], rtol=0, atol=0)


def test_peft_merge_is_refused_with_the_reason_and_unload_works():
    model = _peft_two_adapters("gpt2")
    base = build("gpt2")
    batch = inputs("gpt2")
    for merge in (model.merge_and_unload, model.merge_adapter,
                  lambda: model.base_model.model.transformer.h[0].mlp.merge()):
        with pytest.raises(AdapterError, match=r"nonlinear.*cannot be merged.*unload\(\)"):
            merge()
    unloaded = model.unload()
    assert not any(isinstance(m, SCLTunerLayer) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**batch).logits, base(**batch).logits, rtol=0, atol=0)


def test_peft_target_modules_are_honoured_or_refused():
    model = peft.get_peft_model(build("llama"), fastseq.SCLPeftConfig(r=2, target_modules=["layers.1.mlp"]))
    assert model.peft_config["default"].target_modules == ["model.layers.1.mlp"]
    assert [n for n, m in model.named_modules() if isinstance(m, SCLTunerLayer)] == [
        "base_model.model.model.layers.1.mlp"]
    regex = peft.get_peft_model(build("llama"), fastseq.SCLPeftConfig(r=2, target_modules=r".*\.0\.mlp"))
    assert regex.peft_config["default"].target_modules == ["model.layers.0.mlp"]
    for wrong in (["up_proj", "down_proj"], ["layers.1.mlp", "q_proj"], r".*attn.*"):
        with pytest.raises(AdapterError, match="SCL wraps whole FFNs.*not single projections"):
            peft.get_peft_model(build("llama"), fastseq.SCLPeftConfig(r=2, target_modules=wrong))
    with pytest.raises(AdapterError, match="layers_to_transform.*differ"):
        fastseq.SCLPeftConfig(layers=[0], layers_to_transform=1)
    assert fastseq.SCLPeftConfig(layers_to_transform=1).layers == [1]


@pytest.mark.parametrize("level", [0, 1, 2])
def test_peft_init_weights(level):
    base = build("llama")
    batch = inputs("llama")
    with torch.no_grad():
        want = base(**batch).logits
        for init_weights in (True, False):
            model = peft.get_peft_model(build("llama"), fastseq.SCLPeftConfig(
                r=2, checkpoint_level=level, backend="torch", init_weights=init_weights))
            got = model(**batch).logits
            if init_weights:  # the base model's output, bit for bit on Llama at every level
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            else:
                assert not torch.allclose(got, want, atol=1e-4)
    with pytest.raises(AdapterError, match="init_weights must be True"):
        fastseq.SCLPeftConfig(init_weights="gaussian")


def test_peft_autocast_adapter_dtype():
    def dtypes(**kw):
        model = peft.get_peft_model(build("llama").to(torch.bfloat16), fastseq.SCLPeftConfig(r=2), **kw)
        model.add_adapter("other", fastseq.SCLPeftConfig(r=2), **kw)
        layer = next(m for m in model.modules() if isinstance(m, SCLTunerLayer))
        tensors = [t for name in ("default", "other") for t in (layer.scl_compress[name].weight,
                                                                layer.scl_out[name].weight)]
        with torch.no_grad():
            model(**inputs("llama"))  # runs in either dtype
        return {t.dtype for t in tensors}

    assert dtypes() == {torch.float32}  # fastseq's choice, = PEFT's default
    assert dtypes(autocast_adapter_dtype=False) == {torch.bfloat16}


def test_peft_frozen_c_is_a_buffer_and_old_files_load():
    """tests/fixtures/peft_scl_before_buffers was written by fastseq before this change (C a frozen
    Parameter; r=2, random P, tiny Llama of tiny_models.build): it loads into C's buffers."""
    from safetensors.torch import load_file

    model = peft.PeftModel.from_pretrained(build("llama"), FIXTURES / "peft_scl_before_buffers")
    layer = model.base_model.model.model.layers[0].mlp
    assert "weight" in dict(layer.scl_compress["default"].named_buffers())
    assert not any(".scl_compress." in n for n, _ in model.named_parameters())
    saved = load_file(FIXTURES / "peft_scl_before_buffers" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.scl_compress.weight"
    assert torch.equal(layer.scl_compress["default"].weight, saved[key])
    assert torch.equal(layer.scl_out["default"].weight, saved[key.replace("scl_compress", "scl_out")])
    # the same tensors through fastseq's own injection give the same model
    native = fastseq.get_scl_model(build("llama"), SCLConfig(r=2, checkpoint_level=0))
    with torch.no_grad():
        for i in range(2):
            scl = native.model.layers[i].mlp.scl
            prefix = f"base_model.model.model.layers.{i}.mlp."
            scl.compress.weight.copy_(saved[prefix + "scl_compress.weight"])
            scl.project.weight.copy_(saved[prefix + "scl_out.weight"])
        batch = inputs("llama")
        torch.testing.assert_close(model(**batch).logits, native(**batch).logits, rtol=0, atol=0)
        assert not torch.allclose(model(**batch).logits, build("llama")(**batch).logits, atol=1e-4)


# --- fastseq's own API: get_scl_model / save_adapter / load_adapter with adapter names ------

NATIVE_ADAPTERS = {
    "default": SCLConfig(r=4, placement="parallel", checkpoint_level=1, backend="torch"),
    "personal": SCLConfig(r=2, placement="residual", train_compress=True, checkpoint_level=0),
}


def _randomize(model, adapter_name, seed):
    g = torch.Generator().manual_seed(seed)
    state = fastseq.adapters.adapters_of(model)[adapter_name]
    with torch.no_grad():
        for scl in state.scl_layers().values():
            scl.out.weight.copy_(torch.randn(scl.out.weight.shape, generator=g) * 0.3)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_native_named_adapters_match_each_alone(arch, tmp_path):
    heads = ["classifier"] if arch == "bert" else []
    model = fastseq.get_scl_model(build(arch), NATIVE_ADAPTERS["default"], trainable_modules=heads)
    fastseq.get_scl_model(model, NATIVE_ADAPTERS["personal"], adapter_name="personal")
    for seed, name in enumerate(NATIVE_ADAPTERS):
        _randomize(model, name, seed)
    assert model.fastseq_adapter.name == "default"
    assert all(".scl_adapters.personal." not in n for n in fastseq.scl_parameter_names(model))

    # each adapter alone: saved under its name, loaded as the only adapter of a fresh base
    alone = {}
    for name in NATIVE_ADAPTERS:
        fastseq.save_adapter(model, tmp_path / name, adapter_name=name)
        alone[name] = fastseq.load_adapter(build(arch), tmp_path / name).eval()
    batch = inputs(arch, batch=len(ROWS), seed=2)
    rows = [r if r != "a" else "default" for r in ROWS]
    rows = [r if r != "b" else "personal" for r in rows]
    for n, p in model.named_parameters():  # gradients of both adapters (a frozen C too), to compare
        p.requires_grad_(".scl" in n)
    with fastseq.adapters.mixed_adapter_batch(model, rows):
        mixed = output_tensor(arch, model(**batch))
    _loss(mixed).backward()
    for name in (*NATIVE_ADAPTERS, "__base__"):
        idx = [i for i, n in enumerate(rows) if n == name]
        ref = alone[name] if name != "__base__" else alone["default"]
        if name == "__base__":
            with fastseq.adapters.disable_adapter(ref), torch.no_grad():
                want = output_tensor(arch, ref(**_rows(batch, idx)))
        else:
            for p in ref.parameters():
                p.requires_grad_(True)
            want = output_tensor(arch, ref(**_rows(batch, idx)))
            (_loss(want) * len(idx) / len(rows)).backward()
            state = fastseq.adapters.adapters_of(model)[name]
            got_grads = {state.file_name(n): p.grad for n, p in model.named_parameters()
                         if n.startswith(tuple(state.scl_prefix(s) + "." for s in state.sites))}
            ref_grads = {n: p.grad for n, p in ref.named_parameters() if ".scl." in n}
            assert got_grads.keys() == ref_grads.keys() and got_grads
            for n in ref_grads:
                torch.testing.assert_close(got_grads[n], ref_grads[n], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(mixed[idx].detach(), want.detach(), rtol=1e-5, atol=1e-6)

    # set_adapter runs and trains the other one; the saved file is the same whatever the name
    fastseq.adapters.set_adapter(model, "personal")
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(arch, model(**batch)), output_tensor(arch, alone["personal"](**batch)))
    assert all(".scl_adapters.personal." in n for n in fastseq.scl_parameter_names(model))
    reloaded = fastseq.load_adapter(copy.deepcopy(alone["default"]), tmp_path / "personal", adapter_name="personal",
                                    is_trainable=False)
    assert sorted(fastseq.adapters.adapters_of(reloaded)) == ["default", "personal"]


def test_native_adapter_lifecycle_and_errors():
    model = fastseq.get_scl_model(build("llama"), SCLConfig(r=2))
    fastseq.get_scl_model(model, SCLConfig(r=2), adapter_name="other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".scl." in n for n in trainable)  # "other" is frozen until set_adapter
    with pytest.raises(AdapterError, match="already has SCL layers for the adapter named 'other'"):
        fastseq.get_scl_model(model, SCLConfig(r=2), adapter_name="other")
    with pytest.raises(AdapterError, match="only a model's first SCL adapter may have trainable_modules"):
        fastseq.get_scl_model(model, SCLConfig(r=2), trainable_modules=["lm_head"], adapter_name="third")
    with pytest.raises(AdapterError, match=r"no SCL adapter named 'nope'; its adapters are \['default', 'other'\]"):
        fastseq.adapters.set_adapter(model, "nope")
    with pytest.raises(AdapterError, match="'__base__'"):
        fastseq.get_scl_model(model, SCLConfig(r=2), adapter_name="__base__")
    with pytest.raises(AdapterError, match=r"does not have: \['nope'\]"):
        with fastseq.adapters.mixed_adapter_batch(model, ["nope", "default"]):
            pass

    fastseq.adapters.set_adapter(model, ["default", "other"])  # both run (branches add) and train
    names = fastseq.scl_parameter_names(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert any(".scl_adapters.other." in n for n in names) and any(".mlp.scl." in n for n in names)
    fastseq.adapters.delete_adapter(model, "default")  # an active one: "other" stays
    assert model.fastseq_adapter.name == "other"
    assert not hasattr(model.model.layers[0].mlp, "scl")
    fastseq.adapters.delete_adapter(model, "other")  # the last one: the base model is back
    assert not any("scl" in n for n, _ in model.named_parameters())
    batch = inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, build("llama")(**batch).logits, rtol=0, atol=0)
    fastseq.get_scl_model(model, SCLConfig(r=2))  # and takes a new adapter like any base


# --- a federated method on two adapters: FedSA-style personalisation for SCL ----------------

def test_fedsa_scl_shares_the_global_adapter_and_keeps_the_personal_one(tmp_path):
    from fastseq.fed.engine import run_experiment
    from fastseq.fed.methods import get_method
    from fastseq.models import load_model

    from fed_helpers import history, tiny_config

    model, _ = load_model("tiny-bert", "text-classification", num_labels=3)
    method = get_method("fedsa-scl", r=4)
    method.prepare(model, ["classifier"], seed=0)
    shared, local = set(method.shared_names()), set(method.local_names())
    assert method.personalized and shared and local and not shared & local
    assert all(".scl_adapters.personal." in n for n in local)
    assert all(".scl." in n or n.startswith("classifier") for n in shared)
    assert any(".compress." in n for n in method.lr_groups()["compress"]) is method.scl_train_compress
    assert model.fastseq_selection.active == ["default", "personal"]

    cfg = tiny_config(tmp_path, method="fedsa-scl", rounds=2)
    run_experiment(cfg, echo=lambda s: None)
    hist = history(cfg.out)
    assert hist[-1]["personalized"] and len(hist[-1]["per_client_accuracy"]) == 3
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]
    saved = fastseq.adapters.read_adapter_config(Path(cfg.out) / "adapter")  # the global adapter, fastseq's format
    assert saved["scl_config"]["r"] == cfg.r
    # each client kept its own personal adapter, trained away from its zero init, and nothing else
    from safetensors.torch import load_file

    states = [load_file(sorted((Path(cfg.out) / "clients" / c).glob("round_*.safetensors"))[-1])
              for c in ("client_0", "client_1", "client_2")]
    personal = [{k: v for k, v in st.items() if k.startswith("local")} for st in states]
    assert all(p and all(".scl_adapters.personal." in k for k in p) for p in personal)
    outs = [{k: v for k, v in p.items() if ".project." in k} for p in personal]
    assert all(any(v.abs().sum() > 0 for v in o.values()) for o in outs)
    assert not all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
