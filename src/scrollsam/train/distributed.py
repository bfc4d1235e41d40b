"""torchrun / DistributedDataParallel plumbing: which process this is, the process group, and
the few collectives the loop and prediction need.

``torchrun --nproc-per-node N -m scrollsam train|predict ...`` starts N copies of the same
command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment (SLURM launches
torchrun, see ``scripts/``). :func:`join_process_group` reads them once and joins the process
group: NCCL on CUDA, gloo on the CPU, chosen from the device. Without those variables (a plain
``scrollsam train``) it does nothing and :class:`World` says one process: every caller works
the same for one process and many, and nothing here is home-made transport.
"""

from __future__ import annotations

import datetime
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from scrollsam.errors import InputError, PeerLost, ScrollsamError
from scrollsam.shell import shell_word

E = TypeVar("E", bound=BaseException)

# A collective that waits longer than this ends the job instead of hanging it (a rank that died
# outside the loop's error exchange, a lost node). Training steps are far shorter.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes: ``rank`` in [0, size), ``local_rank`` its
    index on its machine (its GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, TensorBoard, config and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The World that torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` describe; one
    process when ``WORLD_SIZE`` is unset. Inconsistent values are an InputError."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    try:
        size = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise InputError(f"RANK / WORLD_SIZE / LOCAL_RANK: expected integers, got {err}") from err
    if size < 1 or not 0 <= rank < size or local < 0:
        raise InputError(f"RANK / WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got RANK={rank} "
                         f"WORLD_SIZE={size} (launch with torchrun)")
    return World(rank=rank, size=size, local_rank=local)


def current_world() -> World:
    """The World of the joined process group, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def process_device(device: torch.device, world: World) -> torch.device:
    """The device this process uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one
    GPU per process), anything else is returned as it is."""
    if device.type == "cuda" and world.distributed and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_frames(error: BaseException) -> None:
    """Let go of what the finished frames of ``error``'s traceback (and of the errors it chains,
    ``__cause__`` / ``__context__``) hold: their local variables are cleared
    (:func:`traceback.clear_frames`; the traceback still prints, file and line for each frame).

    For a process that leaves the group on an error: the loop's frames hold the
    DistributedDataParallel wrapper, whose reducer holds the process group, and a reference
    cycle through them (``failure = err`` in a frame the error's traceback names) keeps them
    until a garbage collection, often the one at interpreter exit. Then
    :func:`shutdown_distributed` only unregisters the group: gloo's worker threads live on, and
    at exit one releasing its last collective's tensors (which needs the GIL) aborts the
    process ("terminate called without an active exception") after the error line. Called
    before :func:`shutdown_distributed`, nothing holds the group, which then goes for real
    (its threads joined), as on the normal path."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)  # running frames (the caller's) stay as they are
        todo += [e for e in (err.__cause__, err.__context__) if e is not None]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process, in place (and returned); ``t`` as it is alone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (pickled; small objects only)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def error_line(err: BaseException, *, typed: bool = False) -> str:
    """One line for ``err``: the first line of its message, prefixed by its type name
    (``RuntimeError: ...``) unless it is a scrollsam error and not ``typed``."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, ScrollsamError) and not typed:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def exchange_errors(error: BaseException | None, *,
                    typed: bool = False) -> list[tuple[int, str]]:
    """Every process's error, exchanged (a collective: call it at the same point on every
    process): ``[(rank, one-line message), ...]`` of the processes that failed (their
    ``error`` was not None), lowest rank first; empty when none did. The one place torchrun's
    processes tell each other that they failed (training's :class:`~scrollsam.train.ranks.Ranks`
    and prediction's :func:`~scrollsam.infer.segment.settle`). ``typed``: see
    :func:`error_line`. Alone: this process's error, if any."""
    line = None if error is None else error_line(error, typed=typed)
    return [(rank, m) for rank, m in enumerate(gather_objects(line)) if m is not None]


def mark_echo(error: E, echo: bool) -> E:
    """``error`` with ``error.echo = echo``: True where it repeats what another process (the
    first that failed) reports itself, so the CLI prints one error line for a torchrun run, not
    one per process."""
    error.echo = echo  # type: ignore[attr-defined]
    return error


# The start of what gloo says (after its source location) when a collective's peer is gone; a
# process killed outright closes its sockets, and every process still waiting fails this way
# ("Read error [127.0.0.1]:43952: Connection reset by peer" or "Connection closed by peer ...",
# which of them depends on timing).
PEER_GONE = ("Connection closed by peer", "Read error", "Socket closed",
             "Socket unexpectedly closed")


def peer_lost(err: BaseException, then: str) -> PeerLost | None:
    """A one-line PeerLost for ``err`` when it is a collective failing because another process
    of the group stopped (gloo's RuntimeError, :data:`PEER_GONE`), ending with ``then`` (how to
    go on: :func:`resume_hint` for training); None for any other error."""
    if not isinstance(err, RuntimeError) or not str(err):
        return None
    cause = str(err).splitlines()[0]
    cause = cause.split("] ", 1)[1] if cause.startswith("[") and "] " in cause else cause
    if not cause.startswith(PEER_GONE):
        return None
    cause = cause.split(". This is typically")[0].split(". Check the logs")[0]
    return PeerLost(f"another process of this torchrun run stopped ({cause}); torchrun's summary "
                    f"names it; {then}")


def resume_hint(run: Path) -> str:
    """How to go on with the training run in ``run`` after it stopped: resume it, or, where a
    new run's folder was removed, start it again."""
    if (run / "config.yaml").is_file():
        return (f"checkpoints are written whole: continue with `scrollsam train "
                f"out={shell_word(run)} --resume`")
    return "the run had not started: start it again"


def row_bands(height: int, *, band_rows: int, world: World) -> list[tuple[int, int]]:
    """The row bands [y0, y1) of an image ``height`` rows tall that ``world.rank`` owns: bands
    of ``band_rows`` rows (a multiple of the output's chunk height, so each band's chunks belong
    to it alone), dealt round-robin to the ranks; their union over ranks covers every row once.
    """
    if band_rows < 1:
        raise InputError(f"band_rows: expected a positive integer, got {band_rows}")
    starts = range(0, height, band_rows)
    return [(y0, min(y0 + band_rows, height)) for i, y0 in enumerate(starts)
            if i % world.size == world.rank]


def join_process_group(*, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> World:
    """Join the process group torchrun describes and return this process's World; one process
    (and no group) without torchrun. One backend per device kind this machine has: gloo for CPU
    tensors and, where torch sees CUDA, NCCL for CUDA tensors; a collective picks the backend
    from its tensor's device. So training can join before it knows its device (a resumed run
    reads it from its checkpoint) and exchange small CPU flags beside DDP's gradients, and
    prediction joins the same way. Each process uses GPU ``LOCAL_RANK``. No-op alone and when
    already joined (tests that start their own group can call code that calls this)."""
    world = world_from_env()
    if not world.distributed:
        return world
    if dist.is_initialized():
        return current_world()
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(process_device(torch.device("cuda"), world))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timeout)
    return world
