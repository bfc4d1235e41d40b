"""Small process groups for the DDP training tests (not a test module): spawned processes with
torchrun's environment (RANK, WORLD_SIZE, ...), gloo on the CPU, and the workers they run."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
WRITE_EVENTS = {"os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree",
                "os.truncate", "os.link", "os.symlink", "os.chmod"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, size: int, port: int, folder: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_WAIT_POLICY="PASSIVE")
    torch.set_num_threads(1)  # two processes share the test machine's cores
    try:
        out: dict[str, Any] = {"result": fn(rank, *args)}
    except BaseException as err:  # noqa: BLE001 (reported to the test, whatever it is)
        out = {"error": type(err).__name__, "message": str(err),
               "step": getattr(err, "step", None), "main": getattr(err, "main", None),
               "echo": getattr(err, "echo", None)}
    with open(Path(folder) / f"{rank}.pkl", "wb") as f:
        pickle.dump(out, f)


def run_ranks(fn: Callable, size: int, *args: Any, timeout: float = 150.0) -> list[dict]:
    """``fn(rank, *args)`` in ``size`` spawned processes of one group -> per rank
    ``{"result": ...}`` or ``{"error": name, "message": str, "step": ...}``. Fails (after
    killing them) when they do not all end within ``timeout`` seconds: a hang is a failure."""
    with tempfile.TemporaryDirectory(prefix="scrollsam-ranks-") as folder:  # removed after
        ctx = mp.start_processes(_entry, args=(fn, size, free_port(), folder, args),
                                 nprocs=size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise AssertionError(f"the {size} processes did not end within {timeout} s "
                                     f"(hang)")
        out = []
        for rank in range(size):
            with open(Path(folder) / f"{rank}.pkl", "rb") as f:
                out.append(pickle.load(f))
    return out


def record_writes(under: Path) -> list[tuple[str, str]]:
    """Start recording this process's file-system writes (Python-level audit events: opens
    for writing, renames, removals, mkdir) under ``under``; returns the live list."""
    import sys

    root = os.path.realpath(under)
    seen: list[tuple[str, str]] = []

    def inside(path: object) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        full = os.path.realpath(os.fsdecode(path))
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and (hit := inside(path)):
                seen.append((event, hit))
        elif event in WRITE_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and (hit := inside(path)):
                    seen.append((event, hit))

    sys.addaudithook(hook)
    return seen


def train_worker(rank: int, overrides: list[str], resume: bool = False,
                 fail_at: int | None = None, signal_at: int | None = None) -> dict:
    """Train with ``overrides`` as one process of the group; ``fail_at``: rank 1 raises in its
    forward pass of that step; ``signal_at``: rank 1 gets SIGTERM in that step. Returns rank
    1's writes into the run dir and rank 0's train/loss scalars."""
    import signal

    from scrollsam.config import load_config
    from scrollsam.train import forward, loop

    cfg = load_config(None, overrides)
    writes = record_writes(Path(cfg.out)) if rank != 0 else []
    real = forward.LossModule.forward
    calls = [0]

    def patched(self, *args, **kwargs):
        step = calls[0] // cfg.train.accumulate
        calls[0] += 1
        if rank == 1 and step == fail_at:
            raise RuntimeError(f"boom in step {step}")
        if rank == 1 and step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    forward.LossModule.forward = patched
    loop.train(cfg, resume=resume, progress=False)
    return {"writes": writes}


def validate_worker(rank: int, overrides: list[str]) -> tuple[dict[str, float], list[int]]:
    """Validation scores of the tiny model seeded with 0 (as one process builds it), this rank
    scoring its share of the tiles, and the indices of those tiles."""
    import torch.distributed as dist

    from scrollsam.config import load_config
    from scrollsam.train.distributed import current_world
    from scrollsam.train.loop import setup, validate
    from scrollsam.train.ranks import Ranks
    from scrollsam.train.validate import my_tiles

    dist.init_process_group("gloo")
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    ranks = Ranks(current_world())
    s = setup(cfg, Path(cfg.out), ranks=ranks)
    scores = validate(s)
    dist.destroy_process_group()
    return scores, list(my_tiles(len(s.valid_set), ranks))


def settings_worker(rank: int, runs: list[list[str]]) -> None:
    """Train each config of ``runs`` in turn in one process group (joined here, so train()
    neither joins nor leaves it)."""
    import torch.distributed as dist

    from scrollsam.config import load_config
    from scrollsam.train.loop import train

    dist.init_process_group("gloo")
    for overrides in runs:
        train(load_config(None, overrides), progress=False)
    dist.destroy_process_group()


def threads_after_failure_worker(rank: int, overrides: list[str],
                                 fail_at: int | None) -> dict:
    """:func:`train_worker` with rank 1 failing at step ``fail_at``: this process's thread
    count before training and after train() has raised (Linux: /proc/self/task), and the
    error's name."""
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    import scrollsam.train.loop  # noqa: F401 (its imports start their thread pools here)

    before = threads()
    try:
        train_worker(rank, overrides, False, fail_at)
    except Exception as err:  # noqa: BLE001 (the test checks which)
        return {"before": before, "after": threads(), "error": type(err).__name__}
    return {"before": before, "after": threads(), "error": None}


def killed_at_eval_worker(rank: int, overrides: list[str]) -> None:
    """Train; rank 1 kills itself outright (SIGKILL) at the first validation, as a batch
    system or the OOM killer would."""
    import signal

    from scrollsam.config import load_config
    from scrollsam.train.loop import train

    def on_eval(step: int, scores: dict) -> None:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    train(load_config(None, overrides), progress=False, on_eval=on_eval)


def run_ranks_one_killed(fn: Callable, size: int, *args: Any,
                         timeout: float = 150.0) -> tuple[list[int | None], dict]:
    """Like :func:`run_ranks` where some rank is expected to die by a signal: the ranks' exit
    codes (negative: the signal) and rank 0's outcome."""
    with tempfile.TemporaryDirectory(prefix="scrollsam-ranks-") as folder:
        ctx = mp.start_processes(_entry, args=(fn, size, free_port(), folder, args),
                                 nprocs=size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        for p in ctx.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        codes = [p.exitcode for p in ctx.processes]
        for p in ctx.processes:
            if p.exitcode is None:
                p.kill()
        assert None not in codes, f"the {size} processes did not end within {timeout} s (hang)"
        with open(Path(folder) / "0.pkl", "rb") as f:
            return codes, pickle.load(f)


def cli_worker(rank: int, argv: list[str]) -> tuple[int, str]:
    """``scrollsam ARGV`` in this process: its exit code and what it printed to stderr."""
    import contextlib
    import io

    from scrollsam.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()
