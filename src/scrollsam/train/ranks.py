"""Keeping torchrun's training processes in step: one error, one stop, one set of numbers.

Under torchrun every process runs the same loop, and DDP's gradient all-reduce waits for all
of them. A process that raised while the others went on would leave them waiting for ever, so
the loop catches what a step's own work raises (data, forward pass, NaN guard, validation) and
calls :meth:`Ranks.agree` before anything that waits for the others (backward, histograms):
one 3-element all-reduce says whether a process failed and whether one got Ctrl-C / SIGTERM.
When one failed, every process raises the same :class:`TrainingError` naming the first failed
rank and its message (``rank 1: ...``); when one got a signal, every process stops after the
same step. Alone (no torchrun) nothing is exchanged: errors propagate as they are and the
signal is read where it arrives, exactly as before.
"""

from __future__ import annotations

import logging
import signal

import torch

from scrollsam.errors import ScrollsamError
from scrollsam.train.distributed import (
    World,
    all_reduce_sum,
    exchange_errors,
    join_process_group,
    mark_echo,
    shutdown_distributed,
    world_from_env,
)
from scrollsam.train.stop import StopSignals

log = logging.getLogger(__name__)


class TrainingError(ScrollsamError):
    """Training cannot go on: NaN loss, CUDA out of memory, another process's error. The
    message says what to do."""


class Ranks:
    """The processes of a run (``world``) and the stop requests of this one (``stop``)."""

    def __init__(self, world: World, stop: StopSignals | None = None) -> None:
        self.world = world
        self.stop = stop
        self._agreed_stop: int | None = None

    @property
    def stop_requested(self) -> int | None:
        """The signal that stops the run after this step (None: go on). Alone: the live flag;
        under torchrun: what the last :meth:`agree` settled, the same on every process."""
        if not self.world.distributed:
            return None if self.stop is None else self.stop.requested
        return self._agreed_stop

    def agree(self, failure: BaseException | None = None) -> None:
        """Exchange whether this process failed (``failure``: what it caught) and whether it was
        asked to stop. Raises on every process when any failed: alone ``failure`` itself; under
        torchrun the failed process's own error when every process failed alike (a bad config
        or fragment), else ``TrainingError("rank R: <message>")`` naming the first failed rank.
        Call it at the same points on every process."""
        if not self.world.distributed:
            if failure is not None:
                raise failure
            return
        asked = None if self.stop is None else self.stop.requested
        flags = torch.tensor([failure is not None, asked == signal.SIGINT,
                              asked == signal.SIGTERM], dtype=torch.int64)
        all_reduce_sum(flags)  # (3,) on every process: failed, SIGINT, SIGTERM counts
        failed, sigint, sigterm = (int(v) for v in flags)
        if sigterm or sigint:
            self._agreed_stop = signal.SIGTERM if sigterm else signal.SIGINT
        if not failed:
            return
        if failure is not None and not isinstance(failure, ScrollsamError):
            log.error("rank %d failed", self.world.rank, exc_info=failure)  # a bug: its trace
        failed = exchange_errors(failure)
        rank, first = failed[0]
        if failure is not None and len(failed) == self.world.size and all(
                m == first for _, m in failed):
            raise mark_echo(failure, self.world.rank != rank)  # every process alike: its own
        raise mark_echo(TrainingError(f"rank {rank}: {first}"),
                        self.world.rank != rank) from failure

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """0-dim tensors averaged over the processes (one all-reduce; a host sync under
        torchrun: the loop calls it on log steps only). Alone: ``values`` as they are."""
        if not self.world.distributed or not values:
            return values
        keys = sorted(values)
        stacked = torch.stack([values[k].detach().float() for k in keys])  # (K,)
        all_reduce_sum(stacked)
        return {k: v / self.world.size for k, v in zip(keys, stacked.unbind(0), strict=True)}


def agree_before_start(failure: ScrollsamError) -> ScrollsamError:
    """The error to raise for ``failure``, found before training began (a bad override, a
    config file that is not there). Under torchrun every process joins the group and agrees,
    as training would have at its start: the first process that failed prints it, the others'
    copies are marked echo; a process where nothing failed (a file missing on one machine
    only) gets ``rank R: <message>`` from :meth:`Ranks.agree` in :func:`.loop.train`. Alone:
    ``failure`` as it is."""
    world = world_from_env()
    if not world.distributed:
        return failure
    joined = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    if joined:
        join_process_group()
    try:
        Ranks(world).agree(failure)
    except ScrollsamError as agreed:
        return agreed
    finally:
        if joined:
            shutdown_distributed()
    return failure  # not reached: agree raises for a failure
