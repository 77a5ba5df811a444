"""--report-to tensorboard,mlflow,wandb,trackio: a real federated run on a tiny model, then what
each tracker wrote is read back through that tracker's own reader (offline, local files), and a
resumed run continues the same tracker runs."""

import glob
import importlib.util
import json
import os
import struct
import sys

import pytest

from fastseq.cli import main

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
# found, not imported: trackio reads TRACKIO_DIR when it is first imported (the trackio_dir fixture)
_missing = [m for m in ("tensorboard", "mlflow", "wandb", "trackio", "sqlalchemy") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"not installed: {_missing} (the trackers extra)")

RUN = ["run", "--model", "tiny-llama", "--task", "synthetic", "--max-examples", "80", "--clients", "3",
       "--clients-per-round", "2", "--partition", "iid", "--min-client-size", "4", "--local-steps", "3",
       "--batch-size", "8", "--r", "4", "--lr", "0.01", "--no-progress", "--workers", "1"]


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory):
    """trackio reads TRACKIO_DIR when it is imported: point it here before anything imports it."""
    if "trackio" in sys.modules:
        import trackio.utils

        return trackio.utils.TRACKIO_DIR
    d = tmp_path_factory.mktemp("trackio")
    os.environ["TRACKIO_DIR"] = str(d)
    return d


@pytest.fixture(autouse=True)
def _tracker_homes(tmp_path, monkeypatch):
    """W&B's staging, cache and config folders under the test's tmp_path, not the home folder."""
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # nor MLflow's telemetry id in ~/.config


def _wandb_records(run_dir):
    """The records of a W&B offline run file (the LevelDB log format W&B writes: a 7-byte header
    ':W&B' 0xBEE1 v0, then 32 KiB blocks of crc32/length/type-framed chunks), parsed with W&B's
    own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    raw = open(path, "rb").read()
    assert struct.unpack("<4sHB", raw[:7]) == (b":W&B", 0xBEE1, 0)
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, typ = struct.unpack("<IHB", raw[pos:pos + 7])
        if typ == 0 and n == 0:
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + n], pos + 7 + n
        buf = data if typ in (1, 2) else buf + data
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _wandb_history(out):
    rows, config, artifacts = {}, {}, []
    for run_dir in sorted(glob.glob(str(out / "wandb" / "offline-run-*"))):
        for rec in _wandb_records(run_dir):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows.setdefault(row["_step"], {}).update(row)
            elif kind == "run":
                config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "artifact":
                artifacts.append((rec.artifact.type, sorted(m.path for m in rec.artifact.manifest.contents)))
    return rows, config, artifacts


def _check_trackers(out, hist, trackio_dir, rounds, names=TRACKERS):
    """Each tracker holds every round's accuracy and bytes as metrics.jsonl has them."""
    acc = [h["accuracy"] for h in hist]
    up = [float(h["uplink_bytes"]) for h in hist]
    assert [h["round"] for h in hist] == list(range(rounds + 1))
    state = json.loads((out / "tracking.json").read_text())
    assert state["logged_rounds"] == {t: rounds for t in names} and set(state) == {*names, "logged_rounds"}

    # TensorBoard: its own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("accuracy")] == [(r, pytest.approx(a)) for r, a in enumerate(acc)]
    assert [e.value for e in ea.Scalars("uplink_bytes")] == up
    assert ea.Images("curves") and "config/text_summary" in ea.Tags()["tensors"]

    # MLflow: its client on the run folder's SQLite store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.01"
    assert run.data.params["task"] == "synthetic"
    assert run.data.params["report_to"] == json.dumps(["tensorboard", "mlflow", "wandb"])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accuracy"))
    assert history == [(r, pytest.approx(a)) for r, a in enumerate(acc)]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "summary.json", "adapter"} <= files
    assert any(f.path.endswith(".safetensors") for f in client.list_artifacts(run.info.run_id, "adapter"))

    # W&B (offline): the run file, with W&B's protobuf schema
    rows, config, artifacts = _wandb_history(out)
    assert [rows[r]["accuracy"] for r in range(rounds + 1)] == pytest.approx(acc)
    assert [rows[r]["uplink_bytes"] for r in range(rounds + 1)] == up
    config = {k: v["value"] if isinstance(v, dict) and set(v) == {"value"} else v for k, v in config.items()}
    assert config["lr"] == 0.01 and config["task"] == "synthetic"
    assert any(t == "model" and any(p.endswith(".safetensors") for p in paths) for t, paths in artifacts)

    if "trackio" not in names:
        return state
    # trackio: its own local storage
    from trackio.sqlite_storage import SQLiteStorage

    logs = [r for r in SQLiteStorage.get_logs("fastseq", state["trackio"]["name"]) if "accuracy" in r]
    assert [(r["step"], r["accuracy"]) for r in logs] == [(r, pytest.approx(a)) for r, a in enumerate(acc)]
    assert SQLiteStorage.get_run_config("fastseq", state["trackio"]["name"])["lr"] == 0.01
    return state


def test_every_tracker_gets_the_run_and_a_resume_continues_it(tmp_path, trackio_dir, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "tracked"
    assert main([*RUN, "--rounds", "2", "--report-to", "tensorboard,mlflow,wandb", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "report_to mlflow: mlflow run" in said and "(offline)" in said
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = _check_trackers(out, hist, trackio_dir, 2, TRACKERS[:3])

    # resumed: the same tracker runs get rounds 3 and 4; trackio, added now, gets every round
    assert main(["run", "--resume", str(out), "--rounds", "4", "--no-progress", "--report-to", ",".join(TRACKERS)]) == 0
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    again = _check_trackers(out, hist, trackio_dir, 4)
    assert again["mlflow"]["run_id"] == first["mlflow"]["run_id"] and again["wandb"]["id"] == first["wandb"]["id"]


@pytest.mark.parametrize("value,phrase", [
    ("tensorbord", "report_to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?); valid: tensorboard, "
                   "mlflow, wandb, trackio (comma-separated), or none"),
    ("none,wandb", "'none' means no tracker and cannot be combined with others"),
    ("mlflow,mlflow", "report_to names 'mlflow' twice"),
])
def test_bad_report_to_is_one_line(tmp_path, capsys, value, phrase):
    assert main([*RUN, "--report-to", value, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tracker,module", [("wandb", "wandb"), ("mlflow", "sqlalchemy"), ("trackio", "trackio"),
                                            ("tensorboard", "tensorboard")])
def test_a_tracker_not_installed_names_the_extra(tmp_path, capsys, monkeypatch, tracker, module):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert main([*RUN, "--report-to", f"tensorboard,{tracker}" if tracker != "tensorboard" else tracker,
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f'--report-to {tracker} needs {module}, which is not installed: pip install "fastseq[trackers]"' in err
    assert not (tmp_path / "run").exists()


def test_no_tracker_writes_no_tracking_file(tmp_path):
    assert main([*RUN, "--rounds", "1", "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "tracking.json").exists()
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["report_to"] == []


def test_a_tracker_that_cannot_start_stops_the_run_in_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    assert main([*RUN, "--rounds", "1", "--report-to", "tensorboard,mlflow", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--report-to mlflow could not start" in err, err
    assert not (tmp_path / "run").exists()


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_finishes(tmp_path, capsys, monkeypatch):
    from fastseq.tracking import TensorBoardTracker

    real = TensorBoardTracker.log

    def flaky(self, metrics, step):
        if step == 1:
            raise OSError("disk full")
        real(self, metrics, step)

    monkeypatch.setattr(TensorBoardTracker, "log", flaky)
    out = tmp_path / "run"
    assert main([*RUN, "--rounds", "2", "--report-to", "tensorboard", "--out", str(out)]) == 0
    assert "warning: report_to tensorboard failed to log (OSError: disk full)" in capsys.readouterr().out
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert json.loads((out / "tracking.json").read_text())["logged_rounds"] == {"tensorboard": 0}
