"""Partitioners, methods' shared/local split and aggregation, server optimizers, FedProx."""

import random

import pytest
import torch

from fastseq.config import ConfigError
from fastseq.fed.client import prox_term
from fastseq.fed.methods import get_method, matched_lora_rank, weighted_mean
from fastseq.fed.partition import (dirichlet_partition, iid_partition, mean_label_entropy, partition,
                                   pathological_partition, format_histogram)
from fastseq.fed.server_opt import ServerOptimizer
from fastseq.models import load_model


def _keys(n=1000, c=5, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(c) for _ in range(n)]


def _assert_exact_cover(parts, n):
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partition_cover_reproducible_min_size(scheme):
    keys = _keys()
    a = partition(keys, 10, scheme, alpha=0.1, classes_per_client=2, seed=3, min_size=20)
    b = partition(keys, 10, scheme, alpha=0.1, classes_per_client=2, seed=3, min_size=20)
    c = partition(keys, 10, scheme, alpha=0.1, classes_per_client=2, seed=4, min_size=20)
    _assert_exact_cover(a, len(keys))
    assert a == b
    assert a != c
    assert min(len(p) for p in a) >= 20
    assert "client" in format_histogram(keys, a)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    keys = _keys(2000)
    ent = {a: sum(mean_label_entropy(keys, dirichlet_partition(keys, 10, alpha=a, seed=s)) for s in range(3))
           for a in (100.0, 1.0, 0.1)}
    assert ent[100.0] > ent[1.0] > ent[0.1]
    iid = mean_label_entropy(keys, iid_partition(keys, 10, seed=0))
    assert iid > ent[0.1] / 3


def test_dirichlet_min_size_rebalances():
    keys = _keys(200, 4)
    parts = dirichlet_partition(keys, 10, alpha=0.01, seed=0, min_size=15, max_tries=1)
    _assert_exact_cover(parts, 200)
    assert min(len(p) for p in parts) >= 15


def test_pathological_classes_per_client_and_errors():
    keys = _keys(1000, 10)
    parts = pathological_partition(keys, 5, classes_per_client=2, seed=1)
    assert all(len({keys[i] for i in p}) == 2 for p in parts)
    with pytest.raises(ConfigError):
        pathological_partition(keys, 2, classes_per_client=2)
    with pytest.raises(ConfigError):
        partition(keys, 3, "nope")


def test_server_optimizers_vs_hand():
    x = {"w": torch.tensor([1.0, -2.0])}
    d1, d2 = torch.tensor([0.5, 0.1]), torch.tensor([-0.2, 0.3])
    opt = ServerOptimizer("fedavg")
    assert torch.allclose(opt.step(x, {"w": d1})["w"], x["w"] + d1)
    opt = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)
    x1 = opt.step(x, {"w": d1})["w"]
    assert torch.allclose(x1, x["w"] + 0.5 * d1)
    x2 = opt.step({"w": x1}, {"w": d2})["w"]
    assert torch.allclose(x2, x1 + 0.5 * (0.9 * d1 + d2))
    opt = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    y1 = opt.step(x, {"w": d1})["w"]
    m, v = 0.1 * d1, 0.01 * d1 * d1
    assert torch.allclose(y1, x["w"] + 0.1 * m / (v.sqrt() + 1e-3))
    y2 = opt.step({"w": y1}, {"w": d2})["w"]
    m, v = 0.9 * m + 0.1 * d2, 0.99 * v + 0.01 * d2 * d2
    assert torch.allclose(y2, y1 + 0.1 * m / (v.sqrt() + 1e-3))
    st = opt.state_dict()
    opt2 = ServerOptimizer("fedadam", lr=0.1)
    opt2.load_state_dict(st)
    assert torch.equal(opt2.step({"w": y2}, {"w": d1})["w"], opt.step({"w": y2}, {"w": d1})["w"])


def test_prox_term_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    anchor = torch.tensor([0.5, 3.0])
    prox_term({"w": w}, {"w": anchor}, mu=0.2).backward()
    assert torch.allclose(w.grad, 0.2 * (w.detach() - anchor))


def test_weighted_mean():
    s = [{"a": torch.tensor([1.0])}, {"a": torch.tensor([4.0])}]
    assert torch.allclose(weighted_mean(s, [1, 2], ["a"])["a"], torch.tensor([3.0]))


def _prepared(name, **kw):
    model, _ = load_model("tiny-bert", "text-classification", num_labels=3)
    m = get_method(name, r=4, **kw)
    m.prepare(model, ["classifier"], seed=0)
    return m


def test_scl_split():
    m = _prepared("scl")
    assert m.shared_names() and not m.local_names()
    assert all(".scl." in n or n.startswith("classifier") for n in m.shared_names())
    assert any(n.startswith("classifier") for n in m.shared_names())


def test_lora_budget_and_splits():
    assert matched_lora_rank(2 * 172 * 8, 64, 172) == 6  # SCL r=8's 2fr per layer
    fedavg = _prepared("fedavg-lora")
    assert fedavg.lora_r == matched_lora_rank(2 * 172 * 4, 64, 172) == 3
    assert set(fedavg.shared_names()) >= set(fedavg.a_names()) | set(fedavg.b_names())
    assert any("classifier" in n for n in fedavg.shared_names())
    assert not fedavg.local_names()
    ffa = _prepared("ffa-lora")
    assert not set(ffa.a_names()) & set(ffa.trainable_names())
    assert set(ffa.b_names()) <= set(ffa.shared_names())
    sa = _prepared("fedsa-lora")
    assert sa.personalized
    assert set(sa.local_names()) == set(sa.b_names())
    assert set(sa.a_names()) <= set(sa.shared_names())
    assert not set(sa.b_names()) & set(sa.shared_names())
    explicit = _prepared("fedavg-lora", lora_r=3)
    assert explicit.lora_r == 3 and explicit.lora_alpha == 6


def test_fedex_aggregate_is_exact():
    m = _prepared("fedex-lora", lora_r=2)
    g = m.global_state()
    torch.manual_seed(1)
    clients = []
    for _ in range(3):
        st = {k: (v + 0.1 * torch.randn_like(v)) for k, v in g.items() if k in m.shared_names()}
        clients.append(st)
    w = [1.0, 2.0, 3.0]
    out = m.aggregate(g, clients, w)
    for mname, a, b, s in m.pairs:
        assert s == m.lora_alpha / m.lora_r
        want_prod = sum((wk / 6.0) * s * (c[b] @ c[a]) for c, wk in zip(clients, w))
        eff = out["fedex_residual:" + mname] + s * (out[b] @ out[a])
        assert torch.allclose(eff, want_prod, atol=1e-6)
        # the folded model's effective weight: W0 + residual + s * B_bar A_bar
        m.load(out)
        mod = m.model.get_submodule(mname)
        W = mod.base_layer.weight.detach()
        assert torch.allclose(W + s * (out[b] @ out[a]), m.base0[mname] + want_prod, atol=1e-5)
    # FedAvg-LoRA's naive average is not exact
    assert any(not torch.allclose(out[b] @ out[a] * s, sum((wk / 6.0) * s * (c[b] @ c[a]) for c, wk in zip(clients, w)))
               for _, a, b, s in m.pairs)


@pytest.mark.parametrize("placement,train_compress,per_layer", [
    ("residual", True, 2 * 172 * 4), ("residual", False, 172 * 4), ("parallel", True, 4 * (172 + 64)),
    ("parallel", False, 64 * 4)])
def test_lora_rank_follows_the_scl_variants_trainable_count(placement, train_compress, per_layer):
    """tiny-bert: d 64, f 172, 2 layers. LoRA (A and B) and FFA-LoRA (B only) train about what
    the SCL variant of the same config trains."""
    scl = _prepared("scl", scl_placement=placement, scl_train_compress=train_compress)
    assert scl.info["adapter_params"] == 2 * per_layer == scl.info["adapter_trainable_params"]
    for name, factors in (("fedavg-lora", 2), ("ffa-lora", 1)):
        lora = _prepared(name, scl_placement=placement, scl_train_compress=train_compress)
        assert lora.lora_r == max(1, round(per_layer / (factors * (64 + 172))))
        trained = lora.info["adapter_trainable_params"]
        assert abs(trained - 2 * per_layer) <= 2 * factors * (64 + 172) / 2, (trained, per_layer)


def test_lr_groups_find_the_head_in_every_wrapper():
    for name in ("scl", "fedavg-lora", "ffa-lora"):
        m = _prepared(name, scl_train_compress=name != "scl")
        g = m.lr_groups()
        assert g["head"] and all("classifier" in n for n in g["head"]), name
        assert sorted(g["head"] + g["compress"] + g["adapter"]) == sorted(m.trainable_names())
        assert not g["compress"]  # LoRA has no C; the SCL here has a frozen one
    scl = _prepared("scl")
    assert {n.rsplit(".scl.", 1)[1] for n in scl.lr_groups()["compress"]} == {"compress.weight"}
