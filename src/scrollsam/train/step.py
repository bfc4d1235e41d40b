"""One training step's forward pass: SAM-paper prompting over a batch of tiles.

A batch of B tiles gets P = B * ``prompt_cfg.sets_per_tile`` prompt sets, each tied to its tile.
Every set has one :class:`PromptKind`, its first prompt:

* ``NONE`` (a ``prompt_cfg.prompt_free_share`` of the sets): no prompt, one mask, which is how
  whole fragments are segmented at inference;
* ``POINT``: one random ink point (a background point where a tile has no ink: never a
  fabricated positive), multimask output in the first round (the lowest-loss mask trains);
* ``BOX``: the noisy ink bounding box (a set whose tile has no ink becomes a ``POINT`` set).

The sets of one kind travel as one :class:`PromptSets` and are decoded in one call, each against
its own tile's embedding. Prompted kinds then run :func:`corrective_rounds`:
``prompt_cfg.corrective_rounds`` times a new point from the error region of the previous
prediction (missed ink -> positive, false ink -> negative), with the previous selected logits
as the mask prompt. :func:`scrollsam.losses.mean_parts` averages the loss over the rounds, then
over the sets.

Randomness: each prompt set draws from its own CPU generator, seeded from its tile's seed and
its place among the tile's sets (:func:`set_generators`). The training loop gives each tile the
seed of its global sample index (:func:`tile_seeds`), so a tile's prompts are a pure function of
(``train.seed``, sample index): the same whichever process draws it and whatever else shares its
batch (torchrun splits a global batch across processes), and a resumed run needs no generator
state. Callers without sample indices (the doctor, tests) pass one ``gen`` to draw tile seeds from.

Host and device: the truth arrives on the CPU (the batch as the dataset gives it) and is
copied to the device once, without waiting; the host keeps only which tiles have ink, to
choose prompt kinds. Every prompt (first points, boxes, corrective points with
``prompt_cfg.corrective: uniform``, the SAM paper's sampler), decoding and the loss run on the
embeddings' device, drawing their few random numbers from the sets' CPU generators: nothing
reads a device value back (``tests/test_train_sync.py``). The one exception is
``prompt_cfg.corrective: center``: each round copies the selected logits and the truth to the
host for OpenCV's distance transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import torch
from torch import Tensor

from scrollsam.config import LossConfig, PromptConfig
from scrollsam.errors import InputError
from scrollsam.losses import mean_parts, sam_loss, to_mask_resolution
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.prompts import (
    Generators,
    Points,
    append_points,
    box_prompts,
    corrective_points,
    first_points,
    random_numbers,
    rows_of,
    select_mask,
)


class PromptKind(IntEnum):
    """The first prompt of a set (integers, so a [P] tensor of kinds compares with them)."""

    NONE = 0
    POINT = 1
    BOX = 2


FIRST = {"point": PromptKind.POINT, "box": PromptKind.BOX, "none": PromptKind.NONE}
ORDER = (PromptKind.POINT, PromptKind.BOX, PromptKind.NONE)  # the order of decode calls
PROMPT_STREAM = 0x70726F6D  # "prom": tile seeds are a stream of their own beside the data's


@dataclass
class PromptSets:
    """P prompt sets of one kind, as one decode call takes them, on the device where the
    samplers make and extend them."""

    kind: PromptKind
    image_index: Tensor  # long [P] on the device: the tile (embedding) of each set
    points: Points | None = None  # ([P, N, 2] (x, y) pixels, [P, N] labels)
    boxes: Tensor | None = None  # [P, 4] XYXY pixels
    mask_inputs: Tensor | None = None  # [P, 1, S/4, S/4] logits


@dataclass
class Truth:
    """Ground truth of some tiles or sets, on the device, in the form each reader wants."""

    ink: Tensor  # float [N, 1, H, W], H = S or S/4 (loss_cfg.resolution): the loss
    valid: Tensor  # float [N, 1, H, W]
    full_ink: Tensor  # bool [N, 1, S, S]: the prompt samplers
    full_valid: Tensor  # bool [N, 1, S, S]

    def select(self, index: Tensor) -> Truth:
        """Rows ``index`` (long, on the device)."""
        return Truth(*(t.index_select(0, index) for t in
                       (self.ink, self.valid, self.full_ink, self.full_valid)))


@dataclass
class StepOutput:
    """Loss parts (0-dim tensors; ``"loss"`` has grad) and one prompted example for pictures."""

    parts: dict[str, Tensor]
    example: dict[str, Tensor] | None


def loss_kwargs(loss_cfg: LossConfig) -> dict[str, object]:
    """LossConfig -> keyword arguments of :func:`scrollsam.losses.sam_loss`."""
    focal = loss_cfg.mask_weight if loss_cfg.kind == "focal" else 0.0
    bce = loss_cfg.mask_weight if loss_cfg.kind == "bce" else 0.0
    return dict(focal_weight=focal, bce_weight=bce, dice_weight=loss_cfg.dice_weight,
                iou_weight=loss_cfg.iou_weight, iou_on=loss_cfg.iou_on,
                resolution=loss_cfg.resolution)


def tile_seeds(seed: int, samples: Sequence[int]) -> list[int]:
    """The prompt seed of each training sample index in ``samples`` (global indices: the n-th
    tile the run draws, see :mod:`scrollsam.train.order`) for the run seed ``seed``."""
    return [_seed64(np.random.SeedSequence([seed, n], spawn_key=(PROMPT_STREAM,)))
            for n in samples]


def set_generators(seeds: Sequence[int], sets_per_tile: int) -> list[torch.Generator]:
    """One CPU generator per prompt set, set j of tile t seeded from (``seeds[t]``, j): the
    P = len(seeds) * ``sets_per_tile`` sets in tile order, as :func:`prompted_forward` makes
    them."""
    return [torch.Generator().manual_seed(_seed64(np.random.SeedSequence([int(s), j])))
            for s in seeds for j in range(sets_per_tile)]


def _seed64(seq: np.random.SeedSequence) -> int:
    hi, lo = (int(v) for v in seq.generate_state(2, np.uint32))
    return (hi << 32 | lo) & (2**63 - 1)


def assign_kinds(num_sets: int, prompt_cfg: PromptConfig, gen: Generators) -> Tensor:
    """The :class:`PromptKind` of each prompt set -> long [P] (CPU)."""
    draw, coin = random_numbers((num_sets, 2), gen, torch.device("cpu")).unbind(1)  # (P,) each
    if prompt_cfg.first == "mixed":
        prompted = torch.where(coin < 0.5, PromptKind.POINT, PromptKind.BOX)
    else:
        prompted = torch.full((num_sets,), FIRST[prompt_cfg.first])
    return torch.where(draw < prompt_cfg.prompt_free_share, PromptKind.NONE, prompted).long()


def tile_truth(model: SamSegmenter, label: Tensor, valid: Tensor, *, loss_cfg: LossConfig,
               device: torch.device) -> Truth:
    """:class:`Truth` of B tiles from label / valid [B, 1, S, S]; at ``resolution="mask"`` the
    loss side is area-averaged to S/4 once per tile, not once per set and round."""
    ink = label.to(device, non_blocking=True)  # (B, 1, S, S)
    inside = valid.to(device, non_blocking=True)
    full_ink, full_valid = ink > 0.5, inside > 0.5  # (B, 1, S, S) bool: the samplers' truth
    if loss_cfg.resolution == "mask":
        ink, inside = to_mask_resolution(ink, inside, (model.mask_size, model.mask_size))
    return Truth(ink, inside, full_ink, full_valid)


def first_prompts(kind: PromptKind, image_index: Tensor, truth: Truth, *,
                  boxes: Tensor | None, gen: Generators) -> PromptSets:
    """The sets of one kind with their first prompt: ``image_index`` long [P] (the tile of each
    set, on the device), ``truth`` of the P sets, ``boxes`` [P, 4] of a ``BOX`` kind."""
    sets = PromptSets(kind, image_index)
    if kind is PromptKind.POINT:
        sets.points = first_points(truth.full_ink, truth.full_valid, gen)
    elif kind is PromptKind.BOX:
        sets.boxes = boxes
    return sets


def decode(model: SamSegmenter, embeddings: Tensor, sets: PromptSets, *, multimask: bool,
           features: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The step's one way to run the decoder: ``sets`` against their own embeddings ->
    (logits, IoU [P, M], the decoder's own logits [P, M, S/4, S/4]). ``logits`` are the mask
    head's [P, M, S, S] when the model has one (``features``: the pixel features of
    :meth:`SamSegmenter.encode_with_pixels`), else the decoder's. The prompts are on the device
    already (the samplers make them there), and their values go unchecked (a check would wait
    for the device)."""
    low, iou = model.decode(embeddings, points=sets.points, boxes=sets.boxes,
                            mask_inputs=sets.mask_inputs,
                            multimask=multimask, image_index=sets.image_index,
                            check_values=False)
    return model.refine(low, features, sets.image_index), iou, low


def corrective_rounds(
    model: SamSegmenter,
    embeddings: Tensor,
    sets: PromptSets,
    truth: Truth,
    *,
    rounds: int,
    multimask: bool,
    mask_feedback: bool,
    loss_kw: dict[str, object],
    sampler: str = "uniform",
    gen: Generators | None = None,
    features: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor, PromptSets]:
    """Decode ``sets`` and score them; then ``rounds`` times add one point from the error region
    of the selected mask (SAM paper, Appendix A), with its logits as the next mask prompt when
    ``mask_feedback``, and decode and score again. ``multimask``: three masks in the first round.
    ``sampler``: :func:`corrective_points`' mode; "uniform" (the SAM paper's) draws from the sets'
    generators ``gen`` on the device, "center" copies each round's masks to the host.

    The mask prompt is the decoder's own S/4 logits of the selected mask (with a mask head the
    error region comes from the head's full-resolution mask). Returns the loss parts averaged
    over the 1 + ``rounds`` rounds, the last round's selected logits [P, 1, S/4, S/4] or
    [P, 1, S, S] with a mask head (detached) and the prompts of the last round.
    """
    per_round = []
    for r in range(1 + rounds):
        logits, iou, low = decode(model, embeddings, sets, multimask=multimask and r == 0,
                                  features=features)
        loss = sam_loss(logits, iou, truth.ink, truth.valid, **loss_kw)
        per_round.append(loss.parts)
        chosen = select_mask(logits, loss.selected)  # (P, 1, S/4 or S, ...), detached
        if r < rounds:
            if sampler == "uniform":  # on the device, no sync
                new = corrective_points(chosen, truth.full_ink, truth.full_valid,
                                        mode="uniform", generator=gen)
            else:  # OpenCV on the host: the round's copies back and their wait
                new = corrective_points(chosen.cpu(), truth.full_ink.cpu(),
                                        truth.full_valid.cpu(), mode="center")
                new = _to(new, chosen.device)
            points = new if sets.points is None else append_points(sets.points, new)
            feedback = chosen if low is logits else select_mask(low, loss.selected)
            sets = replace(sets, points=points,
                           mask_inputs=feedback if mask_feedback else None)
    return mean_parts(per_round), chosen, sets


def _to(points: Points, device: torch.device) -> Points:
    """``points`` on ``device`` (a copy that does not wait)."""
    return points[0].to(device, non_blocking=True), points[1].to(device, non_blocking=True)


def picture_example(tile: Tensor, chosen: Tensor, sets: PromptSets) -> dict[str, Tensor]:
    """The first set of a group for the training picture: its tile (CPU), last selected logits
    [1, S/4, S/4] (on the device: the loop copies them on picture steps only) and points."""
    coords, labels = sets.points if sets.points is not None else (
        torch.zeros(1, 0, 2), torch.zeros(1, 0, dtype=torch.long))
    return {"tile": tile, "logits": chosen[0].detach(), "coords": coords[0], "labels": labels[0]}


def prompted_forward(
    model: SamSegmenter,
    embeddings: Tensor,
    label: Tensor,
    valid: Tensor,
    *,
    prompt_cfg: PromptConfig,
    loss_cfg: LossConfig,
    seeds: Sequence[int] | None = None,
    gen: torch.Generator | None = None,
    features: Tensor | None = None,
) -> StepOutput:
    """Loss for a batch: embeddings [B, 256, g, g] on the device; label / valid [B, 1, S, S]
    ink and fragment mask on the CPU (device tensors work too, at the cost of a copy back).
    ``seeds``: the prompt seed of each tile (B ints, :func:`tile_seeds`), or ``gen`` to draw
    them from. ``features``: the pixel features [B, G, S, S] a full-resolution mask head needs
    (:meth:`SamSegmenter.encode_with_pixels`); None without one."""
    dev = embeddings.device
    B = embeddings.shape[0]
    if (seeds is None) == (gen is None):
        raise InputError("seeds, gen: expected exactly one of them (the prompt seed of each "
                         "tile, or a generator to draw them from)")
    if gen is not None:
        seeds = torch.randint(0, 2**62, (B,), generator=gen).tolist()
    if len(seeds) != B:
        raise InputError(f"seeds: expected one per tile ({B}), got {len(seeds)}")
    tile_of_set = torch.arange(B).repeat_interleave(prompt_cfg.sets_per_tile)  # (P,) CPU
    gens = set_generators(seeds, prompt_cfg.sets_per_tile)  # P, one per set
    truth = tile_truth(model, label, valid, loss_cfg=loss_cfg, device=dev)
    kinds = assign_kinds(tile_of_set.shape[0], prompt_cfg, gens)  # (P,) CPU
    boxes = None
    if prompt_cfg.first in ("box", "mixed"):  # a set whose tile has no ink gets a point
        # decided on the host, from the batch as the loader gave it (no copy from a CPU batch)
        has_ink = ((label.detach().cpu() > 0.5) & (valid.detach().cpu() > 0.5)).flatten(1).any(1)
        kinds = torch.where((kinds == PromptKind.BOX) & ~has_ink[tile_of_set], PromptKind.POINT,
                            kinds)
        every_set = truth.select(tile_of_set.to(dev, non_blocking=True))
        boxes, _ = box_prompts(every_set.full_ink, every_set.full_valid,
                               generator=gens)  # (P, 4) on the device
    loss_kw = loss_kwargs(loss_cfg)
    groups, sizes, example = [], [], None
    for kind in ORDER:
        sel = (kinds == kind).nonzero().flatten()  # (Pk,) CPU
        if not len(sel):
            continue
        tiles = tile_of_set[sel]  # (Pk,)
        index = tiles.to(dev, non_blocking=True)  # (Pk,) the same, on the device
        sets_truth = truth.select(index)
        sets_gens = rows_of(gens, sel.tolist())
        sets = first_prompts(kind, index, sets_truth, gen=sets_gens,
                             boxes=boxes[sel.to(dev, non_blocking=True)]
                             if kind is PromptKind.BOX else None)
        prompted = kind is not PromptKind.NONE
        parts, chosen, sets = corrective_rounds(
            model, embeddings, sets, sets_truth,
            rounds=prompt_cfg.corrective_rounds if prompted else 0,
            multimask=prompt_cfg.multimask and kind is PromptKind.POINT,
            mask_feedback=prompt_cfg.mask_feedback, loss_kw=loss_kw,
            sampler=prompt_cfg.corrective, gen=sets_gens, features=features)
        groups.append(parts)
        sizes.append(len(sel))
        if example is None and prompted:
            example = picture_example(tiles[0], chosen, sets)
    return StepOutput(parts=mean_parts(groups, weights=sizes), example=example)
