"""What stops training with a message that says what to do: a non-finite loss (with its step,
its batch's statistics and the batch saved for replay) and CUDA running out of memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from scrollsam.io import atomic_path
from scrollsam.torchfile import save_torch
from scrollsam.train.distributed import World
from scrollsam.train.ranks import TrainingError

Losses = list[tuple[int, int, dict[str, torch.Tensor]]]  # (step, micro-batch, loss parts)


def nan_guard(losses: Losses, *, batch_of: Callable[[int, int], dict], run: Path,
              world: World) -> None:
    """Stop at the first non-finite loss among ``losses`` (since the last call) with its step,
    parts and batch statistics, the batch (``batch_of(step, micro)`` rebuilds it) saved into
    ``run`` for replay by the process that drew it.

    One host sync for them all: the loop calls this on steps that read device values anyway
    (logging, pictures, validation, checkpoints), always before a checkpoint is written, so
    NaN weights are never saved. Steps after the bad one ran on NaN weights, harmlessly.
    """
    if not losses:
        return
    finite = torch.stack([torch.isfinite(parts["loss"].detach()) for *_, parts in losses])
    if bool(finite.all()):
        return
    step, micro, parts = losses[int((~finite).nonzero()[0, 0])]
    loss = parts["loss"]
    batch = batch_of(step, micro)
    rank = f"_rank{world.rank}" if world.distributed else ""
    path = run / f"nan_batch_step{step}{rank}.pt"
    with atomic_path(path) as tmp:  # a full disk is one line, as for checkpoints
        save_torch({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, tmp)
    img = batch["image"].float()
    stats = (f"image mean {img.mean():.3g} std {img.std():.3g} min {img.min():.3g} max "
             f"{img.max():.3g}; ink share {batch['label'].float().mean():.3g}")
    bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items() if v.dim() == 0)
    raise TrainingError(f"loss is {float(loss.detach())} at step {step} ({bad}; batch: "
                        f"{stats}); the batch is saved for replay ({path}); try a lower train.lr")


def out_of_memory(err: BaseException) -> BaseException:
    """``err``, or for a CUDA out-of-memory error the TrainingError that says what to lower."""
    if not isinstance(err, torch.cuda.OutOfMemoryError):
        return err
    hint = TrainingError(
        "CUDA out of memory: lower train.batch_size (and raise train.accumulate to keep "
        "the effective batch), lower model.image_size (256 is about 16x cheaper than "
        "1024), or freeze the encoder (model.trainable=[prompt_encoder,mask_decoder]) so "
        "embeddings are cached")
    hint.__cause__ = err
    return hint
