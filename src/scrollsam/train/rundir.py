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
  overrides may change where and how long (:data:`.resume.RESUMABLE`, and ``train.steps`` upwards),
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

from scrollsam.config import Config
from scrollsam.data.fragment_hosts import fragment_holding
from scrollsam.errors import RunDirError, WriteError
from scrollsam.io import within, write_failure
from scrollsam.out_path import check_out_folder, missing_folders, remove_made
from scrollsam.train.resume import absolute_paths, resumed_run

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
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

    def undo_new(self) -> bool | None:
        """After a new run failed before its first step finished, whatever the error: remove
        what it wrote, so the corrected command can use the folder (a folder that existed,
        empty, stays), and return True (None: some of it could not be removed, which is said).
        False, and nothing removed, once a step finished (:attr:`stepped`), for a resumed run
        (its checkpoints) or in a process without the lock."""
        if not self.new or self.lock is None or self.stepped:
            return False
        failed = None
        for path in [self.path] if self.created else list(self.path.iterdir()):
            try:  # a folder that existed, empty: everything in it is ours
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError as err:
                failed = failed or err
        if failed is not None:  # the run's own error is the one to report: this one is said
            log.warning("could not remove what the failed run wrote (%s); remove it before "
                        "running the command again (%s)", failed.strerror or failed, self.path)
            return None
        remove_made(self.made)
        return True


def open_run(cfg: Config, *, resume: bool, given: Collection[str] | None = None,
             world_size: int = 1) -> RunDir:
    """Lock the run dir ``cfg.out`` and return what the run starts from.

    New run: create the folder (or take an empty one) and refuse one that holds anything.
    Resume: read the newest checkpoint and its config (:func:`.resume.resumed_run`; ``given`` =
    the dotted keys set on the command line, None = those that differ from the defaults), on
    ``world_size`` processes.
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
            resumed, ckpt = resumed_run(cfg, run, given=given, world_size=world_size)
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
    resumed, ckpt = resumed_run(cfg, run, given=given, world_size=world_size, say=False)
    return RunDir(run, resumed, ckpt, new=False, created=False, lock=None)


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
