"""pytest configuration for the benchmark suites (``python -m pytest benchmarks/ --benchmark-enable``).

The main test command (``python -m pytest``, ``testpaths = ["tests"]``) never loads this file.
Here every ``bench_*.py`` file is collected as a test module, so a directory run picks up all
the suites; a file named on the command line is collected once, as usual.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
