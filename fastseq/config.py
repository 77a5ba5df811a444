"""`SCLConfig`: what to inject and how to run it (docs/design.md §1, §2)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ACTIVATION_NAMES = ("silu", "gelu", "gelu_tanh", "relu")
BACKENDS = ("auto", "torch", "triton")
CHECKPOINT_LEVELS = (0, 1, 2)
PLACEMENTS = ("residual", "parallel")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what is allowed."""


def unknown_keys_error(what: str, bad: list[str], valid: list[str]) -> ConfigError:
    """One line for keys a ``what`` table does not have: the closest valid key for each (a typo,
    or ``-`` written for ``_``), and the list of valid keys only when some key resembles none."""
    import difflib

    named, lost = [], False
    for key in bad:
        close = difflib.get_close_matches(str(key).replace("-", "_"), valid, n=1, cutoff=0.6)
        named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        lost = lost or not close
    text = f"unknown {what} key{'s' if len(bad) > 1 else ''} {', '.join(named)}"
    return ConfigError(text + (f"; valid keys: {', '.join(valid)}" if lost else ""))


@dataclass
class SCLConfig:
    """Configuration of the Sequential Compression Layer.

    r: width of the compression bottleneck (C: f -> r, E: r -> f).
    activation: sigma between C and E; None uses the FFN's own activation.
    scale: s in ``c = h + s * E(sigma(C h))``.
    bias: give C and E (or P) biases.
    placement: "residual" (``y = Wd (h + s E sigma(C h))``, E: r -> f) or "parallel"
        (``y = Wd h + s P sigma(C h)``, P: r -> d, a new small "subsequent projection").
        Trainable per layer: ``2 f r`` (residual) or ``r (f + d)`` (parallel).
    train_compress: train C. False freezes C at its seeded init (see init_seed): only E (or
        P) trains, the output is linear in what trains and averaging it is exact.
        Trainable per layer: ``f r`` (residual) or ``d r`` (parallel).
    init_seed: seed of C's initialisation. None draws from torch's global RNG; an integer
        derives each FFN's C from (init_seed, the FFN's name) alone, on the CPU, so that
        every process and device builds bit-identical C (what a frozen C needs).
    train_down_proj: also train the FFN's down projection (costs d*f per layer).
    layers: indices of the transformer layers to adapt; None adapts every FFN
        (including FFNs outside the numbered layers, such as SigLIP's pooling head).
    checkpoint_level: what forward keeps for backward. 0 = plain autograd through
        the reference module; 1 = keeps x, the gate/up outputs (or fc1 pre-activation)
        and p = C h, recomputes elementwise parts; 2 = keeps only x and p, recomputes
        the frozen GEMMs in backward.
    backend: "auto" (Triton on CUDA, the PyTorch recompute path elsewhere), "torch"
        or "triton" (on CPU only under TRITON_INTERPRET=1).
    """

    r: int = 64
    activation: str | None = None
    scale: float = 1.0
    bias: bool = False
    placement: str = "parallel"
    train_compress: bool = False
    init_seed: int | None = 0
    train_down_proj: bool = False
    layers: list[int] | None = None
    checkpoint_level: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, (list, tuple)):
            raise ConfigError(f"SCLConfig.layers must be None or a list of layer indices, got {self.layers!r}")
        if self.layers is not None:
            self.layers = list(self.layers)
        self.validate()

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"SCLConfig.r must be a positive integer (e.g. 16), got {self.r!r}")
        if self.activation is not None and self.activation not in ACTIVATION_NAMES:
            raise ConfigError(
                f"SCLConfig.activation must be None (the FFN's own) or one of {ACTIVATION_NAMES}, got {self.activation!r}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ConfigError(f"SCLConfig.scale must be a finite number, got {self.scale!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"SCLConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.init_seed is not None and (isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int)):
            raise ConfigError(f"SCLConfig.init_seed must be None or an integer, got {self.init_seed!r}")
        for name in ("bias", "train_compress", "train_down_proj"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"SCLConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.layers is not None:
            bad = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad or not self.layers:
                raise ConfigError(f"SCLConfig.layers must be None or a non-empty list of layer indices >= 0, got {self.layers!r}")
        if self.checkpoint_level not in CHECKPOINT_LEVELS or isinstance(self.checkpoint_level, bool):
            raise ConfigError(f"SCLConfig.checkpoint_level must be one of {CHECKPOINT_LEVELS}, got {self.checkpoint_level!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"SCLConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    def adapter_params_per_layer(self, d_model: int, d_ffn: int) -> int:
        """Trainable adapter parameters of one FFN (biases included, down projection not)."""
        out_width = d_ffn if self.placement == "residual" else d_model
        n = out_width * self.r + (out_width if self.bias else 0)
        if self.train_compress:
            n += d_ffn * self.r + (self.r if self.bias else 0)
        return n

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SCLConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SCLConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "SCLConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
