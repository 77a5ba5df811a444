"""`fastseq eval`: runs of the real CLI on tiny-llama, scored by lm-evaluation-harness on the
shipped offline task (fastseq_medqa_mini). What lm-eval scores must be the run's adapter: its
per-document log-likelihoods equal fastseq's own forward of the adapter loaded independently,
differ from the base model's, and a saved round's checkpoint scores what the final adapter does."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="fastseq eval needs the harness extra (lm-eval)")

from fastseq.cli import main  # noqa: E402
from fastseq.data.harness import SHIPPED_TASKS  # noqa: E402

TASK = "fastseq_medqa_mini"
PPL = "fastseq_medqa_mini_ppl"
TRAIN = SHIPPED_TASKS / TASK / "train.jsonl"
TINY_RUN = ["--model", "tiny-llama", "--task", "instruction", "--data-path", str(TRAIN), "--clients", "2",
            "--clients-per-round", "2", "--local-steps", "4", "--batch-size", "8", "--r", "4", "--partition", "iid",
            "--workers", "1", "--lr", "3e-2", "--no-progress"]


def _run(out: Path, *extra: str) -> Path:
    assert main(["run", *TINY_RUN, "--out", str(out), *extra]) == 0
    return out


def _eval(run: Path, *extra: str, final: int = 2) -> dict:
    """`fastseq eval` with samples; returns the round's results file, the samples and their
    log-likelihoods [document, choice]."""
    assert main(["eval", str(run), "--tasks", TASK, "--limit", "6", "--log-samples", *extra]) == 0
    rnd = int(extra[extra.index("--round") + 1]) if "--round" in extra else final
    record = json.loads((run / "harness" / f"round_{rnd}.json").read_text())
    samples = [json.loads(line) for line in
               (run / "harness" / f"round_{rnd}.{TASK}.samples.jsonl").read_text().splitlines()]
    return {"record": record, "samples": samples,
            "lls": torch.tensor([[r[0][0] for r in s["resps"]] for s in samples], dtype=torch.float64)}


def _own_lls(model, tokenizer, samples) -> torch.Tensor:
    """log p(choice | prompt) by fastseq's model forward: lm-eval's (context, continuation) pairs,
    the context's trailing whitespace moved to the continuation as lm-eval does; the tiny models'
    byte tokenizer has no merges, so the continuation is its bytes' tokens."""
    out = []
    with torch.no_grad():
        for s in samples:
            row = []
            for context, choice in s["arguments"]:
                stripped = context.rstrip()
                cont = context[len(stripped):] + choice
                ids = tokenizer(stripped + cont, add_special_tokens=False)["input_ids"]
                n = len(cont.encode())
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                row.append(sum(float(logp[len(ids) - n - 1 + i, ids[len(ids) - n + i]]) for i in range(n)))
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def scl_run(tmp_path_factory):
    """2 rounds of SCL; the server's evaluation scores the perplexity task at rounds 0 and 2."""
    return _run(tmp_path_factory.mktemp("harness") / "scl", "--rounds", "2", "--harness-tasks", PPL,
                "--harness-every", "2", "--harness-limit", "6")


def test_eval_scores_the_runs_adapter_and_compare_shows_it(scl_run, capsys):
    import fastseq
    from fastseq.models import load_model

    final = _eval(scl_run)
    entry = final["record"]["tasks"][TASK]
    assert final["record"]["round"] == 2 and entry["source"] == "adapter"
    assert entry["n_samples"] == {"original": 24, "effective": 6}
    acc = entry["metrics"]["acc,none"]
    assert 0 <= acc <= 1 and len(final["samples"]) == 6
    assert acc == pytest.approx(sum(s["acc"] for s in final["samples"]) / 6)

    base, tok = load_model("tiny-llama", "causal-lm")
    base_lls = _own_lls(base.eval(), tok, final["samples"])
    trained = fastseq.load_adapter(load_model("tiny-llama", "causal-lm")[0], scl_run / "adapter", is_trainable=False)
    torch.testing.assert_close(final["lls"], _own_lls(trained.eval(), tok, final["samples"]), rtol=1e-5, atol=2e-4)
    assert (final["lls"] - base_lls).abs().max() > 1e-2  # the adapter moved the scores: it was loaded

    initial = _eval(scl_run, "--round", "0")  # the initial adapter computes the base model
    assert initial["record"]["tasks"][TASK]["source"] == "initial"
    torch.testing.assert_close(initial["lls"], base_lls, rtol=1e-5, atol=2e-4)

    last = _eval(scl_run, "--round", "2")  # the last round's checkpoint is the final adapter
    assert last["record"]["tasks"][TASK]["source"] == "checkpoints/round_2"
    torch.testing.assert_close(last["lls"], final["lls"], rtol=1e-5, atol=2e-4)

    capsys.readouterr()
    assert main(["compare", str(scl_run), "--plot", str(scl_run / "compare.png")]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("scl ") and TASK in line]
    assert ["scl", "0", TASK, "acc"] in [r[:4] for r in rows]
    assert ["scl", "2", TASK, "acc", f"{acc:.4f}"] in [r[:5] for r in rows]
    assert ["scl", "2", TASK, "acc_norm", f"{entry['metrics']['acc_norm,none']:.4f}"] in [r[:5] for r in rows]


def test_harness_tasks_during_a_run_score_the_global_model(scl_run):
    """--harness-tasks: rounds 0 and 2 (--harness-every 2) scored in the server's evaluation,
    into metrics.jsonl and harness/round_K.json; `fastseq eval` of the same rounds agrees."""
    key = f"harness/{PPL}/perplexity"
    rows = [json.loads(line) for line in (scl_run / "metrics.jsonl").read_text().splitlines()]
    assert [key in r for r in rows] == [True, False, True]
    ppl = {r["round"]: r[key] for r in rows if key in r}
    assert ppl[2] < ppl[0] * 0.99  # the right answers' perplexity fell: the global model trained
    for rnd in (0, 2):
        rec = json.loads((scl_run / "harness" / f"round_{rnd}.json").read_text())
        assert rec["tasks"][PPL]["source"] == "server evaluation"
        assert rec["tasks"][PPL]["metrics"]["perplexity,none"] == pytest.approx(ppl[rnd], rel=1e-9)
    fresh = scl_run.parent / "copy"  # fastseq eval rewrites round_K.json: score a copy of the run
    import shutil

    shutil.copytree(scl_run, fresh, ignore=shutil.ignore_patterns("harness"))
    config = json.loads((fresh / "config.json").read_text())  # the training data moved away: not needed
    (fresh / "config.json").write_text(json.dumps({**config, "data_path": str(fresh / "gone.jsonl")}))
    for rnd in (0, 2):
        assert main(["eval", str(fresh), "--tasks", PPL, "--limit", "6", "--round", str(rnd)]) == 0
        rec = json.loads((fresh / "harness" / f"round_{rnd}.json").read_text())
        assert rec["tasks"][PPL]["metrics"]["perplexity,none"] == pytest.approx(ppl[rnd], rel=1e-5)


def test_your_own_task_yaml_with_local_json(scl_run, tmp_path):
    """--include-path: a task of the user's own, lm-eval's usual `dataset_path: json` over a local file."""
    docs = json.loads((SHIPPED_TASKS / TASK / f"{TASK}.json").read_text())[:3]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"q": d["question"], "a": d["choices"][d["label"]]}) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "my_task.yaml").write_text(
        "task: my_answers\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_target: \" {{a}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    assert main(["eval", str(scl_run), "--tasks", "my_answers", "--include-path", str(tmp_path / "tasks")]) == 0
    entry = json.loads((scl_run / "harness" / "round_2.json").read_text())["tasks"]["my_answers"]
    assert entry["n_samples"]["effective"] == 3 and entry["metrics"]["perplexity,none"] > 1


def test_lora_baseline_evaluates_the_same_way(tmp_path):
    """FedEx-LoRA's final adapter/ (PEFT's files + the residual folded into the base weights)
    scores what its checkpoint does, and not what the base model does."""
    run = _run(tmp_path / "fedex", "--method", "fedex-lora", "--rounds", "1")
    final = _eval(run, final=1)
    assert final["record"]["method"] == "fedex-lora"
    ckpt = _eval(run, "--round", "1")
    torch.testing.assert_close(ckpt["lls"], final["lls"], rtol=1e-5, atol=2e-4)
    initial = _eval(run, "--round", "0")
    assert (final["lls"] - initial["lls"]).abs().max() > 1e-2


def _one_line(rc, err, phrase, command="fastseq eval"):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error:") and phrase in lines[0], err


def test_bad_input_is_one_line_and_writes_nothing(scl_run, tmp_path, capsys, monkeypatch):
    cases = [
        ([str(tmp_path / "nope")], "cannot evaluate: " + str(tmp_path / "nope") + " does not exist; pass the directory"),
        ([str(tmp_path)], "has no config.json (is it a fastseq run directory?)"),
        ([str(scl_run), "--round", "7"], "last 2 rounds; saved: 0 (the initial adapter: the base model), 1, 2"),
        ([str(scl_run), "--tasks", "fastseq_medqa_mni"], "unknown lm-eval task 'fastseq_medqa_mni' (did you mean "
                                                         "fastseq_medqa_mini"),
        ([str(scl_run), "--include-path", str(tmp_path / "none")], "is not a folder"),
    ]
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "config.json").write_text(json.dumps({"model": "tiny-bert", "task": "synthetic"}))
    cases.append(([str(classifier)], "lm-eval scores causal language models"))
    before = sorted(p.name for p in (scl_run / "harness").iterdir()) if (scl_run / "harness").exists() else []
    for argv, phrase in cases:
        if "--tasks" not in argv:
            argv = argv + ["--tasks", TASK]
        capsys.readouterr()
        _one_line(main(["eval", *argv]), capsys.readouterr().err, phrase)
    assert not (tmp_path / "harness").exists() and not (classifier / "harness").exists()
    after = sorted(p.name for p in (scl_run / "harness").iterdir()) if (scl_run / "harness").exists() else []
    assert after == before

    # --harness-tasks during a run: checked before anything is written
    runs = {"fedsa": ([*TINY_RUN, "--method", "fedsa-lora"], "fedsa-lora scores each client's own model instead"),
            "classifier": (["--model", "tiny-llama", "--task", "synthetic", "--rounds", "1", "--no-progress"],
                           "harness_tasks: lm-eval scores causal language models; task 'synthetic'")}
    for name, (argv, phrase) in runs.items():
        out = tmp_path / f"run-{name}"
        capsys.readouterr()
        _one_line(main(["run", *argv, "--harness-tasks", TASK, "--out", str(out)]), capsys.readouterr().err, phrase,
                  "fastseq run")
        assert not (out / "metrics.jsonl").exists() and not (out / "harness").exists()

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    _one_line(main(["eval", str(scl_run), "--tasks", TASK]), capsys.readouterr().err,
              'pip install "fastseq[harness]"')
