"""Architecture registry: where each model family keeps its FFN and what shape it has.

An entry names the attributes of the module that holds the FFN (relative dotted paths)
and whether the FFN is gated (``act(gate(x)) * up(x)``) or plain (``act(fc1(x))``).
Adding an architecture is one `register(FFNStyle(...))` call. Models whose
``config.model_type`` is not registered are matched structurally against every style.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ACTIVATION_NAMES


class UnsupportedModelError(ValueError):
    """The model has no FFN that fastseq knows how to adapt."""


@dataclass(frozen=True)
class FFNStyle:
    name: str
    kind: str  # "gated" | "plain"
    up: str  # up_proj (gated) or fc1 (plain), relative to the matched module
    down: str
    act: str  # attribute holding the FFN activation module/callable
    gate: str | None = None
    entry: str = ""  # module whose forward maps x to the FFN output (or to h, for split FFNs)
    post: str | None = None  # module applied to the down projection's output (GPT-2 dropout)
    model_types: tuple[str, ...] = ()

    @property
    def split(self) -> bool:
        """True when up and down live in different modules (BERT's intermediate/output)."""
        return self.entry != ""


REGISTRY: dict[str, FFNStyle] = {}


def register(style: FFNStyle) -> FFNStyle:
    if style.kind not in ("gated", "plain"):
        raise ValueError(f"FFNStyle.kind must be 'gated' or 'plain', got {style.kind!r}")
    REGISTRY[style.name] = style
    return style


register(FFNStyle(
    "llama-mlp", "gated", up="up_proj", gate="gate_proj", down="down_proj", act="act_fn",
    model_types=("llama", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3", "mistral"),
))
register(FFNStyle(
    "fc1-fc2", "plain", up="fc1", down="fc2", act="activation_fn",
    model_types=("siglip", "siglip_vision_model", "vit", "clip", "clip_vision_model"),
))
register(FFNStyle(
    "bert-split", "plain", up="intermediate.dense", down="output.dense",
    act="intermediate.intermediate_act_fn", entry="intermediate",
    model_types=("bert", "roberta", "xlm-roberta"),
))
register(FFNStyle(
    "gpt2-conv1d", "plain", up="c_fc", down="c_proj", act="act", post="dropout",
    model_types=("gpt2",),
))


def supported_model_types() -> list[str]:
    return sorted({t for style in REGISTRY.values() for t in style.model_types})


def resolve(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        if not part:
            continue
        module = getattr(module, part)
    return module


def _has(module: nn.Module, dotted: str) -> bool:
    try:
        resolve(module, dotted)
    except AttributeError:
        return False
    return True


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, bitsandbytes Linear or Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def detect_activation(fn) -> str | None:
    """Name the activation `fn` computes by probing it, so custom classes are recognised too."""
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    candidates = {
        "silu": torch.nn.functional.silu(probe),
        "gelu": torch.nn.functional.gelu(probe),
        "gelu_tanh": torch.nn.functional.gelu(probe, approximate="tanh"),
        "relu": torch.relu(probe),
    }
    try:
        with torch.no_grad():
            out = fn(probe.float()).double()
    except Exception:
        return None
    for name in ACTIVATION_NAMES:
        if torch.allclose(out, candidates[name], atol=1e-4, rtol=1e-4):
            return name
    return None


@dataclass
class FFNSite:
    """One FFN of a model, as the registry sees it."""

    name: str  # module path of the module that holds the FFN
    layer: int | None  # transformer layer index, None outside the numbered layers
    style: FFNStyle
    holder: nn.Module

    @property
    def entry(self) -> nn.Module:
        return resolve(self.holder, self.style.entry)

    @property
    def up(self) -> nn.Module:
        return resolve(self.holder, self.style.up)

    @property
    def gate(self) -> nn.Module | None:
        return resolve(self.holder, self.style.gate) if self.style.gate else None

    @property
    def down(self) -> nn.Module:
        return resolve(self.holder, self.style.down)

    @property
    def act(self):
        return resolve(self.holder, self.style.act)

    @property
    def post(self):
        return resolve(self.holder, self.style.post) if self.style.post else None

    @property
    def d_model(self) -> int:
        return linear_shape(self.up)[0]

    @property
    def d_ffn(self) -> int:
        return linear_shape(self.up)[1]

    @property
    def scl_prefix(self) -> str:
        """Parameter-name prefix of the SCL layer injected at this site."""
        entry = f"{self.name}.{self.style.entry}" if self.style.entry else self.name
        return f"{entry}.scl".lstrip(".")


def _matches(module: nn.Module, style: FFNStyle) -> bool:
    names = [style.up, style.down, style.act] + ([style.gate] if style.gate else [])
    if not all(_has(module, n) for n in names):
        return False
    projections = [style.up, style.down] + ([style.gate] if style.gate else [])
    if not all(is_linear_like(resolve(module, n)) for n in projections):
        return False
    d, f = linear_shape(resolve(module, style.up))
    return linear_shape(resolve(module, style.down)) == (f, d)


_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search("." + name)
    return int(match.group(1)) if match else None


def find_ffn_sites(model: nn.Module) -> list[FFNSite]:
    """All FFNs of `model` that fastseq can adapt, in module order.

    Raises UnsupportedModelError listing the supported model types when there are none.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    styles = [s for s in REGISTRY.values() if model_type in s.model_types] or list(REGISTRY.values())
    sites: list[FFNSite] = []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in claimed:
            continue
        for style in styles:
            if _matches(module, style):
                sites.append(FFNSite(name, _layer_index(name), style, module))
                claimed.update(id(m) for m in module.modules())
                break
    if not sites:
        raise UnsupportedModelError(
            f"no supported FFN found in {type(model).__name__} (model_type={model_type!r}). "
            f"fastseq adapts gated FFNs with gate_proj/up_proj/down_proj/act_fn (Llama, Gemma, Qwen, Mistral), "
            f"fc1/fc2 FFNs (SigLIP, ViT, CLIP), BERT-style intermediate/output FFNs and GPT-2 c_fc/c_proj. "
            f"Registered model types: {', '.join(supported_model_types())}. "
            f"To add an architecture, call fastseq.adapters.registry.register(FFNStyle(...))."
        )
    return sites
