"""One training step's forward pass: SAM-paper prompting over a batch of tiles.

A batch of B tiles gets P = B * ``prompts.sets_per_tile`` prompt sets; ``image_index`` [P] ties
each set to its tile, so all sets are decoded against their own embedding in one call per group:

* prompt-free sets (a ``prompts.prompt_free_share`` of them): no prompt, one mask, which is how
  whole fragments are segmented at inference;
* point sets: one random ink point (a background point where a tile has no ink: never a
  fabricated positive), multimask output in the first round (the lowest-loss mask trains);
* box sets: the noisy ink bounding box (tiles without ink fall back to a point).

Each prompted group then runs ``prompts.corrective_rounds`` rounds: a new point from the error
region of the previous prediction (missed ink -> positive, false ink -> negative), and the
previous selected logits as the mask prompt. The loss is averaged over rounds and sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scrollsam import prompts as P
from scrollsam.config import LossConfig, PromptConfig
from scrollsam.losses import sam_loss, to_mask_resolution
from scrollsam.model.segmenter import SamSegmenter


@dataclass
class StepOutput:
    """Loss parts (``"loss"`` has grad) and one prompted example for pictures."""

    parts: dict[str, torch.Tensor]
    example: dict[str, torch.Tensor] | None


def loss_kwargs(cfg: LossConfig) -> dict[str, object]:
    """LossConfig -> keyword arguments of :func:`scrollsam.losses.sam_loss`."""
    focal = cfg.mask_weight if cfg.kind == "focal" else 0.0
    bce = cfg.mask_weight if cfg.kind == "bce" else 0.0
    return dict(focal_weight=focal, bce_weight=bce, dice_weight=cfg.dice_weight,
                iou_weight=cfg.iou_weight, iou_head=cfg.iou_on, resolution=cfg.resolution)


def assign_groups(num_sets: int, cfg: PromptConfig, gen: torch.Generator) -> torch.Tensor:
    """Group of each prompt set: 0 prompt-free, 1 point, 2 box -> long [P] (CPU)."""
    draw = torch.rand(num_sets, generator=gen)
    kind = torch.rand(num_sets, generator=gen)
    first = {"point": 1, "box": 2, "none": 0}
    if cfg.first == "mixed":
        prompted = torch.where(kind < 0.5, 1, 2)
    else:
        prompted = torch.full((num_sets,), first[cfg.first])
    return torch.where(draw < cfg.prompt_free_share, 0, prompted).long()


def first_points(target: torch.Tensor, valid: torch.Tensor,
                 gen: torch.Generator) -> P.Points:
    """One random ink point per set; a background point where the tile has no ink (never a
    fabricated positive) -> ([P, 1, 2] as (x, y), [P, 1])."""
    coords, labels = P.random_points(target, valid, generator=gen, positives=1, negatives=0)
    empty = labels[:, 0] < 0  # (P,) no ink pixel inside valid
    if bool(empty.any()):
        neg_c, neg_l = P.random_points(target, valid, generator=gen, positives=0, negatives=1)
        coords = torch.where(empty[:, None, None], neg_c, coords)
        labels = torch.where(empty[:, None], neg_l, labels)
    return coords, labels


def prompted_forward(
    model: SamSegmenter,
    embeddings: torch.Tensor,
    label: torch.Tensor,
    valid: torch.Tensor,
    *,
    prompts: PromptConfig,
    loss: LossConfig,
    gen: torch.Generator,
) -> StepOutput:
    """Loss for a batch: embeddings [B, 256, g, g], label / valid [B, 1, S, S] on the device.

    Prompt sampling runs on the CPU with ``gen``; decoding runs on the model's device.
    """
    dev = embeddings.device
    b = embeddings.shape[0]
    index = torch.arange(b).repeat_interleave(prompts.sets_per_tile)  # (P,) set -> tile
    # Samplers see bool truth per set (a quarter of the bytes of float copies at S x S).
    target_cpu = (label.detach().cpu() > 0.5)[index]  # (P, 1, S, S) bool
    valid_cpu = (valid.detach().cpu() > 0.5)[index]  # (P, 1, S, S) bool
    if loss.resolution == "mask":  # area-average once per tile, not once per set and round
        label, valid = to_mask_resolution(label, valid, (model.mask_size, model.mask_size))
    groups = assign_groups(index.shape[0], prompts, gen)
    if prompts.first in ("box", "mixed"):
        boxes, present = P.box_prompts(target_cpu, valid_cpu, generator=gen)
        groups = torch.where((groups == 2) & ~present, 1, groups)  # no ink: no box
    kw = loss_kwargs(loss)
    total: dict[str, torch.Tensor] = {}
    weight_sum = 0
    example = None
    for group in (1, 2, 0):
        sel = (groups == group).nonzero().flatten()  # (Pg,)
        if not len(sel):
            continue
        idx = index[sel].to(dev)
        tgt, val = target_cpu[sel], valid_cpu[sel]
        tgt_d, val_d = label[idx], valid[idx]  # (Pg, 1, S or S/4, ...) for the loss
        if group == 0:
            logits, iou = model.decode(embeddings, image_index=idx)
            rounds = [sam_loss(logits, iou, tgt_d, val_d, **kw)]
        else:
            box = boxes[sel].to(dev) if group == 2 else None
            if group == 1:
                pts = first_points(tgt, val, gen)
            else:
                pts = (torch.zeros(len(sel), 0, 2), torch.zeros(len(sel), 0, dtype=torch.long))
            mask_in = None
            rounds = []
            for r in range(1 + prompts.corrective_rounds):
                multimask = prompts.multimask and r == 0 and group == 1
                logits, iou = model.decode(
                    embeddings, points=(pts[0].to(dev), pts[1].to(dev)) if pts[0].shape[1]
                    else None, boxes=box, mask_inputs=mask_in, multimask=multimask,
                    image_index=idx)
                out = sam_loss(logits, iou, tgt_d, val_d, **kw)
                rounds.append(out)
                chosen = P.select_mask(logits, out["selected"])  # (Pg, 1, S/4, S/4) detached
                if r == prompts.corrective_rounds:
                    break
                new = P.corrective_points(chosen.cpu(), tgt, val, mode="center")
                pts = P.append_points(pts, new) if pts[0].shape[1] else new
                mask_in = chosen if prompts.mask_feedback else None
            if example is None:
                example = {"tile": index[sel[0]], "logits": chosen[0].detach(),
                           "coords": pts[0][0], "labels": pts[1][0]}
        n = len(sel)
        for key in rounds[0]:
            if key == "selected":
                continue
            mean = torch.stack([o[key] for o in rounds]).mean()
            total[key] = total.get(key, 0) + mean * n
        weight_sum += n
    parts = {k: v / weight_sum for k, v in total.items()}
    return StepOutput(parts=parts, example=example)
