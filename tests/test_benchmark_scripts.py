"""Smoke tests of the benchmark scripts: each runs in its tiny ``--smoke`` configuration,
in-process, and writes well-formed CSV / JSON / PNG files (the numbers are not checked,
only their presence, types and the bookkeeping around them)."""
import csv
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(rel):
    path = ROOT / rel
    name = "_bench_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows, f"{path} has no rows"
    return rows


def _finite(x):
    return x is not None and math.isfinite(float(x))


def test_comm_bytes_smoke(tmp_path):
    cb = _load("benchmarks/comm_bytes.py")
    cb.main(["--smoke", "--out-dir", str(tmp_path)])
    rows = _csv(tmp_path / "comm_bytes.csv")
    doc = json.loads((tmp_path / "comm_bytes.json").read_text())
    assert len(doc["rows"]) == len(rows) == 8 * 2  # 4 SCL variants + 4 LoRA methods x 2 codecs, one shape
    assert (tmp_path / "comm_bytes.png").stat().st_size > 0
    for r in doc["rows"]:
        assert r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0 and r["git_commit"] and r["torch"]
    by = {(r["method"], r["codec"]): r for r in doc["rows"]}
    # SCL's payload is its 2*f*r values per layer; int8 is smaller than fp32
    assert by[("scl", "none")]["uplink_values"] == 6 * 2 * 1536 * 16
    assert by[("scl", "int8")]["uplink_bytes"] < by[("scl", "none")]["uplink_bytes"]
    # the variants send E (f r), C + P (r (f + d)), P (d r) per layer: a frozen C never travels
    assert by[("scl-frozenC", "none")]["uplink_values"] == 6 * 1536 * 16
    assert by[("scl-parallel", "none")]["uplink_values"] == 6 * (1536 + 384) * 16
    assert by[("scl-parallel-frozenC", "none")]["uplink_values"] == 6 * 384 * 16
    assert by[("scl-frozenC", "none")]["trainable_params"] == by[("scl-frozenC", "none")]["uplink_values"]
    # FedEx-LoRA's downlink carries the full-rank residual
    assert by[("fedex-lora", "none")]["downlink_bytes"] > 10 * by[("fedex-lora", "none")]["uplink_bytes"]


def test_train_step_smoke(tmp_path):
    ts = _load("benchmarks/train_step.py")
    ts.main(["--smoke", "--out-dir", str(tmp_path)])
    rows = _csv(tmp_path / "train_step_cpu_smoke.csv")
    doc = json.loads((tmp_path / "train_step_cpu_smoke.json").read_text())
    assert (tmp_path / "train_step_cpu_smoke.png").stat().st_size > 0
    provs = {r["provider"] for r in doc["rows"]}
    assert {"lora_matched", "scl_eager", "scl_recompute_l1", "scl_recompute_l2"} <= provs
    assert len(rows) == len(doc["rows"])
    for r in doc["rows"]:
        assert r["device_name"] and r["torch"] and r["git_commit"]
        for k in ("ms_min", "tokens_per_s", "saved_bytes", "est_peak_bytes", "ms_min_vs_lora"):
            assert _finite(r[k]) and r[k] > 0, (r["provider"], k, r[k])
    by = {r["provider"]: r for r in doc["rows"]}
    assert by["lora_matched"]["ms_min_vs_lora"] == 1.0
    # level 2 keeps less for backward than level 0 (the saving is real on CPU)
    assert by["scl_recompute_l2"]["saved_bytes"] < by["scl_eager"]["saved_bytes"]
    # the fused path is CUDA-only: skipped with a reason on CPU
    assert any("fused" in s["provider"] and s["reason"] for s in doc["skipped"])


def test_accuracy_study_smoke_end_to_end_and_bytes_to_target(tmp_path):
    pytest.importorskip("fastseq.fed.engine")
    st = _load("scripts/accuracy_study.py")
    argv = ["--smoke", "--out-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    st.main(argv)
    stem = tmp_path / "study_synthetic_smoke"
    rows = _csv(f"{stem}.csv")
    doc = json.loads(Path(f"{stem}.json").read_text())
    assert doc["head_lr"] in doc["protocol"]["head_lrs"] and len(doc["head"]["runs"]) == 2 * 1 * 2
    assert set(doc["screen"]["chosen"]) == {"scl", "scl-frozenC", "fedavg-lora", "ffa-lora"}
    fin = doc["finalists"]
    assert len(fin) == 2 and st.is_scl(fin[0]) and not st.is_scl(fin[1])
    main = [r for r in doc["rows"] if r["variant"] == "main"]
    assert {(r["arm"], str(r["alpha"])) for r in main} == {(a, al) for a in fin for al in ("0.5", "iid")}
    for r in main:
        assert r["n"] == 2 and _finite(r["last3_mean"]) and r["total_bytes_mean"] > 0 and r["trainable_params"] > 0
        assert r["lr"] == doc["lrs"][r["arm"]] and r["head_lr"] == doc["head_lr"]
    assert {r["variant"] for r in rows} >= {"main", "full-participation", "fedavgm", "upper-layers"}
    assert {d["alpha"] for d in doc["paired"]} == {0.5, "iid"} and all(len(d["diffs"]) == 2 for d in doc["paired"])
    md = Path(f"{stem}.md").read_text()
    for section in ("**Head lr**", "**Screening**", "**Final comparison**", "**Paired differences**", "**Extras**"):
        assert section in md
    for kind in ("rounds", "bytes", "paired"):
        assert Path(f"{stem}_{kind}.png").stat().st_size > 0
    # comm_bytes reads the study's curves: cumulative bytes to a target accuracy
    cb = _load("benchmarks/comm_bytes.py")
    out = cb.bytes_to_target(f"{stem}.json", 0.0, tmp_path)
    assert len(out) == len(doc["curves"]) and all(r["round_reached"] == 0 for r in out)
    # a rerun reuses every finished run
    stamps = {f: f.stat().st_mtime for f in (tmp_path / "runs").glob("*/summary.json")}
    st.main(argv)
    assert {f: f.stat().st_mtime for f in (tmp_path / "runs").glob("*/summary.json")} == stamps
    # --report-only runs nothing: a third seed is listed as not run, the report keeps the finished two
    st.main(argv + ["--seeds", "1", "2", "3", "--report-only"])
    assert {f: f.stat().st_mtime for f in (tmp_path / "runs").glob("*/summary.json")} == stamps
    doc = json.loads(Path(f"{stem}.json").read_text())
    assert len(doc["meta"]["not_run"]) == 2 * 2 and all("_s3_" in t for t in doc["meta"]["not_run"])
    assert doc["meta"]["failed"] == [] and all(r["n"] == 2 for r in doc["rows"] if r["variant"] == "main")
    assert "**Not run yet** (4 runs" in Path(f"{stem}.md").read_text()


def test_accuracy_study_extends_shorter_runs_and_resumes_interrupted_ones(tmp_path, capsys):
    """More --rounds train a copy of the finished shorter run further (the shorter one is kept);
    an interrupted run continues from its last checkpoint. Both end where a fresh run ends."""
    from safetensors.torch import load_file

    st = _load("scripts/accuracy_study.py")
    base = ["--smoke", "--arms", "scl-frozenC", "--finalists-from-arms", "--head-lr", "1e-2", "--lrs", "1e-2",
            "--alphas", "0.5", "--seeds", "1", "--until", "final", "--out-dir", str(tmp_path)]
    runs, fresh = tmp_path / "runs", tmp_path / "fresh"
    st.main(base + ["--rounds", "2", "--runs-dir", str(runs)])
    st.main(base + ["--rounds", "4", "--runs-dir", str(runs)])
    assert "extending a copy of" in capsys.readouterr().out
    st.main(base + ["--rounds", "4", "--runs-dir", str(fresh)])
    (short,) = runs.glob("*_R2")
    (extended,) = runs.glob("*_R4")
    (ref,) = fresh.glob("*_R4")
    assert (short / "summary.json").is_file() and json.loads((short / "config.json").read_text())["rounds"] == 2

    def same_run(a, b):
        wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
        assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
        ha, hb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
        assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
        assert [h["val_accuracy"] for h in ha] == [h["val_accuracy"] for h in hb]

    same_run(extended, ref)
    # interrupted after round 3, holding the shorter run's summary (a copy made before the engine
    # dropped it on resume): not finished, resumed
    shutil.rmtree(extended / "checkpoints" / "round_4")
    shutil.copy(short / "summary.json", extended / "summary.json")
    st.main(base + ["--rounds", "4", "--runs-dir", str(runs), "--jobs", "2"])  # `fastseq run --resume` in a subprocess
    assert "resuming" in capsys.readouterr().out
    assert json.loads((extended / "summary.json").read_text())["rounds"] == 4
    same_run(extended, ref)


def _fake_run(st, arm, lr, alpha, val, test, head_lr=None, seed=0):
    spec = st.Spec("screen", arm, alpha, seed, lr, head_lr, {}, f"{arm}{lr}{alpha}{head_lr}")
    hist = [dict(round=r, val_accuracy=val, accuracy=test) for r in range(4)]
    return st.Run(spec, hist)


def test_accuracy_study_chooses_on_validation_only():
    """Every choice reads val_<metric>; a test split that says the opposite changes nothing."""
    st = _load("scripts/accuracy_study.py")
    runs = [_fake_run(st, "scl", 1e-3, 0.5, val=0.9, test=0.1), _fake_run(st, "scl", 1e-2, 0.5, val=0.5, test=0.99),
            _fake_run(st, "scl", 1e-3, 0.1, val=0.7, test=0.1), _fake_run(st, "scl", 1e-2, 0.1, val=0.8, test=0.99),
            _fake_run(st, "ffa-lora", 1e-3, 0.5, val=0.6, test=0.99), _fake_run(st, "ffa-lora", 1e-2, 0.5, val=0.6, test=0.1),
            _fake_run(st, "fedavg-lora", 1e-3, 0.5, val=0.7, test=0.0)]
    chosen = st.choose_lrs(runs, "accuracy")
    assert chosen["scl"] == (1e-3, pytest.approx(0.8))  # mean over alphas: 0.8 vs 0.65
    assert chosen["ffa-lora"][0] == 1e-3  # a tie goes to the smaller lr
    assert st.choose_finalists(chosen, "accuracy", 1, 1) == ["scl", "fedavg-lora"]
    heads = [_fake_run(st, "scl", 1e-3, 0.5, val=0.8, test=0.1, head_lr=1e-2),
             _fake_run(st, "scl", 1e-3, 0.5, val=0.6, test=0.9, head_lr=3e-3),
             _fake_run(st, "ffa-lora", 1e-3, 0.5, val=0.7, test=0.1, head_lr=1e-2),
             _fake_run(st, "ffa-lora", 1e-3, 0.5, val=0.75, test=0.9, head_lr=3e-3)]
    head, means = st.choose_head_lr(heads, "accuracy")
    assert head == 1e-2 and means[1e-2] == pytest.approx(0.75)
    assert st.test_scores(runs[0], "accuracy") == dict(last3=pytest.approx(0.1), best=0.1, final=0.1)


def test_accuracy_study_best_round_reads_only_the_runs_own_test_schedule():
    """An extended run also carries test scores at its shorter run's last rounds (here 9): "best"
    skips them, as the run asked for 20 rounds from the start would not have them."""
    st = _load("scripts/accuracy_study.py")
    spec = st.Spec("final", "scl", 0.5, 1, 1e-2, None, dict(rounds=20, test_every=5), "t")
    hist = [dict(round=r, accuracy=0.5 + 0.01 * r) for r in (0, 5, 10, 15, 18, 19, 20)]
    hist.insert(2, dict(round=9, accuracy=0.99))
    assert st.test_scores(st.Run(spec, hist), "accuracy")["best"] == pytest.approx(0.70)
    spec.cfg.clear()  # no schedule known: every tested round counts
    assert st.test_scores(st.Run(spec, hist), "accuracy")["best"] == 0.99


def test_accuracy_study_t_interval():
    st = _load("scripts/accuracy_study.py")
    m, lo, hi = st.t_interval([0.01, 0.03, 0.02, 0.04, 0.00])
    assert m == pytest.approx(0.02) and lo == pytest.approx(0.02 - 2.776 * 0.0158114 / 5 ** 0.5, abs=1e-4)
    assert hi - m == pytest.approx(m - lo)


@pytest.mark.parametrize("model,task,metric", [("tiny-llama", "chatterbot-qa", "rougeL_tf"),
                                               ("tiny-siglip", "synthetic-image", "accuracy")])
def test_accuracy_study_runs_a_causal_lm_and_a_vision_task(tmp_path, model, task, metric):
    """The study is not tied to text classification: pointed at a Q/A task it selects and reports
    the teacher-forced ROUGE-L, at an image task the accuracy."""
    pytest.importorskip("fastseq.fed.engine")
    if task == "chatterbot-qa":
        pytest.importorskip("chatterbot_corpus")  # the `demo` extra
    st = _load("scripts/accuracy_study.py")
    st.main(["--smoke", "--model", model, "--task", task, "--arms", "scl-frozenC", "--finalists-from-arms",
             "--head-lr", "1e-2", "--lrs", "1e-2", "--alphas", "0.5", "--seeds", "1", "--until", "final",
             "--out-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    doc = json.loads((tmp_path / f"study_{task}_smoke.json").read_text())
    assert doc["meta"]["metric"] == metric and doc["meta"]["model"] == model
    (row,) = doc["rows"]
    assert row["metric"] == metric and _finite(row["last3_mean"]) and row["total_bytes_mean"] > 0


def test_accuracy_study_budget_is_plain_scl_whatever_the_defaults():
    """The budget is plain SCL (residual, C trained) at rank r, 2 f r per layer, not the library's
    default variant; every arm's rank is matched to it and pins its variant fields."""
    st = _load("scripts/accuracy_study.py")
    p, shape = {"r": 8}, (384, 1536, 6, True)
    assert st.plain_scl_budget(p, 384, 1536) == 2 * 1536 * 8
    ranks = {arm: st.arm_overrides(arm, p, shape)["r"] for arm in st.ARMS}
    assert ranks["scl"] == 8 and ranks["scl-frozenC"] == 16 and ranks["scl-parallel-frozenC"] == 64
    for arm in st.ARMS:
        o = st.arm_overrides(arm, p, shape)
        assert {"scl_placement", "scl_train_compress"} <= set(o), arm


def test_scale_clients_smoke(tmp_path):
    """Two tiny configurations, in one process and with 2 workers, each in its own process: the
    time split, peak RSS and the client state on disk (the reported size is the files' size), the
    same results with workers; a rerun reuses the finished rows."""
    sc = _load("benchmarks/scale_clients.py")
    argv = ["--smoke", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "runs")]
    sc.main(argv)
    stem = tmp_path / "scale_clients_smoke"
    rows = _csv(f"{stem}.csv")
    doc = json.loads(Path(f"{stem}.json").read_text())
    assert len(rows) == len(doc["rows"]) == 4 and (tmp_path / "scale_clients_smoke.png").stat().st_size > 0
    assert "| arm | clients | workers |" in Path(f"{stem}.md").read_text()
    for r in doc["rows"]:
        assert r["git_commit"] and r["torch"] and r["measured_rounds"] == 2
        assert r["train_s"] > 0 and r["peak_rss_mb"] > 50
        if r["workers"] == 1:  # with workers the clients' training seconds add up across processes
            assert r["train_s"] < r["round_s"] and 0 < r["overhead_frac"] < 1
        # FedSA's B, the error-feedback residual and the held global state (lossy downlink) per client
        assert r["client_state_bytes"] == r["clients_dir_bytes"] > 0
        assert r["server_state_bytes"] == r["server_dir_bytes"] > 0
    assert [(r["clients"], r["workers"]) for r in doc["rows"]] == [(3, 1), (8, 1), (3, 2), (8, 2)]
    seq, par = doc["rows"][:2], doc["rows"][2:]
    assert all(p["final"] == q["final"] and p["client_state_bytes"] == q["client_state_bytes"] for p, q in zip(seq, par))
    assert all(r["worker_peak_rss_mb"] > 50 for r in par) and all(r["worker_peak_rss_mb"] == 0 for r in seq)
    assert "2 workers: round" in Path(f"{stem}.md").read_text()
    stamp = Path(f"{stem}.json").read_text()
    sc.main(argv)  # resumable: nothing is rerun
    assert json.loads(Path(f"{stem}.json").read_text())["rows"] == json.loads(stamp)["rows"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_side_by_side_flower_smoke(tmp_path):
    """The three arms run (fastseq's local engine sequential and with 2 workers, and a plain Flower
    + PEFT simulation), in their own process trees; the Flower arm uses the LoRA the fastseq arm
    resolved, and its tree holds Ray's processes (more than one); the workers arm forks its workers."""
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    sbs = _load("benchmarks/side_by_side_flower.py")
    res = sbs.main(["--smoke", "--out-dir", str(tmp_path), "--workers", "2"])
    stem = tmp_path / "side_by_side_flower_smoke"
    rows = _csv(f"{stem}.csv")
    doc = json.loads(Path(f"{stem}.json").read_text())
    assert [r["arm"] for r in rows] == [r["arm"] for r in doc["rows"]] == ["fastseq", "fastseq-2w", "flower"]
    assert Path(f"{stem}.png").stat().st_size > 0 and "| flower |" in Path(f"{stem}.md").read_text()
    spec = doc["spec"]
    assert spec["lora_targets"] and spec["lora_r"] == 4 and spec["clients"] == 3
    for r in doc["rows"]:
        assert len(r["round_seconds"]) == spec["rounds"] and len(r["accuracy"]) == spec["rounds"] + 1
        for k in ("round_s_mean", "process_wall_s", "peak_rss_mb", "peak_pss_mb", "cpu_s"):
            assert _finite(r[k]) and r[k] > 0, (r["arm"], k)
        assert 0 <= r["accuracy_final"] <= 1 and r["git_commit"] and r["flwr"]
    fast, par, flower = doc["rows"]
    assert fast["peak_processes"] == 1 and flower["peak_processes"] > 2  # Ray's GCS, raylet, actors
    # the rounds ran on 2 workers (the sampler may miss their short life in a smoke run)
    assert [r["workers"] for r in res["rows"]][:2] == [1, 2]
    assert fast["accuracy"] == par["accuracy"]  # the same run, bit for bit
    assert doc["ratios"]["peak PSS"] == pytest.approx(flower["peak_pss_mb"] / fast["peak_pss_mb"])
    assert doc["ratios"]["workers peak PSS / sequential"] == pytest.approx(par["peak_pss_mb"] / fast["peak_pss_mb"])
    assert res["ratios"] == doc["ratios"]


def test_dp_epsilon_smoke_and_rerun_reuses_the_runs(tmp_path):
    pytest.importorskip("dp_accounting")
    dp = _load("benchmarks/dp_epsilon.py")
    dp.main(["--smoke", "--out-dir", str(tmp_path)])
    stem = tmp_path / "dp_epsilon_smoke"
    rows = _csv(f"{stem}.csv")
    doc = json.loads(Path(f"{stem}.json").read_text())
    assert len(rows) == len(doc["rows"]) == 2 * 2  # scl, ffa-lora x noise 0 (no DP), 1
    assert Path(f"{stem}.png").stat().st_size > 0 and "| ffa-lora | 1 |" in Path(f"{stem}.md").read_text()
    assert doc["meta"]["git_commit"] and doc["meta"]["torch"]
    for r in doc["rows"]:
        hist = [json.loads(line) for line in (Path(r["out"]) / "metrics.jsonl").read_text().splitlines()]
        assert _finite(r["accuracy_final"]) and r["rounds"] == 2
        if r["noise"] == 0:
            assert r["dp"] == "none" and r["epsilon"] is None and r["dp_clip"] is None  # no DP: infinite epsilon
            norms = sorted(v for h in hist[1:] for v in h["update_norms"].values())
            clip = next(x["dp_clip"] for x in doc["rows"] if x["method"] == r["method"] and x["noise"] > 0)
            assert norms[0] <= clip <= norms[-1]  # the clip of the DP run comes from these norms
        else:
            assert r["dp"] == "central" and _finite(r["epsilon"]) and r["epsilon"] > 0
            assert r["epsilon"] == pytest.approx(hist[-1]["epsilon"]) and hist[-1]["dp_clip"] == r["dp_clip"]
    stamps = {f: f.stat().st_mtime for f in (tmp_path / "runs").rglob("summary.json")}
    assert len(stamps) == 4
    dp.main(["--smoke", "--out-dir", str(tmp_path)])  # a rerun reuses every finished run
    assert {f: f.stat().st_mtime for f in (tmp_path / "runs").rglob("summary.json")} == stamps


def test_fleet_study_smoke_and_report(tmp_path):
    """scripts/fleet_study.py: every arm x alpha x seed, per-tier bytes and measured memory, the
    paired comparison against everyone-at-the-lowest-rank; a rerun reuses every finished run."""
    st = _load("scripts/fleet_study.py")
    argv = ["--smoke", "--out-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    st.main(argv)
    doc = json.loads((tmp_path / "fleet_study_smoke.json").read_text())
    rows = _csv(tmp_path / "fleet_study_smoke.csv")
    assert {r["arm"] for r in rows} == set(st.arms()) and len(st.arms()) == 12
    fleet_rows = [r for r in doc["rows"] if r["arm"] in st.FLEET_ARMS]
    assert all(set(r["update_bytes_per_tier"]) == {"r1", "r2", "r4"} for r in fleet_rows)
    assert all(r["update_bytes_per_tier"]["r1"] < r["update_bytes_per_tier"]["r4"] for r in fleet_rows)
    assert {p["arm"] for p in doc["paired"]} == set(st.arms()) - {"scl-low", "ffa-low", "fedavg-low"}
    assert [m["rank"] for m in doc["memory"]] == [1, 2, 4] and all(m["measured_bytes"] > 0 for m in doc["memory"])
    assert len(doc["gap"]) == 3 and doc["missing"] == []
    assert (tmp_path / "fleet_study_smoke.png").stat().st_size > 0
    md = (tmp_path / "fleet_study_smoke.md").read_text()
    assert "## Against everyone at the lowest rank" in md and "## Nested fleets against HetLoRA and FlexLoRA" in md
    assert len(doc["head_to_head"]) == 4 * 2  # four nested arms x two baselines, one alpha
    stamps = {f: f.stat().st_mtime for f in (tmp_path / "runs").glob("*/summary.json")}
    st.main(argv + ["--report-only"])
    assert {f: f.stat().st_mtime for f in (tmp_path / "runs").glob("*/summary.json")} == stamps


def test_fleet_study_gap_recovered_is_read_per_seed():
    st = _load("scripts/fleet_study.py")
    acc = st.acc

    def run(arm, seed, score):
        hist = [{"round": 0}] + [{"round": r, "accuracy": score, "val_accuracy": score} for r in (1, 2, 3)]
        return acc.Run(acc.Spec("final", arm, 0.5, seed, 1e-3, None, {}, f"{arm}{seed}"), hist)

    runs = [run("scl-low", 1, 0.6), run("scl-low", 2, 0.7), run("scl-high", 1, 0.8), run("scl-high", 2, 0.9),
            run("scl-holders", 1, 0.7), run("scl-holders", 2, 0.85)]
    _, paired = st.report(runs, "accuracy")
    by = {p["arm"]: p for p in paired}
    assert by["scl-high"]["gap_recovered"] == pytest.approx(1.0)
    assert by["scl-holders"]["vs_low_mean"] == pytest.approx(0.125)
    assert by["scl-holders"]["gap_high_minus_low"] == pytest.approx(0.2)
    assert by["scl-holders"]["gap_recovered"] == pytest.approx(0.625)
    assert by["scl-holders"]["recovered_per_seed"] == pytest.approx([0.5, 0.75])  # 0.1 / 0.2, 0.15 / 0.2
    assert by["scl-holders"]["recovered_ci_low"] < 0.625 < by["scl-holders"]["recovered_ci_high"]
    runs += [run("fedavg-hetlora", 1, 0.65), run("fedavg-hetlora", 2, 0.7), run("fedavg-flexlora", 1, 0.7)]
    h2h = {(h["arm"], h["against"]): h for h in st.head_to_head(runs, "accuracy")}
    assert set(h2h) == {("scl-holders", "fedavg-hetlora"), ("scl-holders", "fedavg-flexlora")}
    assert h2h["scl-holders", "fedavg-hetlora"]["diff_mean"] == pytest.approx(0.1)  # 0.05, 0.15
    assert h2h["scl-holders", "fedavg-flexlora"]["seeds"] == [1]  # paired: only the seeds both have
