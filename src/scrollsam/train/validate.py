"""Validation during training: prompt-free prediction of the validation tiles, F0.5 and other
scores at the best threshold.

Under torchrun the tiles are shared out (tile i to rank i % W), each process counts its
predictions in a :class:`ProbabilityHistogram` (on a GPU counted there and copied back once:
:mod:`.histogram`; the batches cross a step ahead: :mod:`.prefetch`), and the histograms are
summed over processes (one all-reduce of their integer counts), so every process finds the same
best threshold and scores, equal to what one process finds over all tiles (up to the float
rounding of predictions made in other batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from scrollsam.metrics import ProbabilityHistogram, expected_threshold, search_threshold
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.train.cache import EmbeddingCache
from scrollsam.train.distributed import all_reduce_sum
from scrollsam.train.forward import device_keys, encode_tiles
from scrollsam.train.histogram import DeviceHistogram
from scrollsam.train.prefetch import DevicePrefetch
from scrollsam.train.ranks import Ranks
from scrollsam.train.stop import ignore_stop_signals


def my_tiles(count: int, ranks: Ranks) -> range:
    """The validation tile indices this process scores: i with i % W == rank."""
    return range(ranks.world.rank, count, ranks.world.size)


@torch.no_grad()
def prediction_histogram(model: SamSegmenter, cache: EmbeddingCache | None,
                         batches: Iterable[dict[str, Any]], *, device: torch.device,
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         on_device: bool) -> ProbabilityHistogram:
    """The histogram of the prompt-free probabilities of ``batches``; ``on_device``: counted
    where they are predicted (:class:`.histogram.DeviceHistogram`, for a GPU) rather than by
    numpy on the host (faster on a CPU)."""
    counts = DeviceHistogram() if on_device else ProbabilityHistogram()
    for batch in batches:
        with autocast():
            emb, pixels = encode_tiles(model, cache, batch["image"], device=device)
            logits = model.refine(model.decode(emb)[0], pixels)  # (B, 1, S/4 or S, ..)
        prob = torch.sigmoid(model.upscale(logits.float()))  # (B, 1, S, S)
        counts.add(prob[:, 0], batch["label"][:, 0] > 0.5, batch["valid"][:, 0] > 0.5)
    return counts.histogram() if on_device else counts


def validate(model: SamSegmenter, cache: EmbeddingCache | None, tiles: torch.utils.data.Dataset,
             *, ranks: Ranks, batch_size: int, workers: int, device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
    """F0.5, precision, recall, ... and ``threshold`` (the best) over the validation ``tiles``,
    and ``expected_threshold`` (:func:`~scrollsam.metrics.expected_threshold` of their
    probabilities, labels unused); {} without tiles. The same numbers on every process (this
    one scores its share)."""
    if len(tiles) == 0:
        return {}
    model.eval()
    loader = DataLoader(Subset(tiles, my_tiles(len(tiles), ranks)), batch_size=batch_size,
                        shuffle=False, num_workers=workers, worker_init_fn=ignore_stop_signals,
                        pin_memory=device.type == "cuda")
    # on a GPU: each batch copied while the one before is scored (the cache hashes images on
    # the host), the probabilities counted there
    batches = DevicePrefetch(loader, device, move=device_keys(cache))
    hist, failure = ProbabilityHistogram(), None
    try:
        hist = prediction_histogram(model, cache, batches, device=device, autocast=autocast,
                                    on_device=device.type == "cuda")
    except Exception as err:  # every process must hear of it before the sum below
        failure = err
    finally:
        model.train()
    ranks.agree(failure)
    counts = torch.from_numpy(np.stack([hist.ink, hist.background]))  # (2, levels) int64
    all_reduce_sum(counts)
    hist.ink, hist.background = counts[0].numpy(), counts[1].numpy()
    found = search_threshold(hist)
    return {**found.counts.scores(), "threshold": float(found.threshold),
            "expected_threshold": expected_threshold(hist)}
