"""Nothing in the checkout shadows an installed package.

A folder or module in the clone's root (or in a folder the tests and scripts put on
``sys.path``) named like an installed distribution's top-level package wins over it whenever
that folder is first on ``sys.path``: ``python -m pytest``, ``python -c`` or a REPL started in
the root, a subprocess given ``PYTHONPATH=<root>``, Ray's actors. That is how a top-level
``kernels/`` once broke ``import transformers`` (PyPI's ``kernels``, which transformers imports)."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folders that go first on sys.path: the root (python -m, python -c, PYTHONPATH=<root>) and the
# ones the tests, benchmarks and scripts insert themselves
ON_SYS_PATH = (ROOT, ROOT / "tests", ROOT / "tests" / "fixtures", ROOT / "benchmarks", ROOT / "scripts")


def _importable_names(folder: Path) -> set[str]:
    names = set()
    for entry in folder.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.stem != "__init__":
            names.add(entry.stem)
    return names


def test_no_folder_on_sys_path_holds_an_installed_package_name():
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    clashes = {f"{folder.relative_to(ROOT) or '.'}/{name}": installed[name]
               for folder in ON_SYS_PATH for name in _importable_names(folder)
               if name in installed and name != "fastseq" and name != "conftest"}
    assert not clashes, f"these shadow installed packages when their folder is on sys.path: {clashes}"


def test_transformers_imports_with_the_root_first_on_sys_path():
    """The README's REPL-in-the-root and `python -m pytest`: the root is sys.path[0]."""
    code = ("import sys; assert sys.path[0] in ('', {root!r}); import fastseq, fastseq.kernels, transformers; "
            "from transformers.activations import ACT2FN; print(callable(ACT2FN['silu']))").format(root=str(ROOT))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True"


def test_pypi_kernels_is_what_a_root_started_python_imports():
    """PyPI's `kernels` (pulled in by transformers where it needs it) is the one imported from the
    root; without it installed, nothing named `kernels` is importable from the root at all."""
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else 'none')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin = proc.stdout.strip()
    assert origin == "none" or not Path(origin).resolve().is_relative_to(ROOT), origin
