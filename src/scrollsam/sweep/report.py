"""What a sweep found: the best trials, the best config as YAML for ``scrollsam train``, and
which parameters mattered.

Importances come from Optuna's PED-ANOVA evaluator (no scikit-learn needed) over the complete
trials; with fewer than :data:`MIN_IMPORTANCE_TRIALS` of them there is nothing to learn from,
and the report says so instead of printing noise.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from scrollsam.config import Config, config_from_dict, config_to_dict, load_config
from scrollsam.config_yaml import flow_yaml
from scrollsam.errors import ConfigError
from scrollsam.io import atomic_write_text
from scrollsam.shell import shell_command
from scrollsam.sweep.space import Space
from scrollsam.train.progress import duration

log = logging.getLogger(__name__)

MIN_IMPORTANCE_TRIALS = 3
BEST_CONFIG = "best_config.yaml"


@dataclass
class TrialRow:
    """One trial as the report shows it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    f05: float | None  # best validation F0.5 (pruned: the last one reported)
    steps: int | None  # training steps at its last evaluation
    seconds: float | None
    params: dict[str, Any]  # dotted key -> config value
    run_dir: str | None
    baseline: bool = False


@dataclass
class SweepResult:
    """Summary of a study after a sweep."""

    study: str
    storage: str  # the URL, password masked
    out: Path
    counts: dict[str, int]  # state name -> number of trials
    best: list[TrialRow]  # complete trials, best first
    best_config: Path | None  # OUT/best_config.yaml (None: no trial completed)
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""  # why there are no importances


def summarise(study: optuna.Study, space: Space, *, out: Path, storage: str,
              top: int = 5) -> SweepResult:
    """Rows of the best ``top`` complete trials, importances, and the best config written."""
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                      key=lambda t: t.value, reverse=True)
    best = [_row(t, space) for t in complete[:top]]
    path = None
    if complete:
        path = write_best_config(complete[0], out / BEST_CONFIG, study=study.study_name, out=out)
    importances, note = param_importances(study, len(complete))
    return SweepResult(study.study_name, storage, out, counts, best, path, importances, note)


def write_best_config(trial: FrozenTrial, path: Path, *, study: str, out: Path) -> Path | None:
    """The config ``trial`` trained with (:func:`trial_config`), training into ``OUT/best``
    (absolute), written to ``path`` ready for ``scrollsam train --config PATH``; returns
    ``path``, or None (a warning logged, a stale file removed) when that config is lost."""
    try:
        cfg = replace(trial_config(trial), out=os.path.abspath(out / "best"))
    except ConfigError as err:  # lost, or saved by a scrollsam whose config had other keys
        log.warning("best config not written: %s", err)
        path.unlink(missing_ok=True)  # another trial's: not the best one now
        return None
    command = shell_command("scrollsam", "train", "--config", path)
    head = (f"# Best trial {trial.number} of sweep study {study}: validation F0.5 "
            f"{trial.value:.4f}.\n# Train it: {command}"
            f"  (key=value overrides as usual, e.g. out=runs/best train.steps=...)\n")
    atomic_write_text(path, head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def trial_config(trial: FrozenTrial) -> Config:
    """The config ``trial`` trained with: as stored with the trial, else (trials of an older
    scrollsam) its run dir's ``config.yaml``; ConfigError when neither exists or it is no
    longer valid."""
    stored = trial.user_attrs.get("config")
    if isinstance(stored, dict):
        try:
            return config_from_dict(stored, stored=True)  # without out: replaced
        except ConfigError as err:
            raise ConfigError(f"trial {trial.number}'s config is no longer valid ({err})") from err
    run_dir = trial.user_attrs.get("run_dir")
    saved = Path(run_dir) / "config.yaml" if isinstance(run_dir, str) else None
    if saved is None or not saved.is_file():
        raise ConfigError(f"trial {trial.number}'s config is neither stored with the study nor "
                          f"in its run dir ({run_dir})")
    return load_config(saved, stored=True)


def param_importances(study: optuna.Study, complete: int) -> tuple[dict[str, float], str]:
    """(importances by key, highest first) or ({}, why not)."""
    if complete < MIN_IMPORTANCE_TRIALS:
        return {}, (f"parameter importances need at least {MIN_IMPORTANCE_TRIALS} complete "
                    f"trials (have {complete})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature notices
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError) as err:  # e.g. no parameter shared by all trials
        return {}, f"parameter importances unavailable: {err}"
    return dict(found), ""


def _row(t: FrozenTrial, space: Space) -> TrialRow:
    steps = max(t.intermediate_values) if t.intermediate_values else None
    seconds = t.duration.total_seconds() if t.duration is not None else None
    value = t.value if t.value is not None else (
        t.intermediate_values[steps] if steps is not None else None)
    return TrialRow(t.number, t.state.name, value, steps, seconds, space.values_of(t.params),
                    t.user_attrs.get("run_dir"), bool(t.user_attrs.get("baseline")))


def format_report(result: SweepResult) -> str:
    """The summary as text: counts, table of best trials, best config, importances, dashboard."""
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(result.counts.items()))
    lines = [f"study {result.study} ({result.storage}): {sum(result.counts.values())} trials"
             + (f" ({counts})" if counts else "")]
    if result.best:
        keys = list(dict.fromkeys(k for r in result.best for k in r.params))
        header = ["trial", "F0.5", "steps", "time", *keys]
        rows = [[f"{r.number}{' (base)' if r.baseline else ''}",
                 "-" if r.f05 is None else f"{r.f05:.4f}",
                 "-" if r.steps is None else str(r.steps),
                 "-" if r.seconds is None else duration(r.seconds),
                 *(format_value(r.params.get(k)) for k in keys)] for r in result.best]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines += ["", "best trials:"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  for row in [header, *rows]]
        top = result.best[0]
        lines += ["", f"best config: {result.best_config}",
                  f"best run:    {top.run_dir}"]
    else:
        lines += ["", "no trial has completed yet: no best config"]
    if result.importances:
        lines += ["", "parameter importances (PED-ANOVA over the complete trials):"]
        lines += [f"  {k}  {v:.3f}" for k, v in result.importances.items()]
    elif result.importance_note:
        lines += ["", result.importance_note]
    lines += ["", f"dashboard:   {shell_command('optuna-dashboard', result.storage)}",
              f"tensorboard: {shell_command('tensorboard', '--logdir', result.out)}"]
    return "\n".join(lines)


def format_value(value: Any) -> str:
    """A parameter or score as tables and log lines show it (floats to 4 digits, lists as
    flow YAML, None as -)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return flow_yaml(value)
    return str(value)
