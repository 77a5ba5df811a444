"""SCL as a PEFT method: ``peft.get_peft_model(model, SCLPeftConfig(...))`` (docs/internals.md).

Importing this module needs peft; ``fastseq.SCLPeftConfig`` imports it on first use, so
fastseq itself works without peft.

Registration. ``peft.utils.register_peft_method`` only accepts names that are members of
peft's closed ``PeftType`` enum, so an out-of-tree method cannot call it. It does three
dictionary insertions; we do the same ones ourselves with our own ``str`` enum member as the
key (PEFT supports custom ``peft_type`` enums since huggingface/peft#2634): into
``peft.PEFT_TYPE_TO_CONFIG_MAPPING`` and ``peft.PEFT_TYPE_TO_TUNER_MAPPING`` (both exported in
``peft.__all__``) and ``peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING``. No PEFT function or class
is replaced.

Structure. Each targeted FFN entry module (the module whose forward computes the FFN, as the
fastseq registry finds it) is wrapped in an `SCLTunerLayer` (``base_layer`` = the original
module) holding C in ``scl_compress[adapter]`` and E / P in ``scl_out[adapter]``, so PEFT's
own state-dict logic saves ``<entry>.scl_compress.weight`` / ``<entry>.scl_out.weight``. The
forward is fastseq's `SCLFeedForward`: the reference path (level 0) or the fused
``kernels.scl_ffn`` path (levels 1, 2), exactly as with `get_scl_model`.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Optional

from .._quiet import quiet_bitsandbytes_kernel_notice

quiet_bitsandbytes_kernel_notice()  # PEFT imports bitsandbytes when it is installed
import peft  # noqa: E402
from packaging.version import Version  # noqa: E402

# Before 0.20, get_peft_model_state_dict raised "Unknown PEFT type" for any peft_type outside
# PeftType; 0.20 (huggingface/peft#3490) hands the state dict to the tuner class.
if Version(peft.__version__) < Version("0.20.0"):
    raise ImportError(f"SCL as a PEFT method needs peft>=0.20 (an out-of-tree method cannot save with older "
                      f"versions); found peft {peft.__version__}. fastseq.get_scl_model works without it")

import peft.mapping  # noqa: E402
from peft.config import PeftConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer  # noqa: E402
from torch import nn  # noqa: E402

from ..config import SCLConfig  # noqa: E402
from .registry import FFNSite, detect_activation, find_ffn_sites  # noqa: E402
from .scl import AdapterError, SCLFeedForward, SCLLayer, _device_of, _select_sites, compress_generator  # noqa: E402

METHOD_PREFIX = "scl_"


class SCLPeftType(str, enum.Enum):
    """fastseq's own PEFT type (peft's ``PeftType`` is closed to out-of-tree methods)."""

    SCL = "SCL"


@dataclass
class SCLPeftConfig(PeftConfig):
    """`SCLConfig` as a ``peft.PeftConfig``; the fields mean what they mean there.

    ``use_bias`` is SCLConfig's ``bias`` (PEFT reserves ``bias`` for "none"/"all"/"<method>_only").
    ``target_modules`` is filled in by the tuner from fastseq's FFN registry (and ``layers``);
    ``modules_to_save`` (e.g. ``["classifier"]``, or set by ``task_type="SEQ_CLS"``) trains and
    saves a task head, as with any PEFT method. ``train_down_proj`` is not supported under PEFT.
    """

    r: int = field(default=64, metadata={"help": "width of the compression bottleneck"})
    activation: Optional[str] = field(default=None, metadata={"help": "sigma; None uses the FFN's own"})
    scale: float = field(default=1.0, metadata={"help": "s in the SCL branch"})
    use_bias: bool = field(default=False, metadata={"help": "give C and E (or P) biases"})
    placement: str = field(default="parallel", metadata={"help": "'residual' or 'parallel'"})
    train_compress: bool = field(default=False, metadata={"help": "train C (False: frozen at its seeded init)"})
    init_seed: Optional[int] = field(default=0, metadata={"help": "seed of C's init; None: torch's global RNG"})
    train_down_proj: bool = field(default=False, metadata={"help": "not supported under PEFT"})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "transformer layers to adapt; None: all"})
    checkpoint_level: int = field(default=1, metadata={"help": "0, 1 or 2 (docs/design.md §2)"})
    backend: str = field(default="auto", metadata={"help": "'auto', 'torch' or 'triton'"})
    target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "filled in from fastseq's FFN registry; leave None"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules besides SCL to train and save, e.g. a classifier head"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SCLPeftType.SCL
        if self.train_down_proj:
            raise AdapterError("train_down_proj=True is not supported with peft (the down projection lives in the "
                               "wrapped base layer, which PEFT does not save); use fastseq.get_scl_model for it")
        self.to_scl_config()  # validates every SCL field with fastseq's messages

    def to_scl_config(self) -> SCLConfig:
        return SCLConfig(r=self.r, activation=self.activation, scale=self.scale, bias=self.use_bias,
                         placement=self.placement, train_compress=self.train_compress, init_seed=self.init_seed,
                         train_down_proj=self.train_down_proj, layers=self.layers,
                         checkpoint_level=self.checkpoint_level, backend=self.backend)

    @classmethod
    def from_scl_config(cls, config: SCLConfig, **peft_kwargs) -> "SCLPeftConfig":
        """The PEFT config of a fastseq `SCLConfig` (peft_kwargs: task_type, modules_to_save, ...)."""
        data = config.to_dict()
        data["use_bias"] = data.pop("bias")
        return cls(**data, **peft_kwargs)


@dataclass(frozen=True)
class ResolvedSite:
    """An `FFNSite` with its modules looked up once: FFNSite resolves them through the holder on
    every access, and wrapping the entry in an `SCLTunerLayer` moves them under ``base_layer``."""

    name: str
    style: object
    up: nn.Module
    gate: Optional[nn.Module]
    down: nn.Module
    act: object
    post: Optional[nn.Module]
    d_model: int
    d_ffn: int

    @classmethod
    def of(cls, site: FFNSite) -> "ResolvedSite":
        return cls(site.name, site.style, site.up, site.gate, site.down, site.act, site.post, site.d_model, site.d_ffn)


def _entry_name(site: FFNSite) -> str:
    return f"{site.name}.{site.style.entry}".strip(".") if site.style.entry else site.name


class SCLTunerLayer(nn.Module, BaseTunerLayer):
    """Wraps an FFN entry module; its forward is fastseq's `SCLFeedForward` for the active adapter."""

    adapter_layer_names = ("scl_compress", "scl_out")

    def __init__(self, base_layer: nn.Module, site: ResolvedSite) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.site = site
        self.scl_compress = nn.ModuleDict()
        self.scl_out = nn.ModuleDict()
        # Not registered as children: C and E / P are registered once, in the ModuleDicts above.
        self.scl_forward: dict[str, SCLFeedForward] = {}
        self.frozen_peft_weight_names = {}  # per instance: BaseTunerLayer's class default is shared
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: SCLConfig) -> None:
        site = self.site
        ffn_activation = detect_activation(site.act)
        scl_activation = config.activation or ffn_activation
        if scl_activation is None:
            raise AdapterError(f"cannot use the FFN's own activation ({type(site.act).__name__}) at {site.name} as "
                               f"sigma; set activation to one of silu/gelu/gelu_tanh/relu")
        scl = SCLLayer(site.d_ffn, config.r, scl_activation, config.scale, config.bias, device=_device_of(site.up),
                       placement=config.placement, d_model=site.d_model,
                       generator=compress_generator(config.init_seed, site.name))
        self.scl_compress[adapter_name] = scl.compress
        self.scl_out[adapter_name] = scl.out
        self.scl_forward[adapter_name] = SCLFeedForward(site, scl, config, ffn_activation)
        if not config.train_compress:
            # PEFT re-applies this after every set_adapter, which otherwise makes all adapter weights trainable.
            self.frozen_peft_weight_names[adapter_name] = ("scl_compress",)
        self.set_adapter(self.active_adapters)

    def _base_forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        if self.site.style.split:  # the down module passes its input on: apply the down projection here
            down = self.site.down
            y = type(down).forward(down, y)
        return y

    def forward(self, x, *args, **kwargs):
        if self.disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.scl_forward]
        if not active:
            return self._base_forward(x, *args, **kwargs)
        if len(active) > 1:
            raise AdapterError(f"SCL runs one adapter at a time; active adapters are {active}")
        return self.scl_forward[active[0]](x)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise AdapterError("SCL is nonlinear (sigma between C and E / P): it cannot be merged into the base weights")

    def unmerge(self) -> None:
        pass


class SCLTunerModel(BaseTuner):
    """The PEFT tuner of SCL: finds the FFNs with fastseq's registry and wraps their entry modules."""

    prefix = METHOD_PREFIX
    tuner_layer_cls = SCLTunerLayer
    target_module_mapping: dict = {}

    def _pre_injection_hook(self, model: nn.Module, config: SCLPeftConfig, adapter_name: str) -> None:
        if len(self.peft_config) > 1:
            raise AdapterError("one SCL adapter per model under peft; load the base model again for another")
        if getattr(model, "fastseq_adapter", None) is not None:
            raise AdapterError("this model already has SCL layers from fastseq.get_scl_model; pass a plain base model")
        sites = _select_sites(find_ffn_sites(model), config.layers)
        self._scl_sites = {_entry_name(s): s for s in sites}
        # The registry, not a name pattern, says where the FFNs are; saved in adapter_config.json.
        config.target_modules = sorted(self._scl_sites)

    def _prepare_adapter_config(self, peft_config: SCLPeftConfig, model_config: dict) -> SCLPeftConfig:
        return peft_config

    def _check_new_adapter_config(self, config: SCLPeftConfig) -> None:
        pass

    def _create_and_replace(self, peft_config: SCLPeftConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, parameter_name=None) -> None:
        site = self._scl_sites.get(current_key)
        if site is None or isinstance(target, SCLTunerLayer):
            raise AdapterError(f"{current_key} is not an FFN fastseq found (or is adapted already)")
        site = ResolvedSite.of(site)
        layer = SCLTunerLayer(target, site)
        layer.update_layer(adapter_name, peft_config.to_scl_config())
        self._replace_module(parent, target_name, layer, target)
        if site.style.split:
            # The wrapped entry now returns the FFN output; the down module only passes it on.
            site.down.forward = _identity

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner's version assumes a single layer with a ``weight`` (it copies it onto a module without
        # base_layer, as on unload); an FFN entry has none, and the SCL weights are created on the FFN's device.
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(self, merge=True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None):
        if merge:
            raise AdapterError("SCL is nonlinear (sigma between C and E / P): it cannot be merged into the base "
                               "weights; use unload() to get the base model back")
        for module in self.model.modules():
            if isinstance(module, SCLTunerLayer) and module.site.style.split:
                module.site.down.__dict__.pop("forward", None)  # undo the identity forward
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)


def _identity(x):
    return x


def _register() -> None:
    """What ``peft.utils.register_peft_method(name="scl", ...)`` would do, were SCL in PeftType."""
    key = SCLPeftType.SCL
    known = peft.PEFT_TYPE_TO_TUNER_MAPPING.get(key)
    if known is not None and known is not SCLTunerModel:
        warnings.warn(f"peft already has a method registered as {key.value!r} ({known.__name__}); replacing it "
                      f"with fastseq's SCL", stacklevel=2)
    peft.PEFT_TYPE_TO_CONFIG_MAPPING[key] = SCLPeftConfig
    peft.PEFT_TYPE_TO_TUNER_MAPPING[key] = SCLTunerModel
    peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = METHOD_PREFIX


_register()
