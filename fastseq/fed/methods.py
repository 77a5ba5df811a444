"""Federated fine-tuning methods: what is trainable, shared (uploaded and aggregated) and
local (persisted per client), and how the server aggregates.

A method is bound to one prepared model (``prepare``); every state is a plain
``dict[str, Tensor]`` keyed by parameter name (or by a method-specific extra name such as
FedEx-LoRA's folded residual). Register a new method with ``@register_method("name")``.
"""

from __future__ import annotations

import abc
import logging
import os
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..adapters import adapters_of, count_parameters, find_ffn_sites, get_scl_model, save_adapter, set_adapter
from ..config import ConfigError, SCLConfig

log = logging.getLogger("fastseq.fed")

_METHODS: dict[str, type["Method"]] = {}


def register_method(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def default_lr(name: str, scl_placement: str = "parallel", scl_train_compress: bool = False) -> float:
    """The lr a run of method ``name`` uses when none is given (see ``Method.default_lr``)."""
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    return _METHODS[name].lr_for(scl_placement, scl_train_compress)


def default_lrs_text() -> str:
    """The per-method default lrs in words (``fastseq run --help``)."""
    parts = []
    for name in list_methods():
        cls = _METHODS[name]
        if issubclass(cls, SCLMethod):
            v = SCLMethod.VARIANT_LRS
            parts.append(f"{name} {v[('parallel', False)]:g} (C frozen; {v[('parallel', True)]:g} parallel / "
                         f"{v[('residual', True)]:g} residual with C trained)")
        else:
            parts.append(f"{name} {cls.default_lr:g}")
    return ", ".join(parts)


def get_method(name: str, **options: Any) -> "Method":
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    return _METHODS[name](**options)


def weighted_mean(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
                  names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-name weighted mean (fp32); ``weights`` are normalised here."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    out = {}
    for n in names:
        acc = torch.zeros_like(states[0][n], dtype=torch.float32)
        for s, w in zip(states, weights):
            acc += (w / total) * s[n].float()
        out[n] = acc
    return out


class Method(abc.ABC):
    """Base class. Subclasses implement ``_inject`` and the name lists."""

    name = ""
    personalized = False  # evaluate each client with its own local state
    # The client lr a run uses when none is given: the one the accuracy study chose for the
    # method on validation accuracy (MiniLM + BBC News; benchmarks/README.md). A method
    # registered without one uses 1e-3.
    default_lr = 1e-3

    @classmethod
    def lr_for(cls, scl_placement: str, scl_train_compress: bool) -> float:
        """The default lr of this method (SCL's depends on its variant)."""
        return cls.default_lr

    def __init__(self, r: int = 8, scl_scale: float = 1.0, scl_activation: str | None = None,
                 train_down_proj: bool = False, checkpoint_level: int = 1, lora_r: int | None = None,
                 lora_alpha: float | None = None, lora_dropout: float = 0.0,
                 target_modules: Sequence[str] | None = None, scl_placement: str = "residual",
                 scl_train_compress: bool = True, scl_layers: Sequence[int] | None = None):
        self.r = r
        self.scl_scale, self.scl_activation = scl_scale, scl_activation
        self.scl_placement, self.scl_train_compress = scl_placement, scl_train_compress
        self.scl_layers = list(scl_layers) if scl_layers is not None else None
        self.train_down_proj, self.checkpoint_level = train_down_proj, checkpoint_level
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.target_modules = list(target_modules) if target_modules else None
        self.model: nn.Module | None = None
        self.info: dict[str, Any] = {}
        self._params: dict[str, nn.Parameter] = {}
        self.head_modules: list[str] = []
        self.seed = 0

    def scl_config(self) -> SCLConfig:
        """The SCL configuration of this run (what ``scl`` injects, what LoRA's rank is matched to).
        C's initialisation derives from the run's seed, so every process builds the same C."""
        return SCLConfig(r=self.r, activation=self.scl_activation, scale=self.scl_scale,
                         placement=self.scl_placement, train_compress=self.scl_train_compress,
                         init_seed=self.seed, layers=self.scl_layers, train_down_proj=self.train_down_proj,
                         checkpoint_level=self.checkpoint_level)

    # -- setup ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module, head_modules: Sequence[str], seed: int) -> nn.Module:
        """Inject the adapter (deterministically from ``seed``) and freeze everything else."""
        torch.manual_seed(seed)
        self.seed, self.head_modules = seed, list(head_modules)
        model = self._inject(model, list(head_modules))
        self.model = model
        self._params = dict(model.named_parameters())
        pc = count_parameters(model)
        head = sum(self._params[n].numel() for n in self.lr_groups()["head"])
        self.info.update(method=self.name, trainable_params=pc.trainable, total_params=pc.total,
                         adapter_trainable_params=pc.trainable - head, head_params=head,
                         shared_params=sum(self._params[n].numel() for n in self.shared_names()),
                         local_params=sum(self._params[n].numel() for n in self.local_names()))
        return model

    @abc.abstractmethod
    def _inject(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        ...

    def refresh_params(self) -> None:
        """Re-read the model's parameters (after :func:`.hetero.rank_view` swapped some)."""
        self._params = dict(self.model.named_parameters())

    @property
    def adapter_rank(self) -> int:
        """The global adapter's rank: the most a client of a fleet can train (:mod:`.hetero`)."""
        return self.r

    def rank_axes(self) -> dict[str, int]:
        """Parameter name -> the axis of its rank slots, for every tensor whose size is the
        adapter's rank (a heterogeneous fleet's clients train the first slots of each)."""
        return {}

    def trainable_names(self) -> list[str]:
        return [n for n, p in self._params.items() if p.requires_grad]

    def shared_names(self) -> list[str]:
        return self.trainable_names()

    def local_names(self) -> list[str]:
        shared = set(self.shared_names())
        return [n for n in self.trainable_names() if n not in shared]

    def lr_groups(self) -> dict[str, list[str]]:
        """Trainable names by learning-rate role: ``head`` (the task head, whichever wrapper holds
        it), ``compress`` (SCL's C) and ``adapter`` (everything else)."""
        groups: dict[str, list[str]] = {"head": [], "compress": [], "adapter": []}
        for n in self.trainable_names():
            dotted = "." + n
            if any(f".{h}." in dotted for h in self.head_modules):
                groups["head"].append(n)
            elif ".scl.compress." in dotted or (".scl_adapters." in dotted and ".compress." in dotted):
                groups["compress"].append(n)
            else:
                groups["adapter"].append(n)
        return groups

    # -- state ---------------------------------------------------------------------------
    def initial_extras(self) -> dict[str, torch.Tensor]:
        """Server-side global tensors beyond the shared parameters (downlink only)."""
        return {}

    def global_state(self) -> dict[str, torch.Tensor]:
        """The shared parameters as they are in the model now, plus the initial extras."""
        st = {n: self._params[n].detach().float().clone() for n in self.shared_names()}
        st.update(self.initial_extras())
        return st

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {n: self._params[n].detach().float().clone() for n in self.shared_names()}

    def local_state(self) -> dict[str, torch.Tensor]:
        return {n: self._params[n].detach().float().clone() for n in self.local_names()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy named tensors (shared, local or extras) into the model."""
        with torch.no_grad():
            for n, t in tensors.items():
                if n in self._params:
                    p = self._params[n]
                    p.copy_(t.to(device=p.device, dtype=p.dtype))
                else:
                    self._load_extra(n, t)

    def written_in_fit(self) -> list[torch.Tensor]:
        """The tensors a client's fit writes in place (a spawned worker gives them storage of its
        own: :func:`fastseq.fed.workers.own_writable_copies`): the parameters that train."""
        return [self._params[n] for n in self.trainable_names()]

    def _load_extra(self, name: str, tensor: torch.Tensor) -> None:
        raise KeyError(f"method {self.name!r} has no tensor named {name!r}")

    # -- aggregation ---------------------------------------------------------------------
    def aggregate(self, global_state: dict[str, torch.Tensor], client_states: Sequence[dict[str, torch.Tensor]],
                  weights: Sequence[float], combine: Callable = weighted_mean) -> dict[str, torch.Tensor]:
        """Target global state from the clients' shared states (after local training).

        ``combine(states, weights, names)`` is the weighted mean or a robust aggregator
        (:mod:`.aggregators`). The server optimizer then moves the shared tensors towards this
        target; extras (names not in ``shared_names``) are taken as returned."""
        return combine(client_states, weights, self.shared_names())

    # -- output --------------------------------------------------------------------------
    @abc.abstractmethod
    def save_adapter(self, directory: str | os.PathLike) -> None:
        ...


@register_method("scl")
class SCLMethod(Method):
    """Sequential Compression Layers: share C, E (+ Wd with ``train_down_proj``) + head."""

    # (placement, train_compress) -> lr: a frozen C trains at 1e-2; a trained C falls apart there
    VARIANT_LRS = {("parallel", False): 1e-2, ("parallel", True): 1e-3, ("residual", False): 1e-2,
                   ("residual", True): 3e-3}

    @classmethod
    def lr_for(cls, scl_placement: str, scl_train_compress: bool) -> float:
        return cls.VARIANT_LRS[(scl_placement, bool(scl_train_compress))]

    def _inject(self, model, head_modules):
        cfg = self.scl_config()
        model = get_scl_model(model, cfg, trainable_modules=head_modules)
        sites = model.fastseq_adapter.sites
        self.info.update(scl_r=self.r, scl_placement=cfg.placement, scl_train_compress=cfg.train_compress,
                         adapter_params=sum(cfg.adapter_params_per_layer(s.d_model, s.d_ffn) for s in sites),
                         sites=len(sites))
        return model

    def trainable_names(self):
        return self.model.fastseq_adapter.parameter_names(self.model)

    def rank_axes(self):
        from ..adapters.scl import SCLLayer

        axes = {}
        for name, mod in self.model.named_modules():
            if isinstance(mod, SCLLayer):
                out = "expand" if mod.placement == "residual" else "project"
                axes[f"{name}.compress.weight"] = 0  # C: r x f, its rows
                if mod.compress.bias is not None:
                    axes[f"{name}.compress.bias"] = 0
                axes[f"{name}.{out}.weight"] = 1     # E: f x r / P: d x r, its columns
        return axes

    def save_adapter(self, directory):
        save_adapter(self.model, directory)


@register_method("fedsa-scl")
class FedSASCL(SCLMethod):
    """FedSA-style personalisation for SCL: the global SCL adapter (+ head) is shared and
    averaged as with ``scl``; a second SCL adapter, ``personal``, of the same shape sits beside
    it on every FFN, trains on each client and never leaves it (FedSA-LoRA's local B). Both are
    active, so their branches add; that runs on the reference path (checkpoint level 0: the fused
    kernel takes one adapter). Evaluation is personalised, as FedSA-LoRA's."""

    personalized = True
    PERSONAL = "personal"

    def _inject(self, model, head_modules):
        from dataclasses import replace

        model = super()._inject(model, head_modules)
        # Its own seeded C (a frozen C is the same on every client, as the global one is).
        personal = replace(self.scl_config(), init_seed=self.seed + 1, train_down_proj=False)
        get_scl_model(model, personal, adapter_name=self.PERSONAL)
        set_adapter(model, ["default", self.PERSONAL])
        personal_names = set(self._personal_names(model))
        self.info.update(personal_adapter_params=sum(p.numel() for n, p in model.named_parameters()
                                                     if n in personal_names))
        return model

    def _personal_names(self, model) -> list[str]:
        return adapters_of(model)[self.PERSONAL].parameter_names(model)

    def trainable_names(self):
        return super().trainable_names() + self._personal_names(self.model)

    def shared_names(self):
        personal = set(self._personal_names(self.model))
        return [n for n in self.trainable_names() if n not in personal]

    def save_adapter(self, directory):
        # The global adapter, as for fedsa-lora (the personal adapters stay with the clients).
        save_adapter(self.model, directory, adapter_name="default")


def matched_lora_rank(params_per_layer: int, d_model: int, d_ffn: int, trained_factors: int = 2) -> int:
    """LoRA rank on up+down whose trainable count per layer, ``trained_factors * r * (d + f)``
    (2: A and B train; 1: FFA-LoRA trains B only), is closest to ``params_per_layer`` (e.g. an
    SCL variant's, ``SCLConfig.adapter_params_per_layer``)."""
    return max(1, round(params_per_layer / (trained_factors * (d_model + d_ffn))))


def scl_rank_for_budget(params_per_layer: int, d_model: int, d_ffn: int, placement: str = "residual",
                        train_compress: bool = True) -> int:
    """The SCL rank whose trainable count per layer is closest to ``params_per_layer`` for a
    variant (e.g. plain SCL r=8's ``2 f r`` -> r=16 with C frozen)."""
    per_rank = SCLConfig(r=1, placement=placement, train_compress=train_compress).adapter_params_per_layer(d_model, d_ffn)
    return max(1, round(params_per_layer / per_rank))


class LoRAMethod(Method):
    """LoRA through PEFT on the FFN projections (default: up + down of every FFN site)."""

    freeze_A = False

    def _inject(self, model, head_modules):
        from .._quiet import quiet_bitsandbytes_kernel_notice, quiet_peft_gradient_checkpointing_notice

        quiet_bitsandbytes_kernel_notice()  # PEFT imports bitsandbytes when it is installed
        from peft import LoraConfig, get_peft_model

        sites = find_ffn_sites(model)
        if not sites:
            raise ConfigError(f"no FFN found in {type(model).__name__} to put LoRA on")
        if self.target_modules is None:
            targets = [f"{s.name}.{s.style.up}".lstrip(".") for s in sites] + \
                      [f"{s.name}.{s.style.down}".lstrip(".") for s in sites]
        else:
            targets = list(self.target_modules)
        d, f = sites[0].d_model, sites[0].d_ffn
        if self.lora_r is None:
            scl = self.scl_config()
            # SCL's total trainable count spread over the FFNs LoRA adapts (SCLConfig.layers may
            # adapt fewer)
            scl_sites = [s for s in sites if scl.layers is None or s.layer in scl.layers]
            target = round(sum(scl.adapter_params_per_layer(s.d_model, s.d_ffn) for s in scl_sites) / len(sites))
            k = 1 if self.freeze_A else 2
            self.lora_r = matched_lora_rank(target, d, f, k)
            factors = "B" if self.freeze_A else "A and B"
            budget = (f"matched to SCL r={self.r} ({scl.placement}, C {'trained' if scl.train_compress else 'frozen'}: "
                      f"{target} per layer): LoRA r={self.lora_r} on up+down, {factors} trained, "
                      f"{k}*{self.lora_r}*({d}+{f})={k * self.lora_r * (d + f)} per layer")
        else:
            budget = f"explicit LoRA r={self.lora_r}"
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r
        log.info("LoRA budget: %s (alpha=%s)", budget, self.lora_alpha)
        cfg = LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                         target_modules=targets, modules_to_save=list(head_modules) or None)
        with quiet_peft_gradient_checkpointing_notice():
            model = get_peft_model(model, cfg)
        self.pairs: list[tuple[str, str, str, float]] = []  # (module name, A name, B name, scaling)
        from peft.tuners.lora import LoraLayer

        for mname, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
                self.pairs.append((mname, f"{mname}.lora_A.default.weight", f"{mname}.lora_B.default.weight",
                                   float(mod.scaling["default"])))
        if self.freeze_A:
            for _, a, _, _ in self.pairs:
                model.get_parameter(a).requires_grad_(False)
        self.info.update(lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_budget=budget,
                         lora_targets=targets, lora_modules=len(self.pairs))
        return model

    def save_adapter(self, directory):
        self.model.save_pretrained(str(directory))

    @property
    def adapter_rank(self) -> int:
        return self.lora_r

    def rank_axes(self):
        axes = {a: 0 for _, a, _, _ in self.pairs}   # A: r x in, its rows
        axes.update({b: 1 for _, _, b, _ in self.pairs})  # B: out x r, its columns
        return axes

    def a_names(self):
        return [a for _, a, _, _ in self.pairs]

    def b_names(self):
        return [b for _, _, b, _ in self.pairs]


@register_method("fedavg-lora")
class FedAvgLoRA(LoRAMethod):
    """FedIT: A and B trained, shared and averaged separately."""


@register_method("ffa-lora")
class FFALoRA(LoRAMethod):
    """FFA-LoRA: A frozen at its seeded random init (same on every client), B trained and shared."""

    freeze_A = True
    default_lr = 3e-3


@register_method("fedsa-lora")
class FedSALoRA(LoRAMethod):
    """FedSA-LoRA: A (+ head) shared, B kept local per client; personalised evaluation."""

    personalized = True
    default_lr = 3e-3

    def shared_names(self):
        b = set(self.b_names())
        return [n for n in self.trainable_names() if n not in b]


@register_method("fedex-lora")
class FedExLoRA(LoRAMethod):
    """FedEx-LoRA: average A and B, and fold the residual
    ``sum_k p_k s B_k A_k - s B_bar A_bar`` into the frozen base weight (exact aggregation).

    The folded residual is a global tensor ``fedex_residual:<module>`` (shape of the base
    weight) that travels on the downlink; clients set ``W = W0 + residual``."""

    PREFIX = "fedex_residual:"

    def _inject(self, model, head_modules):
        model = super()._inject(model, head_modules)
        self.base0: dict[str, torch.Tensor] = {}
        for mname, _, _, _ in self.pairs:
            base = model.get_submodule(mname).base_layer
            w = getattr(base, "weight", None)
            if w is None or not w.is_floating_point() or hasattr(w, "quant_state") or w.dtype == torch.int8:
                raise ConfigError("fedex-lora folds residuals into the base weights and needs an unquantized "
                                  "model; use --quantization none or another method")
            self.base0[mname] = w.detach().clone()
        return model

    def initial_extras(self):
        return {self.PREFIX + m: torch.zeros_like(w, dtype=torch.float32) for m, w in self.base0.items()}

    def written_in_fit(self):
        # the folded residual is written into the base weights
        return super().written_in_fit() + [self.model.get_submodule(m).base_layer.weight for m in self.base0]

    def _load_extra(self, name, tensor):
        if not name.startswith(self.PREFIX) or name[len(self.PREFIX):] not in self.base0:
            return super()._load_extra(name, tensor)
        m = name[len(self.PREFIX):]
        w = self.model.get_submodule(m).base_layer.weight
        with torch.no_grad():
            w.copy_((self.base0[m].float() + tensor.float().to(w.device)).to(w.dtype))

    def aggregate(self, global_state, client_states, weights, combine=weighted_mean):
        # A and B are combined separately, and so are the clients' products B_k A_k: the
        # effective update s * combine(B_k A_k) is what a robust combiner protects; the residual
        # makes up the gap to s * combine(B) combine(A).
        out = combine(client_states, weights, self.shared_names())
        for m, a, b, s in self.pairs:
            key = self.PREFIX + m
            prods = [{key: st[b].float() @ st[a].float()} for st in client_states]
            mean_prod = combine(prods, weights, [key])[key]
            out[key] = global_state[key] + s * (mean_prod - out[b] @ out[a])
        return out

    def save_adapter(self, directory):
        super().save_adapter(directory)
        from safetensors.torch import save_file

        # The folded base-weight residuals belong to the final model: save them beside the adapter.
        res = {}
        for m in self.base0:
            w = self.model.get_submodule(m).base_layer.weight
            res[m] = (w.detach().float() - self.base0[m].float()).contiguous()
        save_file(res, os.path.join(str(directory), "fedex_residual.safetensors"))
