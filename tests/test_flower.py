"""The Flower engine: a real SuperLink + SuperNodes on 127.0.0.1, same results as the local engine."""

import json
import os
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fed_helpers import assert_same_run, flower_config  # noqa: E402
from flower_helpers import alive  # noqa: E402

from fastseq.fed.engine import run_experiment  # noqa: E402
from fastseq.fed.experiment import ExperimentConfig  # noqa: E402
from fastseq.flower.config import FLOWER_KEYS, from_run_config, key_of, project_toml, to_run_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cfg(out, **kw):
    # 2 clients, one sampled per round: with seed 0 round 1 samples client 1 and round 2
    # client 0, so both SuperNodes train (one ClientApp process per message keeps this < 90 s).
    return flower_config(out, **{"clients": 2, "clients_per_round": 1, **kw})


def test_run_config_round_trip():
    cfg = ExperimentConfig(model="tiny-llama", task="synthetic", lora_r=4, local_epochs=1.5,
                           task_options={"n": 3}, out="/tmp/x")
    rc = to_run_config(cfg, resume=True)
    assert rc["lora-r"] == 4 and rc["server-lr"] == "" and rc["task-options"] == '{"n": 3}' and rc["resume"] is True
    back, flower = from_run_config(tomllib.loads(project_toml(rc))["tool"]["flwr"]["app"]["config"])
    assert back == cfg and flower["resume"] is True
    with pytest.raises(ValueError):
        to_run_config(cfg, nonsense=1)


def test_flower_app_project_is_in_sync():
    """flower_app/pyproject.toml names fastseq's components and has every config key."""
    proj = tomllib.loads((REPO / "flower_app" / "pyproject.toml").read_text())
    app = proj["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fastseq.flower.app:server_app",
                                 "clientapp": "fastseq.flower.app:client_app"}
    expected = set(to_run_config(ExperimentConfig()))
    assert set(app["config"]) == expected
    assert set(FLOWER_KEYS) <= expected and key_of("clients_per_round") in expected
    cfg, _ = from_run_config(app["config"])
    assert cfg.validate() is None
    # ... and the same values as `fastseq run`'s defaults (the Flower engine aside)
    assert dict(cfg.to_dict(), engine="local", progress=None) == ExperimentConfig().to_dict()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", [{"codec": "int8", "error_feedback": True}, {"scl_train_compress": False}],
                         ids=["scl-int8-ef", "scl-frozenC"])
def test_flower_deployment_matches_local_engine(tmp_path, variant):
    """With C frozen, each SuperNode builds C in its own process and it never travels: the same
    metrics and the same final C as the local engine say it is the same C everywhere."""
    from fastseq.flower import run_flower

    emb = run_experiment(_cfg(tmp_path / "local", **variant), echo=lambda s: None)
    fl = run_flower(_cfg(tmp_path / "flower", **variant), timeout=180, echo=lambda s: None)

    # every process of the deployment was stopped
    pids = json.loads((tmp_path / "flower" / "flower" / "pids.json").read_text())
    assert set(pids) == {"superlink", "supernode_0", "supernode_1"}
    assert not [n for n, p in pids.items() if alive(p)]
    assert fl["flower_status"] == "finished:completed" and fl["engine"] == "flower"

    # the same metrics (same sampling, same updates, same evaluation) and the same state
    frozen_c = variant.get("scl_train_compress") is False
    assert_same_run(tmp_path / "local", tmp_path / "flower", rounds=2, clients=[[], ["1"], ["0"]],
                    frozen_c=frozen_c)
    assert fl["final"] == pytest.approx(emb["final"]) and fl["uplink_bytes"] == emb["uplink_bytes"]

    # the clients' persisted state (the error-feedback residual; a frozen-C SCL client keeps
    # nothing) lives where the local engine keeps it
    def state_files(run):
        return sorted(str(p.relative_to(run)) for p in (run / "clients").rglob("*.safetensors"))

    assert state_files(tmp_path / "flower") == state_files(tmp_path / "local")
    assert bool(state_files(tmp_path / "flower")) == (not frozen_c)
    conf = json.loads((tmp_path / "flower" / "config.json").read_text())
    assert conf["engine"] == "flower" and set(conf["flower"]["nodes"]) == {"0", "1"}
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["engine"] == "flower"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_existing_deployment_and_failing_node(tmp_path):
    """run_flower(superlink=...) submits to a running deployment; a node whose ClientApp fails
    (here: a data-path that does not exist) is dropped for the round, the round goes on."""
    from fastseq.flower import LocalDeployment, run_flower

    dep = LocalDeployment(2, tmp_path / "dep", node_config={"state-dir": str(tmp_path / "nodes")},
                          per_node=[{}, {"data-path": str(tmp_path / "missing")}], echo=lambda s: None)
    try:
        dep.start()
        pids = [p.pid for _, p in dep.procs]
        # error feedback: a client state for node 0 to persist in its state-dir
        cfg = _cfg(tmp_path / "run", clients_per_round=2, rounds=1, codec="int8", error_feedback=True)
        summary = run_flower(cfg, superlink=dep.address, insecure=True, timeout=150, echo=lambda s: None)
        dep.check_alive()  # submitting does not stop someone else's deployment
    finally:
        dep.stop()
    assert not [p for p in pids if alive(p)]
    assert summary["flower_status"] == "finished:completed" and summary["dropped"] == 1
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["round"] == 1 and rec["clients"] == ["0"] and not rec["skipped"]
    assert [d["client"] for d in rec["dropped"]] == ["1"] and "missing" in rec["dropped"][0]["reason"]
    assert (tmp_path / "nodes" / "client_0" / "round_1.safetensors").is_file()
    assert (tmp_path / "run" / "adapter").is_dir() and (tmp_path / "run" / "checkpoints" / "round_1").is_dir()


def test_stop_process_ends_the_whole_group(tmp_path):
    import subprocess
    import time

    from fastseq.flower.deploy import free_ports, stop_process, write_connection

    p = subprocess.Popen(["sh", "-c", f"sleep 60 & echo $! > {tmp_path}/child; wait"], start_new_session=True)
    for _ in range(100):
        if (tmp_path / "child").is_file() and (tmp_path / "child").read_text().strip():
            break
        time.sleep(0.05)
    child = int((tmp_path / "child").read_text())
    stop_process(p, timeout=5)
    time.sleep(0.2)
    assert p.poll() is not None and not alive(child)
    ports = free_ports(3)
    assert len(set(ports)) == 3
    conf = tomllib.loads(write_connection(tmp_path / "home", f"127.0.0.1:{ports[0]}", insecure=True).read_text())
    assert conf["superlink"]["default"] == "fastseq"
    assert conf["superlink"]["fastseq"] == {"address": f"127.0.0.1:{ports[0]}", "insecure": True}


def test_flower_env(monkeypatch):
    from fastseq.flower.deploy import flower_env

    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    env = flower_env("/tmp/h")
    assert "MASTER_PORT" not in env and "RANK" not in env  # a DeepSpeed ClientApp picks its own
    assert env["FLWR_HOME"] == "/tmp/h" and env["FLWR_TELEMETRY_ENABLED"] in ("0", os.environ.get("FLWR_TELEMETRY_ENABLED"))
