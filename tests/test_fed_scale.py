"""Many clients on the local engine: per-client state on disk and loaded for the round's
clients only (RAM does not grow with the clients), resume with that state, the size of the state
on disk, the seeded panel of the personalised evaluation, the time split in the metrics."""

import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastseq.comm import DownlinkState, decode
from fastseq.config import ConfigError
from fastseq.fed.client import Client
from fastseq.fed.engine import Hooks, run_experiment
from fastseq.fed.rounds import ClientPool
from fastseq.fed.experiment import ExperimentConfig, build_client
from fastseq.fed.state_store import KnownStore, VersionedFiles, tree_bytes

from fed_helpers import history, tiny_config

QUIET = dict(echo=lambda s: None)


def _many(tmp_path, name, clients, **kw):
    """tiny-llama / synthetic with ``clients`` clients of 2+ examples, 2 sampled per round."""
    base = dict(clients=clients, clients_per_round=2, max_examples=max(80, 3 * clients), min_client_size=2,
                local_steps=2, rounds=2, eval_examples=16, task_options={"num_examples": max(2000, 3 * clients)})
    base.update(kw)
    return tiny_config(tmp_path, name, **base)


def _files_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


class LiveTensors(Hooks):
    """After each round: how many more tensors are alive in the process than before the run (all
    of them: model, server, clients, caches)."""

    def __init__(self):
        self.base = self.live()  # what earlier runs left alive does not count
        self.counts = []

    @staticmethod
    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def on_round_end(self, round, record):
        self.counts.append(self.live() - self.base)


# the per-client state every kind of run keeps: FedSA-LoRA's B, the uplink error-feedback
# residual, and (lossy downlink) what each client holds, on the client and on the server
HEAVY = dict(method="fedsa-lora", codec="int8", error_feedback=True, downlink_codec="bf16")


def test_live_tensors_do_not_grow_with_the_number_of_clients(tmp_path):
    counts = {}
    run_experiment(_many(tmp_path, "warm", 10, rounds=1, **HEAVY), **QUIET)  # one-time caches (4 tensors)
    for n in (10, 200):
        hooks = LiveTensors()
        run_experiment(_many(tmp_path, f"c{n}", n, **HEAVY), hooks=hooks, **QUIET)
        counts[n] = hooks.counts
        ck = load_file(str(max((tmp_path / f"c{n}" / "checkpoints").iterdir()) / "server.safetensors"))
        assert not any(k.startswith("known/") for k in ck)  # the checkpoint holds no per-client copy
    # every client that took part has state on disk; the process holds exactly as many tensors
    assert counts[10] == counts[200], counts
    assert len(list((tmp_path / "c200" / "clients").iterdir())) > 10


def test_client_pool_builds_only_the_clients_it_is_asked_for():
    built, discarded = [], []

    class Fake:
        def __init__(self, cid):
            self.cid = cid
            built.append(cid)

        def discard_after(self, r):
            discarded.append((self.cid, r))

    pool = ClientPool(Fake, floor=4, cache=2)
    for cid in ("1", "2", "1", "3", "4", "1"):
        assert pool[cid].cid == cid
    assert pool.built() == 2
    assert built == ["1", "2", "3", "4", "1"]  # "1" was evicted and built again ...
    assert discarded == [("1", 4), ("2", 4), ("3", 4), ("4", 4)]  # ... but discarded only once


class Crash(Hooks):
    def on_round_end(self, round, record):
        if round == 2:
            raise KeyboardInterrupt("simulated kill after round 2")


class KilledInRound3(Client):
    """Killed in round 3 once its state (and the server's record of its downlink) is written."""

    def fit(self, downlink_blob, round, **kw):
        out = super().fit(downlink_blob, round, **kw)
        if round == 3:
            raise KeyboardInterrupt("simulated kill in round 3")
        return out


def _killed_in_round_3(cfg, rt, cid, state_dir):
    c = build_client(cfg, rt, cid, state_dir)
    return KilledInRound3(c.client_id, rt, c.examples, c.train_cfg, state_dir)


@pytest.mark.parametrize("kw", [HEAVY, dict(method="scl", codec="int8", topk=0.5, error_feedback=True)],
                         ids=["fedsa-int8ef-bf16down", "scl-topk-ef"])
@pytest.mark.parametrize("when", ["after-round-2", "in-round-3"])
def test_resume_with_on_disk_state_equals_an_uninterrupted_run(tmp_path, kw, when):
    kw = dict(kw, rounds=4, personal_eval_clients=3, server_opt="fedadam")
    full = _many(tmp_path, "full", 12, **kw)
    run_experiment(full, **QUIET)
    crashed = _many(tmp_path, "crashed", 12, **kw)
    with pytest.raises(KeyboardInterrupt):
        if when == "after-round-2":
            run_experiment(crashed, hooks=Crash(), **QUIET)
        else:  # state versions of round 3 are on disk (client and server side), its checkpoint is not
            run_experiment(crashed, client_factory=_killed_in_round_3, **QUIET)
    if when == "in-round-3":
        assert list(Path(crashed.out, "clients").rglob("round_3.safetensors"))
        assert list(Path(crashed.out, "server").rglob("round_3.safetensors")) or kw["method"] == "scl"
    assert len(history(crashed.out)) == 3
    run_experiment(_many(tmp_path, "crashed", 12, **kw), resume=True, **QUIET)
    name = "adapter/adapter_model.safetensors"
    a, b = load_file(f"{full.out}/{name}"), load_file(f"{crashed.out}/{name}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("accuracy", "uplink_bytes", "downlink_bytes", "client_state_bytes", "server_state_bytes",
            "eval_clients", "per_client_accuracy", "clients")
    ha, hb = history(full.out), history(crashed.out)
    assert [[h.get(k) for k in keys] for h in ha] == [[h.get(k) for k in keys] for h in hb]
    # every client state file is the one an uninterrupted run has, bit for bit
    for root in ("clients", "server"):
        fa = sorted(p.relative_to(full.out) for p in Path(full.out, root).rglob("*.safetensors"))
        fb = sorted(p.relative_to(crashed.out) for p in Path(crashed.out, root).rglob("*.safetensors"))
        assert fa == fb
        for rel in fa:
            ta, tb = load_file(str(Path(full.out, rel))), load_file(str(Path(crashed.out, rel)))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_state_size_on_disk_is_reported_and_is_the_files_size(tmp_path):
    cfg = _many(tmp_path, "run", 30, rounds=3, personal_eval_clients=4, **HEAVY)
    summary = run_experiment(cfg, **QUIET)
    hist = history(cfg.out)
    out = Path(cfg.out)
    assert summary["client_state_bytes"] == hist[-1]["client_state_bytes"] == _files_bytes(out / "clients") > 0
    assert summary["server_state_bytes"] == hist[-1]["server_state_bytes"] == _files_bytes(out / "server") > 0
    assert tree_bytes(out / "clients") == summary["client_state_bytes"]
    sizes = [h["client_state_bytes"] for h in hist]
    assert sizes[0] == 0 and sizes == sorted(sizes)
    # one version per client once its round's checkpoint is written; only clients that took part
    touched = {c for h in hist for c in h["clients"] + h.get("eval_clients", [])}
    dirs = {p.name for p in (out / "clients").iterdir()}
    assert dirs == {f"client_{c}" for c in touched}
    assert all(len(VersionedFiles(out / "clients" / d).versions()) == 1 for d in dirs)
    st = load_file(str(next((out / "clients").rglob("*.safetensors"))))
    assert {k.split("/")[0] for k in st} <= {"known", "local", "ef"} and any(k.startswith("known/") for k in st)


def test_lossless_downlink_keeps_no_per_client_copy_of_the_global_state(tmp_path):
    # SCL without error feedback has nothing per client: nothing is written
    scl = run_experiment(_many(tmp_path, "scl", 12, rounds=2), **QUIET)
    assert scl["client_state_bytes"] == 0 and scl["server_state_bytes"] == 0
    assert not (tmp_path / "scl" / "clients").exists() or _files_bytes(tmp_path / "scl" / "clients") == 0
    # FedSA-LoRA keeps its B only: no "known/" global state on either side
    cfg = _many(tmp_path, "fedsa", 12, rounds=2, method="fedsa-lora")
    summary = run_experiment(cfg, **QUIET)
    files = list(Path(cfg.out, "clients").rglob("*.safetensors"))
    assert files and all({k.split("/")[0] for k in load_file(str(f))} == {"local"} for f in files)
    assert summary["client_state_bytes"] == _files_bytes(Path(cfg.out, "clients"))
    assert summary["server_state_bytes"] == 0 and not Path(cfg.out, "server").exists()


def test_downlink_state_full_when_lossless_and_delta_when_lossy():
    g = {"w": torch.randn(8, 8)}
    plain = DownlinkState("none")
    for r in range(3):
        blob, held = plain.send("1", g, round=r)
        assert decode(blob).full and held["w"] is g["w"]
    assert plain.client_state("1") is None and len(plain.known) == 0
    lossy = DownlinkState("bf16")
    lossy.send("1", g, round=0)
    g2 = {"w": g["w"] + 0.1}
    blob, held = lossy.send("1", g2, round=1)
    assert not decode(blob).full and torch.equal(held["w"], lossy.client_state("1")["w"])
    forced = DownlinkState("none", delta=True)  # the former behaviour, on request
    forced.send("1", g, round=0)
    assert not decode(forced.encode_for("1", g2, round=1)).full
    with pytest.raises(ValueError, match="lossless full_codec"):
        DownlinkState("none", full_codec="int8", delta=False)


def test_known_store_versions_commit_and_discard(tmp_path):
    store = KnownStore(tmp_path / "known")
    st = {"a": torch.arange(4.0)}
    for r in (1, 2, 3):
        store.round = r
        store["7"] = {"a": st["a"] + r}
    vf = VersionedFiles(tmp_path / "known" / "7")
    assert vf.versions() == [2, 3]  # the version before the newest waits for the checkpoint
    assert store.nbytes == vf.nbytes(3) == os.path.getsize(vf.path(3))
    store.round = 2
    assert torch.equal(store["7"]["a"], st["a"] + 2)
    store.commit(["7"], 3)
    assert vf.versions() == [3]
    store.round = 4
    store["7"] = {"a": st["a"] + 4}
    store.discard_after(3)  # a resume from the checkpoint of round 3
    assert vf.versions() == [3] and store.nbytes == vf.nbytes(3)
    assert list(store) == ["7"] and "8" not in store


def test_personal_eval_panel_is_seeded_logged_and_counted(tmp_path):
    # one process: with 2 workers the clients' training times add up to more than a round's wall time
    cfg = _many(tmp_path, "panel", 30, rounds=2, method="fedsa-lora", personal_eval_clients=4, workers=1)
    run_experiment(cfg, **QUIET)
    hist = history(cfg.out)
    panels = [h["eval_clients"] for h in hist[1:]]
    assert len(panels[0]) == 4 and all(p == panels[0] for p in panels)  # one panel, every round
    assert all(len(h["per_client_accuracy"]) == 4 for h in hist[1:])
    # the panel comes from the seed: the same for the same seed, another for another seed
    from fastseq.fed.experiment import build_runtime, build_server
    rt = build_runtime(cfg, echo=lambda s: None)
    assert build_server(cfg, rt).eval_clients(7) == panels[0]
    other = _many(tmp_path, "panel2", 30, rounds=2, method="fedsa-lora", personal_eval_clients=4, seed=1)
    assert build_server(other, rt).eval_clients(1) != panels[0]
    # 4 evaluation downlinks, full states of the same size, per round
    per = hist[1]["downlink_bytes"] / len(hist[1]["clients"])
    assert hist[1]["eval_downlink_bytes"] == 4 * per
    # time split: local training is part of the round
    for h in hist[1:]:
        assert 0 < h["train_seconds"] < h["seconds"] and 0 < h["eval_seconds"] < h["seconds"]


def test_personal_eval_default_scores_every_client_of_a_small_run(tmp_path):
    cfg = tiny_config(tmp_path, "small", method="fedsa-lora", rounds=1)
    run_experiment(cfg, **QUIET)
    assert history(cfg.out)[1]["eval_clients"] == ["0", "1", "2"]
    from fastseq.fed.server import personal_eval_count
    assert personal_eval_count(20, None) == 20 and personal_eval_count(1000, None) == 20
    assert personal_eval_count(10, 50) == 10 and personal_eval_count(1000, 5) == 5


@pytest.mark.parametrize("bad", [0, -3, 2.5, "20", True])
def test_personal_eval_clients_is_validated(bad):
    with pytest.raises(ConfigError, match="personal_eval_clients"):
        ExperimentConfig.from_dict({"personal_eval_clients": bad})


def test_personal_eval_clients_flag():
    from fastseq.cli import _overrides, build_parser

    args = build_parser().parse_args(["run", "--personal-eval-clients", "3"])
    assert _overrides(args)["personal_eval_clients"] == 3
    assert "personal_eval_clients" not in _overrides(build_parser().parse_args(["run"]))


def test_many_clients_config_file_is_valid():
    from fastseq.fed.experiment import load_config_file

    cfg = ExperimentConfig.from_dict(load_config_file(Path(__file__).parent.parent / "configs" / "many-clients.toml"))
    assert cfg.clients == 1000 and cfg.clients_per_round == 10 and cfg.method == "fedsa-lora"
    # enough examples for every client to get its minimum (partition checks it when the run builds)
    assert cfg.task_options["num_examples"] * 0.8 >= cfg.clients * cfg.min_client_size


def test_partition_histogram_of_many_clients_is_short():
    from fastseq.fed.partition import format_histogram, partition

    keys = [i % 4 for i in range(4000)]
    parts = partition(keys, 1000, "iid", seed=0, min_size=2)
    full = format_histogram(keys, parts).splitlines()
    short = format_histogram(keys, parts, max_rows=40).splitlines()
    assert len(full) == 1001 and len(short) == 1 + 40 + 1
    assert short[:21] == full[:21] and short[-20:] == full[-20:]
    assert "960 more clients" in short[21]
    assert format_histogram(keys[:40], partition(keys[:40], 4, "iid", seed=0), max_rows=40).count("\n") == 4
