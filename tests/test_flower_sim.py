"""--engine flower-sim (Flower's Simulation Engine on Ray) and the engine dispatch above fastseq.fed."""

import ast
import dataclasses
import re
import shlex
import time
from pathlib import Path

import pytest

from fed_helpers import assert_same_run, flower_config, history

import fastseq.engines as engines
from fastseq.config import ConfigError
from fastseq.fed.engine import RESUME_MAY_CHANGE, run_experiment
from fastseq.fed.experiment import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]


def _cfg(out, **kw):
    # 3 virtual clients, 2 per round: with seed 0 every client trains in one of the 2 rounds.
    return flower_config(out, **{"clients": 3, "clients_per_round": 2, **kw})


def _ray_processes_since(t0: float) -> list[str]:
    """Ray's processes (GCS, raylet, workers, actors) started after ``t0`` and still running."""
    psutil = pytest.importorskip("psutil")
    found = []
    for p in psutil.process_iter(["name", "cmdline", "create_time", "status"]):
        try:
            if p.info["create_time"] < t0 - 1 or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        except (psutil.Error, TypeError):
            continue
        if re.search(r"ray::|raylet|gcs_server|ray/_private|ray/dashboard", text):
            found.append(f"{p.pid} {text[:80]}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_flower_sim_matches_local_engine(tmp_path):
    """The same ServerApp/ClientApp on Ray actors compute exactly what the local engine does, and
    every Ray process is gone when the run returns."""
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    local = run_experiment(_cfg(tmp_path / "local"), echo=lambda s: None)
    t0 = time.time()
    sim = engines.run(_cfg(tmp_path / "sim", engine="flower-sim", client_cpus=1), echo=lambda s: None)
    assert _ray_processes_since(t0) == []
    import ray

    assert not ray.is_initialized()
    assert sim["engine"] == "flower-sim"
    clients = [r["clients"] for r in history(tmp_path / "local")]
    assert sorted({c for cs in clients for c in cs}) == ["0", "1", "2"]  # every virtual client trained
    assert_same_run(tmp_path / "local", tmp_path / "sim", rounds=2)
    assert sim["final"] == pytest.approx(local["final"]) and sim["uplink_bytes"] == local["uplink_bytes"]
    import json

    conf = json.loads((tmp_path / "sim" / "config.json").read_text())
    assert conf["engine"] == "flower-sim" and set(conf["flower"]["nodes"]) == {"0", "1", "2"}
    assert conf["client_cpus"] == 1
    def state_files(run):  # a client that keeps nothing (SCL, no error feedback) writes nothing
        return sorted(str(p.relative_to(run)) for p in run.rglob("clients/**/*.safetensors"))

    assert state_files(tmp_path / "sim") == state_files(tmp_path / "local")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_flower_sim_resumes_a_local_run(tmp_path):
    """A run started on the local engine resumes on flower-sim with other client resources (how,
    not what): the client state the local engine persisted is where the virtual clients find it,
    and the result equals an uninterrupted local run."""
    pytest.importorskip("ray")
    run_experiment(_cfg(tmp_path / "full", rounds=3), echo=lambda s: None)
    run_experiment(_cfg(tmp_path / "run", rounds=1), echo=lambda s: None)
    summary = engines.run(_cfg(tmp_path / "run", rounds=3, engine="flower-sim", client_cpus=0.5), resume=True,
                          echo=lambda s: None)
    assert summary["engine"] == "flower-sim" and summary["rounds"] == 3
    assert_same_run(tmp_path / "full", tmp_path / "run", rounds=3)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_flower_sim_stops_ray_when_the_server_fails(tmp_path, monkeypatch):
    """An error in the ServerApp reaches the caller; Ray is shut down, its processes are gone
    and the environment Flower's Ray backend rewrites (PYTHONPATH) is restored."""
    pytest.importorskip("ray")
    import os

    import ray

    import fastseq.flower.app as app

    def broken(grid, run_config, echo=print):
        raise RuntimeError("server exploded on purpose")

    monkeypatch.setattr(app, "run_server", broken)
    env_before = os.environ.get("PYTHONPATH")
    t0 = time.time()
    with pytest.raises(RuntimeError, match="server exploded on purpose"):
        engines.run(_cfg(tmp_path / "x", engine="flower-sim"), echo=lambda s: None)
    assert not ray.is_initialized()
    # killed or exiting, they leave within seconds (under load a killed GCS can still be listed)
    deadline = time.monotonic() + 30
    while _ray_processes_since(t0) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes_since(t0) == []
    assert os.environ.get("PYTHONPATH") == env_before


def test_fed_does_not_import_flower():
    """The engine choice sits above fastseq.fed: no module of fed imports fastseq.flower (not even
    inside a function)."""
    bad = []
    for path in sorted((REPO / "fastseq" / "fed").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = "fastseq.fed".rsplit(".", node.level - 1)[0] if node.level else ""
                mod = ".".join(x for x in (base, node.module) if x)
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n == "fastseq.flower" or n.startswith("fastseq.flower.") for n in names):
                bad.append(f"{path.name}:{node.lineno}")
    assert bad == []


def test_run_experiment_is_the_local_engine_only(tmp_path):
    for engine in ("flower", "flower-sim"):
        with pytest.raises(ConfigError, match=r"fastseq\.engines\.run"):
            run_experiment(_cfg(tmp_path / engine, engine=engine), echo=lambda s: None)
        assert not (tmp_path / engine).exists()


def test_engines_run_dispatches(tmp_path, monkeypatch):
    import fastseq.flower

    seen = []
    monkeypatch.setattr(fastseq.flower, "run_flower_simulation",
                        lambda cfg, resume=False, **kw: seen.append(("flower-sim", cfg, resume, kw)) or {"x": 1})
    monkeypatch.setattr(fastseq.flower, "run_flower",
                        lambda cfg, resume=False, **kw: seen.append(("flower", cfg, resume, kw)) or {"x": 2})
    assert engines.run(_cfg(tmp_path / "a", engine="flower-sim"), resume=True, echo=print) == {"x": 1}
    assert engines.run(_cfg(tmp_path / "b", engine="flower")) == {"x": 2}
    assert [(e, c.engine, r, sorted(k)) for e, c, r, k in seen] == [("flower-sim", "flower-sim", True, ["echo"]),
                                                                     ("flower", "flower", False, [])]
    summary = engines.run(_cfg(tmp_path / "c", rounds=1), echo=lambda s: None)  # local: the real engine
    assert summary["rounds"] == 1 and (tmp_path / "c" / "summary.json").is_file()


def test_flower_sim_without_ray_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape('pip install "fastseq[flower-sim]"')):
        engines.run(_cfg(tmp_path / "x", engine="flower-sim"))
    from fastseq.flower import run_flower_simulation

    with pytest.raises(ConfigError, match=re.escape('pip install "fastseq[flower-sim]"')):
        run_flower_simulation(_cfg(tmp_path / "y", engine="flower-sim"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_client_resources_are_validated(tmp_path):
    for bad in (dict(client_cpus=0), dict(client_cpus=-1.0), dict(client_gpus=-0.5)):
        with pytest.raises(ConfigError, match="client_(cpus|gpus) must be"):
            ExperimentConfig.from_dict(bad)
    cfg = ExperimentConfig.from_dict(dict(client_cpus=0.5, client_gpus=0.25))
    assert (cfg.client_cpus, cfg.client_gpus) == (0.5, 0.25)
    # they change how a run is carried out, not what it computes
    assert {"client_cpus", "client_gpus", "engine"} <= set(RESUME_MAY_CHANGE)
    from fastseq.flower.simulation import backend_config, check_resources, ray_init_args

    args = ray_init_args(cfg, {"num_cpus": 2, "num_gpus": 0})
    assert args["include_dashboard"] is False and args["log_to_driver"] is False and args["num_cpus"] == 2
    assert backend_config(cfg, args)["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    with pytest.raises(ConfigError, match="client_gpus=0.25 but Ray has 0 GPUs"):
        check_resources(cfg, args)
    with pytest.raises(ConfigError, match="client_cpus=4.0 exceeds the 2 CPUs"):
        check_resources(dataclasses.replace(cfg, client_cpus=4.0, client_gpus=0.0), args)
    with pytest.raises(ConfigError, match="client_gpus=0: Ray gives the virtual clients no GPU"):
        check_resources(dataclasses.replace(cfg, device="cuda", client_gpus=0.0), args)
    check_resources(dataclasses.replace(cfg, client_gpus=0.0), args)  # CPU clients on 2 CPUs: fine
    check_resources(cfg, {**args, "num_gpus": 1})  # a quarter of one GPU: fine


def test_cli_client_resource_flags(tmp_path, monkeypatch, capsys):
    import fastseq.flower
    from fastseq.cli import main

    seen = {}
    monkeypatch.setattr(fastseq.flower, "run_flower_simulation", lambda cfg, resume=False, **kw: seen.update(cfg=cfg) or {})
    assert main(["run", "--engine", "flower-sim", "--client-cpus", "0.5", "--client-gpus", "0", "--model",
                 "tiny-llama", "--task", "synthetic", "--out", str(tmp_path / "s")]) == 0
    assert seen["cfg"].engine == "flower-sim" and seen["cfg"].client_cpus == 0.5 and seen["cfg"].client_gpus == 0
    assert main(["run", "--engine", "flower-sim", "--client-gpus", "-1", "--out", str(tmp_path / "t")]) == 2
    assert "client_gpus must be a GPU fraction >= 0" in capsys.readouterr().err
    from fastseq.cli import build_parser

    run_help = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "flower-sim" in run_help and "--client-gpus" in run_help


# ---------------------------------------------------------------------------------------------
# flower_app/: `flwr run . local-sim` with a simulation SuperLink, as its README says
# ---------------------------------------------------------------------------------------------
def _readme_command() -> list[str]:
    text = (REPO / "flower_app" / "README.md").read_text()
    m = re.search(r"^flwr run \. local-sim .*?(?<!\\)$", text, re.S | re.M)
    assert m, "flower_app/README.md has no `flwr run . local-sim ...` command"
    return shlex.split(m.group(0).replace("\\\n", " "))


def test_flower_app_project_and_simulation_command_parse():
    """flwr's own checks accept the project (components importable by name) and the README's
    local-sim command: its federation config is a valid SimulationConfig with one SuperNode
    per client, and its run config is a valid ExperimentConfig."""
    pytest.importorskip("flwr")
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    from fastseq.flower.config import from_run_config

    config, _ = load_and_validate(REPO / "flower_app" / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"]["serverapp"] == "fastseq.flower.app:server_app"
    # flwr run rewrites a pyproject that declares [tool.flwr.federations] (1.42 migrates it into
    # $FLWR_HOME/config.toml); the project keeps its federations out.
    assert "federations" not in config["tool"]["flwr"]
    argv = _readme_command()
    fed = argv[argv.index("--federation-config") + 1]
    sim = simulation_config_from_json({k.replace("-", "_"): v for k, v in parse_config_args([fed]).items()})
    run = parse_config_args([argv[argv.index("--run-config") + 1]])
    base = config["tool"]["flwr"]["app"]["config"]
    cfg, flower = from_run_config({**base, **run})
    assert sim.num_supernodes == cfg.clients >= 2
    assert cfg.engine == "flower" and flower["client-state-dir"]
