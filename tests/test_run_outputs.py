"""What a run leaves on disk and on the terminal: no directory after a failure before the first
checkpoint (an existing one is never removed), progress bars only on a terminal, curves.png
with whole-number rounds and a loss panel, one time figure, and resume of a finished run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import fastseq.fed.engine as engine
from fastseq.cli import main
from fastseq.fed.engine import Hooks, run_experiment, run_seconds, show_progress
from fastseq.fed.plots import build_figure

from fed_helpers import history, tiny_config

QUIET = dict(echo=lambda s: None)


class Boom(RuntimeError):
    pass


def _fail_round_0_evaluation(monkeypatch):
    """The run fails after its directory exists, before its first checkpoint."""
    from fastseq.fed.server import Server

    def evaluate(self, round):
        raise Boom("evaluation failed")

    monkeypatch.setattr(Server, "evaluate", evaluate)


# --- failed runs leave nothing behind --------------------------------------------------------

def test_failure_before_the_first_checkpoint_removes_the_new_directory(tmp_path, monkeypatch):
    _fail_round_0_evaluation(monkeypatch)
    cfg = tiny_config(tmp_path, "new/nested/run")
    with pytest.raises(Boom):
        run_experiment(cfg, **QUIET)
    assert list(tmp_path.iterdir()) == []  # the run folder and the parents it created


def test_interrupt_before_the_first_checkpoint_removes_the_new_directory(tmp_path, monkeypatch):
    from fastseq.fed.server import Server

    def interrupted(self, round):
        raise KeyboardInterrupt

    monkeypatch.setattr(Server, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(tmp_path, "run"), **QUIET)
    assert not (tmp_path / "run").exists()


def test_default_output_directory_is_not_left_behind(tmp_path, monkeypatch, capsys):
    """`fastseq run` without --out, failing while it loads the model, leaves no runs/<stamp>-scl/."""
    monkeypatch.chdir(tmp_path)

    def no_model(*args, **kwargs):
        from fastseq.models import ModelLoadError

        raise ModelLoadError("cannot load the model (simulated)")

    monkeypatch.setattr("fastseq.models.load_model", no_model)
    assert main(["run", "--model", "tiny-llama", "--task", "synthetic", "--no-progress"]) == 2
    assert "simulated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_directories_are_never_removed(tmp_path, monkeypatch):
    _fail_round_0_evaluation(monkeypatch)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Boom):
        run_experiment(tiny_config(tmp_path, "empty"), **QUIET)
    assert empty.is_dir()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "notes.txt").write_text("results of an earlier experiment")
    with pytest.raises(Boom):
        run_experiment(tiny_config(tmp_path, "earlier"), **QUIET)
    assert (earlier / "notes.txt").read_text() == "results of an earlier experiment"
    # a parent that existed stays too
    with pytest.raises(Boom):
        run_experiment(tiny_config(tmp_path, "earlier/sub/run"), **QUIET)
    assert earlier.is_dir() and not (earlier / "sub").exists()


class CrashAfter(Hooks):
    def __init__(self, round):
        self.round = round

    def on_round_end(self, round, record):
        if round == self.round:
            raise Boom(f"crash after round {round}")


def test_failure_after_the_first_checkpoint_keeps_the_run_for_resume(tmp_path):
    cfg = tiny_config(tmp_path, "run", rounds=2)
    with pytest.raises(Boom):
        run_experiment(cfg, hooks=CrashAfter(1), **QUIET)
    assert (tmp_path / "run" / "checkpoints" / "round_1" / "server.json").is_file()
    run_experiment(tiny_config(tmp_path, "run", rounds=2), resume=True, **QUIET)
    assert [h["round"] for h in history(tmp_path / "run")] == [0, 1, 2]


# --- time, resume of a finished run ----------------------------------------------------------

def test_summary_and_compare_report_the_same_seconds_across_a_resume(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "run", rounds=2)
    with pytest.raises(Boom):
        run_experiment(cfg, hooks=CrashAfter(1), **QUIET)
    summary = run_experiment(tiny_config(tmp_path, "run", rounds=2), resume=True, **QUIET)
    hist = history(tmp_path / "run")
    assert summary["seconds"] == pytest.approx(sum(h["seconds"] for h in hist))  # both invocations' rounds
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["seconds"] == summary["seconds"]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "run"), "--plot", str(tmp_path / "c.png")]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[-1] == f"{summary['seconds']:.1f}" == f"{run_seconds(hist):.1f}"


def test_resuming_a_finished_run_changes_nothing_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    run_experiment(tiny_config(tmp_path, "run", rounds=1), **QUIET)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has already finished all 1 rounds: nothing to resume, nothing was changed" in err
    assert "--rounds N" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    # training it further is a resume, not an error
    assert main(["run", "--resume", str(out), "--rounds", "2", "--no-progress"]) == 0
    assert [h["round"] for h in history(out)] == [0, 1, 2]


def test_a_new_run_never_writes_over_an_earlier_one(tmp_path, capsys):
    """`fastseq run --out DIR` where DIR holds a run: one line, exit 2, every file untouched;
    an empty existing directory is fine."""
    out = tmp_path / "run"
    run_experiment(tiny_config(tmp_path, "run", rounds=1), **QUIET)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(dict(tiny_config(tmp_path, "run", rounds=1).to_dict(), lr=3e-2)))
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"output directory {out} already holds a run" in err and "--resume" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    (tmp_path / "empty").mkdir()
    run_experiment(tiny_config(tmp_path, "empty", rounds=1), **QUIET)
    assert (tmp_path / "empty" / "summary.json").is_file()


# --- progress bars ---------------------------------------------------------------------------

class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("progress,tty,shown", [(None, False, False), (None, True, True), (True, False, True),
                                                (False, True, False)])
def test_progress_bars_only_on_a_terminal_unless_asked(progress, tty, shown, tmp_path, monkeypatch):
    stream = _Stream(tty)
    monkeypatch.setattr(engine.sys, "stderr", stream)
    cfg = tiny_config(tmp_path, "run", rounds=1, progress=progress)
    assert show_progress(cfg) is shown
    monkeypatch.setattr("sys.stderr", stream)  # where tqdm writes
    run_experiment(cfg, **QUIET)
    text = stream.getvalue()
    if shown:
        assert "rounds" in text and "\r" in text
    else:
        assert text == "", text  # no control characters in a log file


def test_cli_progress_flag_is_recorded(tmp_path):
    assert main(["run", "--model", "tiny-llama", "--task", "synthetic", "--max-examples", "40", "--rounds", "1",
                 "--clients", "2", "--clients-per-round", "1", "--partition", "iid", "--local-steps", "1",
                 "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["progress"] is None  # decided at run time


# --- curves.png ------------------------------------------------------------------------------

def _hist(rounds=3):
    return [{"round": r, "train_loss": None if r == 0 else 1.0 / r, "eval_loss": 1.5 - 0.1 * r,
             "accuracy": 0.2 + 0.1 * r, "uplink_bytes": 1000 * r, "downlink_bytes": 900 * r} for r in range(rounds + 1)]


@pytest.mark.parametrize("rounds", [1, 2, 3, 7])
def test_curves_have_whole_round_ticks_and_a_loss_panel(rounds):
    import matplotlib.pyplot as plt

    fig = build_figure([("scl", _hist(rounds)), ("ffa-lora", _hist(rounds))])
    try:
        fig.canvas.draw()
        axes = fig.get_axes()
        assert [ax.get_title() for ax in axes] == ["accuracy per round", "train loss (solid) and eval loss (dashed)",
                                                   "communication"]
        for ax in axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        loss = axes[1]
        labels = [line.get_label() for line in loss.get_lines()]
        assert labels == ["scl train", "scl eval", "ffa-lora train", "ffa-lora eval"]
        train = loss.get_lines()[0]
        assert list(train.get_xdata()) == list(range(1, rounds + 1))  # round 0 has no train loss
        assert list(loss.get_lines()[1].get_xdata()) == list(range(rounds + 1))
    finally:
        plt.close(fig)


def test_run_writes_curves_png(tmp_path):
    run_experiment(tiny_config(tmp_path, "run", rounds=1), **QUIET)
    png = Path(tmp_path / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
