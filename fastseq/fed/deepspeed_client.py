"""A federated client whose local training runs under DeepSpeed (ZeRO stage 2 by default).

Same contract as :class:`fastseq.fed.client.Client` (bytes in, bytes out; the same seeds,
data order, loss, FedProx term, codecs, error feedback and persisted state); only the
optimisation step runs through a ``deepspeed.initialize`` engine (ZeRO-partitioned
optimizer state and gradients, optional CPU optimizer offload, bf16 where supported).

On a machine without a launcher (one process, CPU or one GPU) the process-group variables
are set here: ``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=<free>``
(gloo on CPU). DeepSpeed JIT-compiles a communication op on its first initialize (about a
minute on CPU); it is cached under ``TORCH_EXTENSIONS_DIR``, which defaults here to
``~/.cache/fastseq/torch_extensions`` so that later runs load it in seconds.

Switch it on with the experiment config's ``deepspeed`` table (``ExperimentConfig.deepspeed =
{"zero_stage": 2}``, a ``[deepspeed]`` section of the config file, or ``--deepspeed '{...}'``);
``build_client`` then builds DeepSpeedClient objects, on the local engine and on Flower alike.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, unknown_keys_error
from .client import Client, optimizer_groups

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "fastseq" / "torch_extensions"


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings of a client.

    zero_stage: 0, 1, 2 (default: optimizer state and gradients partitioned) or 3.
    bf16: "auto" (bf16 on a CUDA device that supports it, else fp32), true or false.
        With bf16 DeepSpeed casts the whole model (the frozen backbone too) to bf16.
    offload_optimizer: keep the optimizer state on the CPU (ZeRO-Offload; with a GPU).
    extensions_dir: TORCH_EXTENSIONS_DIR for DeepSpeed's JIT-built ops (None: the
        environment's value, else ``~/.cache/fastseq/torch_extensions``).
    config: extra DeepSpeed config entries, merged over the generated ones.
    """

    enabled: bool = True
    zero_stage: int = 2
    bf16: Any = "auto"
    offload_optimizer: bool = False
    extensions_dir: str | None = None
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.bf16 not in ("auto", True, False):
            raise ConfigError(f"deepspeed.bf16 must be \"auto\", true or false, got {self.bf16!r}")
        for k in ("enabled", "offload_optimizer"):
            if not isinstance(getattr(self, k), bool):
                raise ConfigError(f"deepspeed.{k} must be true or false, got {getattr(self, k)!r}")
        if not isinstance(self.config, dict):
            raise ConfigError(f"deepspeed.config must be a table, got {self.config!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeepSpeedConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise unknown_keys_error("deepspeed", bad, sorted(known))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "DeepSpeedConfig":
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def use_bf16(self, device: torch.device) -> bool:
        if self.bf16 == "auto":
            return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return bool(self.bf16)

    def ds_config(self, train, device: torch.device) -> dict[str, Any]:
        """The DeepSpeed config dict for one client's ``TrainConfig``."""
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        conf: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": train.batch_size,
            "gradient_accumulation_steps": train.grad_accum,
            "gradient_clipping": float(train.max_grad_norm) if train.max_grad_norm else 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": self.use_bf16(device)},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        return _merge(conf, self.config)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_single_process(extensions_dir: str | os.PathLike | None = None) -> None:
    """Process-group variables for one process (unless a launcher set them) and the
    JIT-extension cache folder; then ``deepspeed.init_distributed`` (gloo on CPU)."""
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    ext = extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR") or DEFAULT_EXTENSIONS_DIR
    Path(ext).mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ext)
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=None, verbose=False)


class DeepSpeedClient(Client):
    """:class:`Client` whose ``fit`` trains through a DeepSpeed engine."""

    def __init__(self, *args, deepspeed: DeepSpeedConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ds = deepspeed or DeepSpeedConfig()
        self.last_losses: list[float] = []

    def fit(self, downlink_blob: bytes, round: int, attack: Any = None) -> tuple[bytes, dict[str, Any]]:
        blob, metrics = super().fit(downlink_blob, round, attack=attack)
        if self.ds.enabled:
            metrics["deepspeed_zero_stage"] = self.ds.zero_stage
        return blob, metrics

    def train(self, steps: int, batches, anchor: dict | None) -> list[float]:
        """The same steps as :meth:`Client.train`, through a DeepSpeed engine."""
        if not self.ds.enabled:
            return super().train(steps, batches, anchor)
        setup_single_process(self.ds.extensions_dir)
        import deepspeed

        cfg, model, device = self.train_cfg, self.rt.model, self.rt.device
        groups = optimizer_groups(self.rt.method, cfg)
        train_params = [p for g in groups for p in g["params"]]
        for p in train_params:  # gradients left on the shared model by an earlier client
            p.grad = None
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=train_params,
                                               config=self.ds.ds_config(cfg, device))
        dtype = torch.bfloat16 if self.ds.use_bf16(device) else None
        losses: list[float] = []
        try:
            engine.train()
            for _ in range(steps):
                step_loss = 0.0
                for _ in range(cfg.grad_accum):
                    loss, total = self.step_loss(engine.module, next(batches), anchor, engine.device, dtype)
                    step_loss += float(loss.detach()) / cfg.grad_accum
                    engine.backward(total)  # scales by 1/grad_accum itself
                    engine.step()           # steps (clip + AdamW) at the accumulation boundary
                losses.append(step_loss)
        finally:
            engine.destroy()  # drops ZeRO's gradient hooks from the shared model's parameters
            for p in train_params:
                p.grad = None
        self.last_losses = losses
        return losses
