import importlib.util
import os
import sys

# The Triton interpreter must be chosen before triton is imported (kernel tests run on CPU;
# `--device cuda` turns it off again in pytest_configure, before any test module is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# One torch thread here and in every process a test starts (Flower's SuperNodes and ClientApps,
# Ray actors, `fastseq run` subprocesses): runs compared across processes then sum in the same
# order whatever the machine's core count (CI runs plain `pytest -q`), and the processes of one
# test do not fight over the cores. torch reads the variable when it starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers such as tiny_models

import pytest  # noqa: E402

import devices  # noqa: E402

# what --device cuda runs (the others are CPU tests and are skipped there)
DEVICE_AWARE = "the device-aware kernel tests (those taking the `device` fixture: tests/test_kernels_*.py, " \
               "tests/test_fused_models.py)"


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help=f"where {DEVICE_AWARE} run: cpu (default; Triton through its interpreter) or cuda (the "
                          f"real Triton compiler, fp32/bf16/fp16 on odd shapes; every other test is skipped)")


def pytest_configure(config):
    if config.getoption("device") == "cuda" and "fastseq.kernels.scl_ffn_triton" in sys.modules:
        raise pytest.UsageError("--device cuda: the Triton kernels were imported (under the interpreter) before "
                                "the tests started; a plugin or conftest imported fastseq.kernels.scl_ffn_triton")
    devices.configure(config.getoption("device"))


def _uses_device_fixture(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "device" in getattr(item, "fixturenames", ()) and "device" not in params


# Tests that start Flower deployments, Ray or DeepSpeed's process group (or look for leftover
# processes of those machine-wide): under pytest-xdist they all run on one worker, one at a time.
SERIAL_FILES = ("test_flower.py", "test_flower_faults.py", "test_flower_secagg.py", "test_flower_sim.py",
                "test_deepspeed.py")


def _serial(item) -> bool:
    return item.path.name in SERIAL_FILES or "flower" in item.name


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _serial(item):
            item.add_marker(pytest.mark.xdist_group("serial"))
    if config.getoption("device") != "cuda":
        return
    if devices.UNAVAILABLE:
        skip = pytest.mark.skip(reason=f"--device cuda: {devices.UNAVAILABLE}")
        for item in items:
            item.add_marker(skip)
        return
    cpu_only = pytest.mark.skip(reason=f"CPU-only test; --device cuda runs {DEVICE_AWARE}")
    for item in items:
        if not _uses_device_fixture(item):
            item.add_marker(cpu_only)


@pytest.fixture(scope="session")
def device():
    """The device the test builds its tensors on (``--device``)."""
    return devices.DEVICE


@pytest.fixture(scope="session", autouse=True)
def _one_tile_config_on_cuda(request):
    """On CUDA, one tile config per kernel (autotuning every odd test shape would compile and
    time every config each time); test_every_tile_config_matches_reference covers them all."""
    if devices.DEVICE.type != "cuda" or importlib.util.find_spec("triton") is None:
        yield
        return
    from fastseq.kernels.scl_ffn_triton import pinned_configs

    with pinned_configs(gemm=1, p=0):
        yield


@pytest.fixture
def one_torch_thread():
    """One torch thread in this process for the test: bit-identity with forked workers (which run
    one each) holds at the same threads per client."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
