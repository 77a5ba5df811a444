"""The memory model against measured training steps, the planner, the `fastseq plan` CLI."""

import argparse

import pytest
import torch

import fastseq
from fastseq import memory
from fastseq.memory import estimate, measure_step, plan, plan_candidates
from fastseq.quant import QuantizationError, quantize_model

# Stated tolerances (docs/quantization.md): activations within 15 %, frozen weights within 2 %,
# trainable state within 5 %, the three together within 10 %.
ACT_TOL, FROZEN_TOL, TRAIN_TOL, SUM_TOL = 0.15, 0.02, 0.05, 0.10


def _llama(q, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(cfg)
    return quantize_model(model, q, dtype) if q != "none" else model.to(dtype)


def _siglip(q):
    import transformers as tf

    torch.manual_seed(0)
    vision = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, image_size=48,
                  patch_size=8, num_channels=3, vision_use_head=False)
    cfg = tf.SiglipConfig(vision_config=vision, num_labels=3,
                          text_config=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                                           num_attention_heads=4, vocab_size=1024))
    model = tf.SiglipForImageClassification(cfg)
    return quantize_model(model, q) if q != "none" else model


def _rel(a, b):
    return abs(a - b) / b


def _check(est, meas, label):
    assert _rel(est.activations, meas.activations) <= ACT_TOL, (label, est.activations, meas.activations)
    assert _rel(est.frozen, meas.frozen) <= FROZEN_TOL, (label, est.frozen, meas.frozen)
    assert _rel(est.trainable, meas.trainable) <= TRAIN_TOL, (label, est.trainable, meas.trainable)
    total_est = est.frozen + est.trainable + est.activations
    assert _rel(total_est, meas.frozen + meas.trainable + meas.activations) <= SUM_TOL, label


LLAMA_CASES = [  # quantization, dtype, batch, seq, level, optimizer, input grads
    ("none", torch.float32, 2, 64, 0, "adamw", False),
    ("none", torch.bfloat16, 4, 32, 1, "sgd", False),
    ("nf4", torch.float32, 2, 48, 2, "adamw", False),
    ("nf4", torch.bfloat16, 1, 96, 0, "adamw", True),
    ("int8", torch.float32, 3, 40, 0, "adamw", True),
    ("int8", torch.float32, 2, 64, 1, "sgd", False),
]


@pytest.mark.parametrize("case", LLAMA_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-b{c[2]}s{c[3]}-L{c[4]}-{c[5]}")
def test_estimate_matches_measured_llama(case):
    q, dt, B, S, level, opt, input_grads = case
    model = _llama(q, dt)
    model.train()
    scl = fastseq.SCLConfig(r=8, checkpoint_level=level, backend="torch")
    fastseq.get_scl_model(model, scl)
    if input_grads:
        fastseq.quant.prepare_for_kbit_training(model)
    ids = torch.randint(0, 1024, (B, S), generator=torch.Generator().manual_seed(0))
    meas = measure_step(model, dict(input_ids=ids, labels=ids), optimizer=opt)
    est = estimate(model, scl, q, B, S, level, opt, dt, input_requires_grad=input_grads)
    _check(est, meas, case)


@pytest.mark.parametrize("placement,train_compress", [("residual", False), ("parallel", True), ("parallel", False)])
@pytest.mark.parametrize("dt,level", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 1)])
def test_estimate_matches_measured_variants(placement, train_compress, dt, level):
    """The SCL variants: trainable state counted from the variant's parameters, activations from
    what it keeps (a frozen C keeps no h for dC); the placement does not change the activations."""
    model = _llama("none", dt)
    model.train()
    scl = fastseq.SCLConfig(r=8, checkpoint_level=level, backend="torch", placement=placement,
                            train_compress=train_compress)
    fastseq.get_scl_model(model, scl)
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
    meas = measure_step(model, dict(input_ids=ids, labels=ids))
    est = estimate(model, scl, "none", 2, 48, level, "adamw", dt)
    _check(est, meas, (placement, train_compress, dt, level))
    assert _rel(est.activations, meas.activations) < 1e-3 and est.trainable == meas.trainable
    assert est.details["trainable_params"]["scl"] == fastseq.count_parameters(model).trainable
    plain = estimate(model, fastseq.SCLConfig(r=8, placement="residual", train_compress=True), "none", 2, 48, level,
                     "adamw", dt)
    assert est.trainable < plain.trainable  # every variant trains less than plain SCL at the same r
    if level == 0 and not train_compress:
        assert est.activations < plain.activations


@pytest.mark.parametrize("q,level", [("none", 0), ("nf4", 1), ("int8", 2)])
def test_estimate_matches_measured_siglip(q, level):
    model = _siglip(q)
    model.train()
    scl = fastseq.SCLConfig(r=8, checkpoint_level=level, backend="torch")
    fastseq.get_scl_model(model, scl, trainable_modules=("classifier",))
    g = torch.Generator().manual_seed(0)
    batch = dict(pixel_values=torch.randn(3, 3, 48, 48, generator=g), labels=torch.tensor([0, 1, 2]))
    meas = measure_step(model, batch)
    est = estimate(model, scl, q, 3, 1, level)
    _check(est, meas, (q, level))


def test_levels_and_quantization_order_the_estimate():
    scl = fastseq.SCLConfig(r=16)
    acts = [estimate("TinyLlama/TinyLlama_v1.1", scl, "none", 4, 512, lvl, dtype="bf16").activations for lvl in (0, 1, 2)]
    assert acts[0] > acts[1] > acts[2]
    frozen = [estimate("TinyLlama/TinyLlama_v1.1", scl, q, 4, 512, 1, dtype="bf16").frozen for q in ("none", "int8", "nf4")]
    assert frozen[0] > frozen[1] > frozen[2]
    # TinyLlama-1.1B in bf16 is ~2.2 GB of weights; NF4 projections are about a quarter of that
    assert 2.0e9 < frozen[0] < 2.4e9 and frozen[2] < 0.45 * frozen[0]
    est = estimate("TinyLlama/TinyLlama_v1.1", scl, "nf4", 4, 512, 2, dtype="bf16")
    assert est.total == est.frozen + est.trainable + est.activations + est.workspace
    table = est.as_table()
    assert "frozen weights" in table and "total" in table and f"{est.total:,}" in table


def test_known_configs_offline():
    for name in memory.KNOWN_CONFIGS:
        est = estimate(name, fastseq.SCLConfig(r=16), "nf4", 2, 128, 1, dtype="bf16")
        assert est.total > 0
    gemma = memory.model_shape("google/gemma-2b")
    assert (gemma.d, gemma.f, gemma.n_layers, gemma.n_kv_heads, gemma.head_dim, gemma.vocab) == (
        2048, 16384, 18, 1, 256, 256000)
    assert memory.model_shape("google/siglip-so400m-patch14-384").num_patches == 27 * 27
    assert memory.model_shape("tiny-llama").d == 64


def _brute_force(budget, batch, **kw):
    fitting = []
    for q, lvl, mb in plan_candidates(batch):
        est = estimate("TinyLlama/TinyLlama_v1.1", fastseq.SCLConfig(r=16), q, mb, 512, lvl, dtype="bf16", **kw)
        if est.total <= budget:
            fitting.append((q, lvl, mb))
    return fitting


@pytest.mark.parametrize("budget_gib", [2, 3, 4, 6, 8, 12, 40])
def test_planner_picks_the_most_preferred_fit(budget_gib):
    budget = budget_gib * 2**30
    result = plan("TinyLlama/TinyLlama_v1.1", budget, fastseq.SCLConfig(r=16), batch_size=4, seq_len=512)
    fitting = _brute_force(budget, 4)
    qrank = {"none": 0, "int8": 1, "nf4": 2}
    if not fitting:
        assert not result.fits
        return
    best = min(fitting, key=lambda c: (qrank[c[0]], c[1], -c[2]))
    assert result.fits and (result.quantization, result.checkpoint_level, result.micro_batch) == best
    assert result.micro_batch * result.grad_accum == 4 and result.estimate.total <= budget


def test_planner_refuses_impossible_budget_with_closest():
    result = plan("TinyLlama/TinyLlama_v1.1", 100 * 2**20, fastseq.SCLConfig(r=16), batch_size=4, seq_len=512)
    assert not result.fits and result.shortfall > 0
    smallest = min((estimate("TinyLlama/TinyLlama_v1.1", fastseq.SCLConfig(r=16), q, mb, 512, lvl, dtype="bf16").total,
                    (q, lvl, mb)) for q, lvl, mb in plan_candidates(4))
    assert (result.quantization, result.checkpoint_level, result.micro_batch) == smallest[1]
    assert result.shortfall == smallest[0] - 100 * 2**20
    assert "nothing fits" in result.message and "nf4" in result.message and "over the budget" in result.message


def _cli(argv):
    parser = argparse.ArgumentParser(prog="fastseq")
    sub = parser.add_subparsers(dest="command", required=True)
    memory.add_plan_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_plan(capsys):
    assert _cli(["plan", "--model", "TinyLlama/TinyLlama_v1.1", "--budget", "6GB"]) == 0
    out = capsys.readouterr().out
    assert "frozen weights" in out and "fits:" in out and "quantization=" in out
    assert _cli(["plan", "--model", "TinyLlama/TinyLlama_v1.1", "--budget", "100MB"]) == 3  # its own exit code
    assert "nothing fits" in capsys.readouterr().out
    assert _cli(["plan", "--model", "google/gemma-2b", "--budget", "8GB", "--quantization", "nf4",
                 "--checkpoint-level", "2", "--r", "8", "--optimizer", "sgd"]) in (0, 3)
    assert "quantization=nf4, checkpoint_level=2" in capsys.readouterr().out
    from fastseq.cli import main

    assert main(["plan", "--model", "no/such-model-offline", "--budget", "8GB"]) == 2
    captured = capsys.readouterr()
    assert "known configurations" in captured.err and captured.out == ""  # errors go to stderr


def test_parse_bytes_and_errors():
    assert memory.parse_bytes("8GB") == 8 * 2**30 == memory.parse_bytes("8 GiB")
    assert memory.parse_bytes("512MB") == 512 * 2**20 and memory.parse_bytes("123") == 123
    with pytest.raises(memory.MemoryModelError):
        memory.parse_bytes("eight gigs")
    with pytest.raises(QuantizationError, match="none, int8, nf4"):
        estimate("TinyLlama/TinyLlama_v1.1", fastseq.SCLConfig(), "int4")
    with pytest.raises(memory.MemoryModelError, match="optimizer"):
        estimate("TinyLlama/TinyLlama_v1.1", fastseq.SCLConfig(), optimizer="lion")
