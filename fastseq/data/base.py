"""Task interface, registry, errors and the shared loading helpers of fastseq.data.

A *task* knows where its data comes from, how to split it, which key partitions it across
clients, how to turn a list of examples into model inputs (``collate``), how to compute the
training loss and how to evaluate. Examples are plain dicts; the tensors are built in
``collate`` from the ``processor`` (a tokenizer or an image processor) that the model loader
returned.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import json
import logging
import math
import inspect
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

logger = logging.getLogger("fastseq.data")

TASK_KINDS = ("text-classification", "causal-lm", "image-classification")

# Model types whose sequence-classification head is called ``score`` in transformers.
_SCORE_HEAD_MODEL_TYPES = {
    "llama", "gemma", "gemma2", "gemma3", "gemma3_text", "mistral", "mixtral", "qwen2", "qwen3",
    "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "opt", "starcoder2", "olmo", "olmo2",
}


class DataError(ValueError):
    """A data problem the user can fix: the message says what is wrong and what to do."""


@dataclass
class TaskData:
    """What ``Task.load`` returns.

    ``partition_keys`` has one hashable per train example (its label or category), for the
    non-IID partitioners (``test_partition_keys``, optional, the same for each test example: a
    client's own test split for personalised evaluation). ``label_names`` is the list of class names (index = label id) for
    classification tasks and ``None`` for causal-lm tasks. ``info`` holds load statistics
    (e.g. ``skipped_images``, ``dropped_empty``, ``source``).
    """

    train: list[dict]
    test: list[dict]
    partition_keys: list[Any]
    label_names: list[str] | None
    info: dict = field(default_factory=dict)
    # the same key for each test example: a client's own test split follows its train keys
    test_partition_keys: list[Any] | None = None

    def __post_init__(self) -> None:
        if len(self.partition_keys) != len(self.train):
            raise DataError(
                f"TaskData has {len(self.train)} train examples but {len(self.partition_keys)} "
                "partition keys; there must be exactly one key per train example."
            )
        if self.test_partition_keys is not None and len(self.test_partition_keys) != len(self.test):
            raise DataError(f"TaskData has {len(self.test)} test examples but {len(self.test_partition_keys)} test "
                            "partition keys; there must be exactly one key per test example.")

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    def meta_columns(self) -> list[str]:
        """The columns every train example carries in ``example["meta"]`` (the ``hf`` task keeps
        a dataset's scalar columns there), in order."""
        if not self.train or not all(isinstance(e.get("meta"), dict) for e in self.train):
            return []
        common = set(self.train[0]["meta"]).intersection(*(e["meta"] for e in self.train[1:]))
        return [c for c in self.train[0]["meta"] if c in common]

    def keyed_by(self, column: str | None) -> "TaskData":
        """This data with ``partition_keys`` (and ``test_partition_keys``) read from the meta
        column ``column`` (None: unchanged); a DataError naming the columns there are."""
        if column is None:
            return self
        have = self.meta_columns()
        if column not in have:
            if not have:
                raise DataError(f"--partition-by {column!r}: this task has no columns to partition by (its key is "
                                f"its label or category); use --task hf with a dataset that has a {column!r} column, "
                                f"or leave out --partition-by.")
            import difflib

            close = difflib.get_close_matches(column, have, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"--partition-by {column!r}{hint}: no such column; the columns are {have}. Pass one of "
                            f"them.")
        keys = [e["meta"][column] for e in self.train]
        test_keys = ([e.get("meta", {}).get(column) for e in self.test]
                     if all(isinstance(e.get("meta"), dict) for e in self.test) else None)
        return dataclasses.replace(self, partition_keys=keys, test_partition_keys=test_keys,
                                   info={**self.info, "partition_by": column})


class Task(abc.ABC):
    """Base class of every task. Subclasses set ``name``, ``kind`` and implement
    ``load``, ``collate``, ``loss`` and ``evaluate``."""

    name: str = ""
    kind: str = ""
    model_kind: str = ""          # the ``task_kind`` to pass to fastseq.models.load_model
    # whether collate needs the model's tokenizer / image processor: "required", "optional"
    # or "unused" (fastseq.models.load_model's ``processor`` argument)
    processor_use: str = "required"
    metric_for_selection: str = "eval_loss"
    greater_is_better: bool = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise DataError(
                f"task {self.name!r} got unknown options {sorted(options)}; "
                f"see docs/tasks.md for the options each task accepts."
            )
        if not self.model_kind:
            self.model_kind = self.kind

    # -- heads --------------------------------------------------------------------------
    @property
    def head_modules(self) -> tuple[str, ...]:
        """Default names of trainable head submodules for this task kind (BERT/ViT/SigLIP
        style). Use ``head_modules_for(model)`` to get the right one for a given model."""
        if self.kind == "causal-lm":
            return ()
        return ("classifier",)

    def head_modules_for(self, model: Any) -> tuple[str, ...]:
        """Names of the trainable head submodules of ``model`` for this task.

        ``model`` is a model instance, a config or a ``model_type`` string. Causal LMs train
        no head (the LM head stays frozen). Classification heads are ``score`` for decoder
        models (Llama, Gemma, Mistral, Qwen, ...) and ``classifier`` for BERT, ViT and SigLIP.
        """
        if self.kind == "causal-lm":
            return ()
        if isinstance(model, torch.nn.Module):
            for name in ("score", "classifier"):
                if isinstance(getattr(model, name, None), torch.nn.Module):
                    return (name,)
            raise DataError(
                f"{type(model).__name__} has neither a 'score' nor a 'classifier' head; load it "
                f"with task_kind={self.model_kind!r} so that it gets a classification head."
            )
        model_type = model if isinstance(model, str) else getattr(model, "model_type", "")
        return ("score",) if model_type in _SCORE_HEAD_MODEL_TYPES else ("classifier",)

    # -- interface ----------------------------------------------------------------------
    def prepare_batch(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapt a collated batch to ``model`` just before the forward pass (identity here;
        image tasks resize ``pixel_values`` to the model's input size)."""
        return batch

    @abc.abstractmethod
    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        ...

    @abc.abstractmethod
    def collate(self, examples: Sequence[dict], processor: Any) -> dict[str, torch.Tensor]:
        ...

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, examples: Sequence[dict], processor: Any,
                 batch_size: int = 16) -> dict[str, float]:
        ...

    # Optional, for an evaluation split across processes (the local engine's workers): a task
    # that can score its batches apart defines ``eval_records(model, examples, processor,
    # batch_size) -> list[dict]`` (one JSON record per batch, in order) and
    # ``reduce_eval(records, processor) -> metrics``, with ``evaluate == reduce_eval(eval_records)``
    # bit for bit (``text_classification.ClassificationEval``, ``InstructionTask``).
    @property
    def splittable_eval(self) -> bool:
        """Whether ``eval_records`` / ``reduce_eval`` are defined."""
        return callable(getattr(self, "eval_records", None)) and callable(getattr(self, "reduce_eval", None))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Class decorator: ``@register_task("my-task")`` makes ``get_task("my-task")`` work."""

    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        _REGISTRY[name] = factory
        return factory

    return deco


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with its ``options`` (see docs/tasks.md)."""
    if name not in _REGISTRY:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}.")
    task = _REGISTRY[name](**options)
    task.name = name
    return task


def task_options(name: str) -> set[str]:
    """The option names the task registered as ``name`` accepts."""
    if name not in _REGISTRY:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}.")
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


# ---------------------------------------------------------------------------------------
# loading helpers
# ---------------------------------------------------------------------------------------
TABLE_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def read_splits(source: str) -> tuple[list[dict], list[dict] | None]:
    """(train rows, test rows or None) from a hub id (its train/test splits) or a local table."""
    if looks_like_hub_id(source):
        splits = load_hub_dataset(source)
        if "train" not in splits:
            raise DataError(f"{source}: no 'train' split (splits: {sorted(splits)}).")
        return splits["train"], splits.get("test")
    return read_table(source), None


def looks_like_hub_id(path: str) -> bool:
    """``owner/name`` that is not an existing path and has no file extension we read."""
    return (bool(_HUB_ID.match(path)) and not os.path.exists(path)
            and not path.lower().endswith(TABLE_EXTENSIONS))


def require_path(path: str, what: str = "file or folder") -> str:
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise DataError(
            f"{what} {path!r} does not exist; pass data_path= an existing local {what} "
            "(or a hub id such as 'owner/name' where the task supports it)."
        )
    return path


def read_table(path: str) -> list[dict]:
    """Rows of a local csv/tsv/json/jsonl/parquet file as a list of dicts."""
    path = require_path(path, "file")
    low = path.lower()
    if low.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as fh:
            return [dict(r) for r in csv.DictReader(fh, delimiter="\t" if low.endswith(".tsv") else ",")]
    if low.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {i + 1} is not valid JSON ({e}); fix or remove it.") from e
        return rows
    if low.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            # a .json file holding JSON lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(obj, dict):
            for key in ("data", "rows", "train"):
                if isinstance(obj.get(key), list):
                    return obj[key]
            raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}}).")
        return list(obj)
    if low.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415
        except ImportError:
            try:
                import pandas as pd  # noqa: PLC0415
            except ImportError as e:
                raise DataError(
                    f"reading {path} needs pyarrow (`pip install pyarrow`); or convert it to csv/jsonl."
                ) from e
            return pd.read_parquet(path).to_dict("records")
        return pq.read_table(path).to_pylist()
    raise DataError(
        f"{path}: unsupported file type; use one of {', '.join(TABLE_EXTENSIONS)} or a folder."
    )


def load_hub_dataset(hub_id: str) -> dict[str, list[dict]]:
    """``{split: rows}`` from the Hugging Face hub through ``datasets`` (imported lazily)."""
    try:
        import datasets  # noqa: PLC0415
    except ImportError as e:
        raise DataError(
            f"{hub_id!r} looks like a hub dataset id, which needs the `datasets` package "
            "(`pip install datasets`); or download the data and pass data_path= a local "
            "csv/json/jsonl/parquet file or folder."
        ) from e
    try:
        dd = datasets.load_dataset(hub_id)
    except Exception as e:  # noqa: BLE001 - surfaced with advice
        raise DataError(
            f"could not load hub dataset {hub_id!r} ({type(e).__name__}: {e}); check the id and "
            "your network, or pass data_path= a local file."
        ) from e
    if isinstance(dd, dict) or hasattr(dd, "keys"):
        return {split: list(dd[split]) for split in dd.keys()}
    return {"train": list(dd)}


def check_columns(rows: Sequence[dict], expected: Iterable[str], source: str) -> None:
    expected = list(expected)
    found = list(rows[0].keys()) if rows else []
    missing = [c for c in expected if c not in found]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; columns found: {found}; expected: {expected}. "
            "Rename the columns or pass the column options of the task."
        )


def pick_schema(rows: Sequence[dict], schemas: Sequence[dict[str, str]], source: str) -> dict[str, str]:
    """The first schema (role -> column) whose columns are all present in ``rows``."""
    if not rows:
        raise DataError(f"{source}: no rows found; the file or split is empty.")
    found = set(rows[0].keys())
    for schema in schemas:
        if set(schema.values()) <= found:
            return schema
    raise DataError(
        f"{source}: missing columns; columns found: {sorted(found)}; expected one of: "
        + "; ".join(str(sorted(s.values())) for s in schemas)
        + ". Rename the columns to match one of these schemas."
    )


def split_rows(rows: list, seed: int, test_fraction: float = 0.1) -> tuple[list, list]:
    """Seeded shuffle, then ``test_fraction`` (at least one example) goes to test."""
    if len(rows) < 2:
        raise DataError(
            f"need at least 2 examples to make a train/test split, got {len(rows)}; add data."
        )
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, int(round(len(rows) * test_fraction)))
    test = [rows[i] for i in idx[:n_test]]
    train = [rows[i] for i in idx[n_test:]]
    return train, test


def cap(rows: list, n: int | None, seed: int) -> list:
    """A seeded random subset of at most ``n`` rows (order of the kept rows preserved)."""
    if n is None or len(rows) <= n:
        return rows
    if n < 1:
        raise DataError(f"max_examples must be >= 1, got {n}.")
    keep = sorted(random.Random(seed + 7919).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def finish_splits(train: list, test: list | None, seed: int, max_examples: int | None,
                  source: str, test_fraction: float = 0.1) -> tuple[list, list]:
    """Apply the dataset's own test split or a seeded ``test_fraction`` one, cap the sizes,
    check emptiness.

    Without an own test split, ``max_examples`` caps the total before splitting. With one,
    train keeps at most ``max_examples`` and test at most ``max(1, max_examples // 10)``.
    """
    if test is None:
        train, test = split_rows(cap(train, max_examples, seed), seed, test_fraction)
    else:
        train = cap(train, max_examples, seed)
        test = cap(test, None if max_examples is None else max(1, max_examples // 10), seed)
    if not train:
        raise DataError(f"{source}: the train split is empty; check the data (and the filters applied).")
    if not test:
        raise DataError(f"{source}: the test split is empty; add test data or omit it to get a seeded 10% split.")
    return train, test


# ---------------------------------------------------------------------------------------
# evaluation helpers
# ---------------------------------------------------------------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def batches(examples: Sequence[dict], batch_size: int) -> Iterable[Sequence[dict]]:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    for i in range(0, len(examples), batch_size):
        yield examples[i:i + batch_size]


class eval_mode:
    """Context manager: model.eval() + no_grad, restoring the training flag after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
