"""Reads the task's documents from the JSON file beside this one, wherever lm-eval runs from
(``dataset_path: json`` would resolve ``data_files`` against the working directory)."""

import json
from pathlib import Path

DOCS = Path(__file__).with_name("fastseq_medqa_mini.json")


def load_docs(**kwargs):
    """lm-eval's ``custom_dataset``: a DatasetDict with the one ``test`` split. ``kwargs`` are the
    task's metadata, which this task does not use."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(json.loads(DOCS.read_text()))})
