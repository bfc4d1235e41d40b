"""Where a sweep's study lives: its Optuna storage (SQLite in ``OUT/study.db`` or any
SQLAlchemy URL) and its folder ``OUT``, and the trials whose process died.

A trial whose process died is marked failed, and its run dir is left as it was, by the next
call of any worker: at once when it runs on the same host (the dead process id is recorded with
the trial), else by Optuna's heartbeat once the trial has been silent for ``GRACE_S`` seconds.
A trial Optuna began whose process was killed before the sweep recorded its host is failed
``UNSTARTED_S`` seconds after it began.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from urllib.parse import quote

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.trial import TrialState

from scrollsam.errors import RunDirError, ScrollsamError
from scrollsam.out_path import check_out_folder, missing_folders
from scrollsam.out_path import remove_made as remove_empty

log = logging.getLogger(__name__)

HEARTBEAT_S = 60  # a running trial writes a heartbeat this often ...
GRACE_S = 600  # ... and is taken for dead (failed) after this long without one
UNSTARTED_S = GRACE_S  # a trial Optuna began but the sweep never started: dead after
DB_NAME = "study.db"  # the default storage: sqlite:///OUT/study.db


class SweepError(ScrollsamError):
    """The study storage cannot be opened or holds something that is not a scrollsam sweep."""


_DB = "SCROLLSAMDATABASE"  # stands for the database while the rest of a URL is rendered


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite file ``path`` (made absolute), every character of the
    path that a URL does not keep as is percent-encoded (``sw%20rel%20%C3%BC``), as
    :func:`safe_url` writes it, so the URL the sweep opens is the one it prints."""
    return f"sqlite:///{quote(os.path.abspath(path), safe='/')}"


def safe_url(url: str) -> str:
    """``url`` with any password masked, for messages and the printed ``optuna-dashboard``
    command; its database percent-encoded throughout (SQLAlchemy's own rendering leaves spaces
    and ``+`` as they are but encodes ``ü``), which SQLAlchemy, and so optuna-dashboard, reads
    back to the same path."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url
    text = parsed.render_as_string(hide_password=True)
    if parsed.database is None:
        return text
    text = parsed.set(database=_DB).render_as_string(hide_password=True)
    return text.replace(f"/{_DB}", f"/{quote(parsed.database, safe='/')}", 1)


def open_storage(url: str, *, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at the SQLAlchemy ``url``, with heartbeats; tables made if new.

    SQLite waits up to a minute for a lock held by another worker. Workers starting together
    race to create the tables and stamp their version; the loser tries again.
    """
    kwargs = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
              else {"pool_pre_ping": True})
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 4
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs,
                                                  heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S,
                                                  heartbeat_stale_trial_callback=_log_stale)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as err:
            if attempt == attempts - 1:
                raise SweepError(f"cannot open the study storage: {_first_line(err)} "
                                 f"({safe_url(url)})") from err
            time.sleep(0.5 * (attempt + 1))
        except (ImportError, ValueError, sqlalchemy.exc.ArgumentError) as err:
            raise SweepError(f"cannot open the study storage: {_first_line(err)} "
                             f"({safe_url(url)})") from err
    raise AssertionError("unreachable")


def check_out(out: Path) -> None:
    """RunDirError / InputError when ``out`` cannot be the sweep's folder: a file, a file
    above it, a link to nowhere or a link loop on the way (before anything is made)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out: expected a folder, got a file ({out})")
    check_out_folder(out, name="--out")


def make_out(out: Path) -> list[Path]:
    """Create the sweep's folder ``out`` (and missing parents); returns the folders this made,
    innermost first, for :func:`remove_made`."""
    check_out(out)
    made = missing_folders(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:  # a parent is a file
        raise RunDirError(f"--out: cannot make the folder, a parent is a file ({out})") from err
    return made


def remove_made(made: list[Path], *, files: tuple[str, ...] = ()) -> None:
    """Undo :func:`make_out` after a failed start: remove ``files`` (names) from the innermost
    folder it made, then the folders it made while they are empty. Nothing else is touched."""
    for name in files if made else ():
        (made[0] / name).unlink(missing_ok=True)
    remove_empty(made)  # not empty (another process writes there too): left, and those above


def fail_orphaned_trials(study: optuna.Study) -> None:
    """Mark failed the RUNNING trials whose process is gone. Their run dirs are not touched.
    Gone: started on this host by a process that no longer exists; silent for ``GRACE_S``
    seconds (Optuna's heartbeat, any host); or begun by Optuna more than
    ``UNSTARTED_S`` seconds ago but never started by the sweep (no host recorded: its process
    was killed between the two)."""
    host = socket.gethostname()
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "host" not in t.user_attrs:
            age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0
            if age <= UNSTARTED_S:
                continue  # maybe another worker's, starting now
        elif t.user_attrs["host"] != host or _alive(t.user_attrs.get("pid")):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        log.warning("trial %d was running when its sweep stopped: marked failed, run dir left "
                    "as it was (%s)", t.number, t.user_attrs.get("run_dir", "none made"))
    with warnings.catch_warnings():  # "experimental" in Optuna 4
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # else only when a trial starts; _log_stale


def _log_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """The storage's callback for each trial Optuna fails for want of heartbeats (here or when
    any worker starts a trial)."""
    log.warning("trial %d sent no heartbeat for %d s: marked failed, run dir left as it was "
                "(%s)", trial.number, GRACE_S, trial.user_attrs.get("run_dir"))


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():  # our own id: its former owner is gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
