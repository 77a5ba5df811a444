"""Flower run config <-> :class:`fastseq.fed.experiment.ExperimentConfig`.

Every ExperimentConfig field is one key of ``[tool.flwr.app.config]`` with ``_`` written as
``-`` (``clients_per_round`` -> ``clients-per-round``). Flower run-config values are TOML
scalars, so ``None`` is written as the empty string ``""`` and the tables (``task_options``,
``deepspeed``) as JSON strings. A few keys configure the Flower layer itself (``FLOWER_KEYS``).

This module imports neither torch nor flwr: the ClientApp answers node-discovery queries
without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# Flower-layer keys (not ExperimentConfig fields) and their defaults.
FLOWER_KEYS: dict[str, Any] = {
    # Where each SuperNode keeps its clients' persisted local state; "" means the node's
    # ``state-dir`` node config, else ``~/.cache/fastseq/flower/<experiment>/``.
    "client-state-dir": "",
    # Seconds the ServerApp waits for one SuperNode per partition id to connect.
    "node-wait-s": 300,
    # Seconds the ServerApp waits for one client's reply (fit or evaluate).
    "reply-timeout-s": 3600,
    # Resume from the newest complete checkpoint in ``out``.
    "resume": False,
    # The token of ``out``'s run lock (fastseq.fed.run_lock) when the process that submitted the
    # run holds it (the local Flower engines); "": the ServerApp takes the lock itself.
    "run-lock": "",
}

# ExperimentConfig fields that are tables or lists: sent as JSON strings; the value for "".
JSON_FIELDS: dict[str, Any] = {"task_options": {}, "deepspeed": None, "scl_layers": None, "fleet": None,
                               "partitioner_options": {}, "report_to": [], "harness_tasks": []}

APP_NAME = "fastseq-flower"
SERVERAPP = "fastseq.flower.app:server_app"
CLIENTAPP = "fastseq.flower.app:client_app"


def _fields():
    from ..fed.experiment import ExperimentConfig

    return ExperimentConfig, dataclasses.fields(ExperimentConfig)


def key_of(field_name: str) -> str:
    return field_name.replace("_", "-")


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def to_run_config(cfg, **flower: Any) -> dict[str, Any]:
    """ExperimentConfig (+ Flower-layer keys) -> a flat dict of TOML scalars."""
    _, fields = _fields()
    out: dict[str, Any] = {}
    for f in fields:
        v = getattr(cfg, f.name)
        if f.name in JSON_FIELDS:
            v = "" if v is None else json.dumps(v, sort_keys=True)
        elif v is None:
            v = ""
        elif isinstance(v, (list, tuple)):
            v = json.dumps(list(v))
        out[key_of(f.name)] = v
    unknown = sorted(set(flower) - set(FLOWER_KEYS))
    if unknown:
        raise ValueError(f"unknown Flower key(s) {unknown}; known: {sorted(FLOWER_KEYS)}")
    for k, default in FLOWER_KEYS.items():
        v = flower.get(k, default)
        out[k] = "" if v is None else v
    return out


def from_run_config(run_config: dict[str, Any]):
    """A Flower run config -> (ExperimentConfig, dict of Flower-layer keys)."""
    ExperimentConfig, fields = _fields()
    d: dict[str, Any] = {}
    for f in fields:
        k = key_of(f.name)
        if k not in run_config:
            continue
        v = run_config[k]
        if f.name in JSON_FIELDS:
            v = json.loads(v) if isinstance(v, str) and v.strip() else (v or JSON_FIELDS[f.name])
        elif isinstance(v, str) and v == "" and _optional(f):
            v = None
        elif "float" in str(f.type) and "int" not in str(f.type) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)  # (topk, float | int, keeps an int: it is a count there)
        d[f.name] = v
    flower = {k: run_config.get(k, default) for k, default in FLOWER_KEYS.items()}
    return ExperimentConfig.from_dict(d), flower


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string literal is a valid TOML basic string


def project_toml(run_config: dict[str, Any], description: str | None = None) -> str:
    """The ``pyproject.toml`` of a ``flwr run`` project whose components are fastseq's apps."""
    desc = description or "fastseq federated fine-tuning (SCL and LoRA baselines) on Flower"
    lines = [
        "# A Flower App whose ServerApp and ClientApp are fastseq's (fastseq.flower.app).",
        "# [tool.flwr.app.config] keys are fastseq ExperimentConfig fields with '_' -> '-';",
        "# \"\" means None; task-options is a JSON string. Override with",
        "#   flwr run . <superlink> --run-config 'rounds=10 method=\"fedavg-lora\"'",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        'version = "1.0.0"',
        f"description = {json.dumps(desc)}",
        'license = "Apache-2.0"',
        'dependencies = ["fastseq[flower]"]',
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "fastseq"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVERAPP}"',
        f'clientapp = "{CLIENTAPP}"',
        "",
        "[tool.flwr.app.config]",
    ]
    for k, v in run_config.items():
        lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
