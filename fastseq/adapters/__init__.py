"""Adapters: the architecture registry, the SCL layer and its injection, adapter I/O."""

from .io import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .registry import FFNSite, FFNStyle, UnsupportedModelError, find_ffn_sites, register, supported_model_types
from .scl import (
    AdapterError,
    AdapterState,
    ParameterCount,
    SCLLayer,
    count_parameters,
    get_scl_model,
    scl_parameter_names,
)

__all__ = [
    "AdapterError", "AdapterState", "FFNSite", "FFNStyle", "ParameterCount", "SCLLayer", "UnsupportedModelError",
    "adapter_state_dict", "count_parameters", "find_ffn_sites", "get_scl_model", "load_adapter",
    "read_adapter_config", "register", "save_adapter", "scl_parameter_names", "supported_model_types",
]
