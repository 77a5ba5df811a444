"""Robust aggregators (median, trimmed mean, norm clipping) and simulated hostile clients."""

import json

import pytest
import torch

from fastseq.config import ConfigError
from fastseq.fed.aggregators import clip_update, coordinate_median, get_combiner, trim_count, trimmed_mean
from fastseq.fed.attacks import Attack, hostile_clients
from fastseq.fed.engine import run_experiment
from fastseq.fed.experiment import ExperimentConfig
from fastseq.fed.methods import get_method, weighted_mean

from fed_helpers import history, tiny_config


def _states(values):
    return [{"w": torch.tensor(v, dtype=torch.float32)} for v in values]


def test_median_and_trimmed_mean_are_coordinate_wise_and_unweighted():
    states = _states([[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0], [4.0, 2.0]])
    weights = [1, 1, 1, 1000, 1]  # ignored: a hostile client may claim any example count
    assert torch.equal(coordinate_median(states, weights, ["w"])["w"], torch.tensor([3.0, 1.0]))
    tm = trimmed_mean(0.2)(states, weights, ["w"])["w"]  # drops 1 at each end per coordinate
    assert torch.allclose(tm, torch.tensor([3.0, 1.0]))
    even = coordinate_median(_states([[1.0], [2.0], [4.0], [9.0]]), [1] * 4, ["w"])["w"]
    assert torch.equal(even, torch.tensor([3.0]))
    assert [trim_count(0.2, n) for n in (3, 4, 5, 10)] == [0, 0, 1, 2]
    assert trim_count(0.49, 2) == 0 and trim_count(0.49, 3) == 1  # always leaves one


def test_clip_update_bounds_the_l2_norm_over_all_tensors():
    t = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    clipped, norm = clip_update(t, 1.0)
    assert norm == pytest.approx(5.0)
    total = sum(float(v.pow(2).sum()) for v in clipped.values()) ** 0.5
    assert total == pytest.approx(1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    same, _ = clip_update(t, 10.0)
    assert same is t  # under the bound: untouched


def test_mean_is_todays_weighted_mean():
    assert get_combiner("mean") is weighted_mean
    assert get_combiner("norm-clip") is weighted_mean
    with pytest.raises(ValueError):
        get_combiner("krum")


def _fedex_with_pairs(d=4, f=6, r=2):
    """A FedEx-LoRA method with two hand-made (A, B) pairs and no model."""
    m = get_method("fedex-lora")
    m.pairs = [(f"m{i}", f"m{i}.A", f"m{i}.B", 0.5) for i in range(2)]
    m._params = {}
    for _, a, b, _ in m.pairs:
        m._params[a] = torch.nn.Parameter(torch.zeros(r, d))
        m._params[b] = torch.nn.Parameter(torch.zeros(f, r))
    return m


def test_fedex_mean_aggregation_is_bit_identical_to_the_old_rule():
    torch.manual_seed(0)
    m = _fedex_with_pairs()
    names = m.shared_names()
    clients = [{n: torch.randn_like(m._params[n]) for n in names} for _ in range(3)]
    weights = [3.0, 5.0, 7.0]
    glob = {n: torch.zeros_like(m._params[n]) for n in names}
    glob.update({m.PREFIX + mod: torch.randn(6, 4) for mod, _, _, _ in m.pairs})
    new = m.aggregate(glob, clients, weights)
    # the rule before robust aggregators, verbatim
    old = weighted_mean(clients, weights, names)
    total = float(sum(weights))
    for mod, a, b, s in m.pairs:
        key = m.PREFIX + mod
        mean_prod = torch.zeros_like(glob[key])
        for st, w in zip(clients, weights):
            mean_prod += (w / total) * (st[b].float() @ st[a].float())
        old[key] = glob[key] + s * (mean_prod - old[b] @ old[a])
    assert set(new) == set(old)
    assert all(torch.equal(new[k], old[k]) for k in old)


def test_fedex_median_makes_the_effective_update_the_median_of_products():
    torch.manual_seed(1)
    m = _fedex_with_pairs()
    names = m.shared_names()
    clients = [{n: torch.randn_like(m._params[n]) for n in names} for _ in range(5)]
    clients[0] = {n: -10 * t for n, t in clients[0].items()}  # one hostile client
    glob = {n: torch.zeros_like(m._params[n]) for n in names}
    glob.update({m.PREFIX + mod: torch.zeros(6, 4) for mod, _, _, _ in m.pairs})
    out = m.aggregate(glob, clients, [1.0] * 5, combine=coordinate_median)
    for mod, a, b, s in m.pairs:
        prods = torch.stack([c[b] @ c[a] for c in clients])
        effective = out[m.PREFIX + mod] + s * (out[b] @ out[a])
        assert torch.allclose(effective, s * prods.median(dim=0).values, atol=1e-5)


def test_attacks_tamper_with_the_delta():
    d = {"w": torch.tensor([1.0, -2.0])}
    assert torch.equal(Attack("sign-flip", 10.0).apply(d, 1, "0")["w"], torch.tensor([-10.0, 20.0]))
    assert torch.equal(Attack("scale", 3.0).apply(d, 1, "0")["w"], torch.tensor([3.0, -6.0]))
    assert torch.isnan(Attack("nan").apply(d, 1, "0")["w"]).all()
    n1, n2 = Attack("noise", 1.0, seed=4).apply(d, 1, "0")["w"], Attack("noise", 1.0, seed=4).apply(d, 1, "0")["w"]
    assert torch.equal(n1, n2) and not torch.equal(n1, d["w"])


def test_hostile_clients_are_seeded_and_among_the_sampled():
    sampled = ["1", "3", "4", "7"]
    a = [hostile_clients(sampled, 2, seed=0, round=r) for r in range(1, 20)]
    assert a == [hostile_clients(sampled, 2, seed=0, round=r) for r in range(1, 20)]
    assert all(len(h) == 2 and set(h) <= set(sampled) for h in a)
    assert len({tuple(h) for h in a}) > 1  # changes from round to round
    assert hostile_clients(sampled, 0, seed=0, round=1) == []


def test_byzantine_is_refused_on_flower():
    with pytest.raises(ConfigError, match="local engine only"):
        ExperimentConfig.from_dict(dict(engine="flower", byzantine=1, attack="sign-flip"))


# The test: 5 clients (all sampled), 1 hostile sending its delta sign-flipped x10.
ATTACK_RUN = dict(clients=5, clients_per_round=5, rounds=5, local_steps=6, max_examples=80)


def test_sign_flip_attack_breaks_mean_but_not_median_or_trimmed_mean(tmp_path):
    acc = {}
    for name, extra in [("clean", {}), ("mean", {}), ("median", {"aggregator": "median"}),
                        ("trimmed-mean", {"aggregator": "trimmed-mean", "trim_fraction": 0.2})]:
        attack = {} if name == "clean" else {"byzantine": 1, "attack": "sign-flip", "attack_scale": 10.0}
        cfg = tiny_config(tmp_path, name, **ATTACK_RUN, **attack, **extra)
        acc[name] = run_experiment(cfg, echo=lambda *a: None)["final"]
        if attack:
            rows = history(cfg.out)[1:]
            assert all(len(r["hostile"]) == 1 and r["hostile"][0] in r["clients"] for r in rows)
            saved = json.loads((tmp_path / name / "config.json").read_text())
            assert (saved["byzantine"], saved["attack"], saved["aggregator"]) == (1, "sign-flip", extra.get("aggregator", "mean"))
    print("accuracy:", acc)
    assert acc["clean"] - acc["mean"] > 0.20
    assert abs(acc["median"] - acc["clean"]) <= 0.02
    assert abs(acc["trimmed-mean"] - acc["clean"]) <= 0.02


def test_nan_attack_is_dropped_logged_and_the_round_goes_on(tmp_path):
    lines = []
    cfg = tiny_config(tmp_path, clients=3, clients_per_round=3, byzantine=1, attack="nan")
    summary = run_experiment(cfg, echo=lines.append)
    rows = history(cfg.out)[1:]
    assert len(rows) == cfg.rounds
    for r in rows:
        (h,) = r["hostile"]
        assert [d["client"] for d in r["dropped"]] == [h]
        assert "NonFiniteUpdate" in r["dropped"][0]["reason"]
        assert h not in r["clients"] and len(r["clients"]) == 2 and not r["skipped"]
    assert any("dropped client" in line and "NaN" in line for line in lines)
    assert summary["final"] is not None


def test_norm_clip_records_the_clipped_clients_and_a_huge_bound_changes_nothing(tmp_path):
    base = run_experiment(tiny_config(tmp_path, "mean"), echo=lambda *a: None)
    loose = run_experiment(tiny_config(tmp_path, "loose", aggregator="norm-clip", norm_bound=1e9), echo=lambda *a: None)
    assert loose["final"] == base["final"]
    a, b = history(tmp_path / "mean"), history(tmp_path / "loose")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # bit-identical path
    assert all(r["clipped"] == [] for r in b[1:])
    tight = tiny_config(tmp_path, "tight", aggregator="norm-clip", norm_bound=1e-4)
    run_experiment(tight, echo=lambda *a: None)
    assert all(r["clipped"] == r["clients"] for r in history(tight.out)[1:])


@pytest.mark.parametrize("method", ["scl", "fedavg-lora", "ffa-lora", "fedsa-lora", "fedex-lora"])
@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "norm-clip"])
def test_every_aggregator_composes_with_every_method(tmp_path, method, aggregator):
    extra = {"norm_bound": 1.0} if aggregator == "norm-clip" else {}
    cfg = tiny_config(tmp_path, rounds=1, clients=3, clients_per_round=3, local_steps=2, method=method,
                      aggregator=aggregator, trim_fraction=0.34, **extra)
    summary = run_experiment(cfg, echo=lambda *a: None)
    rows = history(cfg.out)
    assert rows[-1]["clients"] == ["0", "1", "2"] and not rows[-1]["skipped"]
    assert summary["final"] is not None


def test_robustness_keys_survive_the_flower_run_config():
    from fastseq.flower.config import from_run_config, to_run_config

    cfg = ExperimentConfig.from_dict(dict(engine="flower", aggregator="norm-clip", norm_bound=0.5))
    back, _ = from_run_config(to_run_config(cfg))
    assert (back.aggregator, back.norm_bound, back.byzantine, back.attack) == ("norm-clip", 0.5, 0, None)


def test_nan_attack_under_a_quantizing_codec_is_dropped_too(tmp_path):
    cfg = tiny_config(tmp_path, rounds=2, clients=3, clients_per_round=3, byzantine=1, attack="nan", codec="int8")
    run_experiment(cfg, echo=lambda *a: None)
    for r in history(cfg.out)[1:]:
        assert [d["client"] for d in r["dropped"]] == r["hostile"] and len(r["clients"]) == 2
