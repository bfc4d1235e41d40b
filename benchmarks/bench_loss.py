"""The SAM loss at label resolution: per-pixel autograd terms against the chunked sums.

- ``loss_1024_sums_vs_autograd``: one loss call (forward + backward) as a 1024 px training
  round has it: 8 prompt sets (a vit_b batch of 4, two sets per tile) of 3 masks each, the
  decoder's 256 x 256 logits upsampled to the 1024 x 1024 labels, focal 20 : dice 1 and the
  IoU head's MSE. Baseline: the terms written as autograd ops (``focal_loss``,
  ``soft_dice_loss``, ``mask_iou`` on the upsampled logits, as ``sam_loss`` computed them
  before :mod:`scrollsam.mask_loss`); ours: ``sam_loss`` now. ``metrics`` has the memory each
  way keeps for backward, counted with ``saved_tensors_hooks``.
- ``loss_1024_compiled_vs_eager``: the same call, ``sam_loss`` with its per-pixel terms eager
  against compiled as ``train.compile`` compiles them (:func:`scrollsam.mask_loss.pixel_terms`,
  inductor; the compile happens in the warm-up). Skipped where compile cannot run. On a CPU a
  chunk holds one set at 1024 px (``CHUNK``), so this times the one-set graphs; on a GPU a
  chunk holds about ten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from common import compare, register

from scrollsam.losses import (
    focal_loss,
    iou_mse_loss,
    mask_iou,
    sam_loss,
    soft_dice_loss,
    upsample_logits,
)


def _autograd_loss(logits: torch.Tensor, iou: torch.Tensor, target: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """The loss as the per-pixel autograd terms give it (focal 20 : dice 1, IoU MSE on all)."""
    up = upsample_logits(logits.float(), tuple(target.shape[-2:]))  # (P, M, H, W)
    per_mask = 20 * focal_loss(up, target, valid) + soft_dice_loss(up, target, valid)
    pick = per_mask.detach().argmin(dim=1)[:, None]  # (P, 1)
    return per_mask.gather(1, pick).mean() + iou_mse_loss(iou, mask_iou(up, target, valid)).mean()


def _ours(logits: torch.Tensor, iou: torch.Tensor, target: torch.Tensor,
          valid: torch.Tensor) -> torch.Tensor:
    return sam_loss(logits, iou, target, valid).parts["loss"]


def _round(sets: int, masks: int, size: int) -> tuple[torch.Tensor, ...]:
    """A training round's loss inputs: logits [P, M, S/4, S/4] and IoU [P, M] (with grad),
    blob-shaped ink and an all-valid mask [P, 1, S, S]."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(sets, masks, size // 4, size // 4, generator=g).requires_grad_()
    iou = torch.rand(sets, masks, generator=g).requires_grad_()
    blobs = torch.rand(sets, 1, size // 16, size // 16, generator=g)  # (P, 1, S/16, S/16)
    target = (torch.nn.functional.interpolate(blobs, size=(size, size), mode="bilinear")
              > 0.6).float()  # (P, 1, S, S) blob-shaped ink
    return logits, iou, target, torch.ones_like(target)


def _step(loss_fn: Callable[..., torch.Tensor],
          args: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """One forward + backward of ``loss_fn(*args)``, gradients cleared."""
    def run() -> None:
        loss_fn(*args).backward()
        args[0].grad = args[1].grad = None
    return run


def _saved_mb(loss_fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> float:
    """MB of the tensors ``loss_fn`` keeps for backward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(*args)
    return sum(storages.values()) / 2**20


@register("loss_1024_sums_vs_autograd", goal=None,
          about="SAM loss at 1024 px, 8 sets x 3 masks: autograd terms vs chunked sums")
def loss_1024_sums_vs_autograd(quick: bool) -> dict[str, Any]:
    sets, masks, size = (2 if quick else 8), 3, 1024
    args = _round(sets, masks, size)
    result = compare(_step(_autograd_loss, args), _step(_ours, args),
                     repeats=1 if quick else 5)
    result["settings"] = {"sets": sets, "masks": masks, "logits_px": size // 4,
                          "label_px": size, "baseline": "per-pixel autograd terms",
                          "ours": "scrollsam.mask_loss chunked sums"}
    result["metrics"] = {"saved_mb_autograd": _saved_mb(_autograd_loss, *args),
                         "saved_mb_ours": _saved_mb(_ours, *args)}
    return result


def _compile_unavailable() -> str | None:
    from scrollsam.model.compile import compile_unavailable

    return compile_unavailable("cpu")


@register("loss_1024_compiled_vs_eager", goal=None,
          about="SAM loss at 1024 px, 8 sets x 3 masks: per-pixel terms eager vs compiled",
          needs=_compile_unavailable)
def loss_1024_compiled_vs_eager(quick: bool) -> dict[str, Any]:
    sets, masks, size = (2 if quick else 8), 3, 1024
    args = _round(sets, masks, size)

    def compiled(*loss_args: torch.Tensor) -> torch.Tensor:
        return sam_loss(*loss_args, compiled="inductor").parts["loss"]

    result = compare(_step(_ours, args), _step(compiled, args), repeats=1 if quick else 5)
    result["settings"] = {"sets": sets, "masks": masks, "logits_px": size // 4,
                          "label_px": size, "baseline": "sam_loss, per-pixel terms eager",
                          "ours": "the same compiled (inductor, train.compile's form)"}
    return result
