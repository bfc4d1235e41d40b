"""``scrollsam sweep``: what QA found (the best config, --out, Ctrl-C, space files, messages)."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from test_sweep import _space, _study

import scrollsam.sweep.study as study_mod
from scrollsam.cli import main
from scrollsam.config import load_config, save_config
from scrollsam.sweep.report import write_best_config
from scrollsam.train.rundir import stored_config

LR = "train.lr: {low: 1.0e-5, high: 1.0e-2}\n"


def _scored_by_steps(cfg, *, progress, on_eval):
    """A stand-in for training whose F0.5 grows with train.steps (then train.lr)."""
    on_eval(1, {"f0.5": cfg.train.steps / 10 + cfg.train.lr})


def test_the_best_config_is_the_best_trials_own_config(tmp_path, monkeypatch, caplog):
    # Before: best_config.yaml was this call's base config plus the best trial's params, so a
    # report-only call with other overrides, or a continued study with another train.steps,
    # wrote values no trial used; and its out was relative to where the sweep ran.
    monkeypatch.setattr(study_mod, "train", _scored_by_steps)
    monkeypatch.chdir(tmp_path)
    space = str(_space(tmp_path, LR))
    args = ["sweep", "--space", space, "--out", "sw2", "--pruner", "none"]
    assert main([*args, "--trials", "2", "train.steps=8"]) == 0
    best = max(_study(tmp_path / "sw2").get_trials(), key=lambda t: t.value)

    def check(path: Path, out: Path) -> None:
        cfg = load_config(path)
        assert (cfg.train.steps, cfg.train.lr) == (8, best.params["train.lr"])
        assert (cfg.model.image_size, cfg.train.batch_size) == (256, 4)  # the defaults
        assert cfg.out == str(out / "best")  # absolute: trains there from any folder

    check(tmp_path / "sw2" / "best_config.yaml", tmp_path / "sw2")
    caplog.clear()
    assert main([*args, "--trials", "2", "model.image_size=128", "train.batch_size=2"]) == 0
    check(tmp_path / "sw2" / "best_config.yaml", tmp_path / "sw2")  # a report-only call
    (warning,) = [r.getMessage() for r in caplog.records if "base config" in r.getMessage()]
    assert "model.image_size=128 (was 256)" in warning and "train.batch_size=2 (was 4)" in warning
    storage = f"sqlite:///{tmp_path / 'sw2' / 'study.db'}"
    assert main(["sweep", "--space", space, "--out", "sw3", "--study", "sw2", "--storage",
                 storage, "--trials", "3", "--pruner", "none", "train.steps=4"]) == 0
    assert len(_study(tmp_path / "sw2").get_trials()) == 3  # one more trial, of 4 steps
    check(tmp_path / "sw3" / "best_config.yaml", tmp_path / "sw3")


def test_a_best_trial_of_an_older_sweep_gives_its_run_dirs_config(tmp_path, caplog):
    # trials recorded before the study stored their configs: the run dir's config.yaml
    run = tmp_path / "sw" / "trial_0000"
    run.mkdir(parents=True)
    cfg = load_config(None, ["train.steps=7", f"data.root={tmp_path}"])
    save_config(stored_config(cfg), run / "config.yaml")
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2)}
    trial = optuna.trial.create_trial(value=0.5, params={"train.lr": 1e-4}, distributions=dist,
                                      user_attrs={"run_dir": str(run)})
    path = tmp_path / "sw" / "best_config.yaml"
    assert write_best_config(trial, path, study="sw", out=tmp_path / "sw") == path
    best = load_config(path)
    assert best.train.steps == 7 and best.out == str(tmp_path / "sw" / "best")
    # its run dir gone (another host, deleted): no best config, not a stale one
    (run / "config.yaml").unlink()
    with caplog.at_level(logging.WARNING):
        assert write_best_config(trial, path, study="sw", out=tmp_path / "sw") is None
    assert not path.exists() and "best config not written" in caplog.text


def test_an_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    # Before: run_sweep's mkdir raised FileExistsError, a traceback
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (afile, afile / "sub"):
        code = main(["sweep", "--space", str(_space(tmp_path, LR)), "--trials", "1", "--out",
                     str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: --out: ") and err.count("\n") == 1, err
        assert str(out) in err
    assert afile.read_text() == "mine"


def test_a_bad_storage_leaves_no_empty_out_folder(tmp_path, capsys):
    # Before: --out was made before the storage was opened, and stayed behind, empty
    out = tmp_path / "new" / "sw"
    code = main(["sweep", "--space", str(_space(tmp_path, LR)), "--trials", "1", "--out",
                 str(out), "--storage", "nosuchdb://host/db"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot open the study storage"), err
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()  # a folder that was there before is left as it was
    assert main(["sweep", "--space", str(_space(tmp_path, LR)), "--trials", "1", "--out",
                 str(tmp_path / "old"), "--storage", "nosuchdb://host/db"]) == 2
    assert (tmp_path / "old").is_dir()
