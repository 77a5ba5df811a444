"""Adapters: the architecture registry, the SCL layer and its injection, adapter I/O."""

from .io import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .registry import FFNSite, FFNStyle, UnsupportedModelError, find_ffn_sites, register, supported_model_types
from .scl import (
    AdapterError,
    AdapterState,
    ParameterCount,
    SCLLayer,
    adapters_of,
    count_parameters,
    delete_adapter,
    disable_adapter,
    get_scl_model,
    mixed_adapter_batch,
    scl_parameter_names,
    set_adapter,
)

__all__ = [
    "AdapterError", "AdapterState", "FFNSite", "FFNStyle", "ParameterCount", "SCLLayer", "UnsupportedModelError",
    "adapter_state_dict", "adapters_of", "count_parameters", "delete_adapter", "disable_adapter", "find_ffn_sites",
    "get_scl_model", "load_adapter", "mixed_adapter_batch", "read_adapter_config", "register", "save_adapter",
    "scl_parameter_names", "set_adapter", "supported_model_types",
]
