"""``scrollsam sweep``: space files, trials as run dirs, pruning, shared studies, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import scrollsam
import scrollsam.sweep.study as study_mod
from scrollsam.cli import main
from scrollsam.config import load_config
from scrollsam.errors import ConfigError, WriteError
from scrollsam.sweep import load_space, run_sweep
from scrollsam.train.loop import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SRC = Path(scrollsam.__file__).resolve().parents[1]
SPACE = ("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
         "model.trainable: [[mask_decoder], [prompt_encoder, mask_decoder]]\n")


@pytest.fixture(autouse=True)
def fragments_checked_with_real_training(monkeypatch):
    """The base config's fragments are checked before a sweep starts (the real check) unless
    the test stands in for training (``study_mod.train``): such tests have no data."""
    real_check, real_train = study_mod.check_base_fragments, study_mod.train

    def check(base, space):
        if study_mod.train is real_train:
            real_check(base, space)

    monkeypatch.setattr(study_mod, "check_base_fragments", check)


def _overrides(data: Path, *extra: str) -> list[str]:
    """A 2-step run of the tiny model, validated after each step."""
    return [f"data.root={data}", "data.train=[train/1]", "data.valid=[train/2]",
            "model.type=tiny", "model.image_size=64", "train.batch_size=3", "train.steps=2",
            "train.warmup=1", "train.eval_every=1", "train.save_every=1", "train.device=cpu",
            "log.images=false", "prompts.corrective_rounds=1", *extra]


def _space(tmp_path: Path, text: str = SPACE) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def _subprocess_env() -> dict[str, str]:
    """This checkout's scrollsam first (an installed copy may be another branch's)."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_WAIT_POLICY": "PASSIVE"}


def test_three_trial_sweep_writes_the_best_config(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--space", str(_space(tmp_path)), "--trials", "3", "--out", str(out),
            *_overrides(data)]
    assert main(args) == 0
    report = capsys.readouterr().out
    trials = _study(out).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:  # each trial an ordinary run dir
        run = out / f"trial_{t.number:04d}"
        assert {"config.yaml", "best.pt", "last.pt", "tb"} <= {p.name for p in run.iterdir()}
        assert t.user_attrs["run_dir"] == str(run.resolve())
        assert sorted(t.intermediate_values) == [1, 2]
    assert trials[0].user_attrs["baseline"] and trials[0].params == {  # the base config's values
        "train.lr": 1e-4, "model.trainable": "[prompt_encoder, mask_decoder]"}
    best = max(trials, key=lambda t: t.value)
    cfg = load_config(out / "best_config.yaml")  # ready for `scrollsam train`
    assert cfg.train.lr == best.params["train.lr"]
    assert cfg.model.trainable == yaml.safe_load(best.params["model.trainable"])
    assert cfg.out == str(out / "best") and cfg.train.steps == 2
    assert "best trials:" in report and f"{best.value:.4f}" in report
    assert "parameter importances" in report and "optuna-dashboard sqlite:///" in report
    # the same command again: the target is met, nothing more runs
    assert main(args) == 0
    assert len(_study(out).get_trials()) == 3


def test_a_pruned_trial_is_marked_pruned_and_keeps_its_run_dir(data, tmp_path):
    out = tmp_path / "sweep"
    base = load_config(None, _overrides(data))
    result = run_sweep(base, load_space(_space(tmp_path), base), trials=1, out=out,
                       pruner=optuna.pruners.ThresholdPruner(lower=1.01))  # F0.5 <= 1: pruned
    (trial,) = _study(out).get_trials()
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]  # stopped at the first of 2 evaluations
    assert (out / "trial_0000" / "best.pt").is_file()
    assert result.counts == {"PRUNED": 1} and result.best_config is None
    assert not (out / "best_config.yaml").exists()
    assert "at least 3 complete trials (have 0)" in result.importance_note


def test_median_pruner_is_the_default_and_importances_need_trials(data, tmp_path):
    from scrollsam.sweep import make_pruner

    pruner = make_pruner()
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    base = load_config(None, _overrides(data))
    result = run_sweep(base, load_space(_space(tmp_path), base), trials=1, out=tmp_path / "s")
    assert result.counts == {"COMPLETE": 1} and result.importances == {}
    assert "have 1" in result.importance_note


def test_an_exception_in_on_eval_ends_training_and_propagates(data, tmp_path):
    class Stop(Exception):
        pass

    seen = []

    def on_eval(step, scores):
        seen.append((step, scores["f0.5"]))
        raise Stop

    cfg = load_config(None, [f"out={tmp_path / 'run'}", *_overrides(data)])
    with pytest.raises(Stop):
        train(cfg, progress=False, on_eval=on_eval)
    assert [s for s, _ in seen] == [1]
    assert (tmp_path / "run" / "best.pt").is_file()
    assert list((tmp_path / "run" / "tb").iterdir())  # TensorBoard closed, events on disk


# Each worker holds its first trial until the other worker is inside a trial too, so the two
# really share the study (without this one could finish every trial before the other starts).
WORKER = """
import sys, time
import optuna
import scrollsam.sweep.study as study_mod

real_train, held = study_mod.train, []

def train(cfg, **kwargs):
    if not held:
        held.append(True)
        storage, name = sys.argv[1], sys.argv[2]
        deadline = time.monotonic() + 300  # both workers in a trial, however loaded the CPU
        while time.monotonic() < deadline:
            running = optuna.load_study(study_name=name, storage=storage).get_trials(
                states=(optuna.trial.TrialState.RUNNING,))
            if len(running) >= 2:
                break
            time.sleep(0.2)
    return real_train(cfg, **kwargs)

study_mod.train = train
from scrollsam.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_two_processes_on_one_sqlite_study_run_distinct_trials(data, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    args = ["sweep", "--space", str(_space(tmp_path)), "--trials", "2", "--out", str(out),
            "--study", "shared", "--storage", storage, "--no-baseline", *_overrides(data)]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, storage, "shared", *args],
                                env=_subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert len(trials) >= 2 and all(t.state == TrialState.COMPLETE for t in trials), logs
    assert {t.user_attrs["pid"] for t in trials} == {w.pid for w in workers}
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(dirs)) == len(trials)
    assert all((Path(d) / "best.pt").is_file() for d in dirs)


def test_a_killed_sweep_continues_and_leaves_the_running_trials_dir(data, tmp_path):
    out = tmp_path / "sweep"
    space = _space(tmp_path)
    args = ["sweep", "--space", str(space), "--trials", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "scrollsam", *args,
                             *_overrides(data, "train.steps=100000", "train.eval_every=1000")],
                            env=_subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = out / "trial_0000"
    deadline = time.monotonic() + 300
    while not (first / "config.yaml").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    time.sleep(1.0)  # into training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _study(out).get_trials()[0].state == TrialState.RUNNING

    def listing() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(first)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in first.rglob("*")}

    left = listing()
    assert main([*args, *_overrides(data)]) == 0  # the same command (shorter trials)
    trials = _study(out).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    assert listing() == left  # never written into
    assert (out / "trial_0001" / "best.pt").is_file() and (out / "trial_0002").is_dir()


def test_a_trial_never_writes_into_an_existing_run_dir(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    (out / "trial_0000").mkdir(parents=True)
    (out / "trial_0000" / "notes.txt").write_text("precious")  # from a study since deleted
    code = main(["sweep", "--space", str(_space(tmp_path)), "--trials", "1", "--out", str(out),
                 *_overrides(data)])
    assert code == 2 and "trial 0's run dir exists" in capsys.readouterr().err
    assert [p.name for p in (out / "trial_0000").iterdir()] == ["notes.txt"]
    assert (out / "trial_0000" / "notes.txt").read_text() == "precious"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_whose_values_fail_is_marked_failed_and_the_sweep_goes_on(data, tmp_path):
    out = tmp_path / "sweep"
    base = load_config(None, _overrides(data, "train.cache=memory", "data.pixel_augment=false",
                                        "model.trainable=[mask_decoder]"))
    space = load_space(_space(tmp_path, "model.lora_rank: [0, 2]\n"), base)
    # trial 0: the base's rank 0 (the baseline); trial 1: rank 2, whose LoRA adapters refuse the
    # embedding cache when training starts: a ConfigError of these values, not of the sweep
    sampler = optuna.samplers.PartialFixedSampler({"model.lora_rank": 2},
                                                  optuna.samplers.RandomSampler(seed=0))
    # (every later trial fails, so the call stops after 2 failures, short of its target of 2)
    result = run_sweep(base, space, trials=2, out=out, sampler=sampler)
    ok, *failed = _study(out).get_trials()
    assert (ok.params, ok.state) == ({"model.lora_rank": 0}, TrialState.COMPLETE)
    assert len(failed) == 2
    for t in failed:
        assert (t.params, t.state) == ({"model.lora_rank": 2}, TrialState.FAIL)
        assert "cache" in t.user_attrs["error"]
    assert result.counts == {"COMPLETE": 1, "FAIL": 2} and result.best_config is not None


@pytest.mark.parametrize("text, message", [
    ("train.lrr: {low: 1.0e-5, high: 1.0e-3}\n", "unknown config key train.lrr (did you mean"),
    ("train.lr: {low: 1.0e-3, high: 1.0e-5}\n", "train.lr: expected low <= high"),
    ("data.z_start: []\n", "data.z_start: expected a non-empty list of choices"),
    ("train.lr: {low: 0, high: 1.0e-3, log: true}\n", "train.lr: a log range needs low > 0"),
    ("train.lr: {lo: 1.0e-5, high: 1.0e-3}\n", "train.lr: unknown range key lo"),
    ("train.lr: {low: a, high: 1.0e-3}\n", "train.lr: low: expected a number, got 'a'"),
    ("train.lr: 1.0e-4\n", "a fixed value belongs in the base config"),
    ("data.input: {low: 0, high: 1}\n", "data.input: a range needs a number key"),
    ("train.steps: {low: 10, high: 20.5}\n", "train.steps: expected an integer, got 20.5"),
    ("train: {low: 1, high: 2}\n", "train: a config section, not a key"),
    ("data.input: [ir, xray]\n", "data.input: expected one of ir, slices, got 'xray'"),
    ("out: [a, b]\n", "out: the sweep sets each trial's run dir"),
    ("[1, 2]\n", "expected a mapping of config keys"),
    ("train.lr: [1.0e-4\n", "not valid YAML: expected ',' or ']', but got '<stream end>' at "
                           "line 2, column 1; while parsing a flow sequence at line 1"),
    ("train.lr: [1.0e-4]\n\x01\n", "not valid YAML: unacceptable character #x0001"),
])
def test_a_bad_space_file_is_one_clear_error_with_exit_2(tmp_path, capsys, text, message):
    space = _space(tmp_path, text)
    out = tmp_path / "sweep"
    code = main(["sweep", "--space", str(space), "--trials", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err and str(space) in err, err
    assert not out.exists()  # nothing started


def test_space_ranges_follow_the_key_types(tmp_path):
    base = load_config(None, [])
    space = load_space(_space(tmp_path, "train.lr: {low: 1, high: 2}\n"
                                        "train.warmup: {low: 0, high: 50, step: 10}\n"
                                        "data.z_start: [null, 20]\n"), base)
    lr, warmup, z = space.params
    assert (lr.kind, lr.low, lr.high) == ("float", 1.0, 2.0)
    assert (warmup.kind, warmup.step) == ("int", 10)
    assert z.kind == "choice" and z.choices == (None, 20)
    study = optuna.create_study()
    values = space.suggest(study.ask())
    assert isinstance(values["train.warmup"], int) and values["train.warmup"] % 10 == 0
    assert space.base_params(base) is None  # lr 1e-4 lies outside [1, 2]: no baseline trial


def test_the_sweep_demo_preset_is_valid():
    base = load_config(CONFIGS / "sweep_demo.yaml")
    space = load_space(CONFIGS / "sweep_demo_space.yaml", base)
    assert base.model.type == "tiny" and base.train.device == "cpu"
    assert base.train.steps // base.train.eval_every >= 3  # room for the pruner to act
    assert len(space.params) >= 2
    assert space.base_params(base) is not None  # trial 0 is the demo's own values
    demo = load_config(CONFIGS / "demo.yaml")
    assert (base.data, base.model) == (demo.data, demo.model)  # the demo's problem, shorter


def _fake_train(fails: set[int] | None = None):
    """A stand-in for training: trial ``n`` (read from its run dir) raises a ConfigError of its
    values when ``n`` is in ``fails`` (None: every trial), else reports F0.5 0.5 at step 1."""

    def fake(cfg, *, progress, on_eval):
        number = int(Path(cfg.out).name.removeprefix("trial_"))
        if fails is None or number in fails:
            raise ConfigError(f"trial {number} cannot train")
        on_eval(1, {"f0.5": 0.5})

    return fake


def test_failed_trials_do_not_count_against_the_target_of_one_call(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(study_mod, "train", _fake_train(fails={1, 3}))
    out = tmp_path / "sweep"
    args = ["sweep", "--space", str(_space(tmp_path)), "--trials", "3", "--out", str(out),
            "--pruner", "none"]
    assert main(args) == 0
    states = [t.state for t in _study(out).get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                      TrialState.FAIL, TrialState.COMPLETE]
    assert "5 trials (3 complete, 2 fail)" in capsys.readouterr().out
    assert main(args) == 0  # the target is met: nothing more runs
    assert len(_study(out).get_trials()) == 5


def test_a_sweep_whose_every_trial_fails_stops_after_as_many_failures_as_its_target(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(study_mod, "train", _fake_train())
    out = tmp_path / "sweep"
    args = ["sweep", "--space", str(_space(tmp_path)), "--trials", "3", "--out", str(out)]
    assert main(args) == 1  # no trial completed
    assert [t.state for t in _study(out).get_trials()] == [TrialState.FAIL] * 3
    (stop,) = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert "\n" not in stop
    assert "3 trials failed in this call" in stop and "--trials 3" in stop, stop
    assert main(args) == 1  # the same command again tries as many more, then stops again
    assert len(_study(out).get_trials()) == 6


def test_a_baseline_stopped_by_a_full_disk_runs_again_when_the_sweep_continues(
        tmp_path, monkeypatch, capsys):
    # Before: the baseline was queued only in a new study, so a baseline trial that a full disk
    # (or a kill, or Ctrl-C) stopped was never run again and the table lost its comparison.
    calls = []

    def full_disk_once(cfg, *, progress, on_eval):
        calls.append(cfg.train.lr)
        if len(calls) == 1:
            raise WriteError(f"no space left on device while writing best.pt ({cfg.out})")
        on_eval(1, {"f0.5": 0.5})

    monkeypatch.setattr(study_mod, "train", full_disk_once)
    out = tmp_path / "sweep"
    args = ["sweep", "--space", str(_space(tmp_path, "train.lr: {low: 1.0e-5, high: 1.0e-2}\n")),
            "--trials", "2", "--out", str(out), "--pruner", "none"]
    assert main(args) == 2
    assert "no space left on device" in capsys.readouterr().err
    assert main(args) == 0
    first, again, other = _study(out).get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["baseline"]
    assert again.state == TrialState.COMPLETE and again.user_attrs["baseline"]
    assert again.params == first.params and other.params != first.params
    assert calls[0] == calls[1]  # the base config's own learning rate, twice
    assert main(args) == 0 and len(_study(out).get_trials()) == 3  # not queued a third time


def test_the_table_shows_every_f05_to_four_decimals(tmp_path):
    # Before: 4 significant digits with trailing zeros cut, so 0.491 sat beside 0.4893.
    from scrollsam.sweep.report import SweepResult, TrialRow, format_report

    rows = [TrialRow(n, "COMPLETE", f, 2, 1.0, {"train.lr": 1e-3}, None)
            for n, f in ((0, 0.4934), (1, 0.491), (2, 0.5))]
    text = format_report(SweepResult("s", "sqlite://", tmp_path, {"COMPLETE": 3}, rows,
                                     tmp_path / "best_config.yaml"))
    table = [line.split()[:2] for line in text.splitlines() if line.startswith("  ")][1:4]
    assert table == [["0", "0.4934"], ["1", "0.4910"], ["2", "0.5000"]]
