"""The SCL layer and its injection into Hugging Face models (docs/design.md §1).

`get_scl_model` finds every FFN through the registry, attaches an `SCLLayer` (C: f -> r,
then E: r -> f for the residual placement or P: r -> d for the parallel one, zero-initialised)
to the module that computes the FFN, and routes that module's forward through
`SCLFeedForward`, which either runs the reference math with the model's own modules
(checkpoint level 0, any projection type) or calls the fused `fastseq.kernels.scl_ffn` path
(levels 1 and 2).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SCLConfig
from .registry import FFNSite, detect_activation, find_ffn_sites, is_conv1d

TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


class AdapterError(ValueError):
    """An adapter cannot be injected into, saved from or loaded into this model."""


class FrozenLinear(nn.Module):
    """A linear map whose weight (and bias) are buffers: saved and moved with the model, never
    trained and never counted as parameters. PEFT keeps frozen adapter tensors this way (VeRA's
    A/B); the state-dict keys (``weight``, ``bias``) are those of the ``nn.Linear`` it replaces,
    so files written while C was a frozen Parameter load unchanged."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, frozen"


class SCLLayer(nn.Module):
    """The trainable compression layer: ``branch(h) = s * out(sigma(C h))``.

    * residual placement: ``out`` is E (``r -> f``, module ``expand``) and the FFN computes
      ``Wd (h + branch(h))`` (``forward`` returns ``c = h + branch(h)``);
    * parallel placement: ``out`` is P (``r -> d``, module ``project``) and the FFN computes
      ``Wd h + branch(h)``.

    ``out`` is zero-initialised, so the adapted model starts as the base model. C is
    initialised like LoRA's A (Kaiming uniform); with ``generator`` (a CPU generator) the draw
    is independent of the device and of torch's global RNG. Parameters are kept in fp32
    whatever the backbone's dtype (as PEFT does for LoRA); the forward casts them to the
    activation dtype so gradients flow back in fp32.
    """

    def __init__(self, d_ffn: int, r: int, activation: str, scale: float = 1.0, bias: bool = False,
                 device=None, placement: str = "residual", d_model: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if activation not in TORCH_ACTIVATIONS:
            raise AdapterError(f"SCL activation must be one of {sorted(TORCH_ACTIVATIONS)}, got {activation!r}")
        if placement == "parallel" and d_model is None:
            raise AdapterError("the parallel placement needs d_model (the width of P's output)")
        self.d_ffn, self.r, self.activation, self.scale = d_ffn, r, activation, float(scale)
        self.placement = placement
        self.compress = nn.Linear(d_ffn, r, bias=bias, device=device, dtype=torch.float32)  # C
        if placement == "residual":
            self.expand = nn.Linear(r, d_ffn, bias=bias, device=device, dtype=torch.float32)  # E
        else:
            self.project = nn.Linear(r, d_model, bias=bias, device=device, dtype=torch.float32)  # P
        self.reset_parameters(generator)

    @property
    def out(self) -> nn.Linear:
        """The zero-initialised layer after sigma: E (residual) or P (parallel)."""
        return self.expand if self.placement == "residual" else self.project

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # C like LoRA's A (Kaiming uniform, a=sqrt(5): U(-1/sqrt(f), 1/sqrt(f))), drawn on the CPU
        # so that a seed gives the same C on every device; E / P zero.
        bound = 1.0 / math.sqrt(self.d_ffn)
        c = torch.empty(self.compress.weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.compress.weight.copy_(c)
        nn.init.zeros_(self.out.weight)
        for lin in (self.compress, self.out):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def freeze_compress(self) -> None:
        """Keep C as buffers (`FrozenLinear`) instead of a frozen Parameter."""
        if not isinstance(self.compress, FrozenLinear):
            self.compress = FrozenLinear(self.compress)

    def randomize_out(self, generator: torch.Generator | None = None) -> None:
        """Start E / P away from zero (Kaiming uniform like C, bound 1/sqrt(r)): the adapted model
        then differs from the base at init, which save/load and disable tests need to see."""
        bound = 1.0 / math.sqrt(self.r)
        out = torch.empty(self.out.weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.out.weight.copy_(out)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """``s * out(sigma(C h))``: ``[..., f]`` (residual) or ``[..., d]`` (parallel)."""
        dtype = h.dtype
        p = F.linear(h, self.compress.weight.to(dtype), _cast(self.compress.bias, dtype))
        out = self.out
        return self.scale * F.linear(TORCH_ACTIVATIONS[self.activation](p), out.weight.to(dtype),
                                     _cast(out.bias, dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``c = h + branch(h)`` (the residual placement's input of the down projection)."""
        if self.placement != "residual":
            raise AdapterError("SCLLayer.forward(h) is the residual placement's c; use branch(h) for the parallel one")
        return h + self.branch(h)

    def extra_repr(self) -> str:
        return (f"d_ffn={self.d_ffn}, r={self.r}, activation={self.activation}, scale={self.scale}, "
                f"placement={self.placement}")


def compress_generator(init_seed: int | None, site_name: str) -> torch.Generator | None:
    """A CPU generator seeded from (init_seed, FFN name), or None (torch's global RNG)."""
    if init_seed is None:
        return None
    digest = hashlib.sha256(f"{init_seed}:{site_name}:scl.compress".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


# --- frozen projection weights, as the kernels want them ---------------------------------

_DEQUANT_BUFFERS: dict[tuple, torch.Tensor] = {}
_NO_DEQUANT_OUT: set[str] = set()  # device types whose bitsandbytes lacks dequantize_4bit(out=)


def _dequantized(module: nn.Module, role: str) -> Callable[[], torch.Tensor]:
    """A callable that dequantizes a bitsandbytes weight into a buffer reused across layers.

    One buffer per (role, shape, dtype, device): gate, up and down of one layer may be
    alive at once in backward, the same role of another layer never is.
    """
    weight = module.weight

    def load() -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        if getattr(weight, "quant_state", None) is not None:  # Params4bit
            state = weight.quant_state
            key = (role, tuple(state.shape), state.dtype, weight.device)
            out = _DEQUANT_BUFFERS.get(key)
            if out is None:
                out = _DEQUANT_BUFFERS[key] = torch.empty(state.shape, dtype=state.dtype, device=weight.device)
            if weight.device.type not in _NO_DEQUANT_OUT:
                try:
                    return bnbf.dequantize_4bit(weight.data, state, out=out)
                except NotImplementedError:  # bitsandbytes' CPU backend has no `.out` overload
                    _NO_DEQUANT_OUT.add(weight.device.type)
            return out.copy_(bnbf.dequantize_4bit(weight.data, state))
        scb = getattr(weight, "SCB", None)
        if scb is None and getattr(module, "state", None) is not None:
            scb = module.state.SCB
        if scb is None:  # Int8Params not yet quantized (still floating point)
            return weight.data
        key = (role, tuple(weight.shape), torch.float32, weight.device)
        out = _DEQUANT_BUFFERS.get(key)
        if out is None:
            out = _DEQUANT_BUFFERS[key] = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        torch.mul(weight.data.float(), scb.float().unsqueeze(1) / 127.0, out=out)
        return out

    return load


def is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and (
        getattr(weight, "quant_state", None) is not None or type(weight).__name__ in ("Int8Params", "Params4bit")
    )


def frozen_weight(module: nn.Module, role: str):
    """The [out, in] weight of a projection: a tensor, or a dequantizing callable for bnb layers."""
    if is_quantized(module):
        # bitsandbytes repacks 4-bit weights in place into a CPU inference layout on its first
        # no-grad eval forward (AVX512-BF16 CPUs); `_dequantized` reads the NF4 layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        return _dequantized(module, role)
    if is_conv1d(module):
        return module.weight.t()
    return module.weight


# --- the FFN forward -----------------------------------------------------------------------

def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


BASE_ROWS = "__base__"  # PEFT's adapter name for the rows of a mixed batch that run the base model


def reference_ffn(site: FFNSite, x: torch.Tensor, scl_layers: list[SCLLayer]) -> torch.Tensor:
    """The FFN with the branches of one or several SCL layers, with the model's own modules
    (level 0, any projection type). Several layers add their branches, as PEFT adds the deltas
    of several active LoRA adapters: residual ones inside the down projection, parallel ones
    after it."""
    pre = site.up(x)
    h = site.act(site.gate(x)) * pre if site.gate is not None else site.act(pre)
    inner, parallel = h, None
    for scl in scl_layers:
        if scl.placement == "residual":
            inner = inner + scl.branch(h)
        else:
            parallel = scl.branch(h) if parallel is None else parallel + scl.branch(h)
    down = site.down
    y = type(down).forward(down, inner)  # the class forward: split FFNs patch down.forward to identity
    return y if parallel is None else y + parallel


class SCLFeedForward:
    """Replaces the forward of the module that computes an FFN (set as an instance attribute).

    Not an nn.Module on purpose: it only points at modules the model already owns, so the
    model's parameter names stay those of the base model plus ``<ffn>.scl.*``.
    """

    def __init__(self, site: FFNSite, scl: SCLLayer, config: SCLConfig, ffn_activation: str | None):
        self.site, self.scl, self.config = site, scl, config
        self.ffn_activation = ffn_activation
        self.fused_ok = ffn_activation is not None
        self._warned = False

    # reference math with the model's own modules: works for every projection type
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return reference_ffn(self.site, x, [self.scl])

    def fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        from fastseq import kernels

        site, scl = self.site, self.scl
        gate = site.gate
        return kernels.scl_ffn(
            x,
            frozen_weight(site.up, "up"), site.up.bias,
            frozen_weight(gate, "gate") if gate is not None else None, gate.bias if gate is not None else None,
            frozen_weight(site.down, "down"), site.down.bias,
            scl.compress.weight, scl.compress.bias, scl.out.weight, scl.out.bias,
            ffn_activation=self.ffn_activation, scl_activation=scl.activation, scale=scl.scale,
            checkpoint_level=self.config.checkpoint_level, backend=backend, placement=scl.placement,
        )

    def backend_for(self, x: torch.Tensor) -> str | None:
        """The kernel backend to use for `x`, or None for the reference path."""
        cfg = self.config
        if cfg.checkpoint_level == 0:
            return None
        if not self.fused_ok:
            if cfg.backend == "triton":
                raise AdapterError(
                    f"backend='triton' needs an FFN activation among silu/gelu/gelu_tanh/relu; the FFN at "
                    f"{self.site.name} uses {type(self.site.act).__name__}. Use backend='auto' or checkpoint_level=0."
                )
            if not self._warned:
                warnings.warn(f"FFN activation at {self.site.name} is not one the fused path knows; "
                              f"using the reference path (checkpoint level 0) there", stacklevel=3)
                self._warned = True
            return None
        if cfg.backend == "auto":
            from fastseq import kernels

            return "triton" if x.is_cuda and kernels.triton_available(x.device) else "torch"
        return cfg.backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend_for(x)
        y = self.reference(x) if backend is None else self.fused(x, backend)
        post = self.site.post
        return post(y) if post is not None else y


def run_adapters(x: torch.Tensor, forwards: dict[str, SCLFeedForward], active: list[str],
                 base_forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One FFN with its active adapters: none (the base FFN), one (its own path: reference or
    fused, as its config says) or several (their branches summed, on the reference path: the
    fused kernel takes one C and one E / P)."""
    present = [forwards[name] for name in active if name in forwards]
    if not present:
        return base_forward(x)
    if len(present) == 1:
        return present[0](x)
    site = present[0].site
    y = reference_ffn(site, x, [f.scl for f in present])
    return site.post(y) if site.post is not None else y


def run_mixed_batch(x: torch.Tensor, forwards: dict[str, SCLFeedForward], adapter_names: list[str],
                    base_forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One FFN where row i of the batch uses adapter ``adapter_names[i]`` (``"__base__"``: none).

    Each adapter runs on its own rows through its usual path (so the fused kernels keep working);
    rows naming an adapter this FFN does not have (it targets other layers) run the base FFN,
    as in PEFT. The rows are gathered per adapter and put back in order: outputs and gradients
    are those of running each adapter alone on its rows."""
    if len(adapter_names) != x.shape[0]:
        raise AdapterError(f"adapter_names has {len(adapter_names)} names but the batch has {x.shape[0]} rows; "
                           f"give one adapter name (or {BASE_ROWS!r}) per row")
    rows: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(row)
    outputs, order = [], []
    for name, idx in rows.items():
        sub = x if len(rows) == 1 else x.index_select(0, torch.tensor(idx, device=x.device))
        forward = forwards.get(name)
        outputs.append(base_forward(sub) if forward is None else forward(sub))
        order += idx
    if len(rows) == 1:
        return outputs[0]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(outputs).index_select(0, inverse.to(x.device))


# --- injection --------------------------------------------------------------------------------

DEFAULT_ADAPTER = "default"  # PEFT's name for the first adapter


@dataclass
class AdapterState:
    """One adapter `get_scl_model` injected; ``model.fastseq_adapters[name]``, and the active one
    is also ``model.fastseq_adapter``.

    The adapter named ``"default"`` keeps its layers at ``<entry>.scl`` (the names fastseq has
    always used); any other adapter at ``<entry>.scl_adapters.<name>``. Files do not depend on
    the name: `save_adapter` writes every adapter under the ``<entry>.scl.`` names.
    """

    config: SCLConfig
    sites: list[FFNSite]
    trainable_modules: list[str] = field(default_factory=list)
    name: str = DEFAULT_ADAPTER

    def scl_prefix(self, site: FFNSite) -> str:
        """Parameter-name prefix of this adapter's SCL layer at `site`."""
        if self.name == DEFAULT_ADAPTER:
            return site.scl_prefix
        return f"{_entry_path(site)}.scl_adapters.{self.name}".lstrip(".")

    def layer(self, site: FFNSite) -> SCLLayer:
        return self.scl_layers()[site.name]

    def scl_layers(self) -> dict[str, SCLLayer]:
        """This adapter's SCL layer at each site, by site name."""
        out = {}
        for site in self.sites:
            router = site.entry.__dict__["forward"]
            out[site.name] = router.forwards[self.name].scl
        return out

    def parameter_names(self, model: nn.Module) -> list[str]:
        """Names of every parameter the adapter trains (a frozen C is not one of them)."""
        frozen = set() if self.config.train_compress else set(self._compress_names(model))
        return [n for n in self.saved_names(model) if n not in frozen]

    def saved_names(self, model: nn.Module) -> list[str]:
        """What the adapter saves: every SCL parameter (a frozen C too: the adapter needs it),
        the down projections with ``train_down_proj`` and the trainable head modules."""
        prefixes = [self.scl_prefix(site) + "." for site in self.sites]
        if self.config.train_down_proj:
            prefixes += [_down_prefix(site) + "." for site in self.sites]
        prefixes += [name + "." for name in self.trainable_modules]
        return [n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)]

    def file_name(self, name: str) -> str:
        """The name a parameter of this adapter has in an adapter file (the default adapter's)."""
        for site in self.sites:
            prefix = self.scl_prefix(site) + "."
            if name.startswith(prefix):
                return site.scl_prefix + "." + name[len(prefix):]
        return name

    def _compress_names(self, model: nn.Module) -> list[str]:
        prefixes = tuple(self.scl_prefix(site) + ".compress." for site in self.sites)
        return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


@dataclass
class AdapterSelection:
    """What the FFN routers of one model run (shared by all of them): the active adapters,
    whether adapters are disabled, and per-row adapter names for a mixed batch."""

    active: list[str] = field(default_factory=lambda: [DEFAULT_ADAPTER])
    disabled: bool = False
    adapter_names: list[str] | None = None


class FFNRouter:
    """The forward `get_scl_model` sets on an FFN entry module: runs the selected adapters."""

    def __init__(self, site: FFNSite, selection: AdapterSelection):
        self.site, self.selection = site, selection
        self.forwards: dict[str, SCLFeedForward] = {}

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        entry, site = self.site.entry, self.site
        y = type(entry).forward(entry, x)
        if site.style.split:  # the down module passes its input on: apply the down projection here
            down = site.down
            y = type(down).forward(down, y)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sel = self.selection
        if sel.disabled:
            return self.base_forward(x)
        if sel.adapter_names is not None:
            return run_mixed_batch(x, self.forwards, sel.adapter_names, self.base_forward)
        return run_adapters(x, self.forwards, sel.active, self.base_forward)


def _entry_path(site: FFNSite) -> str:
    return f"{site.name}.{site.style.entry}".strip(".") if site.style.entry else site.name


def _down_prefix(site: FFNSite) -> str:
    return f"{site.name}.{site.style.down}".lstrip(".")


def _select_sites(sites: list[FFNSite], layers: list[int] | None) -> list[FFNSite]:
    if layers is None:
        return sites
    available = sorted({s.layer for s in sites if s.layer is not None})
    missing = sorted(set(layers) - set(available))
    if missing:
        raise AdapterError(f"SCLConfig.layers asks for layers {missing} but the model's FFN layers are {available}")
    return [s for s in sites if s.layer in layers]


def _matching_module_names(model: nn.Module, wanted: str) -> list[str]:
    return [n for n, _ in model.named_modules() if n == wanted or n.endswith("." + wanted)]


def adapters_of(model: nn.Module) -> dict[str, AdapterState]:
    """The SCL adapters `get_scl_model` injected into `model`, by name (empty if none)."""
    return getattr(model, "fastseq_adapters", None) or {}


def _check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ROWS:
        raise AdapterError(f"adapter_name must be a non-empty string without '.' and not {BASE_ROWS!r} "
                           f"(the name of the base model in a mixed batch), got {name!r}")


def get_scl_model(model: nn.Module, config: SCLConfig, trainable_modules: tuple[str, ...] | list[str] = (),
                  adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Inject an SCL layer into every targeted FFN of `model`, in place, and return it.

    Everything is frozen except the SCL parameters, the down projections when
    ``config.train_down_proj``, and the modules named in `trainable_modules` (a task head
    such as ``"classifier"``; a name matches a module path or its suffix).

    Called again with another `adapter_name`, it adds a second adapter as PEFT's
    ``add_adapter`` does: the active adapter stays active (`set_adapter` switches), the new
    one is frozen until then. Head modules and down projections would be shared by the
    adapters, so only the first adapter may train them.
    """
    if not isinstance(config, SCLConfig):
        raise AdapterError(f"config must be an SCLConfig, got {type(config).__name__}")
    config.validate()
    _check_adapter_name(adapter_name)
    existing = adapters_of(model)
    if getattr(model, "fastseq_adapter", None) is not None and not existing:
        raise AdapterError("this model already has SCL layers; load the base model again to inject a new adapter")
    if adapter_name in existing:
        raise AdapterError(f"this model already has SCL layers for the adapter named {adapter_name!r}; pass another "
                           f"adapter_name to add a second adapter, or delete_adapter(model, {adapter_name!r}) first")
    if existing:
        first = next(iter(existing.values()))
        if trainable_modules or config.train_down_proj or first.config.train_down_proj:
            raise AdapterError(
                f"adapter {adapter_name!r} would share the model's head modules / down projections with adapter "
                f"{first.name!r}: only a model's first SCL adapter may have trainable_modules or train_down_proj. "
                f"Load another copy of the base model, or use PEFT (SCLPeftConfig with modules_to_save keeps a "
                f"copy of the head per adapter)")
    sites = _select_sites(find_ffn_sites(model), config.layers)

    head_names: list[str] = []
    for wanted in trainable_modules:
        found = _matching_module_names(model, wanted)
        if not found:
            raise AdapterError(f"trainable module {wanted!r} not found in {type(model).__name__}; "
                               f"top-level modules are {[n for n, _ in model.named_children()]}")
        head_names += found

    if config.train_down_proj:
        quantized = [s.name for s in sites if is_quantized(s.down)]
        if quantized:
            raise AdapterError(f"train_down_proj=True needs a floating-point down projection, but it is quantized at "
                               f"{quantized[:3]}; load the model without quantization or keep train_down_proj=False")

    layers: list[tuple[FFNSite, SCLLayer, str | None]] = []
    for site in sites:  # every check before the model is touched
        ffn_activation = detect_activation(site.act)
        scl_activation = config.activation or ffn_activation
        if scl_activation is None:
            raise AdapterError(
                f"cannot use the FFN's own activation ({type(site.act).__name__}) at {site.name} as sigma; "
                f"set SCLConfig.activation to one of silu/gelu/gelu_tanh/relu"
            )
        scl = SCLLayer(site.d_ffn, config.r, scl_activation, config.scale, config.bias, device=_device_of(site.up),
                       placement=config.placement, d_model=site.d_model,
                       generator=compress_generator(config.init_seed, site.name))
        layers.append((site, scl, ffn_activation))

    if not existing:
        model.requires_grad_(False)
        model.fastseq_selection = AdapterSelection(active=[adapter_name])
    selection: AdapterSelection = model.fastseq_selection
    state = AdapterState(config, sites, head_names, adapter_name)
    for site, scl, ffn_activation in layers:
        entry = site.entry
        # registered as a child: parameters named <entry>.scl.* (or <entry>.scl_adapters.<name>.*)
        if adapter_name == DEFAULT_ADAPTER:
            entry.scl = scl
        else:
            if "scl_adapters" not in entry._modules:
                entry.scl_adapters = nn.ModuleDict()
            entry.scl_adapters[adapter_name] = scl
        router = entry.__dict__.get("forward")
        if not isinstance(router, FFNRouter):
            router = entry.forward = FFNRouter(site, selection)
        router.forwards[adapter_name] = SCLFeedForward(site, scl, config, ffn_activation)
        if site.style.split:
            # The entry now returns the FFN output; the down module only passes it on.
            site.down.forward = _identity
        if config.train_down_proj:
            site.down.requires_grad_(True)
    trainable = adapter_name in selection.active
    for scl in state.scl_layers().values():
        scl.requires_grad_(trainable)
        if not config.train_compress:
            scl.compress.requires_grad_(False)
    for name in head_names:
        model.get_submodule(name).requires_grad_(True)

    model.fastseq_adapters = {**existing, adapter_name: state}
    if not existing:
        model.fastseq_adapter = state
    return model


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make `adapter_name` the active SCL adapter of a `get_scl_model` model, as PEFT's
    ``set_adapter``: it runs and trains, the others are frozen (``model.fastseq_adapter`` is it).
    A list activates several: their branches add (on the reference path), all of them train,
    and ``model.fastseq_adapter`` is the first."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise AdapterError("set_adapter needs at least one adapter name (disable_adapter(model) runs the base model)")
    for name in names:
        adapters = _named_adapter(model, name)
    for name, state in adapters.items():
        for scl in state.scl_layers().values():
            scl.requires_grad_(name in names)
            if not state.config.train_compress:
                scl.compress.requires_grad_(False)
    model.fastseq_selection.active = names
    model.fastseq_adapter = adapters[names[0]]


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an SCL adapter and its tensors. Deleting the active adapter activates the first
    remaining one (by name, as PEFT does); deleting the last one gives back the base model."""
    adapters = _named_adapter(model, adapter_name)
    state = adapters.pop(adapter_name)
    for site in state.sites:
        entry = site.entry
        router = entry.__dict__["forward"]
        del router.forwards[adapter_name]
        if adapter_name == DEFAULT_ADAPTER:
            del entry.scl
        else:
            del entry.scl_adapters[adapter_name]
            if not len(entry.scl_adapters):
                del entry.scl_adapters
        if not router.forwards:  # the FFN is plain again
            del entry.forward
            if site.style.split:
                site.down.__dict__.pop("forward", None)
    if not adapters:
        for attr in ("fastseq_adapters", "fastseq_adapter", "fastseq_selection"):
            delattr(model, attr)
        return
    active = model.fastseq_selection.active
    if adapter_name in active:
        set_adapter(model, [a for a in active if a != adapter_name] or sorted(adapters)[0])


@contextmanager
def disable_adapter(model: nn.Module):
    """Within the block the model computes the base model (PEFT's ``disable_adapter()``)."""
    selection = _selection(model)
    before, selection.disabled = selection.disabled, True
    try:
        yield
    finally:
        selection.disabled = before


@contextmanager
def mixed_adapter_batch(model: nn.Module, adapter_names: list[str]):
    """Within the block row i of every batch uses adapter ``adapter_names[i]`` (``"__base__"``:
    the base model): PEFT's ``model(..., adapter_names=...)`` for a `get_scl_model` model."""
    adapters = adapters_of(model)
    unknown = sorted({n for n in adapter_names if n != BASE_ROWS} - set(adapters))
    if unknown:
        raise AdapterError(f"adapter_names names adapters this model does not have: {unknown}; it has "
                           f"{sorted(adapters)} (and {BASE_ROWS!r} for the base model)")
    selection = _selection(model)
    before, selection.adapter_names = selection.adapter_names, list(adapter_names)
    try:
        yield
    finally:
        selection.adapter_names = before


def _selection(model: nn.Module) -> AdapterSelection:
    selection = getattr(model, "fastseq_selection", None)
    if selection is None:
        raise AdapterError("model has no SCL adapter; call fastseq.get_scl_model first")
    return selection


def _named_adapter(model: nn.Module, adapter_name: str) -> dict[str, AdapterState]:
    adapters = adapters_of(model)
    if not adapters:
        raise AdapterError("model has no SCL adapter; call fastseq.get_scl_model first")
    if adapter_name not in adapters:
        raise AdapterError(f"this model has no SCL adapter named {adapter_name!r}; its adapters are {sorted(adapters)}")
    return adapters


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def scl_parameter_names(model: nn.Module) -> list[str]:
    """What the active adapter trains (all active adapters', when `set_adapter` gave several)."""
    state = getattr(model, "fastseq_adapter", None)
    if state is None:
        raise AdapterError("model has no SCL adapter; call fastseq.get_scl_model first")
    adapters = adapters_of(model)
    names = state.parameter_names(model)
    for other in model.fastseq_selection.active[1:]:
        names += [n for n in adapters[other].parameter_names(model) if n not in names]
    return names


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.fraction:.4f}"


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes 4-bit parameters pack two values per byte: count the logical weight.
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (quantized weights counted by their logical shape)."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return ParameterCount(trainable, total)
