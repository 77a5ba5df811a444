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
module) holding, per adapter, C in ``scl_compress[adapter]`` (buffers when frozen) and E / P in
``scl_out[adapter]``, so PEFT's own state-dict logic saves ``<entry>.scl_compress.weight`` /
``<entry>.scl_out.weight``. The forward is fastseq's `SCLFeedForward` per adapter: the reference
path (level 0) or the fused ``kernels.scl_ffn`` path (levels 1, 2), exactly as with
`get_scl_model`; several adapters (PEFT's add_adapter / set_adapter / delete_adapter, and
mixed-adapter batches) go through `scl.run_adapters` / `scl.run_mixed_batch`.
"""

from __future__ import annotations

import enum
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Union

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
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists  # noqa: E402
from peft.utils import AuxiliaryTrainingWrapper  # noqa: E402
from torch import nn  # noqa: E402

from ..config import SCLConfig  # noqa: E402
from .registry import FFNSite, detect_activation, find_ffn_sites  # noqa: E402
from .scl import (  # noqa: E402
    BASE_ROWS,
    AdapterError,
    SCLFeedForward,
    SCLLayer,
    _device_of,
    _select_sites,
    compress_generator,
    run_adapters,
    run_mixed_batch,
)

METHOD_PREFIX = "scl_"


class SCLPeftType(str, enum.Enum):
    """fastseq's own PEFT type (peft's ``PeftType`` is closed to out-of-tree methods)."""

    SCL = "SCL"


@dataclass
class SCLPeftConfig(PeftConfig):
    """`SCLConfig` as a ``peft.PeftConfig``; the fields mean what they mean there.

    ``use_bias`` is SCLConfig's ``bias`` (PEFT reserves ``bias`` for "none"/"all"/"<method>_only").
    ``target_modules`` None adapts every FFN fastseq's registry finds (and ``layers`` selects);
    a list of names (or a regex) keeps the FFNs whose module names match, and names that match
    no FFN are refused (SCL wraps whole FFNs, not single projections). ``modules_to_save``
    (e.g. ``["classifier"]``, or set by ``task_type="SEQ_CLS"``) trains and saves a task head,
    as with any PEFT method. ``train_down_proj`` is not supported under PEFT.
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
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={
        "help": "PEFT's name for layers (an index or a list); give either"})
    checkpoint_level: int = field(default=1, metadata={"help": "0, 1 or 2 (docs/design.md §2)"})
    backend: str = field(default="auto", metadata={"help": "'auto', 'torch' or 'triton'"})
    init_weights: bool = field(default=True, metadata={
        "help": "True: E / P start at zero, the model computes the base model at init; False: a small random "
                "E / P (from torch's global RNG), for tests and debugging save/load"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "FFN modules to adapt (names or a regex); None: every FFN fastseq's registry finds. Filled in "
                "with the FFNs' full names"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules besides SCL to train and save, e.g. a classifier head"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SCLPeftType.SCL
        if self.train_down_proj:
            raise AdapterError("train_down_proj=True is not supported with peft (the down projection lives in the "
                               "wrapped base layer, which PEFT does not save); use fastseq.get_scl_model for it")
        if not isinstance(self.init_weights, bool):
            raise AdapterError(f"init_weights must be True (start as the base model) or False (a small random "
                               f"E / P), got {self.init_weights!r}")
        if self.layers_to_transform is not None:
            wanted = ([self.layers_to_transform] if isinstance(self.layers_to_transform, int)
                      else list(self.layers_to_transform))
            if self.layers is not None and list(self.layers) != wanted:
                raise AdapterError(f"layers={self.layers} and layers_to_transform={self.layers_to_transform} (PEFT's "
                                   f"name for the same setting) differ; give one of them")
            self.layers = wanted
        if isinstance(self.target_modules, set):  # PEFT may hand back a set; keep the saved config a sorted list
            self.target_modules = sorted(self.target_modules)
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
    layer: Optional[int]
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
        return cls(site.name, site.layer, site.style, site.up, site.gate, site.down, site.act, site.post,
                   site.d_model, site.d_ffn)


def _entry_name(site: FFNSite) -> str:
    return f"{site.name}.{site.style.entry}".strip(".") if site.style.entry else site.name


MERGE_REFUSED = ("SCL is nonlinear (sigma between C and E / P), so it cannot be merged into the base weights; "
                 "keep the adapter as it is, or call unload() to get the base model back without it")


class SCLTunerLayer(nn.Module, BaseTunerLayer):
    """Wraps an FFN entry module and runs fastseq's `SCLFeedForward` for the active adapter(s).

    Per adapter: C in ``scl_compress[name]`` (an ``nn.Linear``, or a `FrozenLinear` of buffers
    when C is frozen, as PEFT keeps frozen adapter tensors), E / P in ``scl_out[name]``, and the
    forward (config, activation, path) in ``scl_forward[name]``.
    """

    adapter_layer_names = ("scl_compress", "scl_out")
    other_param_names = ("scl_forward",)

    def __init__(self, base_layer: nn.Module, site: ResolvedSite, active_adapters: list[str]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.site = site
        # An FFN maps the hidden state to the hidden state (PEFT expects both on every tuner layer).
        self.in_features = self.out_features = site.d_model
        self.scl_compress = nn.ModuleDict()
        self.scl_out = nn.ModuleDict()
        # Not registered as children: C and E / P are registered once, in the ModuleDicts above.
        self.scl_forward: dict[str, SCLFeedForward] = {}
        self.merged_adapters = []
        self._active_adapter = list(active_adapters)  # the model's, so every layer runs the same adapters

    def update_layer(self, adapter_name: str, config: SCLConfig, init_weights: bool = True) -> None:
        site = self.site
        ffn_activation = detect_activation(site.act)
        scl_activation = config.activation or ffn_activation
        if scl_activation is None:
            raise AdapterError(f"cannot use the FFN's own activation ({type(site.act).__name__}) at {site.name} as "
                               f"sigma; set activation to one of silu/gelu/gelu_tanh/relu")
        scl = SCLLayer(site.d_ffn, config.r, scl_activation, config.scale, config.bias, device=_device_of(site.up),
                       placement=config.placement, d_model=site.d_model,
                       generator=compress_generator(config.init_seed, site.name))
        if not config.train_compress:
            scl.freeze_compress()
        if not init_weights:
            scl.randomize_out()
        self.scl_compress[adapter_name] = scl.compress
        self.scl_out[adapter_name] = scl.out
        self.scl_forward[adapter_name] = SCLFeedForward(site, scl, config, ffn_activation)
        self.set_adapter(self.active_adapters)  # trainable if active, frozen otherwise

    def _base_forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        if self.site.style.split:  # the down module passes its input on: apply the down projection here
            down = self.site.down
            y = type(down).forward(down, y)
        return y

    def forward(self, x, *args, adapter_names=None, **kwargs):
        if self.disable_adapters:
            return self._base_forward(x, *args, **kwargs)

        def base(rows):
            return self._base_forward(rows, *args, **kwargs)

        if adapter_names is not None:
            return run_mixed_batch(x, self.scl_forward, adapter_names, base)
        return run_adapters(x, self.scl_forward, self.active_adapters, base)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise AdapterError(MERGE_REFUSED)

    def unmerge(self) -> None:
        pass  # nothing is ever merged


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class SCLTunerModel(BaseTuner):
    """The PEFT tuner of SCL: finds the FFNs with fastseq's registry and wraps their entry modules."""

    prefix = METHOD_PREFIX
    tuner_layer_cls = SCLTunerLayer
    target_module_mapping: dict = {}

    def _pre_injection_hook(self, model: nn.Module, config: SCLPeftConfig, adapter_name: str) -> None:
        if getattr(model, "fastseq_adapter", None) is not None:
            raise AdapterError("this model already has SCL layers from fastseq.get_scl_model; pass a plain base model")
        # The FFNs are found once, before any is wrapped: the registry recognises an FFN by its
        # projections, which a wrapped entry hides under base_layer. Every adapter picks from these.
        self._ffn_sites = {_entry_name(s): ResolvedSite.of(s) for s in find_ffn_sites(model)}

    def _prepare_adapter_config(self, peft_config: SCLPeftConfig, model_config: dict) -> SCLPeftConfig:
        sites = _select_sites(list(self._ffn_sites.values()), peft_config.layers)
        entries = [name for name, site in self._ffn_sites.items() if site in sites]
        if peft_config.target_modules is not None:
            entries = self._targeted_ffns(peft_config, entries)
        # The FFNs' full names, saved in adapter_config.json: loading adapts exactly these.
        peft_config.target_modules = sorted(entries)
        return peft_config

    def _targeted_ffns(self, peft_config: SCLPeftConfig, entries: list[str]) -> list[str]:
        """The FFN entry modules `target_modules` names (PEFT's matching: a regex matches the full
        name, a list entry the name or its last components); names matching no FFN are refused."""
        targets = peft_config.target_modules
        chosen = [name for name in entries if check_target_module_exists(peft_config, name)]
        if isinstance(targets, str):
            unmatched = [] if chosen else [targets]
        else:
            unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in entries)]
        if unmatched:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise AdapterError(
                f"target_modules {unmatched} name no FFN that SCL can adapt. SCL wraps whole FFNs (here: {shown}), "
                f"not single projections such as up_proj / down_proj; name FFN modules (e.g. {entries[0]!r} or its "
                f"last part), select transformer layers with layers=[...], or leave target_modules=None for every FFN")
        return chosen

    def _create_and_replace(self, peft_config: SCLPeftConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, parameter_name=None) -> None:
        site = self._ffn_sites.get(current_key)
        if site is None:
            raise AdapterError(f"{current_key} is not an FFN fastseq found; SCL adapts FFN modules only")
        if isinstance(target, SCLTunerLayer):  # another adapter on an FFN that has one already
            target.update_layer(adapter_name, peft_config.to_scl_config(), peft_config.init_weights)
            return
        layer = SCLTunerLayer(target, site, self.active_adapters)
        layer.update_layer(adapter_name, peft_config.to_scl_config(), peft_config.init_weights)
        self._replace_module(parent, target_name, layer, target)
        if site.style.split:
            # The wrapped entry now returns the FFN output; the down module only passes it on.
            site.down.forward = _identity

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner's version assumes a single layer with a ``weight`` (it copies it onto a module without
        # base_layer, as on unload); an FFN entry has none, and the SCL weights are created on the FFN's device.
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """SCL's tensors are created in fp32 whatever the base dtype (fastseq's choice, and what
        PEFT's default ``autocast_adapter_dtype=True`` gives LoRA). With False they take the
        dtype of the FFN they adapt, as PEFT does for LoRA."""
        if autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if not isinstance(module, SCLTunerLayer) or adapter_name not in module.scl_out:
                continue
            dtype = module.site.up.weight.dtype
            if not dtype.is_floating_point or dtype == module.scl_out[adapter_name].weight.dtype:
                continue
            for container in (module.scl_compress, module.scl_out):
                container[adapter_name].to(dtype)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed-adapter batches: ``model(..., adapter_names=[...])`` / ``generate(...)`` hand each
        tuner layer (and ``modules_to_save`` head) the adapter name of every row, as LoRA does."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise AdapterError("adapter_names (a mixed-adapter batch) is for inference, as in PEFT: call model.eval() "
                               "first, or train one adapter at a time with set_adapter")
        if not isinstance(adapter_names, (list, tuple)):
            raise AdapterError(f"adapter_names must be a list with one adapter name per row, got "
                               f"{type(adapter_names).__name__}")
        known = set()
        for module in self.model.modules():
            if isinstance(module, SCLTunerLayer):
                known |= module.scl_forward.keys()
        unknown = sorted({n for n in adapter_names if n != BASE_ROWS} - known)
        if unknown:
            raise AdapterError(f"adapter_names names adapters this model does not have: {unknown}; it has "
                               f"{sorted(known)} (and {BASE_ROWS!r} for the base model)")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats every row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.model.modules():
            if isinstance(module, (SCLTunerLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _unload_and_optionally_merge(self, merge=True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None):
        if merge:
            raise AdapterError(MERGE_REFUSED)
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
