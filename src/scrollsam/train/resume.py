"""What a resumed run trains with: the saved config, the overrides a resume may change, the
checkpoint it continues from, and a global batch that keeps the data order.

A resume continues the run as saved: ``key=value`` overrides may change where and how things
run (:data:`RESUMABLE`) and extend ``train.steps``; other changes are reported and ignored,
since they would make the rest of the run another experiment. Under torchrun only rank 0
reports (``say``); every process computes the same config.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from scrollsam.config import Config, config_from_dict, config_to_dict, flat_keys, load_config
from scrollsam.errors import ConfigError, RunDirError
from scrollsam.train.checkpoint import load_checkpoint
from scrollsam.train.optim import lr_at

log = logging.getLogger(__name__)

# Keys a resume may change: where the data and the run are, the device, how often to evaluate,
# save and log, the embedding cache's size. Everything else would make the rest of the run a
# different experiment.
# train.batch_size and train.accumulate only where the global batch stays (check_global_batch).
RESUMABLE = frozenset({
    "out", "data.root", "data.workers", "train.device", "train.eval_every", "train.save_every",
    "log.every", "log.images", "log.image_every", "train.batch_size", "train.accumulate",
    "train.cache_gb",
})


def resumed_run(cfg: Config, run: Path, *, given: Collection[str] | None, world_size: int,
                say: bool = True) -> tuple[Config, dict[str, Any] | None]:
    """(the config to resume with, the checkpoint) of the run dir ``run``, asked with ``cfg``
    (``given``: the keys set on the command line; None: those that differ from the defaults)
    on ``world_size`` processes. ``say``: report what the resume changes or ignores."""
    saved, ckpt = _saved_state(run, say=say)
    keys = set(given) if given is not None else _non_default_keys(cfg)
    step = int(ckpt["step"]) if ckpt is not None else 0
    resumed = absolute_paths(resume_config(saved, absolute_paths(cfg), given=keys,
                                           step=step, say=say))  # runs saved before: relative
    if ckpt is not None:
        check_global_batch(resumed, world_size=world_size, saved=saved,
                           saved_world_size=int(ckpt.get("world_size", 1)), run=run, say=say)
    return resumed, ckpt


def _saved_state(run: Path, *, say: bool) -> tuple[Config, dict[str, Any] | None]:
    """(saved config, newest checkpoint) of ``run``; checkpoint None when the run was stopped
    before its first save (then its config.yaml restarts it)."""
    last, best = run / "last.pt", run / "best.pt"
    ckpt = load_checkpoint(last) if last.is_file() else None
    if best.is_file() and (ckpt is None or best.stat().st_mtime_ns > last.stat().st_mtime_ns):
        other = load_checkpoint(best)  # written after last.pt: maybe at a later step
        if ckpt is None or int(other["step"]) > int(ckpt["step"]):
            _note(say)("resuming from %s (step %d), the newest checkpoint", best,
                       int(other["step"]))
            ckpt = other
    if ckpt is not None:
        return config_from_dict(ckpt["config"], stored=True), ckpt
    if (run / "config.yaml").is_file():
        _note(say)("no checkpoint in %s yet (stopped before its first save): starting its "
                   "saved config from step 0", run)
        return load_config(run / "config.yaml", stored=True), None
    raise RunDirError(f"nothing to resume: no last.pt in the run dir ({run})")


def check_global_batch(cfg: Config, *, world_size: int, saved: Config, saved_world_size: int,
                       run: Path, say: bool = True) -> None:
    """ConfigError unless ``cfg`` on ``world_size`` processes has the global batch (processes x
    train.batch_size x train.accumulate) the run was saved with: its data order and schedule
    are counted in global batches, so only then does it continue exactly; the message says
    which values keep it. ``say``: report a change of its parts (else debug level)."""
    def parts(c: Config, w: int) -> tuple[int, int, int]:
        return w, c.train.batch_size, c.train.accumulate

    old, new = parts(saved, saved_world_size), parts(cfg, world_size)
    g_old, g_new = old[0] * old[1] * old[2], new[0] * new[1] * new[2]
    if g_old == g_new:
        if old != new:
            (log.info if say else log.debug)(
                "--resume: %s x batch %d x accumulate %d (was %d x %d x %d), the same "
                "global batch of %d", _processes(new[0]), *new[1:], *old, g_new)
        return
    if g_old % world_size == 0:
        per = g_old // world_size  # tiles per process and step
        keep = (f"train.batch_size={per // cfg.train.accumulate}"
                if per % cfg.train.accumulate == 0 else f"train.batch_size={per} "
                f"train.accumulate=1")
        fix = f"pass {keep} to keep it on {_processes(world_size)}"
    else:
        fix = f"use a number of processes that divides {g_old}"
    raise ConfigError(
        f"--resume: the run trained with a global batch of {g_old} tiles ({_processes(old[0])} x "
        f"train.batch_size {old[1]} x train.accumulate {old[2]}) and would go on with {g_new} "
        f"({new[0]} x {new[1]} x {new[2]}); {fix}, or start a new run with another out= "
        f"({run})")


def _processes(n: int) -> str:
    """``1 process``, ``2 processes``."""
    return f"{n} process" if n == 1 else f"{n} processes"


def resume_config(saved: Config, asked: Config, *, given: Collection[str], step: int,
                  say: bool = True) -> Config:
    """The config a resumed run trains with: ``saved``, with ``out`` from ``asked`` (the folder
    named now) and, of the ``given`` keys, those in :data:`RESUMABLE` from ``asked``.
    ``train.steps`` may grow (a smaller value is reported and does nothing); other changed
    keys are reported and ignored (``say``: reported; else logged at debug level). ``step`` is
    the checkpoint's step."""
    warn, info = _note(say), log.info if say else log.debug
    cfg = copy.deepcopy(saved)
    cfg.out = asked.out
    old, new = flat_keys(config_to_dict(saved)), flat_keys(config_to_dict(asked))
    ignored = []
    for key in sorted(k for k in given if k in new and k != "out" and new[k] != old.get(k)):
        if key == "train.steps":
            if new[key] > old[key]:
                before = lr_at(step, cfg)
                cfg.train.steps = new[key]
                after = lr_at(step, cfg)
                if abs(after - before) <= 1e-3 * before:  # in warm-up, or from step 0
                    info("--resume: train.steps %d -> %d", old[key], new[key])
                else:
                    warn("--resume: train.steps %d -> %d: the learning-rate schedule (warm-up, "
                         "cosine decay) now spans %d steps, so at step %d the lr goes from "
                         "%.3g to %.3g", old[key], new[key], new[key], step, before, after)
            else:
                warn("train.steps=%d does nothing: --resume can only extend a run, and "
                     "this one runs to step %d", new[key], old[key])
        elif key in RESUMABLE:
            info("--resume: %s %s -> %s", key, old.get(key), new[key])
            _set(cfg, key, new[key])
        else:
            ignored.append(f"{key}={new[key]} (the run has {old.get(key)})")
    for key in sorted(k for k in given if k not in new and k != "out"):  # a dict's or section's
        mine, theirs = _under(new, key), _under(old, key)  # keys (data.view={...}): not resumable
        if mine != theirs:
            ignored.append(f"{key}={mine} (the run has {theirs})")
    if ignored:
        warn("--resume keeps the run's settings; ignored: %s. To change them start a new run "
             "with another out=", ", ".join(ignored))
    if step >= cfg.train.steps:
        warn("the run is already at step %d of train.steps=%d; pass a larger train.steps=N to "
             "train further", step, cfg.train.steps)
    return cfg.validate()


def _note(say: bool) -> Any:
    """``log.warning`` where this process reports (rank 0), else ``log.debug``."""
    return log.warning if say else log.debug


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``data.root`` and ``model.checkpoint`` made absolute (relative
    paths mean: from the current directory, which is not where the run will be resumed)."""
    cfg = copy.deepcopy(cfg)
    cfg.data.root = os.path.abspath(cfg.data.root)
    if cfg.model.checkpoint is not None:
        cfg.model.checkpoint = os.path.abspath(cfg.model.checkpoint)
    return cfg


def _under(flat: dict[str, Any], key: str) -> dict[str, Any]:
    """The entries of ``flat`` (:func:`flat_keys`) under the dotted ``key``, named from it."""
    return {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(f"{key}.")}


def _non_default_keys(cfg: Config) -> set[str]:
    mine, default = flat_keys(config_to_dict(cfg)), flat_keys(config_to_dict(Config()))
    return {k for k, v in mine.items() if default.get(k) != v}


def _set(cfg: Config, key: str, value: Any) -> None:
    *path, name = key.split(".")
    node: Any = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, name, value)
