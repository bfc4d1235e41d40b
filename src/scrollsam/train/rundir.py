"""The run dir: one process at a time, never another run's files overwritten, resumable from
the folder alone, wherever it has moved.

- **The folder named by ``out=`` is the run.** A new run refuses a folder that holds anything;
  ``--resume`` continues the folder named on the command line, never a path stored in it.
- **Stored paths do not depend on where you stand.** The saved config (``config.yaml`` and the
  copy inside each checkpoint) holds ``out: .`` (the folder that holds it) and absolute
  ``data.root`` / ``model.checkpoint``, so a run resumes and predicts from any directory.
- **A lock for the run's life.** ``RUN/.lock`` is locked with ``fcntl.flock`` (exclusive,
  non-blocking) before anything is read or written; a second process gets ``run dir is in use
  by pid N``. The operating system drops the lock when the process dies, even by ``kill -9``.
- **Stale temp files go.** A process killed while writing a checkpoint leaves its hidden temp
  file (``.last.tmp-*.pt``); with the lock held none can be writing, so a resume removes them.
- **Resume continues the run as saved.** ``--resume`` reads the newest complete checkpoint
  (``last.pt``, or ``best.pt`` when a killed run wrote it later) with its config; ``key=value``
  overrides may change where and how long (:data:`RESUMABLE`, and ``train.steps`` upwards),
  not what is learned. A run killed before its first checkpoint restarts from step 0 with its
  saved ``config.yaml``.
- **Under torchrun rank 0 owns the folder.** It alone locks it, creates or checks it and
  removes stale temps (:func:`open_run`); the other processes read what they need without
  writing (:func:`follow_run`). A resume may change the number of processes, and
  ``train.batch_size`` / ``train.accumulate`` with it, only where the global batch (processes
  x batch_size x accumulate) stays the same: then the run continues exactly
  (:mod:`.order`); another global batch is a ConfigError saying which values keep it.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from scrollsam.config import Config, config_from_dict, config_to_dict, flat_keys, load_config
from scrollsam.data.fragment_hosts import fragment_holding
from scrollsam.errors import ConfigError, RunDirError, WriteError
from scrollsam.io import within, write_failure
from scrollsam.out_path import check_out_folder, missing_folders, remove_made
from scrollsam.train.checkpoint import load_checkpoint
from scrollsam.train.optim import lr_at

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# Keys a resume may change: where the data and the run are, the device, how often to evaluate,
# save and log, the embedding cache's size. Everything else would make the rest of the run a
# different experiment.
# train.batch_size and train.accumulate only where the global batch stays (check_global_batch).
RESUMABLE = frozenset({
    "out", "data.root", "data.workers", "train.device", "train.eval_every", "train.save_every",
    "log.every", "log.images", "log.image_every", "train.batch_size", "train.accumulate",
    "train.cache_gb",
})
# Temp files of scrollsam's atomic writers in a run dir (scrollsam.io._temp_sibling, the stats
# cache): (folder inside the run, name pattern).
STALE_TEMPS = (
    ("", re.compile(r"^\.(last|best|config)\.tmp-[0-9a-f]{8}\.(pt|yaml)$")),
    ("embeddings", re.compile(r"^\.[0-9a-f]+\.tmp-[0-9a-f]{8}\.pt$")),
    ("stats", re.compile(r"^\.[^/]+\.json\.tmp-[0-9]+$")),
)


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` holding the owner's pid; see :meth:`acquire`."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, run: Path, *, what: str = "run dir", name: str = LOCK_NAME) -> RunLock:
        """Lock ``run`` (an existing folder) through its file ``name`` (never through a link)
        or raise RunDirError naming the holder's pid (``<what> is in use by pid N (<run>)``)."""
        path = run / name
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:  # O_NOFOLLOW: never write through a link
                    raise RunDirError(f"{what}: {name} is a symbolic link; remove it ({run})"
                                      ) from None
                cause = write_failure(err, run)
                if cause is None:
                    raise
                raise WriteError(f"{cause} while writing {name} ({run})") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                who = f"pid {holder}" if holder.isdigit() else "another process"
                raise RunDirError(f"{what} is in use by {who} ({run})") from None
            try:  # the holder may have removed the file (a failed new run) before we got it
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            if not run.is_dir():
                raise RunDirError(f"{what} was removed while starting ({run})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Unlock (closing the file drops the lock); the lock file stays for the next run."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class RunDir:
    """An open, locked run dir and what a run needs from it (see :func:`open_run`)."""

    path: Path
    cfg: Config  # the config to train with: out = path, data.root and model.checkpoint absolute
    checkpoint: dict[str, Any] | None  # the checkpoint to resume from (None: start at step 0)
    new: bool  # a new run (not a resume)
    created: bool  # the folder did not exist before this run
    lock: RunLock | None  # None: a process that only reads the folder (follow_run)
    stepped: bool = False  # a training step finished: from then on the folder holds a run
    made: list[Path] = field(default_factory=list)  # folders above it this run created

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.lock is not None:
            self.lock.release()

    def undo_new(self) -> bool:
        """After a new run failed before its first step finished, whatever the error: remove
        what it wrote, so the corrected command can use the folder (a folder that existed,
        empty, stays), and return True. Not once a step finished (:attr:`stepped`), nor for a
        resumed run (its checkpoints), nor in a process without the lock."""
        if not self.new or self.lock is None or self.stepped:
            return False
        try:
            if self.created:
                shutil.rmtree(self.path)
                remove_made(self.made)
            else:  # the folder was empty: everything in it is ours
                for child in self.path.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        except OSError as err:  # the run's own error is the one to report: this one is said
            log.warning("could not remove what the failed run wrote (%s); remove it before "
                        "running the command again (%s)", err.strerror or err, self.path)
            return False
        return True


def open_run(cfg: Config, *, resume: bool, given: Collection[str] | None = None,
             world_size: int = 1) -> RunDir:
    """Lock the run dir ``cfg.out`` and return what the run starts from.

    New run: create the folder (or take an empty one) and refuse one that holds anything.
    Resume: read the newest checkpoint and its config (see :func:`resume_config`; ``given`` =
    the dotted keys set on the command line, None = those that differ from the defaults), on
    ``world_size`` processes (see :func:`check_global_batch`).
    A resume removes stale temp files once the lock is held (a new run's folder is empty).
    Release with ``with`` or ``.lock.release()``.
    """
    run = Path(cfg.out)
    if resume:
        if not run.is_dir():
            raise RunDirError(f"nothing to resume: the run dir does not exist ({run})")
        lock = RunLock.acquire(run)
        try:
            remove_stale_temps(run)
            resumed, ckpt = _resumed(cfg, run, given=given, world_size=world_size)
            return RunDir(run, resumed, ckpt, new=False, created=False, lock=lock)
        except BaseException:
            lock.release()
            raise
    if run.exists() and not run.is_dir():
        raise RunDirError(f"out: expected a folder for the run, got a file ({run})")
    check_out_folder(run, name="out")
    _check_outside_fragments(cfg, run)
    made = missing_folders(run)[1:]  # the parents a failed start removes again
    try:
        run.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as err:
        cause = write_failure(err, run.parent if run.parent.is_dir() else None)
        if cause is None:
            raise
        raise WriteError(f"{cause} while creating the run dir ({run})") from err
    lock = RunLock.acquire(run)
    if any(p.name != LOCK_NAME for p in run.iterdir()):
        lock.release()
        raise RunDirError(f"run dir exists and is not empty ({run}); pass --resume to continue "
                          f"it or choose another out=")
    return RunDir(run, absolute_paths(cfg), None, new=True, created=created, lock=lock,
                  made=made if created else [])


def _check_outside_fragments(cfg: Config, run: Path) -> None:
    """RunDirError when ``run`` is a fragment folder of ``data.train`` / ``data.valid``, or any
    other fragment folder, or lies inside one: a run never writes into data."""
    inside = run.resolve()
    for name in [*cfg.data.train, *cfg.data.valid]:
        frag = Path(os.path.realpath(Path(cfg.data.root) / name))  # no error on a link loop
        if within(inside, frag):
            raise RunDirError(f"out: the run dir must not be inside fragment folder {name} "
                              f"(data.train / data.valid) ({run})")
    host = fragment_holding(run)  # any other fragment's folder: its data is not the run's
    if host is not None:
        raise RunDirError(f"out: the run dir must not be inside a fragment folder: {host[0]} "
                          f"holds {host[1]} ({run})")


def follow_run(cfg: Config, *, resume: bool, given: Collection[str] | None = None,
               world_size: int = 1) -> RunDir:
    """What :func:`open_run` returns, for a torchrun process other than rank 0: nothing is
    locked, created or removed (rank 0 does that). Call it before rank 0 can write: the
    checkpoint it reads is the one rank 0 resumes from."""
    run = Path(cfg.out)
    if not resume:
        return RunDir(run, absolute_paths(cfg), None, new=True, created=False, lock=None)
    if not run.is_dir():
        raise RunDirError(f"nothing to resume: the run dir does not exist ({run})")
    resumed, ckpt = _resumed(cfg, run, given=given, world_size=world_size)
    return RunDir(run, resumed, ckpt, new=False, created=False, lock=None)


def _resumed(cfg: Config, run: Path, *, given: Collection[str] | None,
             world_size: int) -> tuple[Config, dict[str, Any] | None]:
    """(the config to resume with, the checkpoint) of the run dir ``run``."""
    saved, ckpt = _saved_state(run)
    keys = set(given) if given is not None else _non_default_keys(cfg)
    step = int(ckpt["step"]) if ckpt is not None else 0
    resumed = absolute_paths(resume_config(saved, absolute_paths(cfg), given=keys,
                                           step=step))  # runs saved before: relative
    if ckpt is not None:
        check_global_batch(resumed, world_size=world_size, saved=saved,
                           saved_world_size=int(ckpt.get("world_size", 1)), run=run)
    return resumed, ckpt


def check_global_batch(cfg: Config, *, world_size: int, saved: Config, saved_world_size: int,
                       run: Path) -> None:
    """ConfigError unless ``cfg`` on ``world_size`` processes has the global batch (processes x
    train.batch_size x train.accumulate) the run was saved with: its data order and schedule
    are counted in global batches, so only then does it continue exactly; the message says
    which values keep it."""
    def parts(c: Config, w: int) -> tuple[int, int, int]:
        return w, c.train.batch_size, c.train.accumulate

    old, new = parts(saved, saved_world_size), parts(cfg, world_size)
    g_old, g_new = old[0] * old[1] * old[2], new[0] * new[1] * new[2]
    if g_old == g_new:
        if old != new:
            log.info("--resume: %s x batch %d x accumulate %d (was %d x %d x %d), the same "
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


def _saved_state(run: Path) -> tuple[Config, dict[str, Any] | None]:
    """(saved config, newest checkpoint) of ``run``; checkpoint None when the run was stopped
    before its first save (then its config.yaml restarts it)."""
    last, best = run / "last.pt", run / "best.pt"
    ckpt = load_checkpoint(last) if last.is_file() else None
    if best.is_file() and (ckpt is None or best.stat().st_mtime_ns > last.stat().st_mtime_ns):
        other = load_checkpoint(best)  # written after last.pt: maybe at a later step
        if ckpt is None or int(other["step"]) > int(ckpt["step"]):
            log.warning("resuming from %s (step %d), the newest checkpoint", best,
                        int(other["step"]))
            ckpt = other
    if ckpt is not None:
        return config_from_dict(ckpt["config"], stored=True), ckpt
    if (run / "config.yaml").is_file():
        log.warning("no checkpoint in %s yet (stopped before its first save): starting its "
                    "saved config from step 0", run)
        return load_config(run / "config.yaml", stored=True), None
    raise RunDirError(f"nothing to resume: no last.pt in the run dir ({run})")


def resume_config(saved: Config, asked: Config, *, given: Collection[str], step: int) -> Config:
    """The config a resumed run trains with: ``saved``, with ``out`` from ``asked`` (the folder
    named now) and, of the ``given`` keys, those in :data:`RESUMABLE` from ``asked``.
    ``train.steps`` may grow (a smaller value is reported and does nothing); other changed
    keys are reported and ignored. ``step`` is the checkpoint's step."""
    cfg = copy.deepcopy(saved)
    cfg.out = asked.out
    old, new = flat_keys(config_to_dict(saved)), flat_keys(config_to_dict(asked))
    ignored = []
    for key in sorted(k for k in given if k in new and k != "out" and new[k] != old.get(k)):
        if key == "train.steps":
            if new[key] > old[key]:
                before = lr_at(step, cfg)
                cfg.train.steps = new[key]
                log.warning("--resume: train.steps %d -> %d: the learning-rate schedule (warm-up, "
                            "cosine decay) now spans %d steps, so at step %d the lr goes from "
                            "%.3g to %.3g", old[key], new[key], new[key], step, before,
                            lr_at(step, cfg))
            else:
                log.warning("train.steps=%d does nothing: --resume can only extend a run, and "
                            "this one runs to step %d", new[key], old[key])
        elif key in RESUMABLE:
            log.info("--resume: %s %s -> %s", key, old.get(key), new[key])
            _set(cfg, key, new[key])
        else:
            ignored.append(f"{key}={new[key]} (the run has {old.get(key)})")
    for key in sorted(k for k in given if k not in new and k != "out"):  # a dict's or section's
        mine, theirs = _under(new, key), _under(old, key)  # keys (data.view={...}): not resumable
        if mine != theirs:
            ignored.append(f"{key}={mine} (the run has {theirs})")
    if ignored:
        log.warning("--resume keeps the run's settings; ignored: %s. To change them start a new "
                    "run with another out=", ", ".join(ignored))
    if step >= cfg.train.steps:
        log.warning("the run is already at step %d of train.steps=%d; pass a larger "
                    "train.steps=N to train further", step, cfg.train.steps)
    return cfg.validate()


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``data.root`` and ``model.checkpoint`` made absolute (relative
    paths mean: from the current directory, which is not where the run will be resumed)."""
    cfg = copy.deepcopy(cfg)
    cfg.data.root = os.path.abspath(cfg.data.root)
    if cfg.model.checkpoint is not None:
        cfg.model.checkpoint = os.path.abspath(cfg.model.checkpoint)
    return cfg


def stored_config(cfg: Config) -> Config:
    """What a run saves (``config.yaml``, checkpoints): ``out`` is ``.``, the folder holding
    the file, so a moved or copied run names no other place to write."""
    cfg = copy.deepcopy(cfg)
    cfg.out = "."
    return cfg


def remove_stale_temps(run: Path) -> list[Path]:
    """Remove temp files that killed writers left in ``run`` (:data:`STALE_TEMPS`); call only
    while holding the run's lock. Returns what was removed."""
    removed = []
    for sub, pattern in STALE_TEMPS:
        folder = run / sub if sub else run
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if pattern.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("removed %d temp files left by an interrupted run in %s", len(removed), run)
    return removed


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
