"""Server optimizers applied to the aggregated client delta (a pseudo-gradient ``-delta``).

``fedavg``:  x <- x + lr * delta                                   (lr default 1.0)
``fedavgm``: m <- beta * m + delta;  x <- x + lr * m                (lr 1.0, beta 0.9)
``fedadam``: m <- b1 m + (1-b1) delta;  v <- b2 v + (1-b2) delta^2;
             x <- x + lr * m / (sqrt(v) + tau)                      (lr 0.01, b1 0.9, b2 0.99, tau 1e-3)
(Reddi et al., "Adaptive Federated Optimization", no bias correction.)
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..config import ConfigError

SERVER_OPTS = ("fedavg", "fedavgm", "fedadam")
DEFAULT_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-2}


class ServerOptimizer:
    def __init__(self, name: str = "fedavg", lr: float | None = None, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        if name not in SERVER_OPTS:
            raise ConfigError(f"unknown server optimizer {name!r}; valid: {', '.join(SERVER_OPTS)}")
        self.name = name
        self.lr = DEFAULT_LR[name] if lr is None else float(lr)
        self.momentum, self.beta1, self.beta2, self.tau = momentum, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New parameters from the current ``params`` and the aggregated ``delta`` (fp32)."""
        out = {}
        for k, d in delta.items():
            x, d = params[k].float(), d.float()
            if self.name == "fedavg":
                out[k] = x + self.lr * d
            elif self.name == "fedavgm":
                m = self.m.get(k)
                m = d.clone() if m is None else self.momentum * m + d
                self.m[k] = m
                out[k] = x + self.lr * m
            else:
                m = self.m.get(k, torch.zeros_like(d))
                v = self.v.get(k, torch.zeros_like(d))
                m = self.beta1 * m + (1 - self.beta1) * d
                v = self.beta2 * v + (1 - self.beta2) * d * d
                self.m[k], self.v[k] = m, v
                out[k] = x + self.lr * m / (v.sqrt() + self.tau)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        st = {f"m:{k}": v.clone() for k, v in self.m.items()}
        st.update({f"v:{k}": v.clone() for k, v in self.v.items()})
        return st

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: v.float().clone() for k, v in state.items() if k.startswith("m:")}
        self.v = {k[2:]: v.float().clone() for k, v in state.items() if k.startswith("v:")}
