"""The files of a training run that prediction looks at: the run folder and its checkpoints."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from scrollsam.errors import CheckpointError, RunDirError
from scrollsam.torchfile import not_a_file

log = logging.getLogger(__name__)


def resolve_checkpoint(run: str | os.PathLike[str], which: str = "best") -> Path:
    """``best`` -> RUN/best.pt (RUN/last.pt if there is no best.pt yet), ``last`` -> RUN/last.pt,
    anything else is a path to a checkpoint file."""
    run = Path(run)
    if which == "best":
        best, last = run / "best.pt", run / "last.pt"
        if best.is_file():
            return best
        if last.is_file():
            log.info("no best.pt in %s yet (no validation finished); using last.pt", run)
            return last
        raise CheckpointError(f"no checkpoint in the run folder: expected best.pt or last.pt "
                              f"({run})")
    path = run / "last.pt" if which == "last" else Path(which)
    if not path.is_file():
        raise not_a_file(path)
    return path


def check_run_folder(run: str | os.PathLike[str]) -> None:
    """RunDirError unless ``run`` is a folder written by ``scrollsam train`` (it has
    config.yaml; what predict builds comes from the checkpoint's own copy of it)."""
    run = Path(run)
    if not run.is_dir():
        raise RunDirError(f"run folder not found ({run})")
    path = run / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"not a run folder: no config.yaml, expected a folder written by "
                          f"`scrollsam train` ({run})")


def writable(folder: Path) -> bool:
    """Whether ``folder`` exists and this process may write into it."""
    return folder.is_dir() and os.access(folder, os.W_OK)
