"""scripts/gpu_check.py, the one-call GPU check, rehearsed on the CPU: the dry run writes the
same files as the CUDA run; budgets, failures and bad input are handled; `pytest --device cuda`
picks the device-aware kernel tests and skips cleanly without CUDA."""
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
FILES = {"gpu_check.json", "gpu_check.md", "gpu_check.png", "gpu_check.log", "correctness.log",
         "kernel_sweep.csv", "train_step.csv"}


def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its steps itself
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def log_text(out):
    return (out / "gpu_check.log").read_text()


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the dry run runs the Triton interpreter")
def test_dry_run_writes_every_file_and_every_step_passes(tmp_path):
    out = tmp_path / "gpu"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES and len(FILES) <= 8  # the device tool returns 8 files at most
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["meta"]["dry_run"] is True and doc["meta"]["git_commit"] and doc["meta"]["torch"]
    steps = doc["steps"]
    assert list(steps) == ["env", "correctness", "sweep", "train_step", "federated", "gemma_memory", "fleet",
                           "workers"]
    for name, r in steps.items():
        assert r["status"] == "ok", (name, r.get("error"), r.get("units"))
        assert all(u["status"] == "ok" for u in r.get("units", {}).values()), (name, r["units"])
        assert 0 < r["seconds"] <= r["budget_s"]
    assert steps["env"]["matmul_tflops"] > 0 and steps["env"]["copy_gbps"] > 0
    tiers = steps["fleet"]["tiers"]  # three tiers planned differently, each measured within its budget
    assert len(tiers) == 3 and len({(t["rank"], t["checkpoint_level"], t["micro_batch"]) for t in tiers}) >= 2
    assert all(t["within_budget"] and t["measured_bytes"] > 0 for t in tiers)
    assert "Fleet: each tier's planned step, measured" in (out / "gpu_check.md").read_text()
    assert steps["env"]["fastseq_from"] == str(ROOT)  # this checkout's code, whatever is installed
    c = steps["correctness"]["counts"]
    assert c["tests"] == c["passed"] == 5 and "passed" in (out / "correctness.log").read_text()

    sweep = steps["sweep"]["rows"]
    assert len(_csv(out / "kernel_sweep.csv")) == len(sweep) == 2 * 7  # two SCL variants x seven providers
    for r in sweep:
        assert r["device_name"] and r["git_commit"] and r["torch"] and r["dtype"] == "bfloat16"
        assert r["ms_median"] > 0 and math.isfinite(r["tflops"]) and r["flops"] >= r["flops_fwd"] > 0
    for variant in ("plain", "default"):
        by = {r["provider"]: r for r in sweep if r["variant"] == variant}
        assert by["peft_lora_matched"]["speedup_vs_lora"] == 1.0
        assert by["scl_triton_l2"]["saved_bytes"] < by["scl_triton_l1"]["saved_bytes"] < by["scl_eager"]["saved_bytes"]
        assert by["scl_triton_l2"]["flops_executed"] > by["scl_triton_l1"]["flops_executed"]  # recomputed GEMMs
    assert {r["rank"] for r in sweep if r["provider"].startswith("scl")} == {16, 64}  # plain r=16, default r=64

    train = steps["train_step"]["rows"]
    assert {(r["backbone"], r["provider"]) for r in train} == {
        (b, p) for b in ("bf16", "nf4") for p in ("lora_matched", "scl_eager", "scl_fused_l1", "scl_fused_l2")}
    for r in train:
        assert r["tokens_per_s"] > 0 and r["saved_bytes"] > 0 and r["device_name"]
        assert (r["plan_estimate_bytes"] is None) == r["provider"].startswith("lora")
    assert len(_csv(out / "train_step.csv")) == len(train) + 1  # + the Gemma-shaped row

    runs = steps["federated"]["runs"]
    assert [r["method"] for r in runs] == ["scl", "fedavg-lora"]
    assert all(r["rounds"] == 1 and not r["dropped"] and r["uplink_bytes"] > 0 for r in runs)
    g = steps["gemma_memory"]
    assert g["fits"] and g["budget_bytes"] == 6 * 2**30 and len(g["rows"]) == 1 and g["rows"][0]["plan_estimate_bytes"] > 0

    w = steps["workers"]  # 1 and 4 workers: the same run, the same result
    assert [r["workers"] for r in w["runs"]] == [1, 4] and w["same_final"] is True
    assert len(set(w["runs"][1]["client_worker"].values())) == 4 and w["round_time_ratio"] > 0

    goals = {x["key"]: x for x in doc["goals"]}
    assert len(goals) == 8
    # a dry run measures nothing a goal is about: every goal "not measured", never met or missed
    assert all(g["value"] is None and g["met"] is None for g in goals.values()), goals
    assert goals["fused_l1_vs_lora[plain]"]["cases"]  # the CPU numbers are kept, for the record only
    md = (out / "gpu_check.md").read_text()
    assert "MISSED" not in log_text(out) and "**no**" not in md and "not measured" in md
    assert "DRY RUN" in md and "## Goals" in md and "## Kernel sweep" in md and "## Federated round" in md
    assert "## Workers" in md
    assert (out / "gpu_check.png").stat().st_size > 10_000
    log = (out / "gpu_check.log").read_text()
    assert all(f"[{name}] ok in" in log for name in steps)


def test_a_step_over_its_budget_is_stopped_and_the_rest_still_reported(tmp_path):
    out = tmp_path / "gpu"
    proc = _run("--dry-run", "--out", str(out), "--steps", "env,federated", "--budget", "2", "--step-budget", "env=1")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["steps"]["env"]["status"] == "timeout" and "budget of 1 s" in doc["steps"]["env"]["error"]
    assert doc["steps"]["federated"]["status"] == "skipped" and "out of time" in doc["steps"]["federated"]["error"]
    assert "timeout" in (out / "gpu_check.md").read_text() and (out / "gpu_check.log").exists()


def _load_script():
    spec = importlib.util.spec_from_file_location("_gpu_check", SCRIPT)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    return gc


def test_a_failing_step_records_its_error(tmp_path, monkeypatch):
    gc = _load_script()

    def broken(st):
        with st.unit("first"):
            raise ValueError("a unit fails")
        st.result["after"] = "the step went on"
        raise RuntimeError("the step fails")

    monkeypatch.setitem(gc.STEP_FUNCTIONS, "env", broken)
    assert gc.run_step("env", tmp_path, tmp_path, dry=True) == 1
    res = json.loads((tmp_path / "env.json").read_text())
    assert res["status"] == "failed" and res["error"] == "RuntimeError: the step fails" and res["after"]
    assert res["units"]["first"]["status"] == "failed" and "a unit fails" in res["units"]["first"]["error"]


def test_a_step_whose_units_failed_is_not_ok(tmp_path, monkeypatch):
    """Every case inside the step failed but the step itself returned: it is failed, not ok."""
    gc = _load_script()

    def cases_fail(st):
        with st.unit("good"):
            pass
        for case in ("bf16", "nf4"):
            with st.unit(case):
                raise ImportError(f"cannot import name 'CUDAProperties' ({case})")

    monkeypatch.setitem(gc.STEP_FUNCTIONS, "train_step", cases_fail)
    assert gc.run_step("train_step", tmp_path, tmp_path, dry=True) == 1
    res = json.loads((tmp_path / "train_step.json").read_text())
    assert res["status"] == "failed" and res["error"] == "2 of 3 units failed: bf16, nf4"


@pytest.mark.parametrize("args,message", [
    (["--dry-run", "--steps", "env,warp"], "unknown step(s) ['warp']"),
    (["--dry-run", "--step-budget", "env=soon"], "--step-budget wants NAME=SECONDS"),
    (["--dry-run", "--budget", "0"], "--budget must be more than 0"),
])
def test_bad_arguments_say_what_is_wrong(tmp_path, args, message):
    proc = _run("--out", str(tmp_path / "o"), *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_out_must_be_a_writable_folder(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = _run("--dry-run", "--out", str(tmp_path / "a_file" / "sub"))
    assert proc.returncode != 0 and "is not a writable folder" in proc.stderr, proc.stderr
    assert not (tmp_path / "a_file").is_dir()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_real_run_says_to_use_the_dry_run(tmp_path):
    proc = _run("--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "no CUDA GPU here" in proc.stderr and "--dry-run" in proc.stderr


# ---------------------------------------------------------------- pytest --device cuda
def _pytest(*args, extra_path=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the skip of a machine without CUDA")
def test_device_cuda_without_cuda_skips_saying_why():
    proc = _pytest("tests/test_kernels_correctness.py", "-k", "zero_expand or gradcheck", "--device", "cuda", "-rs")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "9 skipped" in proc.stdout and "--device cuda: CUDA is not available" in proc.stdout


def test_device_cuda_runs_the_device_aware_kernel_tests_only(tmp_path):
    """With CUDA pretended present (collection only), the tests taking `device` run and the CPU
    tests are skipped, a test merely parametrized with a `device` argument among them."""
    (tmp_path / "pretend_cuda.py").write_text(
        "import devices\n"
        "devices.cuda_missing_reason = lambda: None\n"
        "def pytest_collection_finish(session):\n"
        "    for item in session.items:\n"
        "        print('RUNS' if item.get_closest_marker('skip') is None else 'SKIPS', item.nodeid)\n")
    proc = _pytest("tests/test_kernels_behaviour.py", "tests/test_fused_models.py",
                   "tests/test_cli_errors.py::test_cuda_device_this_machine_lacks", "--device", "cuda",
                   "--collect-only", "-q", "-p", "pretend_cuda", extra_path=tmp_path)
    runs = {line.split(" ", 1)[1].split("[")[0] for line in proc.stdout.splitlines() if line.startswith("RUNS ")}
    skips = {line.split(" ", 1)[1].split("[")[0] for line in proc.stdout.splitlines() if line.startswith("SKIPS ")}
    assert "tests/test_fused_models.py::test_fused_training_matches_reference" in runs, proc.stdout[-3000:]
    assert "tests/test_fused_models.py::test_fused_ffn_on_bitsandbytes_weights" in runs
    assert "tests/test_kernels_behaviour.py::test_frozen_weights_get_no_grad" in runs
    assert "tests/test_kernels_behaviour.py::test_bad_arguments" in skips
    assert "tests/test_kernels_behaviour.py::test_triton_without_cuda_or_interpreter_raises_clear_error" in skips
    assert "tests/test_cli_errors.py::test_cuda_device_this_machine_lacks" in skips
    assert not runs & skips


# ---------------------------------------------------------------- a bare machine's copy of the tree
def test_an_uninstalled_checkout_imports_fastseq_kernels(tmp_path):
    """A copy of the tree run with PYTHONPATH=<copy> (the lent GPU machine runs fastseq so, not
    installed): `fastseq.kernels` is the copy's own fastseq/kernels/."""
    shutil.copytree(ROOT / "fastseq", tmp_path / "fastseq", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import fastseq.kernels as k, fastseq.kernels.testing as t; print(k.__file__); print(t.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1"))
    kernels = tmp_path / "fastseq" / "kernels"
    assert proc.stdout.split() == [str(kernels / "__init__.py"), str(kernels / "testing.py")], proc.stderr[-2000:]


def test_provenance_outside_git_takes_the_given_commit(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import provenance

    monkeypatch.setattr(provenance, "ROOT", tmp_path)  # not a git checkout
    monkeypatch.delenv("FASTSEQ_GIT_COMMIT", raising=False)
    assert provenance.git_commit() == "unknown"
    monkeypatch.setenv("FASTSEQ_GIT_COMMIT", "abc1234+dirty")
    assert provenance.git_commit() == "abc1234+dirty (given)"
