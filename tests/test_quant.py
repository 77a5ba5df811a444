"""Quantized (bitsandbytes NF4 / int8) backbones under SCL: equivalence at init, training,
frozen weights untouched, adapter save/load, fused levels vs the reference, errors."""

import builtins
import importlib.util

import pytest
import torch

import fastseq
from fastseq import quant
from fastseq.models import load_model
from tiny_models import PLAIN_SCL

pytest.importorskip("bitsandbytes")

QUANTS = ("nf4", "int8")


def _llama(q):
    model, _ = load_model("tiny-llama", "causal-lm", quantization=q)
    return model


def _siglip(q):
    model, _ = load_model("tiny-siglip", "image-classification", num_labels=3, quantization=q)
    return model


def _text_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1024, (2, 12), generator=g)
    return dict(input_ids=ids, labels=ids)


def _image_batch():
    g = torch.Generator().manual_seed(2)
    return dict(pixel_values=torch.randn(4, 3, 32, 32, generator=g), labels=torch.tensor([0, 1, 2, 1]))


def _frozen_snapshot(model):
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            out[name] = p.detach().clone()
    return out


@pytest.mark.parametrize("q", QUANTS)
def test_projections_quantized_head_not(q):
    llama = _llama(q)
    names = quant.quantized_module_names(llama)
    assert any(n.endswith("mlp.gate_proj") for n in names) and any(n.endswith("self_attn.q_proj") for n in names)
    assert not any("lm_head" in n or "embed" in n for n in names)
    sig = _siglip(q)
    names = quant.quantized_module_names(sig)
    assert any(n.endswith("mlp.fc1") for n in names) and any(n.endswith("self_attn.out_proj") for n in names)
    assert "classifier" not in names and type(sig.classifier) is torch.nn.Linear
    assert all(fastseq.adapters.scl.is_quantized(s.down) for s in fastseq.find_ffn_sites(sig))


@pytest.mark.parametrize("q", QUANTS)
@pytest.mark.parametrize("kind", ["llama", "siglip"])
def test_scl_on_quantized_base_trains(q, kind, tmp_path):
    build, batch, heads = (_llama, _text_batch(), ()) if kind == "llama" else (_siglip, _image_batch(), ("classifier",))
    for level in (0, 1, 2):
        model = build(q)
        model.train()  # bitsandbytes' training matmul (dequantize + GEMM), what SCL training runs
        with torch.no_grad():
            base = model(**batch).logits
        fastseq.get_scl_model(model, fastseq.SCLConfig(r=4, checkpoint_level=level, backend="torch"),
                              trainable_modules=heads)
        with torch.no_grad():
            init = model(**batch).logits
        torch.testing.assert_close(init, base, atol=1e-4, rtol=1e-4)
        frozen = _frozen_snapshot(model)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".scl." in n or n.startswith("classifier") for n in trainable)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        losses = []
        for _ in range(6):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 1e-3, (q, kind, level, losses)
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p.detach(), frozen[n]), f"frozen {n} changed"
            else:
                assert not torch.equal(p.detach(), trainable[n]), f"trainable {n} did not change"
        for m in model.modules():  # quantization constants untouched too
            st = getattr(getattr(m, "weight", None), "quant_state", None)
            if st is not None:
                assert st.absmax.isfinite().all()
        with torch.no_grad():
            trained = model(**batch).logits
        if level == 1:  # save/load round trip through a freshly quantized base (one level is enough)
            fastseq.save_adapter(model, tmp_path / f"{q}-{kind}")
            fresh = build(q)
            fresh.train()
            fastseq.load_adapter(fresh, tmp_path / f"{q}-{kind}")
            with torch.no_grad():
                torch.testing.assert_close(fresh(**batch).logits, trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q", QUANTS)
@pytest.mark.parametrize("kind", ["llama", "siglip"])
def test_fused_levels_match_reference_on_quantized_base(q, kind):
    build, batch = (_llama, _text_batch()) if kind == "llama" else (_siglip, _image_batch())
    results = {}
    for level in (0, 1, 2):
        model = build(q)
        model.train()
        fastseq.get_scl_model(model, fastseq.SCLConfig(r=4, checkpoint_level=level, backend="torch", **PLAIN_SCL))
        torch.manual_seed(3)
        with torch.no_grad():  # a non-zero E so that every SCL gradient is exercised
            for n, p in model.named_parameters():
                if n.endswith("scl.expand.weight"):
                    p.copy_(torch.randn_like(p) * 0.1)
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".scl." in n}
        results[level] = (out.logits.detach(), grads)
    ref_out, ref_grads = results[0]
    for level in (1, 2):
        out, grads = results[level]
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=f"{q} {kind} L{level} {n}")


def test_prepare_for_kbit_training():
    model, _ = load_model("tiny-llama", "causal-lm", quantization="nf4", dtype=torch.bfloat16)
    fastseq.get_scl_model(model, fastseq.SCLConfig(r=4, checkpoint_level=2, backend="torch"))
    quant.prepare_for_kbit_training(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == fastseq.scl_parameter_names(model)  # adapter kept, base frozen
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    emb_out = {}
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: emb_out.setdefault("o", o))
    batch = _text_batch()
    loss = model(**batch).loss
    assert emb_out["o"].requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_bnb_config_fields():
    cfg = quant.bnb_config("nf4", torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16 and "classifier" in cfg.llm_int8_skip_modules
    assert quant.bnb_config("nf4", double_quant=False).bnb_4bit_use_double_quant is False
    assert quant.bnb_config("int8").load_in_8bit


def test_unknown_quantization_lists_valid_ones():
    with pytest.raises(quant.QuantizationError, match="none, int8, nf4"):
        quant.bnb_config("fp3")
    with pytest.raises(quant.QuantizationError, match="valid values"):
        load_model("tiny-llama", "causal-lm", quantization="int4")


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "bitsandbytes" else real_find_spec(name, *a, **k))
    with pytest.raises(quant.QuantizationError, match=r"pip install 'fastseq\[quant\]'"):
        quant.bnb_config("nf4")
    with pytest.raises(quant.QuantizationError, match=r"fastseq\[quant\]"):
        load_model("tiny-llama", "causal-lm", quantization="nf4")


def test_broken_bitsandbytes_import(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise RuntimeError("simulated broken install")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(quant.QuantizationError, match="cannot be imported"):
        quant.require_bitsandbytes()


def test_unsupported_device():
    with pytest.raises(quant.QuantizationError):
        quant.check_device("nf4", "meta")
    if not torch.cuda.is_available():
        with pytest.raises(quant.QuantizationError, match="CUDA is not available"):
            quant.check_device("int8", "cuda")
    quant.check_device("nf4", "cpu")
    quant.check_device("int8", "cpu")
