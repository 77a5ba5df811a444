"""Heterogeneous fleets (fastseq.fed.fleet): fleet files, tiers, each client's plan, the memory
its plan really takes; nested-rank aggregation (fastseq.fed.hetero) and fleet runs on the local
engine, against the plain runs they must reduce to."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastseq.cli import main
from fastseq.config import ConfigError
from fastseq.fed.engine import run_experiment
from fastseq.fed.experiment import ExperimentConfig, build_runtime
from fastseq.fed.fleet import FleetMisfit, PlanInputs, Tier, assign_tiers, parse_fleet, plan_tier
from fastseq.fed.hetero import check_rule, nested_aggregate, rank_view
from fastseq.fed.methods import get_method, weighted_mean

from fed_helpers import assert_bit_identical, history, run_rows, tiny_config

QUIET = dict(echo=lambda s: None)
TWO_RANKS = {"tiers": [{"name": "big", "share": 0.5}, {"name": "small", "share": 0.5, "max_rank": 2}]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# --- fleet files ------------------------------------------------------------------------------

@pytest.mark.parametrize("fleet, said", [
    ({"tiers": [{"name": "a", "memroy": "4GB", "share": 1}]}, "'memroy' (did you mean 'memory'?)"),
    ({"tiers": [{"name": "a", "memory": -4, "share": 1}]}, "memory must be a positive size"),
    ({"tiers": [{"name": "a", "memory": "-4GB", "share": 1}]}, "cannot read '-4GB' as a size"),
    ({"tiers": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}, "shares sum to 0.9; they must sum to 1"),
    ({"tiers": [{"name": "a", "share": 1, "clients": ["0"]}]}, "give either share"),
    ({"tiers": [{"name": "a", "clients": ["0"]}, {"name": "b", "clients": ["0"]}]}, "client 0 is in tiers"),
    ({"tiers": [{"name": "a", "share": 1}], "rank_ladder": [8, 2]}, "above the run's r=4"),
    ({"tiers": [{"name": "a", "share": 1}, {"name": "a", "share": 0}]}, "is used twice"),
    ({"tiers": []}, "at least one tier"),
    ({"tier": []}, "'tier' (did you mean 'tiers'?)"),
    ({"tiers": [{"name": "a", "share": 1, "client_cpus": 0}]}, "client_cpus must be a positive number of CPUs"),
    ({"tiers": [{"name": "a", "share": 1, "client_gpus": -0.5}]}, "client_gpus must be a GPU fraction"),
])
def test_a_bad_fleet_is_one_line_and_leaves_nothing(tmp_path, capsys, fleet, said):
    with pytest.raises(ConfigError, match=None) as e:
        parse_fleet(fleet, r=4)
    assert said in str(e.value) and "\n" not in str(e.value)
    import yaml

    f = tmp_path / "fleet.yaml"
    f.write_text(yaml.safe_dump(fleet))
    out = tmp_path / "run"
    code = main(["run", "--model", "tiny-llama", "--task", "synthetic", "--r", "4", "--fleet", str(f), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and said in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_tiers_by_share_and_by_name():
    fleet = parse_fleet({"tiers": [{"name": "a", "share": 0.6}, {"name": "b", "share": 0.4},
                                   {"name": "c", "clients": ["7", "9"]}]})
    tiers = assign_tiers(fleet, 12, seed=0)
    assert tiers["7"] == tiers["9"] == "c"
    rest = [t for c, t in tiers.items() if c not in ("7", "9")]
    assert rest.count("a") == 6 and rest.count("b") == 4
    assert assign_tiers(fleet, 12, seed=0) == tiers and assign_tiers(fleet, 12, seed=1) != tiers
    with pytest.raises(ConfigError, match="names client 12"):
        assign_tiers(parse_fleet({"tiers": [{"name": "a", "clients": ["12"]}]}), 12, seed=0)
    with pytest.raises(ConfigError, match="are in no fleet tier"):
        assign_tiers(parse_fleet({"tiers": [{"name": "a", "clients": ["0"]}]}), 3, seed=0)


# --- the rank view and the aggregation rules --------------------------------------------------

def _prepared(method, r=4, **kw):
    from fastseq.models import load_model

    torch.manual_seed(0)
    model, _ = load_model("tiny-llama", "causal-lm")
    m = get_method(method, r=r, **kw)
    m.prepare(model, [], seed=0)
    return m


@pytest.mark.parametrize("method", ["scl", "ffa-lora"])
def test_rank_view_trains_the_first_slots_of_one_model(method):
    m = _prepared(method, lora_r=4)
    full = {n: p for n, p in m.model.named_parameters()}
    axes = m.rank_axes()
    assert axes and set(axes) <= set(full)
    with rank_view(m, 2):
        for n, axis in axes.items():
            p = m.model.get_parameter(n)
            assert p.shape[axis] == 2 and torch.equal(p, full[n].narrow(axis, 0, 2))
            assert p.requires_grad == full[n].requires_grad
        assert all(m._params[n] is m.model.get_parameter(n) for n in axes)
        trained = dict(m.model.named_parameters())
    assert all(dict(m.model.named_parameters())[n] is full[n] for n in axes)  # put back
    assert all(trained[n] is not full[n] for n in axes)


def test_a_frozen_c_drawn_at_any_rank_nests():
    """Every process draws C at the run's rank from (seed, FFN name): its first rows are the C a
    run at a lower rank draws, bit for bit (what makes slot j mean the same on every client)."""
    big, small = _prepared("scl", r=4), _prepared("scl", r=2)
    for n, p in small.model.named_parameters():
        if ".scl.compress." in n:
            assert torch.equal(p, big.model.get_parameter(n)[:2]), n


class _Method:
    """The names a nested aggregation needs, on hand-made tensors."""
    name = "fake"

    def __init__(self, axes, pairs=()):
        self.axes, self.pairs = axes, list(pairs)

    def shared_names(self):
        return ["head", *self.axes]

    def rank_axes(self):
        return dict(self.axes)


def _states(ranks, g):
    out = []
    for r in ranks:
        out.append({"head": torch.randn(3, generator=g), "P": torch.randn(5, r, generator=g),
                    "C": torch.randn(r, 6, generator=g)})
    return out


def test_holders_and_zero_pad():
    g = torch.Generator().manual_seed(0)
    ranks, w = [4, 2, 2, 1], [1.0, 2.0, 3.0, 4.0]
    states = _states(ranks, g)
    glob = {"head": torch.zeros(3), "P": torch.randn(5, 6, generator=g), "C": torch.randn(6, 6, generator=g)}
    m = _Method({"P": 1, "C": 0})
    hold = nested_aggregate(m, "holders", glob, states, w, ranks, weighted_mean)
    zero = nested_aggregate(m, "zero-pad", glob, states, w, ranks, weighted_mean)
    assert torch.allclose(hold["head"], weighted_mean(states, w, ["head"])["head"])
    for j in range(6):
        holders = [i for i, r in enumerate(ranks) if r > j]
        if holders:
            want = sum(w[i] * states[i]["P"][:, j] for i in holders) / sum(w[i] for i in holders)
        else:
            want = glob["P"][:, j]  # nobody trained slot j: it keeps its global value
        torch.testing.assert_close(hold["P"][:, j], want)
        torch.testing.assert_close(hold["C"][j], (sum(w[i] * states[i]["C"][j] for i in holders) / sum(w[i] for i in holders))
                                   if holders else glob["C"][j])
        # zero-pad: a client without slot j sent a zero delta there (its value = the global one)
        z = sum(w[i] * (states[i]["P"][:, j] if ranks[i] > j else glob["P"][:, j]) for i in range(4)) / sum(w)
        torch.testing.assert_close(zero["P"][:, j], z)
    het = nested_aggregate(m, "hetlora", glob, states, w, ranks, weighted_mean)
    z = sum(w[i] * (states[i]["P"][:, 1] if ranks[i] > 1 else torch.zeros(5)) for i in range(4)) / sum(w)
    torch.testing.assert_close(het["P"][:, 1], z)  # HetLoRA pads with zeros, not with the global slot
    assert het["P"].shape == glob["P"].shape


def test_one_rank_is_the_plain_mean_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    states, w = _states([6, 6, 6], g), [1.0, 5.0, 2.0]
    glob = {"head": torch.zeros(3), "P": torch.zeros(5, 6), "C": torch.zeros(6, 6)}
    plain = weighted_mean(states, w, ["head", "P", "C"])
    for rule in ("holders", "zero-pad", "hetlora"):
        got = nested_aggregate(_Method({"P": 1, "C": 0}), rule, glob, states, w, [6, 6, 6], weighted_mean)
        assert all(torch.equal(got[k], plain[k]) for k in plain), rule


def test_flexlora_redistributes_the_svd_of_the_mean_product():
    g = torch.Generator().manual_seed(2)
    ranks, w = [3, 2, 1], [2.0, 1.0, 1.0]
    states = [{"head": torch.randn(3, generator=g), "A": torch.randn(r, 7, generator=g),
               "B": torch.randn(5, r, generator=g)} for r in ranks]
    glob = {"head": torch.zeros(3), "A": torch.zeros(3, 7), "B": torch.zeros(5, 3)}
    m = _Method({"A": 0, "B": 1}, pairs=[("mod", "A", "B", 2.0)])
    got = nested_aggregate(m, "flexlora", glob, states, w, ranks, weighted_mean)
    mean = sum(wi * s["B"] @ s["A"] for wi, s in zip(w, states)) / sum(w)
    u, sv, vh = torch.linalg.svd(mean)
    best = u[:, :3] @ torch.diag(sv[:3]) @ vh[:3]  # the best rank-3 approximation (Eckart-Young)
    torch.testing.assert_close(got["B"] @ got["A"], best, rtol=1e-4, atol=1e-5)
    assert got["A"].shape == (3, 7) and got["B"].shape == (5, 3)
    # the first slots carry the largest singular values: a rank-1 client gets the best rank-1 part
    torch.testing.assert_close(got["B"][:, :1] @ got["A"][:1], sv[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, kw, rule, said", [
    ("fedavg-lora", {}, "holders", "fedavg-lora trains A, so use hetlora or flexlora"),
    ("scl", {"scl_train_compress": True}, "zero-pad", "scl with C trained trains C"),
    ("scl", {}, "flexlora", "SCL's branch is nonlinear in C"),
    ("ffa-lora", {}, "flexlora", "A is frozen"),
    ("fedsa-lora", {}, "flexlora", "FedSA-LoRA keeps B local"),
])
def test_rules_that_make_no_sense_are_refused(method, kw, rule, said):
    m = get_method(method, **kw)
    with pytest.raises(ConfigError, match=None) as e:
        check_rule(m, rule)
    assert said in str(e.value)


@pytest.mark.parametrize("kw, said", [
    (dict(secagg=True, engine="flower", clients_per_round=3), "--secagg"), (dict(dp="central", dp_clip=1.0), "--dp central"),
    (dict(method="fedex-lora"), "fedex-lora"), (dict(deepspeed={"zero_stage": 0}), "--deepspeed"),
])
def test_fleet_combinations_refused(tmp_path, kw, said):
    with pytest.raises(ConfigError, match="heterogeneous fleet cannot be combined") as e:
        tiny_config(tmp_path, fleet=TWO_RANKS, **kw)
    assert said in str(e.value)
    with pytest.raises(ConfigError, match="pass --fleet FILE too"):
        tiny_config(tmp_path, hetero_aggregation="holders")


# --- fleet runs -------------------------------------------------------------------------------

def test_a_fleet_at_the_full_rank_is_the_plain_run(tmp_path):
    """Every client plans the run's own configuration: the same run, bit for bit (plans aside)."""
    plain = run_experiment(tiny_config(tmp_path, "plain"), **QUIET)
    fleet = run_experiment(tiny_config(tmp_path, "fleet", fleet={"tiers": [{"name": "all", "share": 1.0}]}), **QUIET)
    assert_bit_identical(Path(plain["out"]), Path(fleet["out"]), skip=("plans",))
    rows = history(fleet["out"])
    assert all(set(r["plans"]) == set(r["clients"]) for r in rows[1:])
    assert all(p["rank"] == 4 and p["tier"] == "all" for r in rows[1:] for p in r["plans"].values())


@pytest.mark.parametrize("method", ["scl", "ffa-lora"])
def test_a_fleet_all_at_a_lower_rank_is_the_run_at_that_rank(tmp_path, method):
    """The global adapter at r=4 trained by clients of rank 2 only leaves slots 2-3 untouched, and
    (SCL, whose C is drawn per FFN and so nests across runs too) computes what a run at r=2 does."""
    low = {"tiers": [{"name": "small", "share": 1.0, "max_rank": 2}]}
    fleet = run_experiment(tiny_config(tmp_path, "fleet", r=4, fleet=low, method=method, lora_r=4), **QUIET)
    g = load_file(Path(fleet["out"]) / "checkpoints" / "round_3" / "server.safetensors")
    rank_key = ".scl.project.weight" if method == "scl" else "lora_B.default.weight"
    keys = [k for k in g if k.endswith(rank_key)]
    assert keys and all(torch.count_nonzero(g[k][:, :2]) > 0 and torch.count_nonzero(g[k][:, 2:]) == 0 for k in keys)
    if method != "scl":
        return  # PEFT draws every module's A from one stream: a run at rank 2 draws other A's
    plain = run_experiment(tiny_config(tmp_path, "plain", r=2), **QUIET)
    a, b = run_rows(fleet["out"], skip=("plans",)), run_rows(plain["out"])
    for ra, rb in zip(a, b):
        assert ra["client_train_loss" if ra["round"] else "eval_loss"] == rb["client_train_loss" if rb["round"] else "eval_loss"]
        for k in ("eval_loss", "accuracy", "train_loss"):
            if rb.get(k) is not None:  # the server scores at rank 4: a zero slot changes the sum order only
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["round"], k)
    p = load_file(Path(plain["out"]) / "checkpoints" / "round_3" / "server.safetensors")
    for k in keys:
        torch.testing.assert_close(g[k][:, :2], p[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, rule, kw", [("scl", "holders", {}), ("scl", "zero-pad", {"scl_placement": "residual"}),
                                              ("ffa-lora", "zero-pad", {}), ("fedavg-lora", "flexlora", {})])
def test_a_two_rank_fleet_trains_and_counts_bytes_per_client(tmp_path, method, rule, kw):
    cfg = tiny_config(tmp_path, fleet=TWO_RANKS, clients=4, clients_per_round=3, method=method,
                      lora_r=None if method == "scl" else 4, hetero_aggregation=rule, rounds=2, **kw)
    out = Path(run_experiment(cfg, **QUIET)["out"])
    rows = history(out)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    for r in rows[1:]:
        ranks = {c: p["rank"] for c, p in r["plans"].items()}
        assert set(ranks.values()) <= {4, 2} and set(ranks) == set(r["clients"])
        # each client's update at its own rank: the estimate of its bytes is what it sent, give or
        # take the few header bytes of its loss and step count
        assert abs(r["uplink_bytes"] - sum(p["update_bytes"] for p in r["plans"].values())) <= 16 * len(ranks)
    big = [p["update_bytes"] for r in rows[1:] for p in r["plans"].values() if p["rank"] == 4]
    small = [p["update_bytes"] for r in rows[1:] for p in r["plans"].values() if p["rank"] == 2]
    assert big and small and max(small) < min(big)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_fleet_with_workers_is_the_sequential_fleet(tmp_path, start):
    """Rank views in forked and in spawned workers (a GPU's way: the runtime's tensors shared
    through torch.multiprocessing): bit-identical to the sequential fleet run."""
    kw = dict(fleet=TWO_RANKS, clients=4, clients_per_round=2, rounds=2)
    seq = run_experiment(tiny_config(tmp_path, "seq", workers=1, **kw), **QUIET)
    par = run_experiment(tiny_config(tmp_path, "par", workers=2, worker_start=start, **kw), **QUIET)
    assert_bit_identical(Path(seq["out"]), Path(par["out"]))


@pytest.mark.parametrize("method, rule", [("scl", "holders"), ("fedsa-lora", "hetlora")])
def test_an_interrupted_fleet_run_resumes_to_the_uninterrupted_result(tmp_path, method, rule):
    """Each client's state (its error feedback, FedSA-LoRA's local B) is kept at its own rank, the
    server's at the full rank: a run stopped after round 1 and resumed equals the uninterrupted one."""
    from fastseq.fed.engine import Hooks

    class Interrupt(Hooks):
        def on_round_end(self, round, record):
            if round == 1:
                raise KeyboardInterrupt("Ctrl-C after round 1")

    kw = dict(fleet=TWO_RANKS, clients=4, clients_per_round=3, method=method, hetero_aggregation=rule,
              lora_r=None if method == "scl" else 4, codec="int8", error_feedback=True)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(tmp_path, "cut", **kw), hooks=Interrupt(), **QUIET)
    # the tiers' Ray resources (flower-sim's actors) may change on resume: how it runs, not what it computes
    ray_tiers = {"tiers": [dict(t, client_cpus=2) for t in TWO_RANKS["tiers"]]}
    run_experiment(tiny_config(tmp_path, "cut", **{**kw, "fleet": ray_tiers}), resume=True, **QUIET)
    full = run_experiment(tiny_config(tmp_path, "full", **kw), **QUIET)
    assert_bit_identical(tmp_path / "cut", Path(full["out"]))
    from fastseq.fed.engine import check_resume

    other = {"tiers": [dict(t, max_rank=1) for t in TWO_RANKS["tiers"]]}
    with pytest.raises(ConfigError, match="cannot resume .* with a different config \\(fleet"):
        check_resume(tiny_config(tmp_path, "cut", **{**kw, "fleet": other}), tmp_path / "cut")


def test_a_tier_nothing_fits_is_refused_or_dropped(tmp_path, capsys):
    fleet = {"tiers": [{"name": "ok", "share": 0.5}, {"name": "tiny", "share": 0.5, "memory": "64KB"}]}
    with pytest.raises(FleetMisfit) as e:
        run_experiment(tiny_config(tmp_path, "refused", fleet=fleet, clients=4), **QUIET)
    assert "tier 'tiny': nothing fits even at the ladder's lowest rank 1" in str(e.value)
    assert not (tmp_path / "refused").exists()
    said = []
    cfg = tiny_config(tmp_path, "dropped", fleet=fleet, clients=4, clients_per_round=2, fleet_misfit="drop")
    out = run_experiment(cfg, echo=said.append)["out"]
    tiny = sorted(c for c, t in build_runtime(cfg, echo=lambda s: None).tiers_of.items() if t == "tiny")
    assert any(s.startswith(f"fleet: leaving out clients {', '.join(tiny)}") for s in said)
    assert all(not set(r["clients"]) & set(tiny) for r in history(out))
    with pytest.raises(ConfigError, match="only 2 clients fit their tiers"):
        build_runtime(tiny_config(tmp_path, "x", fleet=fleet, clients=4, clients_per_round=3, fleet_misfit="drop"),
                      echo=lambda s: None)


def test_plan_fleet_cli(tmp_path, capsys):
    f = tmp_path / "fleet.toml"
    f.write_text('rank_ladder = [4, 2]\n[[tiers]]\nname = "small"\nshare = 0.5\nuplink = "1MB"\nmax_rank = 2\n'
                 '[[tiers]]\nname = "big"\nshare = 0.5\n')
    c = tmp_path / "run.toml"
    c.write_text('task = "synthetic"\nmax_examples = 80\nclients = 4\nmin_client_size = 4\npartition = "iid"\n'
                 'fleet = "fleet.toml"\n')
    assert main(["plan", "--fleet", str(f), "--model", "tiny-llama", "--config", str(c), "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "fleet: 2 tiers, rank ladder [4, 2], aggregation holders" in out
    assert "small (2 clients; memory unlimited, uplink 1.00 MiB): rank 2," in out
    assert "big (2 clients; memory unlimited): rank 4," in out
    assert "flower-sim actor pools" not in out  # no tier sets Ray resources
    f.write_text(f.read_text().replace('name = "small"', 'name = "small"\nclient_cpus = 0.5'))
    assert main(["plan", "--fleet", str(f), "--model", "tiny-llama", "--config", str(c), "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "flower-sim actor pools here" in out and "x 0.5 CPU / 0 GPU for 2 client(s)" in out, out
    assert "x 1 CPU / 0 GPU for 2 client(s)" in out  # big: the run's --client-cpus
    f.write_text('[[tiers]]\nname = "tiny"\nshare = 1.0\nmemory = "64KB"\n')
    assert main(["plan", "--fleet", str(f), "--model", "tiny-llama", "--config", str(c), "--r", "4"]) == 3
    assert "fastseq plan: tier 'tiny': nothing fits" in capsys.readouterr().out
    # a run config may name its fleet file (relative to the config)
    cfg = ExperimentConfig.from_dict({**__import__("fastseq.cli", fromlist=["_read_config"])._read_config(str(c)),
                                      "model": "tiny-llama", "r": 4})
    assert cfg.fleet["tiers"][0]["name"] == "tiny"


# --- memory truth -----------------------------------------------------------------------------

def _llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return tf.LlamaForCausalLM(cfg)


def test_every_tier_s_measured_step_fits_its_budget():
    """Three tiers of one fleet: each plans a different configuration, and the step it plans,
    built and measured (saved-tensor hooks, the planner's own measurement path), fits its budget."""
    import fastseq
    from fastseq.memory import estimate, measure_step
    from fastseq.quant import quantize_model

    B, S = 4, 64
    roomy = estimate(_llama(), fastseq.SCLConfig(r=8), "none", B, S, 0, dtype="float32").total
    low = estimate(_llama(), fastseq.SCLConfig(r=8), "nf4", 1, S, 2, dtype="float32").total
    tiers = [Tier("workstation", memory=4 * roomy), Tier("laptop", memory=int(0.8 * roomy)),
             Tier("phone", memory=int(low * 1.12))]
    inputs = PlanInputs(model=_llama(), r=8, placement="parallel", train_compress=False, batch_size=B, seq_len=S,
                        run_quantization="none", run_checkpoint_level=1, run_codec="none", run_device="cpu",
                        quantizations=("none", "int8", "nf4"), update_bytes=lambda r, c: 0, task="causal-lm")
    plans = [plan_tier(t, [8, 4], inputs) for t in tiers]
    assert all(p.fits for p in plans)
    assert len({(p.quantization, p.checkpoint_level, p.micro_batch) for p in plans}) == 3
    for tier, p in zip(tiers, plans):
        model = _llama()
        if p.quantization != "none":
            model = quantize_model(model, p.quantization, torch.float32)
        model.train()
        fastseq.get_scl_model(model, fastseq.SCLConfig(r=p.rank, checkpoint_level=p.checkpoint_level, backend="torch"))
        ids = torch.randint(0, 1024, (p.micro_batch, S), generator=torch.Generator().manual_seed(0))
        m = measure_step(model, dict(input_ids=ids, labels=ids))
        assert m.frozen + m.trainable + m.activations <= tier.memory, (tier.name, p)


# --- Flower: each SuperNode plans itself --------------------------------------------------------

def test_each_supernode_plans_its_client_and_the_serverapp_learns_the_plans(monkeypatch):
    """Discovery asks every node for its partition; in a fleet each node also plans its client on
    its own machine, from its --node-config budgets when it sets some (else as its fleet tier),
    and the ServerApp gets every plan with the replies."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fastseq.flower.app import _query, discover_nodes
    from fastseq.flower.config import to_run_config
    from fed_helpers import flower_config
    from test_flower_faults import _Grid

    for attr, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    fleet = {"rank_ladder": [4, 2], "tiers": [{"name": "all", "share": 1.0}]}
    rc = to_run_config(flower_config(None, clients=3, clients_per_round=2, r=4, fleet=fleet))
    node_configs = {101: {"partition-id": 0, "num-partitions": 3},
                    102: {"partition-id": 1, "num-partitions": 3, "max-rank": 2, "tier": "phone"},
                    103: {"partition-id": 2, "num-partitions": 3, "memory-budget": "64KB"}}

    def answer(msg):
        node = msg.metadata.dst_node_id
        ctx = Context(run_id=7, node_id=node, node_config=node_configs[node], state=RecordDict(), run_config=rc)
        return _query(msg, ctx)

    plans: dict = {}
    nodes = discover_nodes(_Grid(answer, nodes=list(node_configs)), 3, wait_s=5, echo=lambda s: None, plans=plans)
    assert nodes == {"0": 101, "1": 102, "2": 103}
    assert plans["0"]["tier"] == "all" and plans["0"]["rank"] == 4 and plans["0"]["fits"]
    assert plans["1"]["tier"] == "phone" and plans["1"]["rank"] == 2 and plans["1"]["fits"]
    assert plans["2"]["tier"] == "node 2" and not plans["2"]["fits"] and "nothing fits" in plans["2"]["reason"]
    assert plans["2"]["memory_budget"] == 64 * 1024
    with pytest.raises(ConfigError, match="max-rank must be a positive rank"):
        from fastseq.fed.fleet import node_tier

        node_tier({"max-rank": 0}, "3")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_fleet_on_flower_sim_is_the_local_fleet(tmp_path):
    """The same fleet on Ray actors: every node plans its client as the local engine does, and the
    run computes what the local engine computes (plans, bytes per client, metrics, adapter)."""
    pytest.importorskip("ray")
    from fastseq import engines
    from fed_helpers import assert_same_run, flower_config

    # each tier its own Ray resources (one actor pool per tier; the local engine ignores them)
    fleet = {"rank_ladder": [4, 2], "tiers": [{"name": "big", "share": 0.5, "client_cpus": 1},
                                              {"name": "small", "share": 0.5, "max_rank": 2, "client_cpus": 0.5}]}
    kw = dict(clients=3, clients_per_round=2, r=4, fleet=fleet, scl_train_compress=False)
    run_experiment(flower_config(tmp_path / "local", **kw), **QUIET)
    said = []
    engines.run(flower_config(tmp_path / "sim", engine="flower-sim", client_cpus=1, **kw), echo=said.append)
    assert_same_run(tmp_path / "local", tmp_path / "sim", rounds=2, frozen_c=True)
    a, b = history(tmp_path / "local"), history(tmp_path / "sim")
    assert [r.get("plans") for r in a] == [r.get("plans") for r in b]
    assert {p["rank"] for r in a[1:] for p in r["plans"].values()} == {2, 4}
    cpus = {"big": 1.0, "small": 0.5}
    ran = [(p["tier"], b[i]["client_ray_resources"][c]["CPU"]) for i in (1, 2) for c, p in b[i]["plans"].items()]
    assert {t for t, _ in ran} == {"big", "small"} and all(got == cpus[t] for t, got in ran), ran
    assert "client_ray_resources" not in a[1]  # the local engine runs no Ray
    assert not any("did not build" in line for line in said) and any("big: 1 actor(s) x 1 CPU" in line
                                                                      for line in said), said


def _pools(fleet, clients=10, cpus=4.0, gpus=0.0, **kw):
    from fastseq.flower.tier_pools import tier_pools

    return tier_pools(tiny_config(Path("unused"), clients=clients, fleet=fleet, r=4, **kw), cpus, gpus)


def test_tier_pools_share_ray_s_resources_by_tier():
    """One pool per tier: each at least one actor, the rest to the tier with the most clients per
    actor that still fits, never above Ray's CPUs/GPUs nor the tier's clients."""
    assert _pools(TWO_RANKS) is None  # no tier sets resources: Flower's one pool
    fleet = {"tiers": [{"name": "laptop", "share": 0.8, "client_gpus": 0.1, "client_cpus": 1},
                       {"name": "workstation", "share": 0.2, "client_gpus": 0.5, "client_cpus": 2}]}
    pools = {p.tier: p for p in _pools(fleet, cpus=16, gpus=1)}
    assert len(pools["laptop"].partitions) == 8 and len(pools["workstation"].partitions) == 2
    assert pools["laptop"].actors == 5 and pools["workstation"].actors == 1  # 5 x 0.1 + 1 x 0.5 GPUs
    assert sum(p.actors * p.num_gpus for p in pools.values()) <= 1 + 1e-9
    pools = {p.tier: p for p in _pools(fleet, cpus=100, gpus=8)}  # plenty: one actor per client
    assert (pools["laptop"].actors, pools["workstation"].actors) == (8, 2)
    # a tier without its own resources takes the run's --client-cpus / --client-gpus
    mixed = {"tiers": [{"name": "a", "share": 0.5, "client_cpus": 2}, {"name": "b", "share": 0.5}]}
    pools = {p.tier: p for p in _pools(mixed, cpus=3, client_cpus=0.5)}
    assert (pools["a"].num_cpus, pools["b"].num_cpus) == (2.0, 0.5)
    assert (pools["a"].actors, pools["b"].actors) == (1, 2)
    with pytest.raises(ConfigError, match="one actor per fleet tier needs 3 CPUs and 0.6 GPUs.*Ray has 1 CPUs"):
        _pools(fleet, cpus=1, gpus=1)
    with pytest.raises(ConfigError, match="needs 3 CPUs and 0.6 GPUs.*0 GPUs"):
        _pools({"tiers": [dict(t, client_cpus=1.5) for t in fleet["tiers"]]}, cpus=8, gpus=0)
    with pytest.raises(ConfigError, match="tier 'b' has client_gpus=0, so Ray gives its clients no GPU"):
        _pools({"tiers": [{"name": "a", "share": 0.5, "client_gpus": 0.5}, {"name": "b", "share": 0.5}]},
               cpus=4, gpus=1, device="cuda")


def test_a_fleet_that_does_not_fit_ray_is_refused_before_anything_is_written(tmp_path):
    from fastseq import engines
    from fed_helpers import flower_config

    fleet = {"tiers": [{"name": "a", "share": 0.5, "client_cpus": 512}, {"name": "b", "share": 0.5}]}
    with pytest.raises(ConfigError, match="one actor per fleet tier needs 513 CPUs"):
        engines.run(flower_config(tmp_path / "sim", engine="flower-sim", clients=2, clients_per_round=2,
                                       fleet=fleet), **QUIET)
    assert not (tmp_path / "sim").exists()
