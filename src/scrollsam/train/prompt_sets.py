"""The prompt sets of a training step: their kinds, seeds, first prompts and decoder blocks.

A batch of B tiles gets P = B * ``prompt_cfg.sets_per_tile`` prompt sets, each tied to its tile.
Every set has one :class:`PromptKind`, its first prompt. The sets of one family of kinds
(:data:`FAMILIES`; by default all of them) travel as one :class:`PromptSets`, rows ordered by
kind (points, boxes, prompt-free), and share the decoder call of every round:

* a box travels as its two corner points, labelled 2 and 3 (SAM 2's convention; the same tokens
  as official SAM's box), and a point set carries the padding point official SAM appends when
  there is no box, so a point set and a box set both have two sparse tokens in the first round
  and one more in each corrective round;
* prompt-free sets carry two absent tokens (:meth:`SamSegmenter.decode`'s ``present``), which
  nothing attends to: they decode exactly as with no prompt, in the first round only.

With the default prompts a step so makes 1 + ``corrective_rounds`` = 3 decoder calls instead of
one per kind and round (3 for point sets, 3 for box sets, 1 for prompt-free sets: 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from torch import Tensor

from scrollsam.config import PromptConfig
from scrollsam.errors import InputError
from scrollsam.prompts import Generators, Points, first_points, random_numbers, rows_of


class PromptKind(IntEnum):
    """The first prompt of a set (integers, so a [P] tensor of kinds compares with them)."""

    POINT = 0
    BOX = 1
    NONE = 2


FIRST = {"point": PromptKind.POINT, "box": PromptKind.BOX, "none": PromptKind.NONE}
Families = tuple[tuple[PromptKind, ...], ...]
# Kinds decoded together (rows in PromptKind order): all of them, the step's default.
FAMILIES: Families = ((PromptKind.POINT, PromptKind.BOX, PromptKind.NONE),)
# A call per kind and round, as before the kinds shared their calls: the same loss and
# gradients with more calls (tests/test_train_families.py); benchmarks compare the two.
PER_KIND: Families = tuple((kind,) for kind in PromptKind)
PROMPT_STREAM = 0x70726F6D  # "prom": tile seeds are a stream of their own beside the data's

Block = tuple[slice, tuple[int, int]]  # rows of the sets, and the decoder mask outputs they take


@dataclass
class PromptSets:
    """P prompt sets decoded in one call, on the device where the samplers make and extend
    them. ``points`` hold every sparse token of a set: its points, padding (label -1) and box
    corners (labels 2, 3), so the decoder appends nothing; the last ``free_rows`` rows are
    prompt-free, their tokens absent."""

    image_index: Tensor  # long [P] on the device: the tile (embedding) of each set
    points: Points | None = None  # ([P, N, 2] (x, y) pixels, [P, N] labels)
    mask_inputs: Tensor | None = None  # [P, 1, S/4, S/4] logits
    multimask_rows: int = 0  # the first rows (point sets) get three masks in the first round
    free_rows: int = 0  # the last rows (prompt-free sets): scored in the first round only
    # One decoder shape per round, what a compiled decoder needs: prompt-free rows stay in
    # every round (absent, unscored after the first), the first round asks for all four masks
    # (however many point sets it has), and a family of prompt-free sets alone has two tokens.
    static: bool = False

    @property
    def prompted(self) -> int:
        """The number of prompted sets (the first rows)."""
        return self.image_index.shape[0] - self.free_rows

    def present(self) -> Tensor | None:
        """bool [P, N]: the sparse tokens that take part (None: all), made on the device."""
        if not self.free_rows or self.points is None:
            return None
        p, n = self.points[1].shape
        rows = torch.arange(p, device=self.image_index.device) < self.prompted  # (P,)
        return rows[:, None].expand(p, n)

    def blocks(self, *, first: bool) -> list[Block]:
        """The rows that share a mask count and a role this round: in the first, the multimask
        rows take the decoder's three multimask outputs (1, 4), every other row its single
        output (0, 1), and the prompt-free rows are a block of their own (their loss counts
        once, a prompted set's is averaged over its rounds)."""
        k = self.multimask_rows if first else 0
        bounds = [(0, k, (1, 4)), (k, self.prompted, (0, 1)),
                  (self.prompted, self.image_index.shape[0], (0, 1))]
        return [(slice(lo, hi), m) for lo, hi, m in bounds if hi > lo]

    @property
    def kept(self) -> int:
        """The rows the corrective rounds decode: the prompted ones, or all when static."""
        return self.image_index.shape[0] if self.static else self.prompted

    def prompted_only(self) -> PromptSets:
        """The rows the corrective rounds decode (:attr:`kept`)."""
        n = self.prompted
        if not self.free_rows or self.static:
            return self
        points = None if self.points is None else (self.points[0][:n], self.points[1][:n])
        return PromptSets(self.image_index[:n], points,
                          None if self.mask_inputs is None else self.mask_inputs[:n],
                          multimask_rows=min(self.multimask_rows, n))


def tile_seeds(seed: int, samples: Sequence[int]) -> list[int]:
    """The prompt seed of each training sample index in ``samples`` (global indices: the n-th
    tile the run draws, see :mod:`scrollsam.train.order`) for the run seed ``seed``."""
    return [_seed64(np.random.SeedSequence([seed, n], spawn_key=(PROMPT_STREAM,)))
            for n in samples]


def set_generators(seeds: Sequence[int], sets_per_tile: int) -> list[torch.Generator]:
    """One CPU generator per prompt set, set j of tile t seeded from (``seeds[t]``, j): the
    P = len(seeds) * ``sets_per_tile`` sets in tile order, as the step makes them."""
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


def corner_points(boxes: Tensor) -> Points:
    """Boxes [P, 4] XYXY -> their corners as points ``([P, 2, 2], [P, 2])``, labelled 2
    (top-left) and 3 (bottom-right): official SAM's box tokens
    (:func:`scrollsam.model.prompt_tokens.embed_point_tokens`)."""
    labels = torch.arange(2, 4, device=boxes.device).expand(boxes.shape[0], 2)  # no host copy
    return boxes.reshape(-1, 2, 2), labels


def first_prompts(kinds: Tensor, image_index: Tensor, full_ink: Tensor, full_valid: Tensor, *,
                  boxes: Tensor | None, gen: Generators, multimask: bool,
                  static: bool = False) -> PromptSets:
    """The sets of one family with their first prompt. ``kinds`` long [P] (CPU) in
    :class:`PromptKind` order (points, boxes, prompt-free; anything else is an InputError),
    ``image_index`` long [P] (the tile of each set, on the device), the samplers' truth of the
    P sets (bool [P, 1, S, S]), their generators ``gen``, ``boxes`` [P, 4] (used on ``BOX``
    rows); ``multimask``: three masks for point sets; ``static``: see :class:`PromptSets`."""
    if bool((kinds[1:] < kinds[:-1]).any()):
        raise InputError(f"kinds: expected rows in PromptKind order, got {kinds.tolist()}")
    n_point, n_box, n_free = (int((kinds == kind).sum()) for kind in PromptKind)
    if n_point + n_box == 0 and not static:
        return PromptSets(image_index, free_rows=n_free)
    parts = []  # each ([P_k, 2, 2], [P_k, 2])
    if n_point:  # the point, and the padding point official SAM adds when there is no box
        point = first_points(full_ink[:n_point], full_valid[:n_point],
                             rows_of(gen, range(n_point)))
        pad = _absent(n_point, 1, point[0].device)  # last: first_points' sets are compact
        parts.append((torch.cat([point[0], pad[0]], 1), torch.cat([point[1], pad[1]], 1)))
    if n_box:
        parts.append(corner_points(boxes[n_point:n_point + n_box]))
    if n_free:
        parts.append(_absent(n_free, 2, image_index.device))
    points = (torch.cat([c for c, _ in parts]), torch.cat([lab for _, lab in parts]))
    return PromptSets(image_index, points, multimask_rows=n_point if multimask else 0,
                      free_rows=n_free, static=static)


def _absent(p: int, n: int, device: torch.device) -> Points:
    """``p`` sets of ``n`` padding points (coords 0, label -1) on ``device``."""
    return (torch.zeros(p, n, 2, device=device),
            torch.full((p, n), -1, dtype=torch.long, device=device))
