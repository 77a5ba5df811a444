"""--task hf (any Hugging Face dataset) and --partitioner (flwr-datasets' partitioners), offline:
small datasets written here with save_to_disk / to_parquet / to_json / to_csv."""

import json
from collections import Counter
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("flwr_datasets")

from fastseq.cli import main  # noqa: E402
from fastseq.data import DataError, get_task  # noqa: E402
from fastseq.fed.experiment import ExperimentConfig, build_runtime  # noqa: E402
from fastseq.fed.flwr_partition import flwr_partition  # noqa: E402

USERS = ("ann", "bob", "cy", "dee")
WORDS = ("alpha", "beta", "gamma")


def _table(n=48):
    """Texts whose label is the word they repeat; user i writes mostly label i % 3 (a natural
    non-IID split), with a user-dependent number of rows."""
    rows = {"sentence": [], "label": [], "user": [], "prompt": [], "response": []}
    for i in range(n):
        u = USERS[(i * 7) % 11 % len(USERS)]
        lab = (USERS.index(u) + (i % 5 == 0)) % 3
        rows["sentence"].append(" ".join([WORDS[lab]] * 4) + f" {i}")
        rows["label"].append(lab)
        rows["user"].append(u)
        rows["prompt"].append(f"say {WORDS[lab]}")
        rows["response"].append(WORDS[lab])
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=list(WORDS)),
                                  "user": datasets.Value("string"), "prompt": datasets.Value("string"),
                                  "response": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """datasets' cache of loaded files goes under the test's tmp_path, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    ds = _table()
    ds.save_to_disk(str(d / "saved"))
    datasets.DatasetDict({"train": ds, "test": _table(9)}).save_to_disk(str(d / "splits"))
    ds.to_parquet(str(d / "t.parquet"))
    ds.to_json(str(d / "t.jsonl"))
    ds.to_csv(str(d / "t.csv"), index=False)
    return d


@pytest.mark.parametrize("source", ["saved", "splits", "t.parquet", "t.jsonl", "t.csv"])
def test_every_local_format_loads(sources, source):
    task = get_task("hf", text_column="sentence", label_column="label")
    data = task.load(str(sources / source), seed=0, max_examples=40)
    assert task.kind == "text-classification" and task.name == "hf"
    # a ClassLabel gives the names; parquet keeps the feature, json/csv hold the ids only
    assert data.label_names == (list(WORDS) if source in ("saved", "splits", "t.parquet") else ["0", "1", "2"])
    if source == "splits":  # its own test split (capped to max_examples // 10)
        assert len(data.train) == 40 and len(data.test) == 4
    else:  # a seeded 10% split of the 40 kept rows
        assert (len(data.train), len(data.test)) == (36, 4)
    for e in data.train + data.test:
        assert WORDS[e["label"]] in e["text"] and e["meta"]["user"] in USERS
    assert data.meta_columns() == ["label", "user", "prompt", "response"]
    assert data.partition_keys == [e["label"] for e in data.train]
    by_user = data.keyed_by("user")
    assert by_user.partition_keys == [e["meta"]["user"] for e in data.train]
    assert by_user.test_partition_keys == [e["meta"]["user"] for e in data.test]
    # the same seed gives the same data, another seed another subset
    again = get_task("hf", text_column="sentence", label_column="label").load(str(sources / source), seed=0,
                                                                            max_examples=40)
    assert again.train == data.train


def test_instruction_columns_make_a_causal_lm_task(sources):
    task = get_task("hf", prompt_column="prompt", response_column="response", max_length=32)
    data = task.load(str(sources / "saved"), seed=1)
    assert task.kind == "causal-lm" and task.max_length == 32 and data.label_names is None
    assert all(e["question"] == f"say {e['answer']}" for e in data.train)
    assert set(data.meta_columns()) == {"sentence", "label", "user"}


@pytest.mark.parametrize("options,phrase", [
    ({"text_column": "sentense", "label_column": "label"},
     "no column 'sentense' (did you mean 'sentence'?) for --text-column; the dataset's columns are ['sentence', "
     "'label', 'user', 'prompt', 'response']"),
    ({"text_column": "sentence"}, "--label-column is missing"),
    ({"prompt_column": "prompt", "label_column": "label"}, "not both"),
    ({}, "needs --text-column and --label-column (classification) or --prompt-column and --response-column"),
    ({"text_column": "sentence", "label_column": "label", "split": "validation"},
     "no split 'validation'; splits: ['train', 'test']"),
])
def test_bad_columns_say_what_exists(sources, options, phrase):
    with pytest.raises(DataError) as e:
        get_task("hf", **options).load(str(sources / "splits"))
    assert phrase in str(e.value)


def test_flwr_partitioners_are_flwr_datasets_own(sources):
    """What fastseq hands back is exactly what flwr-datasets' class makes of the same column."""
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    keys = [i % 4 for i in range(200)]
    ds = datasets.Dataset.from_dict({"label": keys})
    for ours, theirs in (
            (flwr_partition(keys, 5, "DirichletPartitioner", key="label", alpha=0.3, seed=3, min_client_size=5),
             DirichletPartitioner(num_partitions=5, partition_by="label", alpha=0.3, seed=3, min_partition_size=5)),
            (flwr_partition(keys, 4, "PathologicalPartitioner", {"class_assignment_mode": "deterministic"},
                            key="label", seed=1, classes_per_client=1),
             PathologicalPartitioner(num_partitions=4, partition_by="label", num_classes_per_partition=1,
                                     class_assignment_mode="deterministic", seed=1))):
        theirs.dataset = ds.add_column("i", list(range(len(keys))))
        assert ours == [sorted(theirs.load_partition(k)["i"]) for k in range(len(ours))]
        assert sorted(i for p in ours for i in p) == list(range(len(keys)))  # every example once
    path = flwr_partition(keys, 4, "PathologicalPartitioner", {"class_assignment_mode": "deterministic"},
                          key="label", classes_per_client=1)
    assert [len({keys[i] for i in p}) for p in path] == [1, 1, 1, 1]


def _cli(sources, tmp_path, *extra):
    return ["run", "--model", "tiny-bert", "--task", "hf", "--dataset", str(sources / "saved"), "--text-column",
            "sentence", "--label-column", "label", "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--r",
            "4", "--min-client-size", "2", "--no-progress", "--workers", "1", "--out", str(tmp_path / "run"), *extra]


def test_natural_id_partition_end_to_end(sources, tmp_path, capsys):
    """One client per user: every client trains on exactly one user's rows, and each round's
    examples are the sampled users' row counts."""
    argv = _cli(sources, tmp_path, "--partitioner", "NaturalIdPartitioner", "--partition-by", "user", "--clients",
                "4", "--clients-per-round", "2", "--validation-fraction", "0")
    assert main(argv) == 0
    out = tmp_path / "run"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["partitioner"] == "NaturalIdPartitioner" and cfg["partition_by"] == "user"
    assert cfg["task_options"] == {"text_column": "sentence", "label_column": "label"}
    rt = build_runtime(ExperimentConfig.from_dict({k: v for k, v in cfg.items() if k in ExperimentConfig.keys()}),
                       echo=lambda s: None)
    users = [{rt.data.train[i]["meta"]["user"] for i in part} for part in rt.parts]
    assert all(len(u) == 1 for u in users) and {next(iter(u)) for u in users} == set(USERS)
    rows = Counter(e["meta"]["user"] for e in rt.data.train)
    assert sorted(len(p) for p in rt.parts) == sorted(rows.values())
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in hist] == [0, 1, 2]
    for h in hist[1:]:
        assert not h["skipped"] and h["examples"] == sum(len(rt.parts[int(c)]) for c in h["clients"])
        assert h["train_loss"] > 0 and h["uplink_bytes"] > 0
    assert "partition: flwr-datasets NaturalIdPartitioner" in capsys.readouterr().out
    # resume with the same partition options is allowed; a different partitioner is not
    assert main(["run", "--resume", str(out), "--rounds", "3", "--no-progress"]) == 0
    assert main(["run", "--resume", str(out), "--rounds", "4", "--partitioner", "IidPartitioner"]) == 2
    assert "partitioner 'NaturalIdPartitioner' -> 'IidPartitioner'" in capsys.readouterr().err


@pytest.mark.parametrize("extra,phrase", [
    (["--partitioner", "DirichletPartitoner"],
     "partitioner 'DirichletPartitoner' is not a flwr-datasets row partitioner (did you mean 'DirichletPartitioner'?); "
     "valid: ContinuousPartitioner, DirichletPartitioner"),
    (["--partitioner", "ShardPartitioner", "--partitioner-options", '{"shards": 2}'],
     "partitioner_options ['shards'] are not arguments of ShardPartitioner; its arguments are num_partitions, "
     "partition_by, num_shards_per_partition"),
    (["--partitioner", "GroupedNaturalIdPartitioner", "--partition-by", "user"],
     "GroupedNaturalIdPartitioner needs group_size: pass --partitioner-options '{\"group_size\": ...}'"),
    (["--partitioner", "NaturalIdPartitioner", "--partition-by", "user", "--clients", "3"],
     "NaturalIdPartitioner made 4 partitions (one per distinct 'user') but the run has clients=3; pass --clients 4"),
    (["--partition-by", "usr"], "--partition-by 'usr' (did you mean 'user'?): no such column; the columns are "
                                "['label', 'user', 'prompt', 'response']"),
    (["--label-column", "lable"], "no column 'lable' (did you mean 'label'?) for --label-column"),
    (["--partitioner-options", '{"alpha": 1}'], "set but no partitioner"),
])
def test_bad_partition_input_is_one_line(sources, tmp_path, capsys, extra, phrase):
    assert main(_cli(sources, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert phrase in err, err
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_without_flwr_datasets_the_extra_is_named(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "flwr_datasets.partitioner", None)  # import fails as if not installed
    assert main(["run", "--model", "tiny-bert", "--task", "synthetic", "--partitioner", "IidPartitioner",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert 'needs flwr-datasets, which is not installed: pip install "fastseq[hf-data]"' in err
    assert not Path(tmp_path / "run").exists()


def test_an_unreachable_source_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no hub here, whatever the machine
    task = get_task("hf", text_column="sentence", label_column="label")
    with pytest.raises(DataError, match="does not exist; pass a save_to_disk folder"):
        task.load(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="could not load hub dataset 'nobody/no-such-dataset' .*save_to_disk"):
        task.load("nobody/no-such-dataset")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type .xlsx"):
        task.load(str(tmp_path / "t.xlsx"))


def test_partition_settings_travel_to_flower():
    """The Flower engines rebuild the config from the run config: the new keys survive it."""
    import tomllib

    from fastseq.flower.config import from_run_config, project_toml, to_run_config

    cfg = ExperimentConfig(model="tiny-bert", task="hf", data_path=".", task_options={"text_column": "t",
                           "label_column": "l"}, partitioner="ShardPartitioner", partition_by="user",
                           partitioner_options={"num_shards_per_partition": 2}, report_to=["tensorboard", "mlflow"])
    back, _ = from_run_config(tomllib.loads(project_toml(to_run_config(cfg)))["tool"]["flwr"]["app"]["config"])
    assert back == cfg


def test_a_histogram_of_many_keys_gives_sizes_not_a_column_each():
    from fastseq.fed.partition import format_histogram

    keys = [f"user{i % 30}" for i in range(300)]
    parts = [[i for i in range(300) if i % 30 in (k, k + 15)] for k in range(15)]  # two users per client
    text = format_histogram(keys, parts, max_keys=24).splitlines()
    assert text[0].startswith("30 distinct keys;") and len(text) == 16
    assert text[1].split() == ["0", "20", "2", "user0"]
    assert len(format_histogram(keys, parts).splitlines()[0].split()) == 32  # without max_keys: a column per key


def test_an_unlabelled_test_split_says_to_pick_another(tmp_path):
    ds = _table(12)
    unlabelled = ds.cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1})
    unlabelled = unlabelled.cast_column("label", ds.features["label"])
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(4)), "test": unlabelled}).save_to_disk(
        str(tmp_path / "glue-like"))
    with pytest.raises(DataError, match="its test split is unlabelled .*test_split"):
        get_task("hf", text_column="sentence", label_column="label").load(str(tmp_path / "glue-like"))
    data = get_task("hf", text_column="sentence", label_column="label", test_split="validation").load(
        str(tmp_path / "glue-like"))
    assert len(data.test) == 4 and len(data.train) == 12
