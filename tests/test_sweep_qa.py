"""``scrollsam sweep``: what QA found (the best config, --out, Ctrl-C, space files, messages)."""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_sweep import _overrides, _space, _study, fragments_checked_with_real_training  # noqa: F401

import scrollsam.sweep.storage as storage_mod
import scrollsam.sweep.study as study_mod
from scrollsam.cli import main
from scrollsam.config import load_config, save_config
from scrollsam.sweep import load_space
from scrollsam.sweep.report import write_best_config
from scrollsam.train.loop import train
from scrollsam.train.rundir import stored_config
from scrollsam.train.stop import TrainingStopped

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


def test_a_bad_storage_leaves_no_empty_out_folder(data, tmp_path, capsys):
    # Before: --out was made before the storage was opened, and stayed behind, empty
    out = tmp_path / "new" / "sw"
    code = main(["sweep", "--space", str(_space(tmp_path, LR)), "--trials", "1", "--out",
                 str(out), "--storage", "nosuchdb://host/db", *_overrides(data)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot open the study storage"), err
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()  # a folder that was there before is left as it was
    assert main(["sweep", "--space", str(_space(tmp_path, LR)), "--trials", "1", "--out",
                 str(tmp_path / "old"), "--storage", "nosuchdb://host/db",
                 *_overrides(data)]) == 2
    assert (tmp_path / "old").is_dir()


def _sweep_args(tmp_path: Path, trials: int) -> list[str]:
    return ["sweep", "--space", str(_space(tmp_path, LR)), "--trials", str(trials), "--out",
            str(tmp_path / "sw"), "--pruner", "none"]


def test_ctrl_c_between_trials_leaves_no_trial_running(tmp_path, monkeypatch, capsys):
    # Before: the KeyboardInterrupt landed wherever Optuna was, e.g. in study.ask(), leaving the
    # next trial RUNNING for ever (no host, no heartbeat: nothing ever failed it)
    monkeypatch.setattr(study_mod, "train", _scored_by_steps)
    real_ask = optuna.Study.ask

    def ask(self, *args, **kwargs):  # Ctrl-C while Optuna begins trial 1
        trial = real_ask(self, *args, **kwargs)
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask)
    assert main(_sweep_args(tmp_path, 3)) == 130
    err = capsys.readouterr().err
    assert "sweep stopped by SIGINT before trial 1 started" in err, err
    assert "run the same scrollsam sweep command again" in err and "--resume" not in err
    states = [t.state for t in _study(tmp_path / "sw").get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL]
    assert not (tmp_path / "sw" / "trial_0001").exists()
    monkeypatch.setattr(optuna.Study, "ask", real_ask)
    assert main(_sweep_args(tmp_path, 3)) == 0  # the same command goes on
    assert len(_study(tmp_path / "sw").get_trials(states=(TrialState.COMPLETE,))) == 3


def test_ctrl_c_in_a_trial_says_how_to_continue_the_sweep(tmp_path, monkeypatch, capsys):
    # Before: training's "continue with: scrollsam train out=.../trial_0001 --resume", for a
    # trial the sweep had marked failed: following it trained outside the study
    def stopped_in_trial_1(cfg, *, progress, on_eval):
        if cfg.out.endswith("trial_0001"):
            raise TrainingStopped(signal.SIGINT, step=1, run=Path(cfg.out))
        on_eval(1, {"f0.5": 0.5})

    monkeypatch.setattr(study_mod, "train", stopped_in_trial_1)
    assert main(_sweep_args(tmp_path, 3)) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scrollsam train" not in err, err
    assert "sweep stopped by SIGINT in trial 1, which is marked failed" in err
    assert "run the same scrollsam sweep command again" in err
    assert [t.state for t in _study(tmp_path / "sw").get_trials()] == [TrialState.COMPLETE,
                                                                       TrialState.FAIL]


def test_a_trial_begun_but_never_started_is_failed_by_a_later_call(tmp_path, monkeypatch,
                                                                   capsys):
    # Before: a trial whose process died between Optuna's ask and the sweep recording its host
    # stayed RUNNING for ever, even in the report of later calls
    monkeypatch.setattr(study_mod, "train", _scored_by_steps)
    assert main(_sweep_args(tmp_path, 1)) == 0
    orphan = _study(tmp_path / "sw").ask()  # RUNNING, no host, no heartbeat
    monkeypatch.setattr(storage_mod, "UNSTARTED_S", 0.0, raising=False)  # (raising: new)
    time.sleep(0.01)
    capsys.readouterr()
    assert main(_sweep_args(tmp_path, 1)) == 0  # a report-only call
    assert _study(tmp_path / "sw").get_trials()[orphan.number].state == TrialState.FAIL
    assert "(1 complete, 1 fail)" in capsys.readouterr().out


def test_a_trial_silent_past_the_grace_period_is_failed_by_a_report_only_call(tmp_path,
                                                                              monkeypatch):
    # Before: Optuna fails heartbeat-stale trials only when a trial starts
    monkeypatch.setattr(study_mod, "train", _scored_by_steps)
    assert main(_sweep_args(tmp_path, 1)) == 0
    study = _study(tmp_path / "sw")
    lost = study.ask()
    lost.set_user_attr("host", "another-host")
    study._storage.record_heartbeat(lost._trial_id)
    monkeypatch.setattr(storage_mod, "GRACE_S", 1)
    time.sleep(2.1)  # the database clock counts seconds
    assert main(_sweep_args(tmp_path, 1)) == 0
    assert _study(tmp_path / "sw").get_trials()[lost.number].state == TrialState.FAIL


def test_a_real_ctrl_c_in_training_ends_the_sweep_with_its_trial_failed(data, tmp_path,
                                                                        monkeypatch, capsys):
    def ctrl_c_at_first_eval(cfg, *, progress, on_eval):
        def on_eval_then_ctrl_c(step, scores):
            on_eval(step, scores)
            os.kill(os.getpid(), signal.SIGINT)  # training's handler: stop after this step

        return train(cfg, progress=progress, on_eval=on_eval_then_ctrl_c)

    monkeypatch.setattr(study_mod, "train", ctrl_c_at_first_eval)
    before = signal.getsignal(signal.SIGINT)  # pytest-xdist's workers ignore SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    args = [*_sweep_args(tmp_path, 2), *_overrides(data)]
    try:
        assert main(args) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert "sweep stopped by SIGINT in trial 0" in err and "--resume" not in err, err
    (trial,) = _study(tmp_path / "sw").get_trials()
    assert trial.state == TrialState.FAIL and (tmp_path / "sw" / "trial_0000" / "last.pt").is_file()


@pytest.mark.parametrize("text, message", [
    # Before: every trial got lr 0.0001, and Optuna warned once per trial
    ("train.lr: {low: 1.0e-4, high: 1.0e-3, step: 0.5}\n",
     "train.lr: step 0.5 is larger than the range 0.0001 .. 0.001: every trial would get 0.0001"),
    # Before: silently 0 .. 9
    ("train.warmup: {low: 0, high: 10, step: 3}\n",
     "train.warmup: step 3 does not divide the range 0 .. 10 evenly; the nearest valid high is 9 "
     "or 12"),
    ("loss.dice_weight: {low: 0.5, high: 2.0, step: 0.4}\n",
     "loss.dice_weight: step 0.4 does not divide the range 0.5 .. 2.0 evenly; the nearest valid "
     "high is 1.7 or 2.1"),
    # Before: the last one silently won
    ("train.lr: {low: 1.0e-5, high: 1.0e-3}\ndata.z_start: [16, 20]\ntrain.lr: [1.0e-4]\n",
     "train.lr: given twice, at lines 1 and 3"),
    ("train.lr: {low: 1.0e-5, high: 1.0e-3, low: 1.0e-4}\n",
     "train.lr: low: given twice, at line 1, columns 12 and 39"),
])
def test_a_step_off_the_range_or_a_key_given_twice_is_an_error(tmp_path, capsys, text,
                                                               message):
    space = _space(tmp_path, text)
    code = main(["sweep", "--space", str(space), "--trials", "1", "--out",
                 str(tmp_path / "sw")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err and str(space) in err, err
    assert not (tmp_path / "sw").exists()


def test_a_step_that_divides_the_range_as_written_is_taken(tmp_path):
    base = load_config(None, [])
    space = load_space(_space(tmp_path, "loss.dice_weight: {low: 0.1, high: 0.5, step: 0.1}\n"
                                        "train.warmup: {low: 0, high: 100, step: 20}\n"), base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's "high is not divisible by step" warning
        values = space.suggest(optuna.create_study().ask())
    assert 0.1 <= values["loss.dice_weight"] <= 0.5 and values["train.warmup"] % 20 == 0


def test_no_baseline_names_the_keys_values_and_ranges(tmp_path, caplog):
    # Before: "no baseline trial: a base config value lies outside the space"
    space = _space(tmp_path, "train.warmup: {low: 0, high: 4}\n"
                             "train.lr: {low: 1.0e-4, high: 1.0e-3}\n"  # 1e-4: inside
                             "train.steps: {low: 20, high: 100, step: 20}\n"
                             "data.z_start: [16, 20]\n")
    with caplog.at_level(logging.INFO):
        assert main(["sweep", "--space", str(space), "--trials", "0", "--out",
                     str(tmp_path / "sw"), "train.warmup=100", "train.steps=30"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if "no baseline" in r.getMessage()]
    assert line == ("no baseline trial: the base config's train.warmup=100 is outside [0, 4]; "
                    "train.steps=30 is not low 20 plus a multiple of step 20; "
                    f"data.z_start=null is not one of 16, 20 ({space})")
