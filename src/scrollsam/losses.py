"""Training losses of the SAM paper: focal + dice on masks (20:1), MSE on the IoU head.

Shapes and frames (P prompt sets, M masks per set: 3 with multimask output, else 1):
- ``logits``  ``[P, M, h, w]`` mask logits from the decoder, usually at S/4 (256 for S = 1024);
- ``iou_pred`` ``[P, M]`` the decoder's predicted IoU of each mask;
- ``target`` ``[P, 1, H, W]`` in {0, 1} at label resolution (the S x S input frame), shared by
  the M masks of a set; ``valid`` the same shape, 1 inside the fragment mask.

Resolution: by default (``resolution="label"``) the combiner upsamples the logits bilinearly
(``align_corners=False``, as SAM's own ``postprocess_masks``) to the label resolution H x W and
compares there. ``resolution="mask"`` instead area-averages target and valid down to the logits'
grid (S/4: each low-res pixel's target is its ink fraction, a soft label) and compares there:
16x fewer pixels, which at S = 1024 is most of a cached training step on a CPU. The per-pixel
functions below expect logits already at the target's size.

Reduction: every per-pixel loss is averaged over the valid pixels of each (set, mask) pair,
giving ``[P, M]``; pixels outside ``valid`` count for nothing (a set without valid pixels
contributes 0). The combiner :func:`sam_loss` picks one mask per set and then takes the mean
over P; :func:`mean_parts` averages its results over corrective rounds and groups of sets.

All functions are pure and differentiable in ``logits`` / ``iou_pred``; they compute in
float32 whatever the input dtype (bf16 autocast safe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from scrollsam.errors import InputError, describe
from scrollsam.mask_loss import mask_sums, upsample_logits

__all__ = [
    "SamLoss",
    "bce_loss",
    "focal_loss",
    "iou_mse_loss",
    "mask_iou",
    "mean_parts",
    "sam_loss",
    "scalar_parts",
    "soft_dice_loss",
    "to_mask_resolution",
    "upsample_logits",
]


def _check(logits: Tensor, target: Tensor, valid: Tensor | None) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        raise InputError(f"logits: expected [P, M, H, W] float tensor, got {describe(logits)}")
    if not isinstance(target, Tensor) or target.dim() != 4 or target.shape[1] != 1:
        raise InputError(f"target: expected [P, 1, H, W] tensor, got {describe(target)}")
    if target.shape[0] != logits.shape[0]:
        raise InputError(f"target: expected {logits.shape[0]} prompt sets (as logits), "
                         f"got {describe(target)}")
    if valid is not None and valid.shape != target.shape:
        raise InputError(f"valid: expected the shape of target {list(target.shape)}, "
                         f"got {describe(valid)}")


def _weights(target: Tensor, valid: Tensor | None) -> Tensor:
    """Per-pixel weights [P, 1, H, W]: 1 inside valid, 0 outside."""
    return torch.ones_like(target) if valid is None else (valid > 0.5).to(target.dtype)


def _masked_mean(per_pixel: Tensor, weight: Tensor) -> Tensor:
    """[P, M, H, W] values, [P, 1, H, W] weights -> [P, M] mean over weighted pixels."""
    total = (per_pixel * weight).sum(dim=(2, 3))  # (P, M)
    return total / weight.sum(dim=(2, 3)).clamp(min=1.0)  # (P, M) / (P, 1)


def _same_size(logits: Tensor, target: Tensor) -> None:
    if logits.shape[-2:] != target.shape[-2:]:
        raise InputError(f"logits: expected the label resolution {list(target.shape[-2:])} "
                         f"(call upsample_logits first), got {describe(logits)}")


def to_mask_resolution(target: Tensor, valid: Tensor | None,
                       size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """``resolution="mask"`` targets: area-average ``[N, 1, H, W]`` target and valid down to
    ``size`` (the decoder's S/4 grid) -> ink fraction and valid fraction (kept where > 0.5).
    Pooling is per image, so callers may pool once per tile and index sets afterwards."""
    target = F.adaptive_avg_pool2d(target.float(), size)  # (N, 1, h, w)
    if valid is not None:
        valid = F.adaptive_avg_pool2d(valid.float(), size)  # (N, 1, h, w)
    return target, valid


def focal_loss(
    logits: Tensor, target: Tensor, valid: Tensor | None = None, *,
    alpha: float = 0.25, gamma: float = 2.0,
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over valid pixels -> ``[P, M]``.

    Per pixel: ``a_t * (1 - p_t)^gamma * BCE`` with p_t the probability given to the true
    class; a_t = alpha on ink pixels and 1 - alpha on background (alpha < 0 disables it).
    alpha 0.25, gamma 2 are RetinaNet's, SAM's and SAM 2's values.
    """
    _check(logits, target, valid)
    _same_size(logits, target)
    x, t = logits.float(), target.float()  # (P, M, H, W), (P, 1, H, W)
    # Everything that depends on the truth alone is one [P, 1, H, W] weight: the valid mask,
    # the mean over valid pixels and a_t: fewer full-size ops (benchmarks/README.md).
    w = _weights(t, valid)  # (P, 1, H, W)
    weight = w / w.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    if alpha >= 0:
        weight = weight * (alpha * t + (1 - alpha) * (1 - t))
    ce = F.binary_cross_entropy_with_logits(x, t.expand_as(x), reduction="none")
    miss = torch.sigmoid(x) * (1 - 2 * t) + t  # 1 - p_t = p (1 - t) + (1 - p) t
    return (ce * miss.pow(gamma) * weight).sum(dim=(2, 3))  # (P, M)


def soft_dice_loss(
    logits: Tensor, target: Tensor, valid: Tensor | None = None, *, smooth: float = 1.0
) -> Tensor:
    """``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over valid pixels, with
    p = sigmoid(logits) -> ``[P, M]``. ``smooth`` keeps an empty target defined: there the
    loss is ``sum(p) / (sum(p) + smooth)``, pushing every probability to 0."""
    _check(logits, target, valid)
    _same_size(logits, target)
    w = _weights(target.float(), valid)  # (P, 1, H, W)
    p = torch.sigmoid(logits.float()) * w  # (P, M, H, W)
    t = target.float() * w  # (P, 1, H, W)
    inter = (p * t).sum(dim=(2, 3))  # (P, M)
    return _dice(inter, p.sum(dim=(2, 3)) + t.sum(dim=(2, 3)), smooth)  # (P, M) + (P, 1)


def _dice(inter: Tensor, total: Tensor, smooth: float) -> Tensor:
    """Soft dice loss [P, M] from sum(p t) and sum(p) + sum(t)."""
    return 1 - (2 * inter + smooth) / (total + smooth)


def bce_loss(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits, mean over valid pixels -> ``[P, M]``."""
    _check(logits, target, valid)
    _same_size(logits, target)
    x, t = logits.float(), target.float().expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")  # (P, M, H, W)
    return _masked_mean(ce, _weights(target.float(), valid))


@torch.no_grad()
def mask_iou(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """IoU of each thresholded mask (``logits > 0``) with the truth inside valid -> ``[P, M]``.

    Not differentiable (a target for the IoU head). An empty union (no ink, none predicted)
    counts as IoU 1.0, a perfect answer.
    """
    _check(logits, target, valid)
    _same_size(logits, target)
    w = _weights(target.float(), valid) > 0  # (P, 1, H, W)
    pred = (logits > 0) & w  # (P, M, H, W)
    truth = (target > 0.5) & w  # (P, 1, H, W)
    inter = (pred & truth).sum(dim=(2, 3)).float()  # (P, M)
    return _iou(inter, (pred | truth).sum(dim=(2, 3)).float())


def _iou(inter: Tensor, union: Tensor) -> Tensor:
    """IoU [P, M] from pixel counts; an empty union is 1.0 (nothing to find, nothing found)."""
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


def iou_mse_loss(iou_pred: Tensor, actual_iou: Tensor) -> Tensor:
    """Squared error between predicted and actual IoU, element-wise -> ``[P, M]``."""
    if iou_pred.shape != actual_iou.shape:
        raise InputError(f"iou_pred: expected {list(actual_iou.shape)} (one per mask), "
                         f"got {describe(iou_pred)}")
    return (iou_pred.float() - actual_iou.float().detach()) ** 2


class SamLoss(NamedTuple):
    """:func:`sam_loss` of one round: the loss parts and each set's selected mask."""

    parts: dict[str, Tensor]  # "loss" (with grad) and detached 0-dim parts for logging
    selected: Tensor  # [P] int64: the mask of each set that trains (the next mask prompt)


def sam_loss(
    logits: Tensor,
    iou_pred: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    bce_weight: float = 0.0,
    iou_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    dice_smooth: float = 1.0,
    iou_on: str = "all",
    resolution: str = "label",
    compiled: str | None = None,
) -> SamLoss:
    """The SAM training loss for one round of prompts.

    Mask loss per (set, mask) = focal_weight * focal + dice_weight * dice + bce_weight * BCE
    (the paper's 20:1 focal:dice; set ``bce_weight`` > 0 and ``focal_weight`` = 0 for plain
    BCE). With M > 1 masks only the mask with the lowest mask loss is back-propagated, per set
    (the paper's ambiguity handling). The IoU head learns the actual IoU (:func:`mask_iou`) by
    MSE, on all M outputs (``iou_on="all"``, the default: every output's score is used at
    inference to rank masks) or only the selected one (``"selected"``, as SAM 2 does).
    Everything is averaged over the P prompt sets.

    Returns :class:`SamLoss`: ``parts`` = ``{"loss": total (with grad), "mask", "focal",
    "dice"[, "bce"], "iou_mse", "mask_iou"}``, the others detached 0-dim tensors for logging
    (the terms of the selected masks; "mask_iou" is their actual IoU), and ``selected``, the
    [P] int64 index of each set's selected mask. Feed :func:`scrollsam.prompts.select_mask`
    ``(logits, selected)`` back as the next mask prompt; :func:`scalar_parts` gives the
    loggable floats (a host sync: on log steps only). ``compiled``: the ``torch.compile``
    backend for the per-pixel terms (:func:`scrollsam.mask_loss.pixel_terms`), None: eager.
    """
    _check(logits, target, valid)
    if iou_pred.shape != logits.shape[:2]:
        raise InputError(f"iou_pred: expected {list(logits.shape[:2])} ([P, M], as logits), "
                         f"got {describe(iou_pred)}")
    if iou_on not in ("all", "selected"):
        raise InputError(f"iou_on: expected 'all' or 'selected', got {iou_on!r}")
    if resolution not in ("label", "mask"):
        raise InputError(f"resolution: expected 'label' or 'mask', got {resolution!r}")
    if resolution == "mask" and target.shape[-2:] != logits.shape[-2:]:
        target, valid = to_mask_resolution(target, valid, tuple(logits.shape[-2:]))
    # the per-pixel terms above, summed in one pass that keeps nothing full-size (mask_loss)
    sums = mask_sums(logits, target, valid, alpha=focal_alpha, gamma=focal_gamma,
                     bce=bool(bce_weight), compiled=compiled)
    parts: dict[str, Tensor] = {
        "focal": sums.focal,
        "dice": _dice(sums.inter, sums.prob + sums.ink, dice_smooth),
    }  # each (P, M)
    if bce_weight:
        parts["bce"] = sums.bce
    weights = {"focal": focal_weight, "dice": dice_weight, "bce": bce_weight}
    per_mask = sum(weights[k] * v for k, v in parts.items())  # (P, M)
    selected = per_mask.detach().argmin(dim=1)  # (P,) first index on ties
    pick = selected[:, None]  # (P, 1)
    mask_loss = per_mask.gather(1, pick).squeeze(1).mean()
    actual = _iou(sums.hit, sums.predicted + sums.truth - sums.hit)  # (P, M), no grad
    iou_err = iou_mse_loss(iou_pred, actual)  # (P, M)
    iou_loss = iou_err.mean() if iou_on == "all" else iou_err.gather(1, pick).mean()
    out = {"loss": mask_loss + iou_weight * iou_loss, "mask": mask_loss.detach()}
    for name, value in parts.items():
        out[name] = value.gather(1, pick).mean().detach()
    out["iou_mse"] = iou_loss.detach()
    out["mask_iou"] = actual.gather(1, pick).mean()
    return SamLoss(out, selected)


def mean_parts(parts: Sequence[Mapping[str, Tensor]],
               weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Mean of several loss-part dicts (:attr:`SamLoss.parts`), key by key, as tensors (no host
    sync). Unweighted over the corrective rounds of a group of prompt sets; weighted by the
    number of sets over the groups of a batch, so every prompt set counts alike."""
    if weights is None:
        return {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
    total = sum(weights)
    return {k: sum(p[k] * w for p, w in zip(parts, weights, strict=True)) / total
            for k in parts[0]}


def scalar_parts(parts: Mapping[str, Tensor]) -> dict[str, float]:
    """Loss parts (``loss`` included) as Python floats, for logging: a host sync per part, so
    the training loop calls it on log steps only."""
    return {k: float(v.detach()) for k, v in parts.items()}
