"""fastseq: federated fine-tuning of foundation models with Sequential Compression Layers."""

__version__ = "0.1.0"


def _kernels_from_the_source_tree() -> None:
    """Installed, ``fastseq.kernels`` is the top-level ``kernels/`` folder (pyproject's
    package-dir). Run from a source checkout without installing (``PYTHONPATH=<checkout>``, as
    on a bare GPU machine), map it the same way."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    src = here.parent / "kernels" / "__init__.py"
    if (here / "kernels").exists() or not src.is_file() or not (here.parent / "pyproject.toml").is_file():
        return

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != __name__ + ".kernels":
                return None
            return importlib.util.spec_from_file_location(name, src, submodule_search_locations=[str(src.parent)])

    sys.meta_path.insert(0, _Finder())


_kernels_from_the_source_tree()

from .adapters import (  # noqa: E402
    AdapterError,
    UnsupportedModelError,
    count_parameters,
    find_ffn_sites,
    get_scl_model,
    load_adapter,
    save_adapter,
    scl_parameter_names,
)
from .config import ConfigError, SCLConfig  # noqa: E402

__all__ = [
    "AdapterError", "ConfigError", "SCLConfig", "SCLPeftConfig", "UnsupportedModelError", "__version__", "count_parameters",
    "find_ffn_sites", "get_scl_model", "load_adapter", "save_adapter", "scl_parameter_names",
]


def __getattr__(name: str):
    # SCL as a PEFT method needs peft (the `lora` extra): imported on first use only.
    if name == "SCLPeftConfig":
        try:
            from .adapters.peft_method import SCLPeftConfig
        except ModuleNotFoundError as exc:
            if exc.name != "peft":
                raise
            raise ImportError("fastseq.SCLPeftConfig needs peft>=0.20: pip install 'fastseq[lora]'") from exc
        return SCLPeftConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
