"""fastseq: federated fine-tuning of foundation models with Sequential Compression Layers."""

__version__ = "0.1.0"

from .adapters import (
    AdapterError,
    UnsupportedModelError,
    count_parameters,
    find_ffn_sites,
    get_scl_model,
    load_adapter,
    save_adapter,
    scl_parameter_names,
)
from .config import ConfigError, SCLConfig

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
