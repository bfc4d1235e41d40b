"""Commands scrollsam prints for pasting into a shell stay one word per path (spaces, ``ü``),
and the sweep's dashboard URL is encoded one way throughout; a sweep whose base config cannot
train creates nothing."""

from __future__ import annotations

import shlex
from pathlib import Path

import sqlalchemy.engine

import scrollsam.demo
import scrollsam.train.loop
from scrollsam.cli import main
from scrollsam.demo import DemoResult
from scrollsam.sweep import run_sweep
from scrollsam.sweep.report import SweepResult, format_report
from scrollsam.sweep.space import load_space
from scrollsam.sweep.storage import safe_url
from scrollsam.train.distributed import resume_hint

ODD = "runs/rün 1"


def _command_after(text: str, marker: str) -> list[str]:
    """The words of the command that follows ``marker`` on its line of ``text``."""
    (line,) = [line for line in text.splitlines() if marker in line]
    return shlex.split(line.split(marker, 1)[1].rstrip(")"))


def test_train_prints_its_run_and_tensorboard_command_quoted(tmp_path, monkeypatch, capsys):
    # before: run: runs/rün 1  (checkpoints ...; tensorboard --logdir runs/rün 1/tb)
    monkeypatch.setattr(scrollsam.train.loop, "train", lambda cfg, **kw: Path(cfg.out))
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"out={ODD}"]) == 0
    out = capsys.readouterr().out
    assert shlex.split(out.split("run: ", 1)[1].split("  (")[0]) == [ODD]
    assert _command_after(out, "; ") == ["tensorboard", "--logdir", f"{ODD}/tb"]


def test_the_demo_prints_its_paths_and_tensorboard_command_quoted(tmp_path, monkeypatch,
                                                                  capsys):
    out = Path("my demo")
    result = DemoResult(out, out / "run", out / "pred", {"f0.5": 0.5}, 1.0)
    monkeypatch.setattr(scrollsam.demo, "run_demo", lambda *a, **kw: result)
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert _command_after(text, "tensorboard  ") == ["tensorboard", "--logdir", "my demo/run/tb"]
    assert _command_after(text, "  run  ")[0] == "my demo/run"
    assert _command_after(text, "  data  ") == ["my demo/data"]


def test_the_resume_hint_of_a_lost_torchrun_process_is_quoted(tmp_path):
    run = tmp_path / "my rün"
    run.mkdir()
    (run / "config.yaml").write_text("out: .\n")
    hint = resume_hint(run)
    assert shlex.split(hint.split("`")[1]) == ["scrollsam", "train", f"out={run}", "--resume"]


def test_the_sweep_report_quotes_its_commands_and_encodes_the_url_one_way(tmp_path):
    # before: optuna-dashboard sqlite:////.../sw rel %C3%BC/study.db (space raw, ü encoded)
    out = tmp_path / "sw rel ü"
    url = safe_url(f"sqlite:///{out / 'study.db'}")  # as the sweep gives it to the report
    assert " " not in url and "%20" in url and "%C3%BC" in url
    assert sqlalchemy.engine.make_url(url).database == str(out / "study.db")
    text = format_report(SweepResult("s", url, out, {}, [], None))
    dashboard = _command_after(text, "dashboard:   ")
    assert dashboard == ["optuna-dashboard", url]
    assert _command_after(text, "tensorboard: ") == ["tensorboard", "--logdir", str(out)]
    from scrollsam.sweep.storage import sqlite_url

    assert safe_url(sqlite_url(out / "study.db")) == url  # the URL the sweep opens: the same


def test_a_sweep_whose_base_cannot_train_creates_nothing(data, tmp_path):
    # before: sw/ and sw/study.db were made, then trial 0 failed with this error
    from scrollsam.config import load_config
    from scrollsam.errors import InputError

    base = load_config(None, [f"data.root={data}", "data.train=[train/1]",
                              "data.valid=[train/1]", "model.type=tiny"])
    space_file = tmp_path / "space.yaml"
    space_file.write_text("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    out = tmp_path / "new" / "sw"
    try:
        run_sweep(base, load_space(space_file, base), trials=1, out=out)
    except InputError as err:
        assert "distinct names" in str(err)
    else:
        raise AssertionError("the sweep started")
    assert not (tmp_path / "new").exists()


def test_a_stopped_demo_says_how_to_finish_it(tmp_path, monkeypatch, capsys):
    """Before: `continue with: scrollsam train out=demo/run --resume`, which finishes the
    training but leaves the demo without its prediction and score (QA)."""
    import signal

    import scrollsam.demo as demo
    import scrollsam.train.loop as loop
    from scrollsam.cli import main
    from scrollsam.train.stop import TrainingStopped

    def stopped(cfg, **kw):
        raise TrainingStopped(signal.SIGINT, step=12, run=Path(cfg.out))

    monkeypatch.setattr(demo, "synth_demo_data", lambda folder: folder.mkdir(parents=True))
    monkeypatch.setattr(loop, "train", stopped)
    out = tmp_path / "my demo"
    assert main(["demo", "--out", str(out), "--input", "slices"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"stopped by SIGINT after step 12, before the prediction: run `scrollsam demo "
                   f"--out '{out}' --input slices` again (it starts over), or finish the training "
                   f"with `scrollsam train out='{out}/run' --resume` and then `scrollsam predict "
                   f"--run '{out}/run' --fragment '{out}/data/train/9' --out '{out}/pred'`"), err
