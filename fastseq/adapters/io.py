"""Adapter save/load in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from .._atomic import atomic_write_bytes
from ..config import SCLConfig
from .registry import FFNSite, detect_activation, find_ffn_sites
from .scl import DEFAULT_ADAPTER, AdapterError, AdapterState, adapters_of, get_scl_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def _adapter(model: nn.Module, adapter_name: str | None = None) -> AdapterState:
    """The adapter named `adapter_name`, or the active one (None)."""
    state = getattr(model, "fastseq_adapter", None)
    if state is None:
        raise AdapterError("model has no SCL adapter; call fastseq.get_scl_model first")
    if adapter_name is None:
        return state
    adapters = adapters_of(model)
    if adapter_name not in adapters:
        raise AdapterError(f"this model has no SCL adapter named {adapter_name!r}; its adapters are {sorted(adapters)}")
    return adapters[adapter_name]


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an adapter (`adapter_name`, default the active one): SCL, a frozen C
    included, plus down projections / heads when trained; detached copies, named as in an
    adapter file (the ``<entry>.scl.`` names, whatever the adapter's name)."""
    state = _adapter(model, adapter_name)
    params = dict(model.named_parameters())
    return {state.file_name(name): params[name].detach().contiguous().clone() for name in state.saved_names(model)}


def _ffn_kind(sites: list[FFNSite]) -> tuple[str, str]:
    """(FFN style names, FFN activations) of `sites`, comma-joined when they differ: what
    ``adapter_config.json`` records and `load_adapter` compares."""
    styles = sorted({s.style.name for s in sites})
    acts = sorted({str(detect_activation(s.act)) for s in sites})
    return ",".join(styles), ",".join(acts)


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write an adapter of `model` (`adapter_name`, default the active one) to `directory`
    (created if needed); returns the directory. The files do not record the adapter's name:
    `load_adapter` loads them under any name."""
    state = _adapter(model, adapter_name)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, state.name)
    ffn_style, ffn_activation = _ffn_kind(state.sites)
    meta = {
        "adapter_type": "scl",
        "format_version": FORMAT_VERSION,
        "fastseq_version": __version__,
        "base_model_type": getattr(getattr(model, "config", None), "model_type", None),
        "base_model_class": type(model).__name__,
        "ffn_style": ffn_style,
        "ffn_activation": ffn_activation,
        "scl_config": state.config.to_dict(),
        "trainable_modules": state.trainable_modules,
        "sites": [{"name": s.name, "d_model": s.d_model, "d_ffn": s.d_ffn} for s in state.sites],
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
    }
    # Weights first, config last: a directory with a config always has its weights.
    tmp_weights = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / WEIGHTS_NAME)
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(meta, indent=2).encode())
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}; pass a directory written by fastseq.save_adapter")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc}); the adapter directory is damaged") from exc
    if meta.get("adapter_type") != "scl":
        raise AdapterError(f"{path} describes adapter type {meta.get('adapter_type')!r}, not 'scl'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path} has format version {meta.get('format_version')!r}; this fastseq reads {FORMAT_VERSION}")
    return meta


def _base_mismatches(meta: dict, model: nn.Module, sites: list[FFNSite]) -> list[str]:
    """How `model` differs from the base the adapter was trained on, by what
    ``adapter_config.json`` records (older files lack ffn_style / ffn_activation: not compared)."""
    out = []
    saved_type = meta.get("base_model_type")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if saved_type is not None and model_type is not None and saved_type != model_type:
        out.append(f"model_type {saved_type!r} (a {meta.get('base_model_class')}), this model is {model_type!r} "
                   f"(a {type(model).__name__})")
    names = {saved["name"] for saved in meta["sites"]}
    style, activation = _ffn_kind([s for s in sites if s.name in names] or sites)
    if meta.get("ffn_style") not in (None, style):
        out.append(f"FFN style {meta['ffn_style']!r}, this model's is {style!r}")
    if meta.get("ffn_activation") not in (None, activation):
        out.append(f"FFN activation {meta['ffn_activation']!r}, this model's is {activation!r}")
    return out


def load_adapter(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = True,
                 strict: bool = True, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Inject the saved adapter into `model` as `adapter_name` and load its weights (in place).

    Into a base model it becomes the first (active) adapter; into a model that has SCL adapters
    already it is added beside them as PEFT's ``load_adapter`` does (inactive and frozen until
    `set_adapter`).

    The model must be the kind of base the adapter was trained on: the same ``model_type``,
    FFN style and FFN activation (as ``adapter_config.json`` records them) and the same FFNs
    (names and widths); otherwise an AdapterError says what differs and nothing is changed.
    ``strict=False`` loads into a base of another model_type / FFN style / activation anyway,
    with a warning (the FFN names and widths must still match). With ``is_trainable=False``
    every parameter is frozen (inference).
    """
    meta = read_adapter_config(directory)
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing; the adapter directory is incomplete")
    config = SCLConfig.from_dict(meta["scl_config"])

    # Check the base model before touching it.
    found = find_ffn_sites(model)
    mismatches = _base_mismatches(meta, model, found)
    if mismatches:
        what = "; ".join(mismatches)
        if strict:
            raise AdapterError(f"adapter in {directory!s} was trained on a different base: {what}. Load it into the "
                               f"base it was trained on, or pass strict=False to load it anyway")
        warnings.warn(f"loading the adapter in {directory!s} into a different base (strict=False): {what}",
                      stacklevel=2)
    sites = {s.name: s for s in found}
    for saved in meta["sites"]:
        site = sites.get(saved["name"])
        if site is None:
            raise AdapterError(
                f"adapter was trained on a {meta.get('base_model_class')} ({meta.get('base_model_type')}) with an FFN at "
                f"{saved['name']!r}, which this {type(model).__name__} does not have; load it into the same base model"
            )
        if (site.d_model, site.d_ffn) != (saved["d_model"], saved["d_ffn"]):
            raise AdapterError(
                f"FFN {saved['name']!r} has d_model={site.d_model}, d_ffn={site.d_ffn} in this model but "
                f"d_model={saved['d_model']}, d_ffn={saved['d_ffn']} in the adapter; load it into the same base model"
            )
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise AdapterError(f"cannot read {weights_path}: {exc}") from exc
    recorded = {name: list(shape) for name, shape in meta.get("tensors", {}).items()}
    if recorded != {name: list(t.shape) for name, t in tensors.items()}:
        raise AdapterError(f"{weights_path} does not hold the tensors {CONFIG_NAME} lists; the adapter directory is damaged")

    first = not adapters_of(model)
    get_scl_model(model, config, trainable_modules=meta.get("trainable_modules", []), adapter_name=adapter_name)
    state = adapters_of(model)[adapter_name]
    params = {state.file_name(n): p for n, p in model.named_parameters() if n in set(state.saved_names(model))}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterError(f"adapter weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            if param.shape != tensor.shape:
                raise AdapterError(f"{name}: shape {tuple(tensor.shape)} in the adapter, {tuple(param.shape)} in the model")
            param.copy_(tensor.to(param.dtype))
    if not is_trainable:
        if first:
            model.requires_grad_(False)
        else:
            for param in params.values():
                param.requires_grad_(False)
    return model
