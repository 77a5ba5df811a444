"""GPU truth in one call: kernels, training step and memory, measured on a lent GPU.

    python scripts/gpu_check.py --out DIR             # CUDA: about 9 minutes on an H100 / H200
    python scripts/gpu_check.py --dry-run --out DIR   # CPU rehearsal: tiny shapes, the Triton interpreter

Runs from a source checkout without installing fastseq (the checkout goes first on
``sys.path``). Steps, in this order, each in a process
of its own with a time budget, so that a failure, a timeout or a crashed CUDA context is
recorded and the next step still runs:

1. ``env``          GPU, versions, the measured copy bandwidth and bf16 matmul TFLOP/s (the ceilings)
2. ``correctness``  ``pytest --device cuda`` on the kernel tests (tests/test_kernels_*.py,
                    tests/test_fused_models.py): the real Triton compiler, fp32/bf16/fp16, odd shapes
3. ``sweep``        one FFN layer, fused L1/L2 vs eager SCL and PEFT LoRA at the matched budget,
                    TinyLlama and Gemma-2B FFN shapes, T = 2048 and 8192, bf16 (benchmarks/kernel_sweep.py)
4. ``train_step``   22-layer TinyLlama-shaped step, batch 4 x 512, bf16 and nf4: SCL L0/L1/L2 vs LoRA,
                    tokens/s, peak memory and the planner's estimate (benchmarks/train_step.py)
5. ``federated``    one federated round of a tiny model on the runtime's CUDA path
6. ``gemma_memory`` a Gemma-2B-shaped client: the planner's choice for 6 GB at batch 4 x 512, measured
7. ``fleet``        a 3-tier heterogeneous fleet: each tier's planned step (rank, quantization, level,
                    micro-batch) measured with ``torch.cuda.max_memory_allocated``, against its budget
8. ``workers``      1 vs 4 workers (spawned, the backbone shared through CUDA IPC) of a client with
                    TinyLlama's widths: round time, each client's peak allocation, the device's used
                    memory; then 4 workers on an nf4 backbone, if the step's time allows

Writes to DIR, rewritten after every step (at most 8 files: the device tool returns no more):
gpu_check.json (everything, tagged by benchmarks/provenance.py), gpu_check.md (the summary and
the goals), gpu_check.png, gpu_check.log (this run's output), correctness.log (pytest's),
kernel_sweep.csv, train_step.csv. Exit status 0 when every step ran and every test passed (a
missed goal is a result, not a failure), 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this checkout's fastseq (installed or not) and the benchmark modules the steps reuse
for _p in (ROOT / "scripts", ROOT / "benchmarks", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

GIB = 2**30
# (name, seconds): unspent seconds carry over to the steps after
STEPS = (("env", 20), ("correctness", 130), ("sweep", 100), ("train_step", 120), ("federated", 50),
         ("gemma_memory", 60), ("fleet", 40), ("workers", 50))
TOTAL_BUDGET = 550
GRACE_S = 20  # after SIGINT: pytest writes its report, a step saves what it has
OUT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.png", "gpu_check.log", "correctness.log",
             "kernel_sweep.csv", "train_step.csv")
CORRECTNESS_FILES = ("tests/test_kernels_correctness.py", "tests/test_kernels_behaviour.py",
                     "tests/test_fused_models.py")
# the dry run's share of the same tests: one of each kind, seconds under the interpreter
DRY_CORRECTNESS = ("tests/test_kernels_correctness.py::test_every_tile_config_matches_reference",
                   "tests/test_kernels_correctness.py::test_variants_match_reference"
                   "[dtype1-False-False-True-silu-silu-parallel-False-True-2-triton]",
                   "tests/test_kernels_behaviour.py::test_callable_weights_recomputed_and_shared_buffer_safe[triton]",
                   "tests/test_fused_models.py::test_fused_ffn_on_bitsandbytes_weights[nf4-2-triton]",
                   "tests/test_fused_models.py::test_fused_training_matches_reference[llama-parallel-frozenC-1-triton]")


# ----------------------------------------------------------------------------- inside a step
class Step:
    """What a step process fills in: ``result`` is saved to ``<work>/<name>.json`` by ``save()``
    (after every unit, so a step stopped at its budget keeps what it measured)."""

    def __init__(self, name: str, work: Path, out: Path, dry: bool):
        import torch

        self.name, self.work, self.out, self.dry = name, work, out, dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.result: dict = {"units": {}}

    def save(self) -> None:
        tmp = self.work / f".{self.name}.json"
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.work / f"{self.name}.json")

    def earlier(self, name: str) -> dict:
        path = self.work / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @contextlib.contextmanager
    def unit(self, name: str):
        """One measurement of the step: its failure is recorded and the step goes on."""
        t0 = time.perf_counter()
        try:
            yield
            self.result["units"][name] = dict(status="ok", seconds=round(time.perf_counter() - t0, 1))
        except Exception as e:
            self.result["units"][name] = dict(status="failed", seconds=round(time.perf_counter() - t0, 1),
                                              error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            print(f"[{self.name}] {name} failed: {type(e).__name__}: {e}", flush=True)
        finally:
            self.save()


def _bench_ms(fn, device) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` on CUDA, wall clock on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    import statistics

    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def step_env(st: Step) -> None:
    import importlib.metadata as md
    import importlib.util

    import torch
    from provenance import provenance

    dev = st.device
    st.result["provenance"] = provenance(dev)
    mods = {}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "flwr", "pytest", "xdist"):
        dist = {"xdist": "pytest-xdist"}.get(name, name)
        if importlib.util.find_spec(name) is None:
            mods[name] = None
        else:
            with contextlib.suppress(md.PackageNotFoundError):
                mods[name] = md.version(dist)
    st.result["modules"] = mods
    import fastseq.kernels

    st.result["fastseq_from"] = str(Path(fastseq.kernels.__file__).resolve().parents[2])  # this checkout?
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        st.result["gpu"] = dict(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                                memory_gib=round(p.total_memory / GIB, 1), cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            st.result["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    with st.unit("bitsandbytes"):
        from fastseq.quant import check_device

        check_device("nf4", dev)
    with st.unit("ceilings"):
        # copy: bytes read + written; matmul: a square bf16 product on random data (METHOD.md's two numbers)
        n = 2**28 if dev.type == "cuda" else 2**22
        src = torch.randn(n, device=dev)
        dst = torch.empty_like(src)
        ms = _bench_ms(lambda: dst.copy_(src), dev)
        st.result["copy_gbps"] = 2 * n * 4 / (ms * 1e-3) / 1e9
        m = 8192 if dev.type == "cuda" else 256
        g = torch.Generator(device="cpu").manual_seed(0)
        a, b = (torch.randn(m, m, generator=g).to(dev, torch.bfloat16) for _ in range(2))
        ms = _bench_ms(lambda: a @ b, dev)
        st.result["matmul_tflops"] = 2 * m**3 / (ms * 1e-3) / 1e12
        st.result["matmul_shape"] = f"bf16 {m}x{m}x{m}"
        print(f"[env] copy {st.result['copy_gbps']:.0f} GB/s, bf16 matmul {st.result['matmul_tflops']:.1f} TFLOP/s",
              flush=True)


def step_correctness(st: Step) -> None:
    import importlib.util
    import xml.etree.ElementTree as ET

    junit = st.work / "junit.xml"
    tests = list(DRY_CORRECTNESS if st.dry else CORRECTNESS_FILES)
    cmd = [sys.executable, "-m", "pytest", *tests, "--device", st.device.type, "-q", "-p", "no:cacheprovider",
           "--tb=short", "-rfE", f"--junitxml={junit}"]
    if not st.dry and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]  # compiling the kernels is CPU-bound
    st.result["command"] = " ".join(cmd[1:])
    print(f"[correctness] {st.result['command']}", flush=True)
    interrupted = False
    with open(st.out / "correctness.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the budget: pytest got the SIGINT too and writes its report
            interrupted = True
            try:
                rc = proc.wait(timeout=GRACE_S - 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    st.result["returncode"] = rc
    tail = (st.out / "correctness.log").read_text(errors="replace").strip().splitlines()
    st.result["summary_line"] = tail[-1] if tail else ""
    if junit.exists():
        counts = dict(tests=0, failures=0, errors=0, skipped=0)
        failed, skip_reasons = [], {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            counts["tests"] += 1
            for kind in ("failure", "error", "skipped"):
                el = case.find(kind)
                if el is None:
                    continue
                counts["skipped" if kind == "skipped" else kind + "s"] += 1
                msg = " ".join((el.get("message") or "").split())[:300]
                if kind == "skipped":
                    skip_reasons[msg] = skip_reasons.get(msg, 0) + 1
                else:
                    failed.append(f"{case.get('classname')}::{case.get('name')}: {msg}")
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        st.result.update(counts=counts, failed=failed[:40], skip_reasons=dict(list(skip_reasons.items())[:10]))
        print(f"[correctness] {counts}", flush=True)
    st.save()
    if interrupted:
        raise KeyboardInterrupt
    if rc not in (0, 1) or not st.result.get("counts", {}).get("tests"):  # 1: tests failed (a result, not an error)
        raise RuntimeError(f"pytest exited with code {rc} ({st.result['summary_line']}); see correctness.log")


def step_sweep(st: Step) -> None:
    import torch

    import kernel_sweep as ks
    from provenance import provenance

    dev, dtype = st.device, torch.bfloat16
    ceiling = st.earlier("env").get("matmul_tflops")
    shapes = {"tiny": (64, 160)} if st.dry else ks.SHAPES
    tokens = (32,) if st.dry else (2048, 8192)
    provs = ("frozen_mlp", "peft_lora_matched", "scl_eager", "scl_torch_l1", "scl_torch_l2", "scl_triton_l1",
             "scl_triton_l2")
    provs = [p for p in provs if ks.available(p, dev, allow_interpreter=st.dry)]
    meta = dict(provenance(dev), dtype="bfloat16", ceiling_tflops=ceiling)
    st.result.update(rows=[], providers=provs, ceiling_tflops=ceiling)
    for variant in ("plain", "default"):  # the paper's layer first, then the library's default
        for T in tokens:
            for shape, (d, f) in shapes.items():
                with st.unit(f"{variant}/{shape}/T{T}"):
                    res = ks.measure_block(provs, d, f, ks.RANK, T, dtype, dev, reps=3, warmup=1, variant=variant,
                                           fwd=True)
                    block = [dict(meta, shape=shape, d=d, f=f, tokens=T, provider=p, **m) for p, m in res.items()]
                    for row in ks.add_ratios(block, "peft_lora_matched"):
                        row["speedup_vs_lora"] = 1 / row["time_vs_lora"] if row["time_vs_lora"] else None
                        row["frac_ceiling"] = row["tflops"] / ceiling if ceiling else None
                        row["fwd_frac_ceiling"] = row.get("tflops_fwd", 0) / ceiling if ceiling else None
                        print(f"[sweep] {variant:7s} {shape:9s} T={T:5d} {row['provider']:17s} "
                              f"{row['ms_median']:8.3f} ms  x{row['speedup_vs_lora'] or 0:5.2f} vs LoRA  "
                              f"{row['tflops']:7.1f} TFLOP/s  saved {row['saved_bytes'] / 2**20:8.1f} MiB", flush=True)
                    st.result["rows"].extend(block)
                    del res
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()


def step_train_step(st: Step) -> None:
    import train_step as ts
    from provenance import provenance

    dev = st.device
    shape, layers, vocab, batch, seq = ((ts.SMOKE, 2, 256, 1, 16) if st.dry else (ts.TINYLLAMA, 22, 32000, 4, 512))
    st.result.update(rows=[], skipped=[])
    provs = []
    for p in ("lora_matched", "scl_eager", "scl_fused_l1", "scl_fused_l2"):
        why = ts.available(p, dev, allow_interpreter=st.dry)
        if why:
            st.result["skipped"].append(dict(provider=p, reason=why))
        else:
            provs.append(p)
    meta = dict(provenance(dev), model="tinyllama-shaped", d=shape["hidden_size"], f=shape["intermediate_size"],
                layers=layers, vocab=vocab, batch=batch, seq=seq, tokens=batch * seq)
    for backbone in ("bf16", "nf4"):
        why = ts.nf4_available() if backbone == "nf4" else None
        if why:
            st.result["skipped"].append(dict(backbone=backbone, reason=why))
            continue
        with st.unit(backbone):
            res = ts.measure_backbone(provs, backbone, shape, layers, vocab, batch, seq, reps=1 if st.dry else 5,
                                      warmup=0 if st.dry else 1, device=dev)
            for row in ts.with_ratios([dict(meta, **res[p]) for p in provs]):
                st.result["rows"].append(row)
                peak = row.get("cuda_peak_alone_bytes") or row["est_peak_bytes"]
                est = row.get("plan_estimate_bytes")
                print(f"[train_step] {backbone} {row['provider']:14s} {row['tokens_per_s']:9.0f} tok/s "
                      f"(x{row['tokens_per_s_vs_lora'] or 0:.2f} vs LoRA)  peak {peak / GIB:6.2f} GiB"
                      + (f"  planner {est / GIB:6.2f} GiB" if est else ""), flush=True)


def step_federated(st: Step) -> None:
    import torch

    from fastseq.fed import ExperimentConfig, run_experiment
    from fastseq.kernels import resolve_backend

    st.result.update(runs=[], backend=resolve_backend("auto", st.device))
    with tempfile.TemporaryDirectory(prefix="gpu_check_fed_") as tmp:
        for method in ("scl", "fedavg-lora"):
            with st.unit(method):
                cfg = ExperimentConfig(model="tiny-llama", task="synthetic", method=method, rounds=1, clients=2,
                                       clients_per_round=2, partition="iid", min_client_size=4, local_steps=3,
                                       batch_size=8, max_examples=64, eval_batch_size=32, r=4,
                                       device=st.device.type, out=f"{tmp}/{method}", progress=False, seed=0)
                if st.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                summary = run_experiment(cfg, echo=lambda line: print(f"[federated] {method}: {line}", flush=True))
                rounds = [json.loads(line) for line in open(f"{tmp}/{method}/metrics.jsonl")]
                run = dict(method=method, seconds=round(time.perf_counter() - t0, 2), rounds=summary["rounds"],
                           metric=summary["metric"], initial=summary["initial"], final=summary["final"],
                           uplink_bytes=summary["uplink_bytes"], downlink_bytes=summary["downlink_bytes"],
                           train_loss=rounds[-1].get("train_loss"), dropped=rounds[-1].get("dropped"),
                           cuda_peak_bytes=torch.cuda.max_memory_allocated() if st.device.type == "cuda" else None)
                st.result["runs"].append(run)
                if summary["dropped"] or summary["rounds"] != 1:
                    raise RuntimeError(f"the round did not complete: {run['dropped']}")


def step_gemma_memory(st: Step) -> None:
    import torch

    import train_step as ts
    from fastseq import memory
    from provenance import provenance

    dev = st.device
    if st.dry:
        shape, layers, vocab, seq = dict(ts.SMOKE, arch="gemma", head_dim=16), 1, 256, 16
    else:
        shape, layers, vocab, seq = ts.GEMMA_2B, 18, 256000, 512
    budget = 6 * GIB
    _, cfg = ts.model_config(shape, layers, vocab)
    plan = memory.plan(cfg, budget, ts.scl_config(2), batch_size=4, seq_len=seq, dtype=torch.bfloat16)
    st.result.update(budget_bytes=budget, seq=seq, plan=plan.message, fits=plan.fits, quantization=plan.quantization,
                     checkpoint_level=plan.checkpoint_level, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                     rows=[])
    print(f"[gemma_memory] planner, 6 GiB, batch 4 x {seq}: {plan.message}", flush=True)
    backbone = plan.quantization if plan.quantization != "none" else "bf16"
    provider = {0: "scl_eager", 1: "scl_fused_l1", 2: "scl_fused_l2"}[plan.checkpoint_level]
    with st.unit(f"{backbone}/{provider}/mb{plan.micro_batch}"):
        res = ts.measure_backbone([provider], backbone, shape, layers, vocab, plan.micro_batch, seq, reps=2,
                                  warmup=0 if st.dry else 1, device=dev)
        row = dict(provenance(dev), model="gemma-2b-shaped", layers=layers, vocab=vocab, batch=plan.micro_batch,
                   seq=seq, tokens=plan.micro_batch * seq, **res[provider])
        st.result["rows"].append(row)
        st.result["measured_bytes"] = row.get("cuda_peak_alone_bytes")
        if row.get("cuda_peak_alone_bytes"):
            print(f"[gemma_memory] measured {row['cuda_peak_alone_bytes'] / GIB:.2f} GiB, planner "
                  f"{row['plan_estimate_bytes'] / GIB:.2f} GiB", flush=True)


def step_fleet(st: Step) -> None:
    """Three tiers of one fleet on this device: each tier's plan, and its training step measured
    (the planner's measurement path: ``fleet.measure_plan``; on CUDA the allocator's peak less the
    other tiers' backbones, which share the device here but not on a real client)."""
    import torch

    from fastseq.fed.experiment import ExperimentConfig, build_client, build_runtime
    from fastseq.fed.fleet import measure_plan
    from fastseq.memory import frozen_and_trainable_bytes

    seq = 64 if st.dry else 512
    base = dict(model="tiny-llama", task="synthetic", max_examples=96, clients=3, clients_per_round=3,
                partition="iid", min_client_size=4, batch_size=8, max_length=seq, r=8, device=st.device.type,
                progress=False, out=None)
    probe = build_runtime(ExperimentConfig.from_dict(dict(base, fleet={"tiers": [{"name": "all", "share": 1.0}]})),
                          echo=lambda s: None)
    roomy = probe.plans["0"].estimated_bytes
    del probe
    # budgets that make the tiers plan differently: the full run, a tighter one, the tightest
    fleet = {"rank_ladder": [8, 4, 2], "tiers": [
        {"name": "workstation", "clients": ["0"]},
        {"name": "laptop", "clients": ["1"], "memory": int(roomy * 0.9)},
        {"name": "phone", "clients": ["2"], "memory": int(roomy * 0.6), "max_rank": 2}]}
    st.result.update(fleet=fleet, seq=seq, tiers=[])
    cfg = ExperimentConfig.from_dict(dict(base, fleet=fleet, fleet_misfit="drop"))
    rt = build_runtime(cfg, echo=lambda line: print(f"[fleet] {line}", flush=True))
    backbones = {q: frozen_and_trainable_bytes(b.model)[0] for q, b in rt.backbones.items()}
    for cid, tier in rt.tiers_of.items():
        plan = rt.plans[cid]
        with st.unit(tier):
            if not plan.fits:
                st.result["tiers"].append(dict(tier=tier, fits=False, reason=plan.reason))
                continue
            client = build_client(cfg, rt, cid)
            if st.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            m = measure_plan(client)
            others = sum(b for q, b in backbones.items() if q != plan.quantization)
            own = m.cuda_peak - others if m.cuda_peak is not None else m.frozen + m.trainable + m.activations
            row = dict(**plan.as_row(), budget=plan.memory_budget, measured_bytes=own,
                       cuda_peak_bytes=m.cuda_peak, saved_activations=m.activations,
                       within_budget=plan.memory_budget is None or own <= plan.memory_budget)
            st.result["tiers"].append(row)
            print(f"[fleet] {tier}: rank {plan.rank}, {plan.quantization}, level {plan.checkpoint_level}, micro-batch "
                  f"{plan.micro_batch}: estimated {plan.estimated_bytes / 2**20:.1f} MiB, measured "
                  f"{own / 2**20:.1f} MiB" + (f" of {plan.memory_budget / 2**20:.1f} MiB" if plan.memory_budget else ""),
                  flush=True)


def _tinyllama_wide_folder(folder: Path, dry: bool) -> Path:
    """A random-weight Llama checkpoint with TinyLlama's widths (fewer layers, the tiny models'
    vocabulary and byte tokenizer) saved as a local model folder: the device has no hub."""
    import transformers as tf

    import train_step as ts
    from fastseq.models import TINY_VOCAB, byte_tokenizer

    tok = byte_tokenizer()
    shape, layers = (ts.SMOKE, 2) if dry else (ts.TINYLLAMA, 4)
    cfg = tf.LlamaConfig(vocab_size=TINY_VOCAB, num_hidden_layers=layers, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         **shape)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def _device_used_peak(cuda: bool):
    """Yields a one-item list that ends up holding the device's peak used memory during the
    body (every process on it, CUDA contexts included); [None] without CUDA."""
    import torch

    peak, stop = [None], threading.Event()

    def sample():
        while not stop.wait(0.05):
            free, total = torch.cuda.mem_get_info()
            peak[0] = max(peak[0] or 0, total - free)

    sampler = threading.Thread(target=sample, daemon=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        sampler.start()
    try:
        yield peak
    finally:
        stop.set()


def step_workers(st: Step) -> None:
    """The same 3-round run with 1 and 4 workers on this device (on a GPU the workers are spawned
    and share the backbone through CUDA IPC): round time, each client's own peak allocation, the
    engine's, and the device's used memory (every process's, CUDA contexts included)."""
    import torch

    from fastseq.fed import ExperimentConfig, run_experiment

    cuda = st.device.type == "cuda"
    st.result.update(runs=[])
    with tempfile.TemporaryDirectory(prefix="gpu_check_workers_") as tmp:
        model = _tinyllama_wide_folder(Path(tmp) / "model", st.dry)
        # last, when there is time: an nf4 backbone shared with spawned workers (bitsandbytes' weights)
        for workers, quant in [(1, "none"), (4, "none")] + ([(4, "nf4")] if cuda else []):
            out = f"{tmp}/w{workers}{quant}"
            cfg = ExperimentConfig(model=str(model), task="synthetic", method="scl", rounds=3, clients=4,
                                   clients_per_round=4, partition="iid", min_client_size=4, local_steps=5,
                                   batch_size=4, max_length=32 if st.dry else 256, max_examples=96,
                                   eval_examples=32, eval_batch_size=16, r=8, device=st.device.type,
                                   dtype="bfloat16" if cuda else None, workers=workers, quantization=quant,
                                   out=out, progress=False, seed=0)
            with st.unit(f"workers={workers}" + (f"/{quant}" if quant != "none" else "")), \
                    _device_used_peak(cuda) as used:
                t0 = time.perf_counter()
                summary = run_experiment(cfg, echo=lambda line: print(f"[workers] {workers}: {line}", flush=True))
                rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")][1:]
                run = dict(workers=workers, quantization=quant, seconds=round(time.perf_counter() - t0, 2),
                           round_seconds=[round(r["seconds"], 3) for r in rows],
                           # round 1 starts the workers (spawn: a fresh interpreter and CUDA context each)
                           round_s_after_first=sum(r["seconds"] for r in rows[1:]) / max(1, len(rows) - 1),
                           client_cuda_peak_bytes=max((p for r in rows for p in
                                                       r.get("client_cuda_peak_bytes", {}).values()), default=None),
                           engine_cuda_peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                           device_used_peak_bytes=used[0], final=summary["final"], metric=summary["metric"],
                           client_worker=rows[-1].get("client_worker"))
                st.result["runs"].append(run)
                print(f"[workers] {workers}: rounds {run['round_seconds']} s, client peak "
                      f"{(run['client_cuda_peak_bytes'] or 0) / GIB:.2f} GiB, device used "
                      f"{(run['device_used_peak_bytes'] or 0) / GIB:.2f} GiB", flush=True)
    by = {(r["workers"], r["quantization"]): r for r in st.result["runs"]}
    one, four = by.get((1, "none")), by.get((4, "none"))
    if one and four:
        st.result.update(round_time_ratio=four["round_s_after_first"] / one["round_s_after_first"],
                         same_final=one["final"] == four["final"])


STEP_FUNCTIONS = {"env": step_env, "correctness": step_correctness, "sweep": step_sweep,
                  "train_step": step_train_step, "federated": step_federated, "gemma_memory": step_gemma_memory,
                  "fleet": step_fleet, "workers": step_workers}


def run_step(name: str, work: Path, out: Path, dry: bool) -> int:
    """The body of one step process: 0 done, 1 failed, 130 stopped (SIGINT: the budget)."""
    st = Step(name, work, out, dry)
    try:
        STEP_FUNCTIONS[name](st)
        # ok only if everything inside the step ran: a step whose units failed measured less than it says
        failed = [u for u, r in st.result["units"].items() if r["status"] != "ok"]
        if failed:
            st.result.update(status="failed", error=f"{len(failed)} of {len(st.result['units'])} units failed: "
                                                    + ", ".join(failed))
            return 1
        st.result["status"] = "ok"
        return 0
    except KeyboardInterrupt:
        st.result["status"] = "timeout"
        return 130
    except Exception as e:
        st.result.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        traceback.print_exc()
        return 1
    finally:
        st.save()


# ----------------------------------------------------------------------------- the runner
class Log:
    """Prints and keeps this run's output in DIR/gpu_check.log."""

    def __init__(self, path: Path):
        self.fh = open(path, "w")
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.fh.write(line + "\n")
            self.fh.flush()


def _child_env(dry: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               FLWR_TELEMETRY_ENABLED="0", TRITON_INTERPRET="1" if dry else "0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def spawn_step(name: str, budget: float, work: Path, out: Path, dry: bool, log: Log) -> dict:
    """Run one step in its own process group; at the budget SIGINT (the step saves what it has),
    then SIGKILL after a grace period."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--work", str(work), "--out", str(out)]
    if dry:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(dry), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    reader = threading.Thread(target=lambda: [log(f"  {line.rstrip()}") for line in proc.stdout], daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"[{name}] over its budget of {budget:.0f} s: interrupting")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    path = work / f"{name}.json"
    try:
        res = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        res = {}
    status = "timeout" if timed_out else res.get("status") or ("ok" if proc.returncode == 0 else "failed")
    if status == "failed" and "error" not in res:
        res["error"] = f"the step process exited with code {proc.returncode} and left no result (crashed?)"
    if status == "timeout":
        res["error"] = f"stopped at its budget of {budget:.0f} s; what it had measured by then is kept"
    res.update(status=status, returncode=proc.returncode, seconds=round(time.perf_counter() - t0, 1),
               budget_s=round(budget, 1))
    return res


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gpu_check_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"gpu_check: --out {out} is not a writable folder: {e.strerror or e}") from None


def parse_step_budgets(items: list[str]) -> dict:
    names = dict(STEPS)
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1
        if name not in names or seconds <= 0:
            raise SystemExit(f"gpu_check: --step-budget wants NAME=SECONDS with NAME one of {', '.join(names)} "
                             f"and SECONDS > 0, got {item!r}")
        out[name] = seconds
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--out", required=True, help="folder for the results (created; at most 8 files are written)")
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny shapes, the Triton interpreter")
    ap.add_argument("--steps", default=",".join(n for n, _ in STEPS),
                    help="comma-separated subset of the steps, run in the fixed order (default: all)")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET, help=f"seconds for all steps together (default {TOTAL_BUDGET})")
    ap.add_argument("--step-budget", action="append", default=[], metavar="NAME=SECONDS",
                    help="a step's own budget (unspent seconds carry over to the later steps)")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    if a.step:
        return run_step(a.step, Path(a.work), out, a.dry_run)

    check_out_dir(out)
    names = [n for n, _ in STEPS]
    chosen = [s.strip() for s in a.steps.split(",") if s.strip()]
    bad = [s for s in chosen if s not in names]
    if bad or not chosen:
        raise SystemExit(f"gpu_check: unknown step(s) {bad or a.steps!r}; the steps are {', '.join(names)}")
    if a.budget <= 0:
        raise SystemExit(f"gpu_check: --budget must be more than 0 seconds, got {a.budget}")
    budgets = dict(STEPS, **parse_step_budgets(a.step_budget))
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that sees no GPU"
        raise SystemExit(f"gpu_check: no CUDA GPU here (torch {torch.__version__} is {why}); run it on a GPU "
                         f"machine, or rehearse on the CPU with --dry-run")

    import gpu_check_report as report

    log = Log(out / "gpu_check.log")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results = report.new_results(out, a.dry_run, argv if argv is not None else sys.argv[1:], a.budget)
    log(f"gpu_check: {'DRY RUN (CPU, interpreter)' if a.dry_run else 'CUDA'}, steps {', '.join(chosen)}, "
        f"budget {a.budget:.0f} s, results in {out}")
    t_start = time.perf_counter()
    try:
        for i, name in enumerate(chosen):
            left = a.budget - (time.perf_counter() - t_start)
            later = sum(budgets[n] for n in chosen[i + 1:])
            budget = min(left, budgets[name] + max(0.0, left - budgets[name] - later))
            if budget < 1:
                results["steps"][name] = dict(status="skipped", error=f"out of time ({max(0.0, left):.0f} s left of the budget)")
                log(f"[{name}] skipped: out of time")
            else:
                log(f"[{name}] start (budget {budget:.0f} s)")
                results["steps"][name] = spawn_step(name, budget, work, out, a.dry_run, log)
                r = results["steps"][name]
                log(f"[{name}] {r['status']} in {r['seconds']} s" + (f": {r['error']}" if r.get("error") else ""))
            report.write_all(results, out, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        results["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
        report.write_all(results, out, log)
        log(report.final_table(results))
    bad = [n for n, r in results["steps"].items() if r["status"] != "ok"]
    failed_tests = (results["steps"].get("correctness", {}).get("counts") or {}).get("failures", 0)
    return 1 if bad or failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
