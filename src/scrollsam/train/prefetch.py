"""Training batches copied to the GPU one step ahead, on a side stream.

The loader gives each batch as CPU tensors in pinned memory (``pin_memory=True``). Copied on
the compute stream, a batch's bytes cross the bus while no kernel runs: at 1024 px and batch
32 the labels and valid masks alone (float32 [32, 1, 1024, 1024] each) held an H100 / H200
for about 5 ms of a 380-430 ms step, and the images (float32 [32, 3, 1024, 1024]) add half as
much again; the x-ray views' 26 slices far more. :class:`DevicePrefetch` starts the copy of
batch n + 1 on its own CUDA stream when it hands out batch n, so the copy engine works while
step n computes; the compute stream waits for that copy before it touches the batch.

Only the tensors named move; the rest pass through (fragment ids, tile corners, the ink flags
the step reads on the host, the images when the embedding cache hashes them there). On a device
that is not CUDA the batches pass through unchanged (the step moves what it needs).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from typing import Any

import torch


class DevicePrefetch:
    """``batches`` (dicts of CPU tensors and other values) as an iterator of the same dicts with
    the tensors named in ``move`` on ``device``, each copied while the step before it runs
    (CUDA only).

    The copies go to a side stream; the batch handed out is made safe for the current stream:
    the current stream waits for the copy (``wait_stream``) and each tensor is marked as used
    by it (``record_stream``), so the caching allocator does not give its memory to the next
    copy before the step that reads it has run. One batch is read ahead of the one in use, so
    the loader is asked for one batch more than the loop takes (or runs out quietly)."""

    def __init__(self, batches: Iterable[dict[str, Any]], device: torch.device | str, *,
                 move: Collection[str] = ("image", "label", "valid")) -> None:
        self._batches = iter(batches)
        self.device = torch.device(device)
        self.move = frozenset(move)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._ahead: dict[str, Any] | None = None
        self._started = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self._cuda:
            return next(self._batches)
        if not self._started:
            self._started = True
            self._ahead = self._copy_next()
        batch = self._ahead
        if batch is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)
        for key in self.move & batch.keys():
            batch[key].record_stream(current)
        self._ahead = self._copy_next()  # the next copy runs while this batch's step does
        return batch

    def _copy_next(self) -> dict[str, Any] | None:
        """The loader's next batch with its copy to the device queued on the side stream
        (None when the loader is done)."""
        try:
            batch = next(self._batches)
        except StopIteration:
            return None
        with torch.cuda.stream(self._stream):
            return {k: v.to(self.device, non_blocking=True) if k in self.move else v
                    for k, v in batch.items()}
