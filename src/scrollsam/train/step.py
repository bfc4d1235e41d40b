"""One training step's forward pass: SAM-paper prompting over a batch of tiles.

A batch of B tiles gets P = B * ``prompt_cfg.sets_per_tile`` prompt sets, each tied to its tile.
Every set has one :class:`PromptKind`, its first prompt:

* ``NONE`` (a ``prompt_cfg.prompt_free_share`` of the sets): no prompt, one mask, which is how
  whole fragments are segmented at inference;
* ``POINT``: one random ink point (a background point where a tile has no ink: never a
  fabricated positive), multimask output in the first round (the lowest-loss mask trains);
* ``BOX``: the noisy ink bounding box (a set whose tile has no ink becomes a ``POINT`` set).

All kinds share one decoder call per round, each set against its own tile's embedding (how a
box and no prompt fit beside points: :mod:`scrollsam.train.prompt_sets`). Prompted sets then
run :func:`corrective_rounds`:
``prompt_cfg.corrective_rounds`` times a new point from the error region of the previous
prediction (missed ink -> positive, false ink -> negative), with the previous selected logits
as the mask prompt. :func:`scrollsam.losses.mean_parts` averages the loss over the rounds, then
over the sets.

Randomness: each prompt set draws from its own CPU generator, seeded from its tile's seed and
its place among the tile's sets (:func:`~scrollsam.train.prompt_sets.set_generators`). The
training loop gives each tile the seed of its global sample index
(:func:`~scrollsam.train.prompt_sets.tile_seeds`), so a tile's prompts are a pure function of
(``train.seed``, sample index): the same whichever process draws it and whatever else shares its
batch (torchrun splits a global batch across processes), and a resumed run needs no generator
state. Callers without sample indices (the doctor, tests) pass one ``gen`` to draw tile seeds from.

Host and device: the truth arrives on the device (on a GPU the loop copies each batch a step ahead)
or on the host (then copied once, without waiting); the host keeps only which tiles have ink (the
dataset's ``has_ink`` flags), to choose prompt kinds. Every prompt (first points, boxes, corrective
points with ``prompt_cfg.corrective: uniform``, the SAM paper's sampler), decoding and the loss run
on the embeddings' device, drawing their few random numbers from the sets' CPU generators: nothing
reads a device value back (``tests/test_train_sync.py``). The one exception is
``prompt_cfg.corrective: center``: each round copies the selected logits and the truth to the host
for OpenCV's distance transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from scrollsam.config import LossConfig, PromptConfig
from scrollsam.data.dataset import ink_flags
from scrollsam.errors import InputError
from scrollsam.losses import mean_parts, sam_loss, to_mask_resolution
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.prompts import (
    Generators,
    Points,
    append_points,
    box_prompts,
    corrective_points,
    rows_of,
    select_mask,
)
from scrollsam.train.prompt_sets import (
    FAMILIES,
    Block,
    Families,
    PromptKind,
    PromptSets,
    assign_kinds,
    first_prompts,
    set_generators,
)


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

    def rows(self, rows: slice) -> Truth:
        """Rows ``rows``, as views."""
        return Truth(self.ink[rows], self.valid[rows], self.full_ink[rows], self.full_valid[rows])


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


def decode(model: SamSegmenter, embeddings: Tensor, sets: PromptSets, *, blocks: list[Block],
           first: bool = False,
           features: Tensor | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The step's one way to run the decoder: ``sets`` against their own embeddings, in one
    call -> per block of :meth:`PromptSets.blocks` (logits, IoU [P_b, M], the decoder's own logits
    [P_b, M, S/4, S/4]). ``logits`` are the mask head's [P_b, M, S, S] when the model has one
    (``features``: the pixel features of :meth:`SamSegmenter.encode_with_pixels`), else the
    decoder's. ``first``: the first round (static sets then ask for all four mask outputs,
    whatever the blocks). The prompts are on the device already (the samplers
    make them there), and their values go unchecked (a check would wait for the device)."""
    outputs = {m for _, m in blocks}
    every = len(outputs) > 1 or (first and sets.static)
    low, iou = model.decode(embeddings, points=sets.points, mask_inputs=sets.mask_inputs,
                            multimask=outputs == {(1, 4)}, all_masks=every,
                            image_index=sets.image_index, pad=False, present=sets.present(),
                            check_values=False)
    out = []
    for rows, (lo, hi) in blocks:
        masks = slice(lo, hi) if every else slice(None)
        part = low[rows, masks]  # (P_b, M, S/4, S/4)
        out.append((model.refine(part, features, sets.image_index[rows]), iou[rows, masks],
                    part))
    return out


def corrective_rounds(
    model: SamSegmenter,
    embeddings: Tensor,
    sets: PromptSets,
    truth: Truth,
    *,
    rounds: int,
    mask_feedback: bool,
    loss_kw: dict[str, object],
    sampler: str = "uniform",
    gen: Generators | None = None,
    features: Tensor | None = None,
) -> tuple[list[tuple[dict[str, Tensor], int]], Tensor, PromptSets]:
    """Decode ``sets`` and score them; then ``rounds`` times add one point from the error region
    of the selected mask (SAM paper, Appendix A) to each prompted set, with its logits as the
    next mask prompt when ``mask_feedback``, and decode and score again. The blocks of
    :meth:`PromptSets.blocks` are scored on their own (multimask point sets pick their lowest-
    loss mask); prompt-free sets (``sets.free_rows``) are scored in the first round only (and
    decoded in later ones only with ``sets.static``).
    ``sampler``: :func:`corrective_points`' mode; "uniform" (the SAM paper's) draws from the
    sets' generators ``gen`` on the device, "center" copies each round's masks to the host.

    The mask prompt is the decoder's own S/4 logits of the selected mask (with a mask head the
    error region comes from the head's full-resolution mask). Returns the loss parts with their
    numbers of sets, for :func:`mean_parts` (the prompted sets' parts averaged over the
    1 + ``rounds`` rounds, the prompt-free sets' of their one round), the selected logits of
    the last round [P', 1, S/4, S/4] or [P', 1, S, S] with a mask head (detached) and the
    prompts of the last round (P' = its sets).
    """
    per_round, free = [], []
    for r in range(1 + rounds):
        blocks = sets.blocks(first=r == 0)
        outs = decode(model, embeddings, sets, blocks=blocks, first=r == 0, features=features)
        parts, sizes, picked, feedback = [], [], [], []
        for (rows, _), (logits, iou, low) in zip(blocks, outs, strict=True):
            prompt_free = rows.start >= sets.prompted
            if prompt_free and r > 0:  # kept for a static shape: not scored again
                picked.append(logits.detach())  # (P_b, 1, ...)
                feedback.append(low.detach())
                continue
            part = truth.rows(rows)  # views
            loss = sam_loss(logits, iou, part.ink, part.valid, **loss_kw)
            if prompt_free:
                free.append((loss.parts, logits.shape[0]))
            else:
                parts.append(loss.parts)
                sizes.append(logits.shape[0])
            picked.append(select_mask(logits, loss.selected))  # (P_b, 1, S/4 or S, ...)
            feedback.append(picked[-1] if low is logits else select_mask(low, loss.selected))
        chosen = _rows_together(picked)  # (P, 1, ...), detached
        if not parts:  # prompt-free sets alone
            break
        per_round.append(parts[0] if len(parts) == 1 else mean_parts(parts, weights=sizes))
        if r == rounds:
            break
        n = sets.kept  # the corrective rounds go on with the prompted sets (all when static)
        sets, truth, chosen = sets.prompted_only(), truth.rows(slice(0, n)), chosen[:n]
        gen = gen if gen is None else rows_of(gen, range(n))
        if sampler == "uniform":  # on the device, no sync
            new = corrective_points(chosen, truth.full_ink, truth.full_valid,
                                    mode="uniform", generator=gen)
        else:  # OpenCV on the host: the round's copies back and their wait
            new = corrective_points(chosen.cpu(), truth.full_ink.cpu(),
                                    truth.full_valid.cpu(), mode="center")
            new = _to(new, chosen.device)
        points = new if sets.points is None else append_points(sets.points, new)
        sets = replace(sets, points=points, mask_inputs=_rows_together(feedback)[:n]
                       if mask_feedback else None)
    prompted = [(mean_parts(per_round), sets.prompted)] if per_round else []
    return prompted + free, chosen, sets


def _rows_together(parts: list[Tensor]) -> Tensor:
    """The blocks' rows as one tensor (no copy for one block)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
    static: bool = False,
    families: Families = FAMILIES,
    has_ink: Tensor | None = None,
) -> StepOutput:
    """Loss for a batch: embeddings [B, 256, g, g] on the device; label / valid [B, 1, S, S]
    ink and fragment mask, on the host or the device (the loop prefetches them to a GPU);
    ``has_ink`` (B,) bool on the host, which tiles have ink inside ``valid`` (the dataset's flags),
    to choose prompt kinds without waiting for the device; None: read from the truth (on a device, a
    wait and a copy back). ``seeds``: the prompt seed of each tile (B ints,
    :func:`.prompt_sets.tile_seeds`), or ``gen`` to draw them from. ``features``: the pixel features
    [B, G, S, S] a full-resolution mask head needs (:meth:`SamSegmenter.encode_with_pixels`); None
    without one. ``static``: one decoder shape per round
    (:class:`~scrollsam.train.prompt_sets.PromptSets`), for a compiled decoder; ``families``: the
    kinds that share decoder calls (``PER_KIND``: a call per kind and round). Either way the same
    loss."""
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
    if has_ink is not None and (has_ink.shape != (B,) or has_ink.device.type != "cpu"):
        raise InputError(f"has_ink: expected a host tensor of {B} flags, got "
                         f"{tuple(has_ink.shape)} on {has_ink.device}")
    if prompt_cfg.first in ("box", "mixed"):  # a set whose tile has no ink gets a point
        # decided on the host: the loader's flags, else the truth (a wait if on a device)
        if has_ink is None:
            has_ink = ink_flags(label.detach().cpu(), valid.detach().cpu())  # (B,)
        has_ink = has_ink.bool()
        kinds = torch.where((kinds == PromptKind.BOX) & ~has_ink[tile_of_set], PromptKind.POINT,
                            kinds)
        every_set = truth.select(tile_of_set.to(dev, non_blocking=True))
        boxes, _ = box_prompts(every_set.full_ink, every_set.full_valid,
                               generator=gens)  # (P, 4) on the device
    loss_kw = dict(loss_kwargs(loss_cfg), compiled=model.compiled_loss)
    groups: list[tuple[dict[str, Tensor], int]] = []
    example = None
    for family in families:
        sel = torch.cat([(kinds == kind).nonzero().flatten()
                         for kind in sorted(family)])  # (Pf,) CPU, rows in kind order
        if not len(sel):
            continue
        tiles = tile_of_set[sel]  # (Pf,)
        index = tiles.to(dev, non_blocking=True)  # (Pf,) the same, on the device
        sets_truth = truth.select(index)
        sets_gens = rows_of(gens, sel.tolist())
        sets = first_prompts(kinds[sel], index, sets_truth.full_ink, sets_truth.full_valid,
                             gen=sets_gens, multimask=prompt_cfg.multimask, static=static,
                             boxes=None if boxes is None else boxes[sel.to(dev, non_blocking=True)])
        prompted = sets.prompted > 0
        parts, chosen, sets = corrective_rounds(
            model, embeddings, sets, sets_truth,
            rounds=prompt_cfg.corrective_rounds if prompted else 0,
            mask_feedback=prompt_cfg.mask_feedback, loss_kw=loss_kw,
            sampler=prompt_cfg.corrective, gen=sets_gens, features=features)
        groups += parts
        if example is None and prompted:
            example = picture_example(tiles[0], chosen, sets)
    return StepOutput(parts=mean_parts([p for p, _ in groups], weights=[n for _, n in groups]),
                      example=example)
