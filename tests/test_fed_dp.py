"""Client-level differential privacy (``--dp central | local``) and its accountant."""

import json
import math

import pytest
import torch

dpa = pytest.importorskip("dp_accounting")
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from fastseq.config import ConfigError  # noqa: E402
from fastseq.fed import methods as fed_methods  # noqa: E402
from fastseq.fed.engine import Hooks, run_experiment  # noqa: E402
from fastseq.fed.experiment import ExperimentConfig  # noqa: E402
from fastseq.fed.privacy import CentralDP, DPConfig, epsilon_central, privatize_local  # noqa: E402

from fed_helpers import history, tiny_config  # noqa: E402

QUIET = dict(echo=lambda *a: None)


def _library_epsilon(z, n, m, rounds, delta):
    """dp-accounting on its own: DP-FedAvg with m of n clients sampled without replacement per
    round, noise z * clip on the sum, replace-one (sensitivity 2 * clip, hence z / 2)."""
    def eps(event):
        acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        acc.compose(dpa.SelfComposedDpEvent(event, rounds))
        return acc.get_epsilon(delta)

    inner = dpa.GaussianDpEvent(z / 2)
    # without sampling, and (a bound that is loose at large m / n) with it: the smaller holds
    return min(eps(inner), eps(dpa.SampledWithoutReplacementDpEvent(n, m, inner))) if m < n else eps(inner)


def test_reported_epsilon_is_dp_accountings_central(tmp_path):
    cfg = tiny_config(tmp_path, clients=3, clients_per_round=2, rounds=3, local_steps=2, dp="central", dp_clip=0.5,
                      dp_noise=0.8)
    summary = run_experiment(cfg, **QUIET)
    rows = history(cfg.out)
    assert rows[0]["epsilon"] == 0.0
    for r in rows[1:]:
        assert r["epsilon"] == pytest.approx(_library_epsilon(0.8, 3, 2, r["round"], 1 / 3), rel=1e-12)
        assert r["dp_delta"] == pytest.approx(1 / 3)
    assert rows[1]["epsilon"] < rows[2]["epsilon"] < rows[3]["epsilon"]  # privacy is spent every round
    assert summary["epsilon"] == rows[-1]["epsilon"] and summary["dp"] == "central"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    # sampling amplifies: the same noise with every client in every round costs more
    assert epsilon_central(0.8, 3, 2, 3, 1 / 3) <= epsilon_central(0.8, 3, 3, 3, 1 / 3)
    assert epsilon_central(0.8, 100, 5, 3, 1e-3) < 0.5 * epsilon_central(0.8, 100, 100, 3, 1e-3)
    assert epsilon_central(0.8, 3, 3, 3, 1 / 3) == pytest.approx(_library_epsilon(0.8, 3, 3, 3, 1 / 3))
    assert math.isinf(epsilon_central(0.0, 3, 2, 3, 1 / 3))  # no noise, no guarantee


def _capture_aggregation(monkeypatch):
    """Record, per aggregation, each client's contribution (its state minus the global state)."""
    seen = []
    original = fed_methods.Method.aggregate

    def spy(self, global_state, client_states, weights, combine=fed_methods.weighted_mean):
        names = self.shared_names()
        seen.append(([math.sqrt(sum(float((s[n] - global_state[n]).pow(2).sum()) for n in names))
                      for s in client_states], list(weights)))
        return original(self, global_state, client_states, weights, combine)

    monkeypatch.setattr(fed_methods.Method, "aggregate", spy)
    return seen


def test_central_clipping_bounds_every_clients_contribution(tmp_path, monkeypatch):
    clip = 0.05
    plain = tiny_config(tmp_path, "plain", rounds=2, local_steps=2)
    run_experiment(plain, **QUIET)
    raw = [v for r in history(plain.out)[1:] for v in r["update_norms"].values()]
    assert min(raw) > 4 * clip  # the bound below binds
    seen = _capture_aggregation(monkeypatch)
    cfg = tiny_config(tmp_path, "dp", rounds=2, local_steps=2, dp="central", dp_clip=clip, dp_noise=1.0)
    run_experiment(cfg, **QUIET)
    assert len(seen) == 2
    for norms, weights in seen:
        assert norms and all(n <= clip * (1 + 1e-5) for n in norms)
        assert all(n > 0.99 * clip for n in norms)  # clipped down to the bound, not to zero
        assert len(set(weights)) == 1  # DP-FedAvg: equal weights, whatever the example counts
    rows = history(cfg.out)[1:]
    assert all(r["clipped"] == r["clients"] and r["dp_clip"] == clip for r in rows)
    # the noise on the mean: std noise * clip / n
    assert all(r["dp_noise_std"] == pytest.approx(1.0 * clip / len(r["clients"])) for r in rows)


def test_local_clipping_bounds_what_each_client_sends(tmp_path):
    clip = 0.05
    cfg = tiny_config(tmp_path, rounds=2, local_steps=2, dp="local", dp_clip=clip, dp_noise=0.0)
    run_experiment(cfg, **QUIET)
    rows = history(cfg.out)[1:]
    for r in rows:  # update_norms: the server's view of each decoded uplink
        assert len(r["update_norms"]) == 2
        assert all(0.99 * clip < v <= clip * (1 + 1e-5) for v in r["update_norms"].values())
        # nothing else about the data leaves a client: example count 1 each, no training loss
        assert r["examples"] == len(r["clients"]) and r["train_loss"] is None
    noisy = tiny_config(tmp_path, "noisy", rounds=1, local_steps=2, dp="local", dp_clip=clip, dp_noise=1.0)
    run_experiment(noisy, **QUIET)
    norms = list(history(noisy.out)[1]["update_norms"].values())
    assert all(v > 3 * clip for v in norms)  # noise of std clip per coordinate on top


def test_privatize_local_clips_then_adds_seeded_noise():
    delta = {"a": torch.full((10,), 3.0), "b": torch.full((2, 5), -4.0)}
    clipped, norm = privatize_local(delta, 1.0, 0.0, seed=1)
    assert norm == pytest.approx(math.sqrt(10 * 9 + 10 * 16))
    assert math.sqrt(sum(float(t.pow(2).sum()) for t in clipped.values())) == pytest.approx(1.0)
    a, _ = privatize_local(delta, 1.0, 2.0, seed=7)
    b, _ = privatize_local(delta, 1.0, 2.0, seed=7)
    c, _ = privatize_local(delta, 1.0, 2.0, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["a"], c["a"])
    noise = torch.cat([(a[k] - clipped[k]).flatten() for k in a])
    assert 1.0 < float(noise.std()) < 3.5  # std noise * clip = 2


def test_local_noise_is_what_a_quantizing_codec_carries():
    from fastseq.comm import decode, encode

    torch.manual_seed(0)
    delta = {"w": torch.randn(64, 32) * 0.01}
    noised, _ = privatize_local(delta, 0.5, 1.0, seed=3)
    got = decode(encode(noised, "int8", example_count=1)).tensors["w"]
    clean, _ = privatize_local(delta, 0.5, 0.0, seed=3)
    err = float((got - noised["w"]).norm() / noised["w"].norm())
    assert err < 0.02  # int8 carries the noised delta ...
    assert float((got - clean["w"]).norm()) > 10 * float(clean["w"].norm())  # ... not the clean one


# Both modes at noise 0.5: 5 clients, all sampled, 5 rounds (test split of 20; chance 0.25).
LEARN = dict(clients=5, clients_per_round=5, rounds=5, max_examples=200, dp_clip=1.0, dp_noise=0.5)


@pytest.mark.parametrize("mode,gain", [("central", 0.5), ("local", 0.3)])
def test_dp_run_still_learns_at_noise_half(tmp_path, mode, gain):
    cfg = tiny_config(tmp_path, **LEARN, dp=mode)
    run_experiment(cfg, **QUIET)
    rows = history(cfg.out)
    acc0 = rows[0]["accuracy"]
    last3 = sum(r["accuracy"] for r in rows[-3:]) / 3
    print(mode, [r["accuracy"] for r in rows], rows[-1]["epsilon"])
    assert last3 - acc0 >= gain and last3 > 0.25 + gain / 2
    assert math.isfinite(rows[-1]["epsilon"]) and rows[-1]["epsilon"] > 0


def test_local_epsilon_composes_each_clients_participations(tmp_path):
    cfg = tiny_config(tmp_path, clients=3, clients_per_round=2, rounds=3, local_steps=1, dp="local", dp_clip=1.0,
                      dp_noise=2.0, dp_delta=1e-3)
    run_experiment(cfg, **QUIET)
    rows = history(cfg.out)
    counts = {}
    for r in rows[1:]:
        for c in r["clients"]:
            counts[c] = counts.get(c, 0) + 1
        acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(2.0 / 2), max(counts.values())))
        assert r["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-12)


class Crash(Hooks):
    def on_round_end(self, round, record):
        if round == 1:
            raise KeyboardInterrupt("simulated kill after round 1")


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # wall times differ


def test_noise_is_seeded_and_resume_reproduces_the_run(tmp_path):
    kw = dict(rounds=3, local_steps=2, dp="central", dp_clipping="adaptive", dp_clip=0.2, dp_noise=0.5,
              dp_clipped_count_stddev=1.0)
    run_experiment(tiny_config(tmp_path, "a", **kw), **QUIET)
    run_experiment(tiny_config(tmp_path, "b", **kw), **QUIET)
    a, b = history(tmp_path / "a"), history(tmp_path / "b")
    assert _strip(a) == _strip(b)  # same seed: same noise, same clips, same accuracy, same epsilon
    assert len({r["dp_clip"] for r in a[1:]}) > 1  # the adaptive clip moved
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(tmp_path, "c", **kw), hooks=Crash(), **QUIET)
    run_experiment(tiny_config(tmp_path, "c", **kw), resume=True, **QUIET)
    assert _strip(history(tmp_path / "c")) == _strip(a)  # the adaptive clip came back from the checkpoint
    run_experiment(tiny_config(tmp_path, "d", **dict(kw, seed=1)), **QUIET)
    assert [r["update_norms"] for r in history(tmp_path / "d")[1:]] != [r["update_norms"] for r in a[1:]]


def test_adaptive_clip_follows_the_target_quantile_and_its_noise_is_accounted():
    cfg = DPConfig(mode="central", clipping="adaptive", clip=1.0, noise=0.5, clipped_count_stddev=0.5)
    dp = CentralDP(cfg, clients_per_round=4)
    for seed in range(10):
        dp.adapt([100.0] * 4, seed)  # every update clipped: the clip grows (by about e^0.1 a step)
    assert dp.clip > 2.0
    grown = dp.clip
    for seed in range(10):
        dp.adapt([1e-4] * 4, seed)  # none clipped: it shrinks
    assert dp.clip < grown / 2
    # the update's multiplier (z^-2 - (2 sigma_b)^-2)^-1/2, as Flower computes it
    assert dp.z_update == pytest.approx((0.5 ** -2 - 1.0 ** -2) ** -0.5)
    try:
        from flwr.supercore.differential_privacy import compute_adaptive_noise_params
    except ImportError:
        return
    assert compute_adaptive_noise_params(0.5, 4, 0.5) == pytest.approx((0.5, dp.z_update))


@pytest.mark.parametrize("kw,phrase", [
    (dict(dp="global"), "dp='global' is not valid; valid values: none, central, local"),
    (dict(dp="central"), "needs --dp-clip C"),
    (dict(dp="central", dp_clip=0.0), "dp_clip must be a positive number"),
    (dict(dp="central", dp_clip=-1.0), "dp_clip must be a positive number"),
    (dict(dp="central", dp_clip=1.0, dp_noise=-0.5), "dp_noise must be a number >= 0"),
    (dict(dp="central", dp_clip=1.0, dp_delta=1.5), "dp_delta must be in (0, 1)"),
    (dict(dp="central", dp_clip=1.0, dp_clipping="quantile"), "dp_clipping='quantile' is not valid"),
    (dict(dp="central", dp_clip=1.0, aggregator="median"), "aggregator 'median' has another sensitivity"),
    (dict(dp="central", dp_clip=1.0, aggregator="trimmed-mean", trim_fraction=0.34, clients_per_round=3), "use --aggregator mean"),
    (dict(dp="central", dp_clip=1.0, aggregator="norm-clip", norm_bound=1.0), "DP's own clipping"),
    (dict(dp="central", dp_clip=1.0, method="fedex-lora"), "cannot cover fedex-lora"),
    (dict(dp="local", dp_clipping="adaptive"), "use --dp-clipping fixed with --dp local"),
    (dict(dp="central", dp_clipping="adaptive", dp_noise=1.0), "needs dp_clipped_count_stddev > dp_noise / 2"),
    (dict(dp_clip=1.0), "dp_clip set but dp is 'none'"),
    (dict(dp_noise=2.0), "dp_noise set but dp is 'none'"),
])
def test_config_errors_say_what_to_do(kw, phrase):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"clients": 5, "clients_per_round": 2, **kw})
    assert phrase in str(e.value)


def test_what_dp_composes_with():
    ok = [dict(dp="local", dp_clip=1.0, aggregator="median"),           # local noise: post-processing
          dict(dp="local", dp_clip=1.0, method="fedex-lora"),
          dict(dp="central", dp_clip=1.0, method="fedsa-lora", codec="int8"),
          dict(dp="central", dp_clipping="adaptive", dp_noise=0.5, dp_clipped_count_stddev=0.5),
          dict(dp="central", dp_clip=1.0, byzantine=1, attack="sign-flip")]
    for kw in ok:
        cfg = ExperimentConfig.from_dict(dict(clients=5, clients_per_round=3, **kw))
        assert cfg.dp_config().mode == kw["dp"]


def test_dp_keys_survive_the_flower_run_config():
    from fastseq.flower.config import from_run_config, to_run_config

    cfg = ExperimentConfig.from_dict(dict(engine="flower", dp="central", dp_clipping="adaptive", dp_noise=0.5,
                                          dp_clipped_count_stddev=0.4))
    back, _ = from_run_config(to_run_config(cfg))
    assert back.dp_config() == cfg.dp_config() and back.dp_delta is None and back.dp_clip is None
