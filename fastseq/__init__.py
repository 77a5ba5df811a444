"""fastseq: federated fine-tuning of foundation models with Sequential Compression Layers."""

__version__ = "0.1.0"

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
    "AdapterError", "ConfigError", "SCLConfig", "UnsupportedModelError", "__version__", "count_parameters",
    "find_ffn_sites", "get_scl_model", "load_adapter", "save_adapter", "scl_parameter_names",
]
