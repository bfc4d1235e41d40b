"""The SAM loss at label resolution: per-pixel autograd terms against the chunked sums.

- ``loss_1024_sums_vs_autograd``: one loss call (forward + backward) as a 1024 px training
  round has it: 8 prompt sets (a vit_b batch of 4, two sets per tile) of 3 masks each, the
  decoder's 256 x 256 logits upsampled to the 1024 x 1024 labels, focal 20 : dice 1 and the
  IoU head's MSE. Baseline: the terms written as autograd ops (``focal_loss``,
  ``soft_dice_loss``, ``mask_iou`` on the upsampled logits, as ``sam_loss`` computed them
  before :mod:`scrollsam.mask_loss`); ours: ``sam_loss`` now. ``metrics`` has the memory each
  way keeps for backward, counted with ``saved_tensors_hooks``.
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
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(sets, masks, size // 4, size // 4, generator=g).requires_grad_()
    iou = torch.rand(sets, masks, generator=g).requires_grad_()
    blobs = torch.rand(sets, 1, size // 16, size // 16, generator=g)  # (P, 1, S/16, S/16)
    target = (torch.nn.functional.interpolate(blobs, size=(size, size), mode="bilinear")
              > 0.6).float()  # (P, 1, S, S) blob-shaped ink
    valid = torch.ones_like(target)
    args = (logits, iou, target, valid)

    def step(loss_fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss_fn(*args).backward()
            logits.grad = iou.grad = None
        return run

    result = compare(step(_autograd_loss), step(_ours), repeats=1 if quick else 5)
    result["settings"] = {"sets": sets, "masks": masks, "logits_px": size // 4,
                          "label_px": size, "baseline": "per-pixel autograd terms",
                          "ours": "scrollsam.mask_loss chunked sums"}
    result["metrics"] = {"saved_mb_autograd": _saved_mb(_autograd_loss, *args),
                         "saved_mb_ours": _saved_mb(_ours, *args)}
    return result
