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
        self.device = torch.device(device)
        self.move = frozenset(move)
        self._batches = (self._ahead(iter(batches)) if self.device.type == "cuda"
                         else iter(batches))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._batches)

    def _ahead(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches on the device, each one's copy queued before the one before is handed
        out (lazy: nothing is read before the first batch is asked for)."""
        stream = torch.cuda.Stream(self.device)
        following = self._copy(next(batches, None), stream)
        while following is not None:
            batch = following
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            for key in self.move & batch.keys():
                batch[key].record_stream(current)
            following = self._copy(next(batches, None), stream)  # runs while this one's step does
            yield batch

    def _copy(self, batch: dict[str, Any] | None,
              stream: torch.cuda.Stream) -> dict[str, Any] | None:
        """``batch`` with its copy to the device queued on ``stream`` (None: the loader is
        done)."""
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return {k: v.to(self.device, non_blocking=True) if k in self.move else v
                    for k, v in batch.items()}
