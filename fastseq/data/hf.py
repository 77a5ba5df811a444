"""``hf``: any Hugging Face ``datasets`` dataset as a task.

``get_task("hf", text_column="text", label_column="label")`` is a text-classification task,
``get_task("hf", prompt_column="prompt", response_column="response")`` an instruction
(causal-lm) task. ``data_path`` is a folder written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``, a local parquet/json/jsonl/csv/tsv/arrow file, a folder of such
files (each split a file, as ``datasets.load_dataset(folder)`` reads it) or a hub id where a
hub is reachable. Everything is read by ``datasets`` itself (imported lazily: ``pip install
"fastseq[hf-data]"``).

Each example keeps the dataset's other scalar columns in ``example["meta"]`` so that a run can
partition by any of them (``ExperimentConfig.partition_by``, e.g. a user id for one client per
user): :meth:`fastseq.data.TaskData.keyed_by`.
"""

from __future__ import annotations

import abc
import difflib
import os
from typing import Any

from .base import DataError, Task, TaskData, cap, finish_splits, looks_like_hub_id, register_task
from .instruction import InstructionTask
from .text_classification import TextClassificationTask

EXTRA_HINT = 'pip install "fastseq[hf-data]"'
# datasets' packaged builders by file extension
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv",
             ".arrow": "arrow", ".txt": "text"}


def import_datasets():
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise DataError(f"task 'hf' reads data with the `datasets` package, which is not installed: {EXTRA_HINT}") \
            from None
    return datasets


def _is_saved_dataset(path: str) -> bool:
    """A folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def load_source(source: str):
    """A ``datasets.Dataset`` or ``DatasetDict`` from a save_to_disk folder, a data file, a
    folder of data files or a hub id; a DataError that says what to do otherwise. datasets' own
    progress bars are off meanwhile (fastseq's progress option covers the run)."""
    datasets = import_datasets()
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return _load_source(datasets, source)
    finally:
        if was:
            datasets.enable_progress_bars()


def _load_source(datasets, source: str):
    path = os.path.expanduser(str(source))
    try:
        if os.path.isdir(path):
            if _is_saved_dataset(path):
                return datasets.load_from_disk(path)
            return datasets.load_dataset(path)
        if os.path.isfile(path):
            ext = os.path.splitext(path)[1].lower()
            if ext not in _BUILDERS:
                raise DataError(f"{path}: unsupported file type {ext or '(none)'}; use one of "
                                f"{', '.join(sorted(_BUILDERS))}, a save_to_disk folder or a hub id.")
            kw = {"delimiter": "\t"} if ext == ".tsv" else {}
            return datasets.load_dataset(_BUILDERS[ext], data_files=path, **kw)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a file datasets cannot read: say which and why
        raise DataError(f"datasets could not read {path} ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                        "check the file, or pass a save_to_disk folder.") from None
    if looks_like_hub_id(path):
        try:
            return datasets.load_dataset(path)
        except Exception as e:  # noqa: BLE001 - offline, unknown id, gated...
            raise DataError(f"could not load hub dataset {path!r} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); check the id and the network (offline, "
                            "save it with save_to_disk on a machine that reaches the hub and pass that folder)."
                            ) from None
    raise DataError(f"--dataset {source!r} does not exist; pass a save_to_disk folder, a parquet/json/csv file "
                    "or folder, or a hub id 'owner/name'.")


def pick_splits(obj, source: str, split: str, test_split: str | None):
    """(train Dataset, test Dataset or None) of what :func:`load_source` returned."""
    datasets = import_datasets()
    if isinstance(obj, datasets.Dataset):
        if test_split is not None:
            raise DataError(f"{source} is a single dataset without splits; leave out test_split.")
        return obj, None
    splits = list(obj.keys())
    if split not in splits:
        raise DataError(f"{source}: no split {split!r}; splits: {splits}. Pass task option split= one of them.")
    if test_split is None:
        test_split = "test" if "test" in splits and split != "test" else None
    elif test_split not in splits:
        raise DataError(f"{source}: no split {test_split!r}; splits: {splits}. Pass task option test_split= one "
                        "of them (or leave it out for a seeded split).")
    return obj[split], (obj[test_split] if test_split is not None else None)


def check_dataset_columns(ds, wanted: dict[str, str], source: str) -> None:
    """Each option's column exists; one line naming what exists (and the closest name)."""
    have = list(ds.column_names)
    for option, column in wanted.items():
        if column not in have:
            close = difflib.get_close_matches(column, have, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            flag = "--" + option.replace("_", "-")
            raise DataError(f"{source}: no column {column!r}{hint} for {flag}; the dataset's columns are "
                            f"{have}. Pass {flag} one of them.")


def _meta_columns(ds, text: set[str]) -> list[str]:
    """The scalar columns (Value / ClassLabel features) an example keeps in ``meta``: every one
    but the ``text`` columns the example holds already (a label column stays, raw)."""
    datasets = import_datasets()
    return [name for name, feature in ds.features.items()
            if name not in text and isinstance(feature, (datasets.Value, datasets.ClassLabel))]


def _rows(ds, columns: list[str], n: int | None, seed: int) -> list[dict]:
    """The rows of ``ds`` (only ``columns``), capped to ``n`` as :func:`fastseq.data.base.cap`
    would cap them, without converting the rows it drops."""
    keep = cap(list(range(len(ds))), n, seed)
    if len(keep) < len(ds):
        ds = ds.select(keep)
    return ds.select_columns(columns).to_list()


class _HFMixin:
    """Loading shared by both kinds: ``load`` converts rows with ``self._convert_rows``."""

    source_options = ("split", "test_split")

    def _init_source(self, split: str, test_split: str | None) -> None:
        self.split, self.test_split = split, test_split

    @abc.abstractmethod
    def _used_columns(self) -> dict[str, str]:
        """role -> column name of the columns this task reads."""

    @abc.abstractmethod
    def _text_columns(self) -> set[str]:
        """The columns that hold the example's text (not carried along as metadata)."""

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        if data_path is None:
            raise DataError("task 'hf' needs --dataset PATH_OR_ID (a save_to_disk folder, a parquet/json/csv file "
                            "or a hub id).")
        source = str(data_path)
        train_ds, test_ds = pick_splits(load_source(source), source, self.split, self.test_split)
        used = self._used_columns()
        check_dataset_columns(train_ds, used, source)
        if test_ds is not None:
            check_dataset_columns(test_ds, used, f"{source} (split {self.test_split or 'test'!r})")
        meta = _meta_columns(train_ds, self._text_columns())
        columns = list(dict.fromkeys(list(used.values()) + meta))
        n_test = None if max_examples is None else max(1, max_examples // 10)
        train_rows = _rows(train_ds, columns, max_examples, seed)
        test_rows = None if test_ds is None else _rows(test_ds, [c for c in columns if c in test_ds.column_names],
                                                       n_test, seed)
        data = self._convert_rows(train_rows, test_rows, train_ds, source, meta, seed)
        data.info.update(source=source, columns=list(train_ds.column_names), meta_columns=meta,
                         rows=len(train_ds) + (len(test_ds) if test_ds is not None else 0))
        return data


class HFClassificationTask(_HFMixin, TextClassificationTask):
    """A text-classification task on any ``datasets`` dataset (``--text-column``,
    ``--label-column``). A ClassLabel column gives the class names."""

    name = "hf"

    def __init__(self, text_column: str, label_column: str, split: str = "train", test_split: str | None = None,
                 **options: Any) -> None:
        super().__init__(text_column=text_column, label_column=label_column, **options)
        self._init_source(split, test_split)

    def _used_columns(self) -> dict[str, str]:
        return {"text_column": self.text_column, "label_column": self.label_column}

    def _text_columns(self) -> set[str]:
        return {self.text_column}

    def _convert_rows(self, train_rows, test_rows, train_ds, source, meta, seed) -> TaskData:
        datasets = import_datasets()
        feature = train_ds.features.get(self.label_column)
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        train, names = self._rows_to_examples(train_rows, source, names)
        for e, r in zip(train, train_rows):
            e["meta"] = {c: r[c] for c in meta}
        test = None
        if test_rows is not None:
            if any(r[self.label_column] == -1 for r in test_rows):  # GLUE-style unlabelled test split
                raise DataError(f"{source}: its test split is unlabelled (label -1); set task option test_split to a "
                                f"labelled split (e.g. task_options = {{test_split = \"validation\"}}).")
            test, _ = self._rows_to_examples(test_rows, f"{source} (test)", names)
            for e, r in zip(test, test_rows):
                e["meta"] = {c: r.get(c) for c in meta}
        train, test = finish_splits(train, test, seed, None, source, self.test_fraction)
        return TaskData(train, test, [e["label"] for e in train], names, {},
                        test_partition_keys=[e["label"] for e in test])


class HFInstructionTask(_HFMixin, InstructionTask):
    """An instruction (prompt -> response) causal-LM task on any ``datasets`` dataset
    (``--prompt-column``, ``--response-column``). Partition key: ``category_column`` when given,
    else ``unknown`` (partition by any column with ``--partition-by``)."""

    name = "hf"

    def __init__(self, prompt_column: str, response_column: str, category_column: str | None = None,
                 split: str = "train", test_split: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.prompt_column, self.response_column, self.category_column = prompt_column, response_column, category_column
        schema = {"question": prompt_column, "answer": response_column}
        if category_column is not None:
            schema["category"] = category_column
        self.schemas = (schema,)
        self._init_source(split, test_split)

    def _used_columns(self) -> dict[str, str]:
        used = {"prompt_column": self.prompt_column, "response_column": self.response_column}
        if self.category_column is not None:
            used["category_column"] = self.category_column
        return used

    def _text_columns(self) -> set[str]:
        return {self.prompt_column, self.response_column}

    def _convert_rows(self, train_rows, test_rows, train_ds, source, meta, seed) -> TaskData:
        def convert(rows):
            out = []
            for r in rows:
                e = self.row_to_example(r, self.schemas[0])
                if e["question"] and e["answer"]:
                    e["meta"] = {c: r.get(c) for c in meta}
                    out.append(e)
            return out, len(rows) - len(out)

        if not train_rows:
            raise DataError(f"{source}: no rows found; the split is empty.")
        train, dropped = convert(train_rows)
        test = None
        if test_rows is not None:
            test, dropped_test = convert(test_rows)
            dropped += dropped_test
        train, test = finish_splits(train, test, seed, None, source)
        return TaskData(train, test, [e["category"] for e in train], None, {"dropped_empty": dropped},
                        test_partition_keys=[e["category"] for e in test])


HF_PAIRS = (("text_column", "label_column"), ("prompt_column", "response_column"))


@register_task("hf")
def hf_task(text_column: str | None = None, label_column: str | None = None, prompt_column: str | None = None,
            response_column: str | None = None, max_length: int | None = None, **options: Any) -> Task:
    """The ``hf`` task: classification with ``text_column`` + ``label_column``, instruction
    tuning with ``prompt_column`` + ``response_column`` (exactly one pair)."""
    given = {k for k, v in dict(text_column=text_column, label_column=label_column, prompt_column=prompt_column,
                                response_column=response_column).items() if v is not None}
    pairs = [p for p in HF_PAIRS if given & set(p)]
    if not pairs:
        raise DataError("task 'hf' needs --text-column and --label-column (classification) or --prompt-column and "
                        "--response-column (instruction tuning), naming columns of --dataset.")
    if len(pairs) > 1:
        raise DataError(f"task 'hf' takes either --text-column/--label-column or --prompt-column/--response-column, "
                        f"not both (got {', '.join('--' + g.replace('_', '-') for g in sorted(given))}).")
    missing = [c for c in pairs[0] if c not in given]
    if missing:
        flags = " and ".join("--" + c.replace("_", "-") for c in pairs[0])
        raise DataError(f"task 'hf' needs {flags}; --{missing[0].replace('_', '-')} is missing.")
    if max_length is not None:
        options["max_length"] = max_length
    if text_column is not None:
        return HFClassificationTask(text_column, label_column, **options)
    return HFInstructionTask(prompt_column, response_column, **options)
