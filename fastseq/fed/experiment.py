"""ExperimentConfig and the builders: model, task, method, partition, clients, server."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError, unknown_keys_error
from .aggregators import AGGREGATORS, trim_count
from .attacks import ATTACKS
from .client import Client, TrainConfig, derive_seed
from .methods import Method, default_lr, get_method, list_methods
from .partition import PARTITIONERS, format_histogram, partition
from .privacy import DP_CLIPPING, DP_MODES, DPConfig, adaptive_noise_error
from .server import Server, ServerConfig
from .server_opt import SERVER_OPTS

log = logging.getLogger("fastseq.fed")

# Which engine runs the experiment is chosen above this package (fastseq.engines.run).
ENGINES = ("local", "flower", "flower-sim")
VALIDATION_SPLITS = ("clients", "pooled")
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")

# How a config value's annotation reads in an error message.
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "dict": "a table", "list[int]": "a list of integers", "list[str]": "a list of strings",
               "None": "null"}


def _has_type(value: Any, typ: str) -> bool:
    if typ == "bool":
        return isinstance(value, bool)
    if typ == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ == "str":
        return isinstance(value, str)
    if typ == "dict":
        return isinstance(value, dict)
    if typ.startswith("list"):
        return isinstance(value, (list, tuple))
    return typ == "None" and value is None


@dataclass
class ExperimentConfig:
    """Everything a run needs. The defaults are the embedded demo (MiniLM + SCL on bbc-news)."""

    model: str = "all-MiniLM-L6-v2"
    task: str = "bbc-news"
    data_path: str | None = None
    task_options: dict = field(default_factory=dict)
    max_examples: int | None = None
    eval_examples: int | None = None
    max_length: int | None = 64
    method: str = "scl"
    r: int = 64
    scl_scale: float = 1.0
    # SCL variant (SCLConfig.placement / train_compress / layers); LoRA's matched rank follows it
    scl_placement: str = "parallel"
    scl_train_compress: bool = False
    scl_layers: list[int] | None = None
    train_down_proj: bool = False
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    rounds: int = 10
    clients: int = 5
    clients_per_round: int = 3
    min_clients: int = 1
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    min_client_size: int = 8
    # A flwr-datasets partitioner class instead of `partition` (fastseq.fed.flwr_partition), e.g.
    # "DirichletPartitioner"; its other arguments in partitioner_options. None: fastseq's own.
    partitioner: str | None = None
    partitioner_options: dict = field(default_factory=dict)
    # Partition by this column of the data (a column of the hf task's dataset, e.g. a user id);
    # None: the task's key (its label or category).
    partition_by: str | None = None
    local_steps: int = 10
    local_epochs: float | None = None
    lr: float | None = None             # None: the method's own default (methods.default_lr), resolved at once
    head_lr: float | None = 1e-2        # the task head's lr (None: lr)
    scl_compress_lr: float | None = None  # SCL's C's lr (None: lr)
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    prox_mu: float = 0.0
    server_opt: str = "fedavg"
    server_lr: float | None = None
    server_momentum: float = 0.9
    codec: str = "none"
    block_size: int | None = None
    topk: float | int | None = None     # a fraction in (0, 1] or a count of values >= 1
    stochastic: bool = False
    error_feedback: bool = False
    downlink_codec: str = "none"
    # Robust aggregation (fastseq.fed.aggregators): mean | median | trimmed-mean | norm-clip
    aggregator: str = "mean"
    trim_fraction: float = 0.2          # trimmed-mean: drop floor(f * n) values at each end
    norm_bound: float | None = None     # norm-clip: each client's delta to L2 norm <= this
    # Simulated hostile clients (local engine only, fastseq.fed.attacks)
    byzantine: int = 0
    attack: str | None = None           # sign-flip | scale | noise | nan
    attack_scale: float = 10.0
    # Secure aggregation with Flower's SecAgg+ (engines flower / flower-sim only, fastseq.flower.secagg):
    # the server learns only the weighted mean of the sampled clients' deltas.
    secagg: bool = False
    secagg_shares: float = 1.0          # each client's key shares: this fraction of the round's clients
    secagg_threshold: float = 0.67      # shares needed to reconstruct a key: this fraction of the shares
    secagg_clip_range: float = 8.0      # each (weighted) delta value is clipped to +-this, then quantized
    # Client-level differential privacy (fastseq.fed.privacy, docs/privacy.md): none | central | local
    dp: str = "none"
    dp_clip: float | None = None        # L2 bound on each client's shared delta (adaptive: the initial one)
    dp_noise: float = 1.0               # noise multiplier z (the accountant's)
    dp_delta: float | None = None       # the delta of (epsilon, delta); None: 1 / clients
    dp_clipping: str = "fixed"          # fixed | adaptive (central only; Andrew et al. 2021)
    # adaptive clipping, named as Flower's DifferentialPrivacyServerSideAdaptiveClipping
    dp_target_clipped_quantile: float = 0.5
    dp_clip_norm_lr: float = 0.2
    dp_clipped_count_stddev: float | None = None  # None: clients_per_round / 20
    seed: int = 0
    engine: str = "local"
    # flower-sim: Ray resources of each virtual client (ClientApp actor); a GPU fraction such as
    # 0.25 puts four clients on one GPU. Ignored by the other engines.
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    device: str = "auto"
    dtype: str | None = None
    quantization: str = "none"
    # DeepSpeed client training, e.g. {"zero_stage": 2, "bf16": "auto", "offload_optimizer": false}
    # (see fastseq.fed.deepspeed_client.DeepSpeedConfig); None trains with plain PyTorch.
    deepspeed: dict | None = None
    eval_batch_size: int = 32
    # Model selection: hold out this fraction of each client's training examples ("clients") or
    # of the training set before partitioning ("pooled"); the union is scored every round as
    # val_<metric>. The test split is never used to choose anything.
    validation_fraction: float = 0.0
    validation_split: str = "clients"
    # Score the test split at round 0, every test_every rounds and at each of the last 3 rounds.
    test_every: int = 1
    # Personalised evaluation (fedsa-lora): how many clients' own states are scored each round; a
    # panel drawn once from the seed. None: all clients up to 20, else 20 (see fed.server).
    personal_eval_clients: int | None = None
    # lm-evaluation-harness in the server's evaluation (fastseq.data.harness): these lm-eval tasks
    # score the global model at round 0, every harness_every rounds and at the last round; empty:
    # off. Results: <out>/harness/round_<r>.json and harness/<task>/<metric> in metrics.jsonl.
    harness_tasks: list[str] = field(default_factory=list)
    harness_every: int = 1
    harness_limit: float | int | None = None  # documents per task: a count, or a fraction in (0, 1)
    out: str | None = None
    # tqdm progress bars: None shows them when stderr is a terminal (never in a log file)
    progress: bool | None = None
    # local engine: worker processes that train a round's clients in parallel on one shared
    # backbone (fastseq.fed.workers); None: auto (fastseq.fed.workers.resolve_workers)
    workers: int | None = None
    # how workers start: fork (after the backbone loaded; CPU), spawn (torch.multiprocessing: the
    # backbone's tensors are shared as handles, CUDA IPC on a GPU), auto: fork on a CPU, else spawn
    worker_start: str = "auto"
    # Heterogeneous fleet (fastseq.fed.fleet): tiers of clients with their own memory / uplink
    # budgets; each client plans its rank, quantization, checkpoint level, micro-batch and codec.
    # None: every client runs this config as it is.
    fleet: dict | None = None
    hetero_aggregation: str | None = None  # holders | zero-pad | hetlora | flexlora; None: the method's
    fleet_misfit: str = "refuse"           # a tier nothing fits: refuse the run, or drop its clients
    # Experiment trackers that get the config, every metrics row and the final adapter and curves
    # (fastseq.tracking): any of tensorboard, mlflow, wandb, trackio; [] (or "none"): only files.
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # "tensorboard,mlflow" (a flag) or "none"
            from ..tracking import parse_report_to

            self.report_to = parse_report_to(self.report_to)
        # lr None is the method's own default, resolved here so that config.json records the lr
        # the run used (an invalid method or placement is validate()'s to report)
        if self.lr is None:
            try:
                self.lr = default_lr(self.method, self.scl_placement, self.scl_train_compress)
            except (ConfigError, KeyError, TypeError):
                pass

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        bad = sorted(set(d) - set(cls.keys()))
        if bad:
            raise unknown_keys_error("config", bad, cls.keys())
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check_types(self) -> None:
        """Every field has its annotated type (a config file can hold anything) and every
        number is finite, so the checks below compare numbers with numbers."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            types = [t.strip() for t in str(f.type).split("|")]
            if not any(_has_type(value, t) for t in types):
                words = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
                raise ConfigError(f"{f.name} must be {words}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")

    def validate(self) -> None:
        from ..comm import CODECS

        self._check_types()

        def choice(key, valid):
            if getattr(self, key) not in valid:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not valid; valid values: {', '.join(map(str, valid))}")

        choice("method", list_methods())
        choice("partition", PARTITIONERS)
        choice("server_opt", SERVER_OPTS)
        choice("engine", ENGINES)
        choice("codec", list(CODECS))
        choice("downlink_codec", list(CODECS))
        try:
            from ..quant import QUANTIZATIONS
        except ImportError:
            QUANTIZATIONS = ("none",)
        choice("quantization", QUANTIZATIONS)
        choice("validation_split", VALIDATION_SPLITS)
        from ..config import PLACEMENTS

        choice("scl_placement", PLACEMENTS)
        if not isinstance(self.scl_train_compress, bool):
            raise ConfigError(f"scl_train_compress must be true or false, got {self.scl_train_compress!r}")
        if self.scl_layers is not None and (
                not isinstance(self.scl_layers, (list, tuple)) or not self.scl_layers
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.scl_layers)):
            raise ConfigError(f"scl_layers must be null or a non-empty list of layer indices >= 0, got {self.scl_layers!r}")
        for key in ("head_lr", "scl_compress_lr"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
                raise ConfigError(f"{key} must be null (same as lr) or a positive number, got {v!r}")
        v = self.validation_fraction
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 0.5:
            raise ConfigError(f"validation_fraction must be a number in [0, 0.5) (e.g. 0.1), got {v!r}")
        for key in ("rounds", "clients", "clients_per_round", "r", "batch_size", "grad_accum", "min_clients",
                    "eval_batch_size", "test_every"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {v!r}")
        if self.local_epochs is None and (not isinstance(self.local_steps, int) or self.local_steps < 1):
            raise ConfigError(f"local_steps must be an integer >= 1, got {self.local_steps!r}")
        if self.clients_per_round > self.clients:
            raise ConfigError(f"clients_per_round={self.clients_per_round} exceeds clients={self.clients}")
        if self.min_clients > self.clients_per_round:
            raise ConfigError(f"min_clients={self.min_clients} exceeds clients_per_round={self.clients_per_round}")
        for key in ("lr", "alpha"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{key} must be a positive number, got {v!r}")
        for key, low in (("prox_mu", 0), ("weight_decay", 0), ("seed", 0), ("min_client_size", 0),
                         ("classes_per_client", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key} must be >= {low}, got {getattr(self, key)!r}")
        v = self.personal_eval_clients
        if v is not None and v < 1:
            raise ConfigError(f"personal_eval_clients must be null (all clients up to 20, else a seeded panel of 20) "
                              f"or an integer >= 1 (how many clients' own states are scored each round), got {v!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ConfigError(f"workers must be null (auto) or an integer >= 1, got {self.workers!r}")
        if self.workers is not None and self.workers > 1 and self.deepspeed is not None:
            raise ConfigError("workers > 1 starts worker processes; a DeepSpeed client owns its devices: use "
                              "--workers 1 with --deepspeed")
        if self.worker_start not in ("auto", "fork", "spawn"):
            raise ConfigError(f"worker_start must be auto, fork or spawn, got {self.worker_start!r}")
        for key in ("max_length", "max_examples", "eval_examples", "lora_r", "block_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key} must be null (no limit / the default) or an integer >= 1, got {v!r}")
        for key in ("local_epochs", "lora_alpha", "max_grad_norm", "server_lr"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"{key} must be null (the default) or a positive number, got {v!r}")
        if not self.client_cpus > 0:
            raise ConfigError(f"client_cpus must be a positive number of CPUs per virtual client (e.g. 1 or 0.5), "
                              f"got {self.client_cpus!r}")
        if not self.client_gpus >= 0:
            raise ConfigError(f"client_gpus must be a GPU fraction >= 0 per virtual client (e.g. 0.25), "
                              f"got {self.client_gpus!r}")
        for key in ("lora_dropout", "server_momentum"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
        self._validate_robustness(choice)
        self._validate_harness()
        self._validate_fleet(choice)
        if self.dtype is not None:
            choice("dtype", DTYPES)
        if not DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"device={self.device!r} is not valid; valid values: auto, cpu, cuda, cuda:N (N = GPU index)"
                              ", mps")
        try:  # the uplink codec with its parameters, as every client will build it
            from ..comm import get_codec

            get_codec(self.codec, **self.train_config().codec_params())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"codec {self.codec!r} with block_size={self.block_size!r}, topk={self.topk!r}: {e}") from None
        if self.deepspeed is not None:
            from .deepspeed_client import DeepSpeedConfig

            if not isinstance(self.deepspeed, dict):
                raise ConfigError(f"deepspeed must be a table of DeepSpeedConfig keys, got {self.deepspeed!r}")
            DeepSpeedConfig.from_dict(self.deepspeed)  # raises a ConfigError naming the bad key
        self._validate_partitioner()
        from ..tracking import check_report_to

        check_report_to(self.report_to)
        if self.data_path is not None:
            from ..data.base import looks_like_hub_id

            p = os.path.expanduser(str(self.data_path))
            if not os.path.exists(p) and not looks_like_hub_id(p):
                raise ConfigError(f"data_path {self.data_path!r} (--data-path / --dataset) does not exist (and is not a hub "
                                  f"id 'owner/name')")

    def _validate_harness(self) -> None:
        if any(not isinstance(t, str) or not t.strip() for t in self.harness_tasks):
            raise ConfigError(f"harness_tasks must be a list of lm-eval task names, got {self.harness_tasks!r}")
        if isinstance(self.harness_every, bool) or self.harness_every < 1:
            raise ConfigError(f"harness_every must be an integer >= 1, got {self.harness_every!r}")
        if self.harness_limit is not None:
            from ..data.harness import check_limit

            check_limit(self.harness_limit)
        if self.harness_tasks and get_method(self.method).personalized:
            raise ConfigError(f"harness_tasks scores the global model in the server's evaluation; {self.method} "
                              f"scores each client's own model instead: leave out harness_tasks and score the "
                              f"run's global adapter with `fastseq eval`")

    def _validate_fleet(self, choice) -> None:
        from .fleet import MISFIT, parse_fleet
        from .hetero import RULES

        choice("fleet_misfit", MISFIT)
        if self.hetero_aggregation is not None:
            choice("hetero_aggregation", RULES)
        if self.fleet is None:
            if self.hetero_aggregation is not None:
                raise ConfigError("hetero_aggregation applies to a heterogeneous fleet; pass --fleet FILE too")
            return
        parse_fleet(self.fleet, self.r if self.method == "scl" else None)
        refuse = [(self.deepspeed is not None, "--deepspeed (a DeepSpeed client owns its devices and batch)"),
                  (self.secagg, "--secagg (masked sums need every client's update at one shape)"),
                  (self.dp == "central", "--dp central (its noise is calibrated to one update shape; use --dp local)"),
                  (self.method == "fedex-lora", "fedex-lora (its residual folds products at one rank)")]
        for bad, what in refuse:
            if bad:
                raise ConfigError(f"a heterogeneous fleet cannot be combined with {what}")

    def _validate_partitioner(self) -> None:
        if self.partitioner is None:
            if self.partitioner_options:
                raise ConfigError(f"partitioner_options {self.partitioner_options} set but no partitioner; add "
                                  f"--partitioner NAME (a flwr-datasets partitioner) or leave them out")
            return
        from .flwr_partition import check_partitioner

        check_partitioner(self.partitioner, self.partitioner_options, key=self.partition_by or "key",
                          clients=self.clients, alpha=self.alpha, seed=self.seed,
                          classes_per_client=self.classes_per_client, min_client_size=self.min_client_size)

    def _validate_robustness(self, choice) -> None:
        choice("aggregator", AGGREGATORS)
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5) (e.g. 0.2), got {self.trim_fraction!r}")
        n = self.clients_per_round
        if self.aggregator == "trimmed-mean" and trim_count(self.trim_fraction, n) == 0:
            need = math.ceil(100 / n) / 100
            fix = (f"pass --trim-fraction {need} or more" if need < 0.5
                   else "trimmed-mean needs --clients-per-round 3 or more")
            raise ConfigError(f"trim_fraction={self.trim_fraction} trims no client of clients_per_round={n}; {fix}")
        if self.norm_bound is not None and not self.norm_bound > 0:
            raise ConfigError(f"norm_bound must be a positive number, got {self.norm_bound!r}")
        if self.aggregator == "norm-clip" and self.norm_bound is None:
            raise ConfigError("aggregator norm-clip needs --norm-bound B (the L2 bound on each client's delta)")
        if self.aggregator != "norm-clip" and self.norm_bound is not None:
            raise ConfigError(f"norm_bound is used only by --aggregator norm-clip (aggregator is {self.aggregator!r})")
        if self.byzantine < 0:
            raise ConfigError(f"byzantine must be an integer >= 0, got {self.byzantine!r}")
        if self.byzantine > n:
            raise ConfigError(f"byzantine={self.byzantine} exceeds clients_per_round={n}")
        if self.attack is not None:
            choice("attack", ATTACKS)
        if self.byzantine > 0 and self.attack is None:
            raise ConfigError(f"byzantine={self.byzantine} needs --attack (one of {', '.join(ATTACKS)})")
        if self.byzantine == 0 and self.attack is not None:
            raise ConfigError(f"attack={self.attack!r} needs --byzantine K (K > 0 hostile clients per round)")
        if not self.attack_scale > 0:
            raise ConfigError(f"attack_scale must be a positive number, got {self.attack_scale!r}")
        if self.byzantine > 0 and self.engine != "local":
            raise ConfigError("byzantine clients are simulated by the local engine only; use --engine local "
                              "(or --byzantine 0)")
        self._validate_secagg()
        self._validate_dp(choice)

    def _validate_dp(self, choice) -> None:
        choice("dp", DP_MODES)
        choice("dp_clipping", DP_CLIPPING)
        if self.dp == "none":
            # a DP setting without --dp would silently do nothing
            given = [k for k in ("dp_clip", "dp_delta", "dp_clipped_count_stddev") if getattr(self, k) is not None]
            given += [k for k in ("dp_noise", "dp_clipping", "dp_target_clipped_quantile", "dp_clip_norm_lr")
                      if getattr(self, k) != getattr(ExperimentConfig, k)]
            if given:
                raise ConfigError(f"{', '.join(given)} set but dp is 'none'; add --dp central or --dp local "
                                  "(or leave them out)")
            return
        if self.dp_clip is not None and not self.dp_clip > 0:
            raise ConfigError(f"dp_clip must be a positive number (the L2 bound on each client's delta), got "
                              f"{self.dp_clip!r}")
        if self.dp_clip is None and self.dp_clipping == "fixed":
            raise ConfigError(f"--dp {self.dp} needs --dp-clip C, the L2 bound on each client's shared delta (pick C "
                              "near the median of update_norms in metrics.jsonl of a run without DP), or "
                              "--dp-clipping adaptive")
        if not self.dp_noise >= 0:
            raise ConfigError(f"dp_noise must be a number >= 0 (the noise multiplier; 0 clips only and gives no "
                              f"privacy), got {self.dp_noise!r}")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1) (e.g. 1e-5; default 1/clients), got {self.dp_delta!r}")
        if self.dp == "local":
            if self.dp_clipping == "adaptive":
                raise ConfigError("--dp-clipping adaptive needs the server to count the clipped updates, which "
                                  "local DP never shows it; use --dp-clipping fixed with --dp local, or --dp central")
        else:
            if self.aggregator != "mean":
                raise ConfigError(f"--dp central adds noise calibrated to the sensitivity of the mean (clip / n); "
                                  f"aggregator {self.aggregator!r} has another sensitivity"
                                  + (" (its clipping is DP's own clipping: --dp-clip)" if self.aggregator == "norm-clip"
                                     else " (one client can move a coordinate-wise median by up to the clip)")
                                  + ", so the epsilon would not hold; use --aggregator mean, or --dp local (noise "
                                    "added by each client, any aggregator is then post-processing)")
            if self.method == "fedex-lora":
                raise ConfigError("--dp central cannot cover fedex-lora: its folded residual s*(mean(B_k A_k) - "
                                  "B_mean A_mean) is built from each client's un-noised factors and its sensitivity "
                                  "is not bounded by --dp-clip; use --dp local (the server then only sees noised "
                                  "factors) or another method")
        if not 0 <= self.dp_target_clipped_quantile <= 1:
            raise ConfigError(f"dp_target_clipped_quantile must be in [0, 1] (the fraction of updates to clip), got "
                              f"{self.dp_target_clipped_quantile!r}")
        if not self.dp_clip_norm_lr > 0:
            raise ConfigError(f"dp_clip_norm_lr must be a positive number (e.g. 0.2), got {self.dp_clip_norm_lr!r}")
        if self.dp_clipped_count_stddev is not None and not self.dp_clipped_count_stddev > 0:
            raise ConfigError(f"dp_clipped_count_stddev must be null (clients_per_round / 20) or a positive number, "
                              f"got {self.dp_clipped_count_stddev!r}")
        if self.dp_clipping == "adaptive" and self.dp_noise > 0:
            sb = self.dp_config().count_stddev(self.clients_per_round)
            if not self.dp_noise < 2 * sb:
                raise ConfigError(adaptive_noise_error(self.dp_noise, sb, self.clients_per_round))

    def dp_config(self) -> DPConfig:
        return DPConfig(mode=self.dp, clip=self.dp_clip, noise=self.dp_noise, delta=self.dp_delta,
                        clipping=self.dp_clipping, target_clipped_quantile=self.dp_target_clipped_quantile,
                        clip_norm_lr=self.dp_clip_norm_lr, clipped_count_stddev=self.dp_clipped_count_stddev)

    def _validate_secagg(self) -> None:
        """SecAgg+ reveals only the weighted sum of dense float deltas: everything that needs one
        client's update (robust aggregators, FedEx-LoRA's products, lossy codecs with per-client
        scales or indices) cannot run under it."""
        for key in ("secagg_shares", "secagg_threshold"):
            v = getattr(self, key)
            if not 0 < v <= 1:
                raise ConfigError(f"{key} must be a fraction in (0, 1], got {v!r}")
        if not self.secagg_clip_range > 0:
            raise ConfigError(f"secagg_clip_range must be a positive number, got {self.secagg_clip_range!r}")
        if not self.secagg:
            return
        if self.clients_per_round < 3:
            raise ConfigError(f"secure aggregation needs --clients-per-round 3 or more (got {self.clients_per_round}): "
                              "with 2, each client can subtract its own update from the new global state and "
                              "learn the other's")
        if self.codec != "none" or self.error_feedback:
            raise ConfigError(f"secure aggregation sums dense deltas under its own quantization; codec "
                              f"{self.codec!r}{' with error feedback' if self.error_feedback else ''} cannot be summed "
                              "under masks (per-client scales or indices): use --codec none")
        if self.aggregator != "mean":
            raise ConfigError(f"aggregator {self.aggregator!r} needs each client's update, which secure aggregation "
                              "hides from the server: use --aggregator mean with --secagg")
        if self.method == "fedex-lora":
            raise ConfigError("fedex-lora needs each client's B_i A_i product, which secure aggregation hides from "
                              "the server: use ffa-lora, fedavg-lora, fedsa-lora or scl with --secagg")
        if self.dp == "central":
            raise ConfigError("--dp central clips each client's delta at the server, which secure aggregation hides "
                              "from it: use --dp local with --secagg (each client clips and noises its own delta)")

    def train_config(self) -> TrainConfig:
        return TrainConfig(local_steps=self.local_steps, local_epochs=self.local_epochs, lr=self.lr,
                           head_lr=self.head_lr, compress_lr=self.scl_compress_lr, batch_size=self.batch_size, grad_accum=self.grad_accum, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, prox_mu=self.prox_mu, codec=self.codec,
                           block_size=self.block_size, topk=self.topk, stochastic=self.stochastic,
                           error_feedback=self.error_feedback, seed=self.seed, eval_batch_size=self.eval_batch_size,
                           downlink_codec=self.downlink_codec, dp=self.dp_config())

    def server_config(self) -> ServerConfig:
        return ServerConfig(num_clients=self.clients, clients_per_round=self.clients_per_round, seed=self.seed,
                            min_clients=self.min_clients, server_opt=self.server_opt, server_lr=self.server_lr,
                            server_momentum=self.server_momentum, downlink_codec=self.downlink_codec,
                            aggregator=self.aggregator, trim_fraction=self.trim_fraction,
                            norm_bound=self.norm_bound, personal_eval_clients=self.personal_eval_clients,
                            dp=self.dp_config())


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML, YAML or JSON file -> dict (a ``[run]`` / ``run:`` table is unwrapped if present).
    A missing, unreadable, empty or malformed file raises a ConfigError that says so."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is a directory; pass a .toml, .yaml/.yml or .json file")
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {str(p)!r}: use a .toml, .yaml/.yml or .json file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text; save it as UTF-8 {suffix[1:].upper()}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}; check its permissions") from None
    if suffix == ".toml":
        import tomllib

        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
    else:
        try:
            d = json.loads(text) if text.strip() else None
        except ValueError as e:
            raise ConfigError(f"{p}: invalid JSON: {e}") from None
    if d is None or d == {}:
        raise ConfigError(f"config file {p} is empty; write settings in it (e.g. model = \"tiny-llama\") or leave "
                          f"out --config")
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: the top level must be a table of keys")
    if set(d) == {"run"} and isinstance(d["run"], dict):
        d = d["run"]
    return d


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a
    device this machine lacks raises a ConfigError that says what to use instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_RE.fullmatch(str(name)):
        raise ConfigError(f"device={name!r} is not valid; valid values: auto, cpu, cuda, cuda:N (N = GPU index), mps")
    dev = torch.device(name)
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ConfigError(f"device={name!r} but this torch ({torch.__version__}) is a CPU-only build; use "
                              f"--device cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name!r} but torch sees no CUDA GPU (driver, CUDA_VISIBLE_DEVICES?); use "
                              f"--device cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device={name!r} but this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}; "
                              f"pass one of them, cuda or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS (Apple GPU) is not available here; use --device cpu (or auto)")
    return dev


@dataclass
class Runtime:
    """What every client and the server share in one process: ONE frozen backbone."""

    cfg: ExperimentConfig
    model: torch.nn.Module
    processor: Any
    task: Any
    data: Any
    method: Method
    device: torch.device
    parts: list[list[int]]
    initial_local: dict[str, torch.Tensor]
    initial_global: dict[str, torch.Tensor]
    eval_examples: list[dict]
    val_examples: list[dict] = field(default_factory=list)
    # each client's held-out training indices (validation_split="clients"), for its own validation
    val_parts: list[list[int]] | None = None
    _own: dict[str, tuple[list[dict], list[dict]]] = field(default_factory=dict, repr=False)
    # (which, examples, state, round) -> metrics or None: the local engine's workers score the
    # server's evaluation in parallel (fastseq.fed.rounds.RoundRunner.score_in_workers)
    scorer: Callable | None = field(default=None, repr=False)
    # cfg.harness_tasks resolved and built (fastseq.data.harness.HarnessScorer), None: off
    harness: Any = field(default=None, repr=False)
    # a heterogeneous fleet (plan_fleet_run): each client's plan, tier and the backbone per quantization
    plans: dict | None = None
    tiers_of: dict | None = None
    hetero_rule: str | None = None
    backbones: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        # A spawned worker gets the runtime pickled (fastseq.fed.workers): the engine's scorer
        # (which holds the worker pool) and the harness (the server's alone) stay here.
        return {**self.__dict__, "scorer": None, "harness": None}

    def evaluate(self, round: int | None = None, client: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Score the model as it is now: ``val_<metric>`` on the validation examples, and the
        test metrics when ``round`` is a test round (None: always).

        With ``client`` (a personalised model), on that client's own distribution, as
        FedSA-LoRA's authors evaluate: its own held-out examples and its own test split
        (:func:`client_test_indices`); the global test set's score is reported beside it as
        ``global_<metric>``. ``state``: what the model holds now (the server's evaluation), so
        that ``scorer`` can score it elsewhere."""
        out: dict[str, Any] = {}
        val, test = self.own_examples(client) if client is not None else (self.val_examples, self.eval_examples)
        if val:
            ev = self._score("val", val, state, round)
            out.update({f"val_{k}": v for k, v in ev.items()})
        if round is None or is_test_round(self.cfg, round):
            out.update(self._score("test", test, state, round))
            if client is not None:
                ev = self._score("test", self.eval_examples, None, round)
                out.update({f"global_{k}": v for k, v in ev.items()})
        return out

    def _score(self, which: str, examples: list[dict], state, round) -> dict[str, Any]:
        if state is not None and self.scorer is not None:
            ev = self.scorer(which, examples, state, round)
            if ev is not None:
                return ev
        return self.task.evaluate(self.model, examples, self.processor, batch_size=self.cfg.eval_batch_size)

    def own_examples(self, client: str) -> tuple[list[dict], list[dict]]:
        """(validation, test) examples of ``client``'s own distribution: its held-out training
        examples (the pooled validation set when the split is pooled) and its own test split (the
        global test set when the task gives no test keys or the test set has none of the
        client's)."""
        if client not in self._own:
            cid = int(client)
            val = ([self.data.train[i] for i in self.val_parts[cid]] if self.val_parts is not None
                   else self.val_examples)
            test_keys = self.data.test_partition_keys
            if test_keys is None:
                test = self.eval_examples
            else:
                keys = self.data.partition_keys
                part = self.parts[cid] + (self.val_parts[cid] if self.val_parts is not None else [])
                n_train = sum(len(p) for p in self.parts) + sum(len(p) for p in self.val_parts or [])
                n = max(1, round(len(self.eval_examples) * len(part) / n_train))
                idx = client_test_indices([keys[i] for i in part], test_keys[:len(self.eval_examples)], n,
                                          derive_seed(self.cfg.seed, "client-test", cid))
                # none of its keys in the test set: the global test set is all there is to score it on
                test = [self.eval_examples[i] for i in idx] or self.eval_examples
            self._own[client] = (val, test)
        return self._own[client]


def client_test_indices(client_keys: list, test_keys: list, n: int, seed: int) -> list[int]:
    """A client's own test split: about ``n`` test indices drawn without replacement (seeded)
    with the key proportions of the client's training examples among the keys the test set has
    (largest-remainder rounding; a key with fewer test examples than its share gives all it
    has). Empty only when the test set has none of the client's keys."""
    import random
    from collections import Counter

    by_key: dict[Any, list[int]] = {}
    for i, k in enumerate(test_keys):
        by_key.setdefault(k, []).append(i)
    counts = Counter(k for k in client_keys if k in by_key)
    total = sum(counts.values())
    if total == 0:
        return []
    keys = sorted(counts, key=str)
    exact = {k: n * counts[k] / total for k in keys}
    take = {k: int(exact[k]) for k in keys}
    for k in sorted(keys, key=lambda k: exact[k] - take[k], reverse=True)[:n - sum(take.values())]:
        take[k] += 1
    rng = random.Random(seed)
    picked: list[int] = []
    for k in keys:
        pool = by_key.get(k, [])
        picked += rng.sample(pool, min(take[k], len(pool)))
    return sorted(picked)


def is_test_round(cfg: ExperimentConfig, round: int) -> bool:
    """Round 0, every ``test_every`` rounds and each of the last 3 rounds (a study's report)."""
    return round % cfg.test_every == 0 or round > cfg.rounds - 3


def is_harness_round(cfg: ExperimentConfig, round: int) -> bool:
    """Round 0 (the base model), every ``harness_every`` rounds and the last round."""
    return bool(cfg.harness_tasks) and (round % cfg.harness_every == 0 or round == cfg.rounds)


def split_validation(cfg: ExperimentConfig, n_train: int, parts: list[list[int]] | None
                     ) -> tuple[list[int], list[list[int]] | None]:
    """``(validation indices, parts without them)``: a seeded ``validation_fraction`` of each
    client's part ("clients"; at least one example per client, at least one left to train on),
    or of the whole training set before partitioning ("pooled", ``parts`` None)."""
    import random

    rng = random.Random(derive_seed(cfg.seed, "validation"))
    frac = cfg.validation_fraction
    if parts is None:
        idx = list(range(n_train))
        rng.shuffle(idx)
        k = max(1, round(frac * n_train))
        return sorted(idx[:k]), None
    val, kept = [], []
    for part in parts:
        if len(part) < 2:
            raise ConfigError(f"validation_fraction={frac}: a client has {len(part)} example(s), too few to hold "
                              "any out; raise min_client_size or use validation_split='pooled'")
        shuffled = list(part)
        rng.shuffle(shuffled)
        k = min(len(part) - 1, max(1, round(frac * len(part))))
        val += shuffled[:k]
        kept.append(sorted(shuffled[k:]))
    return sorted(val), kept


def make_task(cfg: ExperimentConfig):
    from ..data import get_task, task_options

    opts = dict(cfg.task_options)
    if cfg.max_length is not None and "max_length" not in opts and "max_length" in task_options(cfg.task):
        opts["max_length"] = cfg.max_length
    return get_task(cfg.task, **opts)


def make_method(cfg: ExperimentConfig) -> Method:
    """The run's method, not yet injected (``method.prepare(model, heads, cfg.seed)`` does that,
    deterministically from the seed: `fastseq eval` rebuilds a round's model this way)."""
    return get_method(cfg.method, r=cfg.r, scl_scale=cfg.scl_scale, train_down_proj=cfg.train_down_proj,
                      scl_placement=cfg.scl_placement, scl_train_compress=cfg.scl_train_compress,
                      scl_layers=cfg.scl_layers, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout)


def check_environment(cfg: ExperimentConfig):
    """What can be checked before loading data or a model: the config, the device, the model
    source, bitsandbytes for a quantized backbone and the task. Returns ``(task, device)``."""
    from ..models import check_model_source

    cfg.validate()
    if cfg.dp != "none":
        from .privacy import check_accountant

        check_accountant()
    device = resolve_device(cfg.device)
    if cfg.workers is not None and cfg.workers > 1 and cfg.engine == "local" and device.type != "cpu":
        if device.type != "cuda":
            raise ConfigError(f"--workers {cfg.workers} shares the backbone with worker processes on a CPU or a CUDA "
                              f"GPU only, not on {device.type}; use --workers 1")
        if cfg.worker_start == "fork":
            raise ConfigError(f"--worker-start fork on {device.type}: a CUDA context cannot be forked; use "
                              f"--worker-start spawn (or auto), or --device cpu")
    check_model_source(cfg.model)
    from ..tracking import check_installed

    check_installed(cfg.report_to)
    if cfg.quantization != "none":
        from ..quant import check_device

        check_device(cfg.quantization, device)
    return make_task(cfg), device


def load_backbone(cfg: ExperimentConfig, task, data, device: torch.device, quantization: str):
    """(model, processor, method): the backbone loaded with ``quantization`` and the method's
    adapter injected (deterministically from the run's seed), in eval mode on ``device``."""
    from ..models import load_model

    torch.manual_seed(cfg.seed)
    model, processor = load_model(cfg.model, task.model_kind, num_labels=data.num_labels,
                                  dtype=cfg.dtype, quantization=quantization, processor=task.processor_use,
                                  # a quantized backbone is placed by bitsandbytes, on the run's device
                                  device=device if quantization != "none" else None)
    heads = task.head_modules_for(model)
    method = make_method(cfg)
    model = method.prepare(model, heads, cfg.seed)
    if quantization == "none":
        model.to(device)
    model.eval()
    return model, processor, method


def build_runtime(cfg: ExperimentConfig, echo=print, plans: dict | None = None) -> Runtime:
    """The run's runtime: task data, partition, backbone(s) and method. ``plans``: a fleet's client
    plans made elsewhere (each Flower SuperNode plans itself), instead of planning from
    ``cfg.fleet`` here."""
    task, device = check_environment(cfg)
    harness = _harness_scorer(cfg, task)
    data = task.load(data_path=cfg.data_path, seed=cfg.seed, max_examples=cfg.max_examples)
    data = data.keyed_by(cfg.partition_by)  # a DataError naming the columns there are
    model, processor, method = load_backbone(cfg, task, data, device, cfg.quantization)
    val_idx: list[int] = []
    keys = list(data.partition_keys)
    pool = list(range(len(keys)))  # training indices the partitioner sees
    if cfg.validation_fraction > 0 and cfg.validation_split == "pooled":
        val_idx, _ = split_validation(cfg, len(keys), None)
        held = set(val_idx)
        pool = [i for i in pool if i not in held]
    sub = make_partition(cfg, [keys[i] for i in pool])
    parts = [[pool[i] for i in part] for part in sub]
    val_parts = None
    if cfg.validation_fraction > 0 and cfg.validation_split == "clients":
        held_parts = parts
        val_idx, parts = split_validation(cfg, len(keys), parts)
        val_parts = [sorted(set(held) - set(kept)) for held, kept in zip(held_parts, parts)]
    echo(f"partition: {partition_label(cfg)}, {cfg.clients} clients, per-client key histogram"
         + (f" (key: column {cfg.partition_by!r})" if cfg.partition_by else "") + ":")
    # with 1,000 clients: 40 rows and the sizes of the rest, not 1,000 lines (and, with a column
    # of many values such as user ids, the sizes and key counts, not a column per value)
    echo(format_histogram(data.partition_keys, parts, data.label_names, max_rows=40,
                          max_keys=24 if cfg.partition_by else None))
    info = method.info
    echo(f"method {cfg.method}: trainable {info['trainable_params']:,} of {info['total_params']:,} params, "
         f"shared {info['shared_params']:,}, local {info['local_params']:,}"
         + (f"; LoRA budget: {info['lora_budget']}" if "lora_budget" in info else ""))
    eval_examples = list(data.test)
    if cfg.eval_examples is not None:
        eval_examples = eval_examples[:cfg.eval_examples]
    val_examples = [data.train[i] for i in val_idx]
    if val_examples:
        echo(f"validation: {len(val_examples)} training examples held out ({cfg.validation_split}); "
             f"test: {len(eval_examples)} examples")
    rt = Runtime(cfg, model, processor, task, data, method, device, parts, method.local_state(),
                 method.global_state(), eval_examples, val_examples, val_parts, harness=harness)
    if cfg.fleet is not None:
        plan_fleet_run(cfg, rt, echo, plans)
    return rt


def plan_inputs(cfg: ExperimentConfig, rt: Runtime):
    """What each client of a fleet plans with (:class:`.fleet.PlanInputs`): this run's model,
    batch and codec, and the exact size of its encoded update at any rank and codec."""
    from ..comm import encode, get_codec
    from .fleet import PlanInputs
    from .hetero import trimmed_shapes

    method, model = rt.method, rt.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shapes = {n: tuple(rt.initial_global[n].shape) for n in method.shared_names()}
    axes = method.rank_axes()
    full = method.adapter_rank
    params = cfg.train_config().codec_params()

    def update_bytes(rank: int, codec: str) -> int:
        zeros = {n: torch.zeros(s) for n, s in trimmed_shapes(shapes, axes, rank).items()}
        return len(encode(zeros, get_codec(codec, **params), round=1, client_id=str(cfg.clients - 1),
                          method=method.name, example_count=1,
                          # a loss of as many digits as a real one: the header is the real one's size
                          extra={"train_loss": 0.12345678901234568, "steps": cfg.local_steps}))

    try:
        from ..quant import QUANTIZATIONS
    except ImportError:
        QUANTIZATIONS = ("none",)
    quants = []
    for q in QUANTIZATIONS:  # what bitsandbytes can run on this device
        try:
            from ..quant import check_device

            check_device(q, rt.device)
            quants.append(q)
        except Exception:
            pass
    # The memory model is SCL's: a LoRA method is planned as the SCL of the same fraction of its rank.
    return PlanInputs(model=base, r=full, placement=cfg.scl_placement, train_compress=cfg.scl_train_compress,
                      batch_size=cfg.batch_size * cfg.grad_accum, seq_len=cfg.max_length or 512,
                      run_quantization=cfg.quantization, run_checkpoint_level=method.checkpoint_level,
                      run_codec=cfg.codec, run_device=rt.device.type, quantizations=quants or ["none"],
                      update_bytes=update_bytes, num_labels=rt.data.num_labels,
                      scl_r_of=(None if method.name == "scl" else (lambda k: max(1, round(cfg.r * k / full)))))


def plan_fleet_run(cfg: ExperimentConfig, rt: Runtime, echo=print, plans: dict | None = None) -> None:
    """Every client of ``cfg.fleet`` plans itself (:mod:`.fleet`; ``plans``: planned elsewhere);
    a tier nothing fits refuses the run (or, with ``fleet_misfit = "drop"``, leaves its clients
    out). Sets ``rt.plans`` and loads one more backbone for each other quantization the plans chose."""
    from .fleet import FleetMisfit, assign_tiers, fleet_table, load_fleet, plan_fleet
    from .hetero import check_rule, default_rule

    fleet = load_fleet(cfg.fleet, rt.method.adapter_rank)
    if cfg.hetero_aggregation is not None:
        check_rule(rt.method, cfg.hetero_aggregation)
    if plans is None:
        plans = plan_fleet(fleet, assign_tiers(fleet, cfg.clients, cfg.seed), plan_inputs(cfg, rt))
    tiers_of = {c: p.tier for c, p in plans.items()}
    rule = cfg.hetero_aggregation or default_rule(rt.method)
    echo(f"fleet: {len(set(tiers_of.values()))} tiers, rank ladder {fleet.ladder(rt.method.adapter_rank)}, "
         f"aggregation {rule}:\n{fleet_table(plans)}")
    misfits = {c: p for c, p in plans.items() if not p.fits}
    if misfits:
        reasons = sorted({p.reason for p in misfits.values()})
        if cfg.fleet_misfit == "refuse":
            raise FleetMisfit(f"{'; '.join(reasons)}; give the tier more memory or uplink, lower the run's batch "
                              f"size / max_length, add a smaller rank to rank_ladder, or pass --fleet-misfit drop "
                              f"to leave its clients out")
        echo(f"fleet: leaving out clients {', '.join(misfits)}: {'; '.join(reasons)}")
        eligible = len(plans) - len(misfits)
        if eligible < cfg.clients_per_round:
            raise ConfigError(f"only {eligible} clients fit their tiers, fewer than clients_per_round="
                              f"{cfg.clients_per_round}; lower --clients-per-round or fix the fleet")
    ranks = {p.rank for p in plans.values() if p.fits}
    if len(ranks) > 1:
        check_rule(rt.method, rule)
    rt.plans, rt.tiers_of = plans, tiers_of
    rt.hetero_rule = rule
    rt.backbones = {cfg.quantization: rt}
    for q in sorted({p.quantization for p in plans.values() if p.fits} - {cfg.quantization}):
        backbone_for(cfg, rt, q, echo)


def backbone_for(cfg: ExperimentConfig, rt: Runtime, quantization: str, echo=print) -> Runtime:
    """The runtime of the backbone loaded with ``quantization`` (loaded now if it is not yet)."""
    if quantization not in rt.backbones:
        model, processor, method = load_backbone(cfg, rt.task, rt.data, rt.device, quantization)
        rt.backbones[quantization] = dataclasses.replace(rt, model=model, processor=processor, method=method,
                                                         backbones={})
        echo(f"fleet: loaded one more backbone, {quantization}, for the tiers that chose it")
    return rt.backbones[quantization]


def plan_node_client(cfg: ExperimentConfig, rt: Runtime, client_id: str, tier, echo=print):
    """A client that plans itself for its own budgets (a Flower SuperNode's node config): its
    plan replaces the fleet tier's in ``rt.plans``; returns it."""
    from .fleet import load_fleet, plan_tier

    fleet = load_fleet(cfg.fleet, rt.method.adapter_rank)
    plan = plan_tier(tier, fleet.ladder(rt.method.adapter_rank), plan_inputs(cfg, rt))
    rt.plans = {**(rt.plans or {}), client_id: plan}
    if plan.fits:
        backbone_for(cfg, rt, plan.quantization, echo)
    return plan


def make_partition(cfg: ExperimentConfig, keys: list) -> list[list[int]]:
    """Indices into ``keys`` per client: fastseq's own ``partition`` or, with ``partitioner``,
    flwr-datasets' class of that name (:mod:`.flwr_partition`)."""
    if cfg.partitioner is None:
        return partition(keys, cfg.clients, cfg.partition, alpha=cfg.alpha, classes_per_client=cfg.classes_per_client,
                         seed=cfg.seed, min_size=cfg.min_client_size)
    from .flwr_partition import flwr_partition

    return flwr_partition(keys, cfg.clients, cfg.partitioner, cfg.partitioner_options, key=cfg.partition_by or "key",
                          alpha=cfg.alpha, seed=cfg.seed, classes_per_client=cfg.classes_per_client,
                          min_client_size=cfg.min_client_size)


def partition_label(cfg: ExperimentConfig) -> str:
    if cfg.partitioner is not None:
        shown = ({"alpha": cfg.alpha} if "Dirichlet" in cfg.partitioner and "alpha" not in cfg.partitioner_options
                 else {})
        opts = ", ".join(f"{k}={v!r}" for k, v in {**shown, **cfg.partitioner_options}.items())
        return f"flwr-datasets {cfg.partitioner}" + (f" ({opts})" if opts else "")
    return cfg.partition + (f" (alpha={cfg.alpha})" if cfg.partition == "dirichlet" else "")


def _harness_scorer(cfg: ExperimentConfig, task):
    """cfg.harness_tasks checked and built (lm-eval installed, the names known, their documents
    loaded) before any data or model is loaded; None when off."""
    if not cfg.harness_tasks:
        return None
    from ..data.harness import HarnessScorer

    if task.model_kind != "causal-lm":
        raise ConfigError(f"harness_tasks: lm-eval scores causal language models; task {cfg.task!r} trains a "
                          f"{task.model_kind} model")
    return HarnessScorer(cfg.harness_tasks, limit=cfg.harness_limit, batch_size=cfg.eval_batch_size)


def harness_evaluate(rt: Runtime, round: int) -> dict[str, Any]:
    """The model as it is now scored by lm-eval on cfg.harness_tasks: written to
    ``<out>/harness/round_<round>.json`` (what ``fastseq eval`` writes) and returned as
    ``harness/<task>/<metric>`` metrics with ``harness_seconds``."""
    from ..data.harness import flat_metrics, timed_score, write_results

    res, seconds = timed_score(rt.harness, rt.model, rt.processor)
    if rt.cfg.out is not None:
        write_results(rt.cfg.out, round, res, {"method": rt.cfg.method, "model": rt.cfg.model,
                                               "source": "server evaluation"}, rt.harness, seconds)
    return {**flat_metrics(res), "harness_seconds": seconds}


def make_evaluator(rt: Runtime):
    """The server's evaluator: the global state (with the initial local state) on the
    validation examples every round and on the test split in test rounds."""
    def evaluate(state: dict[str, torch.Tensor], round: int | None = None) -> dict[str, Any]:
        rt.method.load(state)
        rt.method.load(rt.initial_local)
        out = rt.evaluate(round, state={**state, **rt.initial_local})
        if rt.harness is not None and round is not None and is_harness_round(rt.cfg, round):
            out.update(harness_evaluate(rt, round))  # lm-eval on the model as loaded above
        return out
    return evaluate


def build_server(cfg: ExperimentConfig, rt: Runtime, logger=None, state_dir: str | os.PathLike | None = None) -> Server:
    """``state_dir``: where the server keeps per-client state on disk (see :class:`.server.Server`)."""
    scfg = cfg.server_config()
    if rt.plans:
        fits = {c: p for c, p in rt.plans.items() if p.fits}
        scfg = dataclasses.replace(scfg, ranks={c: p.rank for c, p in fits.items()}, hetero_rule=rt.hetero_rule,
                                   excluded=tuple(c for c in rt.plans if c not in fits))
    return Server(rt.method, rt.initial_global, scfg, evaluator=make_evaluator(rt), logger=logger,
                  state_dir=state_dir)


def build_client(cfg: ExperimentConfig, rt: Runtime, client_id: str, state_dir: str | os.PathLike | None = None) -> Client:
    examples = [rt.data.train[i] for i in rt.parts[int(client_id)]]
    if cfg.deepspeed is not None:
        from .deepspeed_client import DeepSpeedClient, DeepSpeedConfig

        return DeepSpeedClient(str(client_id), rt, examples, cfg.train_config(), state_dir,
                               deepspeed=DeepSpeedConfig.from_dict(cfg.deepspeed))
    plan = rt.plans.get(str(client_id)) if rt.plans else None
    if plan is None:
        return Client(str(client_id), rt, examples, cfg.train_config(), state_dir)
    # a fleet client: its own micro-batch (the effective batch kept), codec and backbone
    train = dataclasses.replace(cfg.train_config(), batch_size=plan.micro_batch, grad_accum=plan.grad_accum,
                                codec=plan.codec)
    return Client(str(client_id), rt.backbones.get(plan.quantization, rt), examples, train, state_dir, plan=plan)


def tier_clients(cfg: ExperimentConfig, rt: Runtime) -> dict[str, Client]:
    """A fleet run's first client of each tier, by tier name (in the fleet's order)."""
    first: dict[str, str] = {}
    for cid, tier in rt.tiers_of.items():
        first.setdefault(tier, cid)
    return {tier: build_client(cfg, rt, cid) for tier, cid in first.items()}


def default_out(cfg: ExperimentConfig) -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.method}")
