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
        site, scl = self.site, self.scl
        pre = site.up(x)
        h = site.act(site.gate(x)) * pre if site.gate is not None else site.act(pre)
        down = site.down
        forward = type(down).forward  # the class forward: split FFNs patch down.forward to identity
        if scl.placement == "parallel":
            return forward(down, h) + scl.branch(h)
        return forward(down, scl(h))

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


# --- injection --------------------------------------------------------------------------------

@dataclass
class AdapterState:
    """What `get_scl_model` did to a model; kept on the model as ``model.fastseq_adapter``."""

    config: SCLConfig
    sites: list[FFNSite]
    trainable_modules: list[str] = field(default_factory=list)

    def parameter_names(self, model: nn.Module) -> list[str]:
        """Names of every parameter the adapter trains (a frozen C is not one of them)."""
        frozen = set() if self.config.train_compress else set(self._compress_names(model))
        return [n for n in self.saved_names(model) if n not in frozen]

    def saved_names(self, model: nn.Module) -> list[str]:
        """What the adapter saves: every SCL parameter (a frozen C too: the adapter needs it),
        the down projections with ``train_down_proj`` and the trainable head modules."""
        prefixes = [site.scl_prefix + "." for site in self.sites]
        if self.config.train_down_proj:
            prefixes += [_down_prefix(site) + "." for site in self.sites]
        prefixes += [name + "." for name in self.trainable_modules]
        return [n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)]

    def _compress_names(self, model: nn.Module) -> list[str]:
        prefixes = tuple(site.scl_prefix + ".compress." for site in self.sites)
        return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


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


def get_scl_model(model: nn.Module, config: SCLConfig, trainable_modules: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """Inject an SCL layer into every targeted FFN of `model`, in place, and return it.

    Everything is frozen except the SCL parameters, the down projections when
    ``config.train_down_proj``, and the modules named in `trainable_modules` (a task head
    such as ``"classifier"``; a name matches a module path or its suffix).
    """
    if not isinstance(config, SCLConfig):
        raise AdapterError(f"config must be an SCLConfig, got {type(config).__name__}")
    config.validate()
    if getattr(model, "fastseq_adapter", None) is not None:
        raise AdapterError("this model already has SCL layers; load the base model again to inject a new adapter")
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

    model.requires_grad_(False)
    for site in sites:
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
        if not config.train_compress:
            scl.compress.requires_grad_(False)
        entry = site.entry
        entry.scl = scl  # registered as a child: parameters named <entry>.scl.{compress,expand}.*
        entry.forward = SCLFeedForward(site, scl, config, ffn_activation)
        if site.style.split:
            # The entry now returns the FFN output; the down module only passes it on.
            site.down.forward = _identity
        if config.train_down_proj:
            site.down.requires_grad_(True)
    for name in head_names:
        model.get_submodule(name).requires_grad_(True)

    model.fastseq_adapter = AdapterState(config, sites, head_names)
    return model


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def scl_parameter_names(model: nn.Module) -> list[str]:
    state = getattr(model, "fastseq_adapter", None)
    if state is None:
        raise AdapterError("model has no SCL adapter; call fastseq.get_scl_model first")
    return state.parameter_names(model)


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
