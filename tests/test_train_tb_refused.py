"""A run dir whose tb/ refuses writes ends with one error line, not the TensorBoard writer
thread's traceback beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scrollsam.cli import main


def env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def _immutable(folder: Path, on: bool) -> bool:
    """chattr +i / -i (root, on a file system with attributes): no file can be made in it, by
    root either."""
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(folder)],
                          capture_output=True).returncode == 0


def test_a_resume_into_an_unwritable_tb_folder_is_one_line(data, tmp_path):
    """Before: `error: ... while writing events.out.tfevents... (RUN/tb)` glued to "Exception in
    thread Thread-1:" and the writer thread's 30-line traceback."""
    run = tmp_path / "run"
    args = [f"out={run}", f"data.root={data}", "data.train=[train/1]", "data.valid=[train/2]",
            "data.input=ir", "model.type=tiny", "model.image_size=64", "train.steps=2",
            "train.batch_size=2", "train.eval_every=2", "train.device=cpu", "log.images=false"]
    assert main(["train", "--no-progress", *args]) == 0
    before = (run / "last.pt").read_bytes()
    if not _immutable(run / "tb", True):
        pytest.skip("chattr +i is not available here")
    try:  # a process of its own: pytest turns a thread's exception into a warning
        proc = subprocess.run([sys.executable, "-m", "scrollsam", "train", "--no-progress",
                               f"out={run}", "--resume", "train.steps=4"],
                              capture_output=True, text=True, timeout=300, env=env())
    finally:
        _immutable(run / "tb", False)
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert err.splitlines()[-1].startswith("error: ") and "while writing TensorBoard events (" in (
        err.splitlines()[-1]), err
    assert (run / "last.pt").read_bytes() == before
