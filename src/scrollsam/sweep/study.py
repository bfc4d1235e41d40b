"""``scrollsam sweep``: an Optuna study over config keys, each trial an ordinary run dir.

Per trial: Optuna samples the space, the base config with those values becomes the run dir
``OUT/trial_0007/`` (config.yaml, best.pt, last.pt, TensorBoard), :func:`~scrollsam.train.loop.
train` runs it and reports the validation F0.5 of every evaluation to the pruner, which may stop
the trial there (state PRUNED, its run dir kept). The trial's value is its best validation F0.5,
the score ``best.pt`` holds.

The study lives in an RDB storage: ``sqlite:///OUT/study.db`` by default, or any SQLAlchemy URL
(PostgreSQL, MySQL) so workers on many machines join one study by running the same command
with the same ``--study`` and ``--storage``. ``trials`` is a target for the whole study (trials
that completed or were pruned), so running the same command again continues a killed sweep and
does nothing more once the target is met. Failed trials do not count, but one call stops once
``trials`` of its own trials failed, so a sweep whose every trial fails ends.

A trial whose process died is marked failed and its run dir left as it was (:mod:`.storage`).
New trials get new numbers, hence fresh run dirs; an existing one is never written into.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from scrollsam.config import Config, config_to_dict, flat_keys
from scrollsam.errors import ConfigError, RunDirError
from scrollsam.sigterm import Terminated
from scrollsam.sweep.report import SweepResult, format_value, summarise
from scrollsam.sweep.space import Space, apply_params
from scrollsam.sweep.stop import StopBetweenTrials, SweepStopped
from scrollsam.sweep.storage import (
    DB_NAME,
    SweepError,
    check_out,
    fail_orphaned_trials,
    make_out,
    open_storage,
    remove_made,
    safe_url,
    sqlite_url,
)
from scrollsam.train.loop import TrainingError, open_fragments, train
from scrollsam.train.resume import absolute_paths
from scrollsam.train.stop import TrainingStopped

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards the trials target


def make_pruner(kind: str = "median", *, startup_trials: int = 3,
                warmup_steps: int = 0) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose F0.5 at an evaluation step is below the median of earlier
    trials at that step, once ``startup_trials`` trials finished and after ``warmup_steps``
    training steps; ``none``: never stop a trial early."""
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind != "median":
        raise ConfigError(f"--pruner: expected median or none, got {kind!r}")
    if startup_trials < 0 or warmup_steps < 0:
        raise ConfigError(f"--startup-trials / --warmup-steps: expected >= 0, got "
                          f"{startup_trials}, {warmup_steps}")
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                       n_warmup_steps=warmup_steps)


FRAGMENT_KEYS = ("data.root", "data.train", "data.valid")  # keys that choose the fragments


def run_sweep(base: Config, space: Space, *, trials: int, out: str | Path = "runs/sweep",
              study_name: str | None = None, storage: str | None = None,
              pruner: optuna.pruners.BasePruner | None = None,
              sampler: optuna.samplers.BaseSampler | None = None,
              baseline: bool = True, progress: bool = False) -> SweepResult:
    """Run (or continue) the study until it holds ``trials`` finished trials; see the module
    docstring. Failed trials do not count towards that target, but a call stops (with a
    warning) once ``trials`` of the trials it ran failed. Returns the summary, after writing
    ``OUT/best_config.yaml``.

    study_name: default the name of ``out``. storage: default ``sqlite:///OUT/study.db``.
    pruner: default :func:`make_pruner` (median). sampler: default TPE.
    baseline: in a new study, the first trial runs the base config's own values of the swept
        keys (when the space holds them), so the table shows what the search gained.
    progress: a progress bar per trial.
    """
    if trials < 0:
        raise ConfigError(f"--trials: expected a number >= 0, got {trials}")
    out = Path(out)
    check_out(out)
    if trials > 0:  # a base that cannot train: no folder, no study.db
        check_base_fragments(base, space)
    made = make_out(out)
    url = storage or sqlite_url(out / DB_NAME)
    name = study_name or out.resolve().name
    with _optuna_quiet():
        try:
            study = optuna.create_study(
                storage=open_storage(url), study_name=name, direction="maximize",
                sampler=sampler or optuna.samplers.TPESampler(),
                pruner=pruner if pruner is not None else make_pruner(), load_if_exists=True)
            if study.direction != optuna.study.StudyDirection.MAXIMIZE:
                raise SweepError(f"study {name} minimizes its objective: not a scrollsam sweep "
                                 f"({safe_url(url)})")
        except BaseException:  # no study: leave no empty folder behind
            remove_made(made, files=() if storage else (DB_NAME,))
            raise
        _check_space(study, space)
        _check_base(study, base)
        fail_orphaned_trials(study)
        if baseline:
            _enqueue_baseline(study, base, space)
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        if done < trials:
            log.info("study %s (%s): %d of %d trials finished; running the rest", name,
                     safe_url(url), done, trials)
            failures = _FailureLimit(trials)
            with StopBetweenTrials() as stop:
                try:
                    study.optimize(
                        lambda trial: _objective(trial, base, space, out, stop=stop,
                                                 progress=progress),
                        gc_after_trial=True,
                        callbacks=[optuna.study.MaxTrialsCallback(trials, states=FINISHED),
                                   failures, stop])
                except KeyboardInterrupt as err:  # a second signal: the trial is marked failed
                    sig = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
                    raise SweepStopped(sig, out=out) from None
            if stop.requested is not None:
                raise SweepStopped(stop.requested, out=out, detail=" between trials")
            if failures.reached:
                log.warning("sweep stopped: %d trials failed in this call, as many as --trials "
                            "%d; see their errors above, fix the base config or the space and "
                            "run the same command again", failures.failed, trials)
        return summarise(study, space, out=out, storage=safe_url(url))


class _FailureLimit:
    """Optuna callback: stops the call's optimize loop once ``limit`` of the trials it ran
    failed, so a sweep whose every trial fails ends (failed trials do not count towards the
    target, hence would otherwise run forever)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.failed = 0

    @property
    def reached(self) -> bool:
        """Whether this call stopped because too many of its trials failed."""
        return self.failed >= self.limit

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failed += 1
            if self.reached:
                study.stop()


def _objective(trial: optuna.Trial, base: Config, space: Space, out: Path, *,
               stop: StopBetweenTrials, progress: bool) -> float:
    """Train one trial; its best validation F0.5, or NaN (a failed trial) when its values make
    an invalid config or training fails (NaN loss, out of memory). A stop requested (``stop``,
    or training's own on Ctrl-C) raises SweepStopped: Optuna marks the trial failed."""
    run = out / f"trial_{trial.number:04d}"
    for key, value in (("run_dir", str(run.resolve())), ("host", socket.gethostname()),
                       ("pid", os.getpid())):
        trial.set_user_attr(key, value)
    params = space.suggest(trial)
    if run.exists() and any(run.iterdir()):
        raise RunDirError(f"trial {trial.number}'s run dir exists and is not empty ({run}); "
                         f"it belongs to another study: choose another --out or --study")
    log.info("trial %d (%s): %s", trial.number, run,
             ", ".join(f"{k}={format_value(v)}" for k, v in params.items()))
    scores: list[float] = []

    def on_eval(step: int, valid: dict[str, float]) -> None:
        if stop.requested is not None:  # the signal came just before training took it over
            raise SweepStopped(stop.requested, out=out,
                               detail=f" in trial {trial.number} (marked failed)")
        scores.append(valid["f0.5"])
        trial.report(valid["f0.5"], step)
        if trial.should_prune():
            log.info("trial %d pruned at step %d (valid F0.5 %.4f)", trial.number, step,
                     valid["f0.5"])
            raise optuna.TrialPruned(f"valid F0.5 {valid['f0.5']:.4f} at step {step}")

    start = time.perf_counter()
    try:
        cfg = apply_params(base, params, out=run)
        trial.set_user_attr("config", config_record(cfg))  # best_config.yaml is made from it
        if stop.requested is not None:  # the signal came while Optuna began this trial
            raise SweepStopped(stop.requested, out=out,
                               detail=f" before trial {trial.number} started (marked failed)")
        train(cfg, progress=progress, on_eval=on_eval)
    except SweepStopped:
        raise
    except TrainingStopped as err:  # Ctrl-C / SIGTERM in training, which wrote last.pt
        raise SweepStopped(err.signum, out=out, detail=(
            f" in trial {trial.number}, which is marked failed (its run dir is left as it was, "
            f"not to be resumed: {run})")) from None
    except (ConfigError, TrainingError) as err:  # these values fail; other trials may not
        log.warning("trial %d failed: %s", trial.number, err)
        trial.set_user_attr("error", str(err))
        return math.nan
    if not scores:
        raise ConfigError("a sweep needs validation scores, but the run scored no validation "
                          "tiles (data.valid / data.valid_band)")
    log.info("trial %d finished: best valid F0.5 %.4f in %.0f s", trial.number, max(scores),
             time.perf_counter() - start)
    return max(scores)


def check_base_fragments(base: Config, space: Space) -> None:
    """Open the base config's fragments (found, readable, distinct ids across data.train and
    data.valid) before the sweep creates anything, so a base every trial would fail on ends
    with one line and leaves no ``--out``. Skipped where the space sweeps which fragments
    (:data:`FRAGMENT_KEYS`): then each trial's own are checked when it starts."""
    swept = {p.key for p in space.params}
    if not swept & set(FRAGMENT_KEYS) and "data" not in swept:
        open_fragments(base)


def _check_space(study: optuna.Study, space: Space) -> None:
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", space.describe())
        study.set_user_attr("space_file", space.source)
    elif stored != space.describe():
        log.warning("the space (%s) differs from the one study %s began with; earlier trials "
                    "keep their values", space.source, study.study_name)


def _check_base(study: optuna.Study, base: Config) -> None:
    """Record the base config with a new study; warn, naming the keys, when this call's
    differs (its trials use it; earlier trials and best_config.yaml keep their own)."""
    now = flat_keys(config_record(base))
    stored = study.user_attrs.get("base_config")
    if not isinstance(stored, dict):
        study.set_user_attr("base_config", now)
        return
    changed = [f"{k}={format_value(now.get(k))} (was {format_value(stored.get(k))})"
               for k in sorted(set(now) | set(stored)) if now.get(k) != stored.get(k)]
    if changed:
        log.warning("the base config differs from the one study %s began with: %s; new trials "
                    "use this one, earlier trials and the best config keep their own",
                    study.study_name, ", ".join(changed))


def _enqueue_baseline(study: optuna.Study, base: Config, space: Space) -> None:
    """Queue the base config's own values as a trial in a new study, and again in a study
    whose baseline trials all failed for a reason other than their values (a full disk, a
    kill, Ctrl-C: no ``error`` recorded), so the comparison is never lost to an accident."""
    trials = study.get_trials(deepcopy=False)
    runs = [t for t in trials if t.user_attrs.get("baseline")]
    if trials and not (runs and all(t.state == TrialState.FAIL and "error" not in t.user_attrs
                                    for t in runs)):
        return
    params = space.base_params(base)
    if params is None:
        if not trials:
            log.info("no baseline trial: the base config's %s (%s)", "; ".join(
                space.outside(base)), space.source)
        return
    if runs:
        log.info("trial %d, the baseline, stopped before it finished: queued again",
                 runs[-1].number)
    study.enqueue_trial(params, user_attrs={"baseline": True}, skip_if_exists=not runs)


def config_record(cfg: Config) -> dict[str, Any]:
    """``cfg`` as stored with the study: plain JSON values, paths absolute, without ``out``."""
    record = json.loads(json.dumps(config_to_dict(absolute_paths(cfg))))
    record.pop("out")
    return record


@contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna's own log lines off (each trial is logged here, without tracebacks)."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)
