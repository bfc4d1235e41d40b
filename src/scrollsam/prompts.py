"""Prompt samplers for training SAM on ink: points, boxes and the paper's corrective points.

Frames and shapes (P prompt sets, each over one S x S tile of the model input frame):
- ground truth: ``target`` ``[P, 1, H, W]`` (ink where > 0.5) and ``valid`` ``[P, 1, H, W]``
  (the fragment mask, valid where > 0.5; None = everywhere). Ink counts only inside valid, and
  samplers place points only on valid pixels.
- points: ``coords`` float32 ``[P, N, 2]`` as **(x, y) = (column, row)** pixel indices of the
  input frame: pixel (row r, column c) is the point (x=c, y=r). Official SAM adds 0.5 itself to
  reach the pixel centre, so the values are whole numbers. ``labels`` int64 ``[P, N]``: 1 = ink,
  0 = background, -1 = padding (coords 0). In every set the real points come first and the
  padding last; N is fixed by the sampler's arguments, never by the data, and nothing is
  truncated.
- boxes: float32 ``[P, 4]`` XYXY with inclusive corners (x1, y1 is the last ink pixel), like
  SAM's own ``batched_mask_to_box``.
- mask prompts: the previous round's low-resolution logits ``[P, 1, S/4, S/4]``
  (:func:`select_mask`).

A tile without ink never gets a positive point: samplers return background points, or padding
only, which SAM reads as "no point" (the same as a prompt-free decode). Randomness comes only
from the ``generator`` argument, never from global state: one ``torch.Generator`` for all P
sets, or a sequence of P generators, one per set (:data:`Generators`), so that each set's
prompts depend on its own generator alone, whatever else is in the batch (training under
torchrun splits a batch across processes and must draw the same prompts). Numbers are drawn on
a generator's device and moved without waiting. Results are on the device of ``target``, and
only :func:`corrective_points` in mode "center" reads values back from it (its distance
transforms run on the CPU with OpenCV); mode "uniform", the SAM paper's training sampler, runs
where the masks are.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scrollsam.errors import InputError, describe
from scrollsam.losses import upsample_logits

__all__ = [
    "Generators",
    "append_points",
    "box_prompts",
    "corrective_points",
    "first_points",
    "pad_point_sets",
    "random_numbers",
    "random_points",
    "rows_of",
    "select_mask",
    "uniform_one",
]

# uniform_one on a CPU: skip the ranked pick when the draws found every row's position (a read
# that a GPU would wait for; tests/test_train_sync.py turns it off to see the GPU's path).
CPU_SHORTCUT = True
Points = tuple[Tensor, Tensor]  # coords [P, N, 2] float32 (x, y), labels [P, N] int64
# One generator for all P sets, or one per set (set p draws from generators[p] only).
Generators = torch.Generator | Sequence[torch.Generator]


def _truth(target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Check the ground truth; return (ink, valid) as bool ``[P, H, W]``, ink inside valid."""
    if not isinstance(target, Tensor) or target.dim() != 4 or target.shape[1] != 1:
        raise InputError(f"target: expected [P, 1, H, W] tensor, got {describe(target)}")
    if valid is None:
        ok = torch.ones(target.shape[0], *target.shape[2:], dtype=torch.bool,
                        device=target.device)
    elif not isinstance(valid, Tensor) or valid.shape != target.shape:
        raise InputError(f"valid: expected {list(target.shape)} (the shape of target), "
                         f"got {describe(valid)}")
    else:
        ok = _as_bool(valid[:, 0])  # (P, H, W)
    return _as_bool(target[:, 0]) & ok, ok


def _as_bool(x: Tensor) -> Tensor:
    """Where ``x`` > 0.5; a bool tensor as it is (no float comparison over every pixel)."""
    return x if x.dtype == torch.bool else x > 0.5


def random_numbers(shape: tuple[int, ...], generator: Generators, device: torch.device,
                   *, normal: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform [0, 1) (or standard normal) numbers of ``shape`` (P, ...) on ``device``; with one
    generator per set, row p comes from ``generator[p]`` alone. Copies to another device do not
    wait for it."""
    draw = torch.randn if normal else torch.rand
    if isinstance(generator, torch.Generator):
        return _moved(draw(shape, generator=generator, device=generator.device, dtype=dtype),
                      device)
    if not _per_set(generator, shape[0]):
        raise InputError(f"generator: expected a torch.Generator or {shape[0]} of them (one per "
                         f"set), got {describe(generator)}")
    if not generator:
        return torch.empty(shape, device=device, dtype=dtype)
    rows = torch.stack([draw(shape[1:], generator=g, device=g.device, dtype=dtype)
                        for g in generator])  # (P, ...) where the generators are
    return _moved(rows, device)


def _moved(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``: itself when it is there, else a copy that does not wait."""
    return t if t.device == torch.device(device) else t.to(device, non_blocking=True)


def _per_set(generator: object, sets: int) -> bool:
    return (isinstance(generator, Sequence) and len(generator) == sets
            and all(isinstance(g, torch.Generator) for g in generator))


def rows_of(generator: Generators, rows: Sequence[int]) -> Generators:
    """The generators of the sets ``rows`` (a subset of the sets, in that order): the one
    shared generator as it is, or the per-set ones picked."""
    if isinstance(generator, torch.Generator):
        return generator
    return [generator[r] for r in rows]


def _compact(coords: Tensor, labels: Tensor) -> Points:
    """Move padding (label -1) to the end of each set, keeping the order of real points."""
    pad = labels == -1  # (P, N)
    coords = coords.masked_fill(pad[..., None], 0.0)
    order = torch.sort(pad.to(torch.int8), dim=1, stable=True).indices  # (P, N)
    return coords.gather(1, order[..., None].expand_as(coords)), labels.gather(1, order)


def _from_flat(index: Tensor, width: int) -> Tensor:
    """Flat pixel indices (any shape) -> float32 (x, y) coords, shape + (2,)."""
    return torch.stack([index % width, index // width], dim=-1).to(torch.float32)


def pad_point_sets(sets: list[Points], *, device: torch.device | str | None = None,
                   length: int | None = None) -> Points:
    """Stack ragged point sets ``[(coords [n_i, 2], labels [n_i]), ...]`` into ``[P, N, 2]`` /
    ``[P, N]`` padded with label -1 (coords 0). N = ``length`` or the largest n_i (at least 1);
    a set longer than ``length`` is an InputError, never cut."""
    sizes = [int(lab.shape[0]) for _, lab in sets]
    n = max([1, *sizes]) if length is None else length
    if sizes and max(sizes) > n:
        raise InputError(f"sets: expected at most {n} points per set, got {max(sizes)}")
    coords = torch.zeros(len(sets), n, 2, dtype=torch.float32, device=device)
    labels = torch.full((len(sets), n), -1, dtype=torch.int64, device=device)
    for i, (c, lab) in enumerate(sets):
        if c.shape != (lab.shape[0], 2):
            raise InputError(f"sets[{i}]: expected coords [n, 2] with labels [n], "
                             f"got {describe(c)} and {describe(lab)}")
        coords[i, : c.shape[0]] = c.to(coords)
        labels[i, : lab.shape[0]] = lab.to(labels)
    return _compact(coords, labels)


def append_points(points: Points, new: Points) -> Points:
    """Append ``new`` ``([P, K, 2], [P, K])`` to ``points`` ``([P, N, 2], [P, N])`` -> N + K
    points per set, real points first (old, then new) and padding last."""
    (c0, l0), (c1, l1) = points, new
    if c0.dim() != 3 or c1.dim() != 3 or c0.shape[0] != c1.shape[0] or c0.shape[2] != 2 \
            or c1.shape[2] != 2 or l0.shape != c0.shape[:2] or l1.shape != c1.shape[:2]:
        raise InputError(f"points, new: expected ([P, N, 2], [P, N]) and ([P, K, 2], [P, K]), "
                         f"got ({describe(c0)}, {describe(l0)}) and "
                         f"({describe(c1)}, {describe(l1)})")
    coords = torch.cat([c0, c1.to(c0)], dim=1)  # (P, N + K, 2)
    labels = torch.cat([l0, l1.to(l0)], dim=1)  # (P, N + K)
    return _compact(coords, labels)


def random_points(target: Tensor, valid: Tensor | None = None, *,
                  generator: Generators, positives: int = 1, negatives: int = 0) -> Points:
    """``positives`` ink points and ``negatives`` background points, uniform without
    replacement inside valid -> N = positives + negatives, ink points first. A set with fewer
    candidates than asked gets what exists, then padding."""
    ink, ok = _truth(target, valid)
    P, H, W = ink.shape
    if positives < 0 or negatives < 0 or positives + negatives == 0:
        raise InputError(f"positives, negatives: expected >= 0 and not both 0, "
                         f"got {positives}, {negatives}")
    if max(positives, negatives) > H * W:
        raise InputError(f"positives, negatives: expected at most {H * W} (pixels per tile), "
                         f"got {positives}, {negatives}")
    flat_ink, flat_ok = ink.reshape(P, -1), ok.reshape(P, -1)
    out_c, out_l = [], []
    for count, pool, label in ((positives, flat_ink, 1), (negatives, flat_ok & ~flat_ink, 0)):
        if count == 0:
            continue
        index, found = uniform_pick(pool, count, generator)  # (P, count) each
        out_c.append(_from_flat(index, W))  # (P, count, 2)
        out_l.append(torch.where(found, label, -1))  # (P, count)
    return _compact(torch.cat(out_c, dim=1), torch.cat(out_l, dim=1))


def first_points(target: Tensor, valid: Tensor | None, generator: Generators) -> Points:
    """One ink point per set, uniform over its ink inside valid; a background point where the
    set has no ink (never a fabricated positive) -> ``([P, 1, 2], [P, 1])``. Every set draws
    for both (ink, then background), so its point depends on its own generator alone; on the
    truth's device, no sync (:func:`uniform_one`)."""
    ink, ok = _truth(target, valid)
    P, _, W = ink.shape
    pos, has_ink = uniform_one(ink.reshape(P, -1), generator)  # (P,), (P,)
    neg, has_bg = uniform_one((ok & ~ink).reshape(P, -1), generator)
    index = torch.where(has_ink, pos, neg)[:, None]  # (P, 1)
    labels = torch.where(has_ink, 1, torch.where(has_bg, 0, -1))[:, None]  # (P, 1)
    return _compact(_from_flat(index, W), labels.long())


def uniform_pick(pool: Tensor, count: int, generator: Generators,
                 *, tries: int = 32) -> tuple[Tensor, Tensor]:
    """``count`` distinct positions per row of ``pool`` (bool [P, L]), uniform without
    replacement among the True ones -> (index long [P, count], found bool [P, count]); a row
    with fewer than ``count`` True positions gets all of them, then found = False (index 0).

    Draws ``tries * count`` positions with replacement per row and keeps the first ``count``
    distinct ones inside the pool, which is exactly uniform without replacement; a row that
    is not filled that way (a pool of under about 1/``tries`` of the row) is sampled exactly from
    its listed positions instead. Cost O(P * tries * count) plus the sparse rows, against
    O(P * L) for a random key per position (timings: ``benchmarks/README.md``).
    """
    P, L = pool.shape
    draws = max(1, tries) * count
    cand = random_numbers((P, draws), generator, pool.device) * L  # (P, D)
    cand = cand.long().clamp_(max=L - 1)
    inside = pool.gather(1, cand)  # (P, D)
    ordered, order = cand.sort(dim=1, stable=True)  # equal draws stay in draw order
    seen = torch.zeros_like(inside)
    seen[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # drawn before, in sorted order
    repeat = torch.empty_like(seen).scatter_(1, order, seen)  # (P, D), in draw order
    keep = inside & ~repeat  # (P, D): first occurrences inside the pool
    rank = keep.cumsum(1)  # (P, D)
    take = keep & (rank <= count)
    index = torch.zeros(P, count, dtype=torch.long, device=pool.device)
    found = torch.zeros(P, count, dtype=torch.bool, device=pool.device)
    rows, cols = take.nonzero(as_tuple=True)
    slot = rank[rows, cols] - 1
    index[rows, slot], found[rows, slot] = cand[rows, cols], True
    for row in (~found[:, -1]).nonzero().flatten().tolist():  # sparse pools, exactly
        listed = pool[row].nonzero().flatten()  # (n,)
        gen = generator if isinstance(generator, torch.Generator) else generator[row]
        perm = torch.randperm(listed.numel(), generator=gen,
                              device=gen.device).to(pool.device)[:count]
        index[row], found[row] = 0, False
        index[row, :perm.numel()], found[row, :perm.numel()] = listed[perm], True
    return index, found


def _depth(region: np.ndarray) -> np.ndarray:
    """Euclidean distance [H, W] of each pixel of a uint8 region to the nearest pixel outside
    it; the tile border counts as outside (as RITM and the SAM paper's sampler do)."""
    padded = np.pad(region, 1)  # (H + 2, W + 2), zero border
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def _uniform_error_point(missed: Tensor, extra: Tensor, generator: Generators) -> Points:
    """One pixel per set drawn uniformly from ``missed | extra`` (bool [P, H, W]) -> points
    ``([P, 1, 2], [P, 1])``, label 1 on missed ink, 0 on false ink, -1 where a set has no error
    (:func:`uniform_one`: on the masks' device, no sync)."""
    P, H, W = missed.shape
    index, found = uniform_one((missed | extra).reshape(P, -1), generator)  # (P,), (P,)
    label = missed.reshape(P, -1).gather(1, index[:, None]).long()  # (P, 1): 1 missed, 0 false
    return _compact(_from_flat(index[:, None], W), label.masked_fill(~found[:, None], -1))


def uniform_one(pool: Tensor, generator: Generators, *, tries: int = 32,
                block: int = 1024) -> tuple[Tensor, Tensor]:
    """One position per row of ``pool`` (bool [P, L]) drawn uniformly among its True ones ->
    (index long [P], found bool [P]); index 0 where a row has none.

    Exactly uniform, from ``tries`` + 1 float64 numbers per row (its generator's, whatever the
    device): the first of ``tries`` uniform positions that falls inside the pool; a row where
    none does takes the True position of rank floor(u * count) instead (u the last number),
    found through per-block counts (blocks of ``block`` positions) and a cumulative count inside
    the one block that holds it. Either way the choice is uniform over the pool. Nothing is read
    back from the pool's device (no sync); on a CPU, where reading is free, the ranked pick is
    skipped when every row found its position by the draws (the count over all positions costs
    about 30 ms for 8 rows of 1024 x 1024 on one core, the draws 0.1 ms).
    """
    P, L = pool.shape
    draws = random_numbers((P, tries + 1), generator, pool.device, dtype=torch.float64)
    cand = (draws[:, :tries] * L).long().clamp_(max=L - 1)  # (P, tries)
    inside = pool.gather(1, cand)  # (P, tries)
    hit = inside.any(1)  # (P,)
    first = cand.gather(1, inside.to(torch.uint8).argmax(1, keepdim=True))[:, 0]  # (P,)
    if CPU_SHORTCUT and pool.device.type == "cpu" and bool(hit.all()):
        return first, hit
    blocks = F.pad(pool, (0, -L % block)).view(P, -1, block)  # (P, nb, block), False padding
    per_block = blocks.sum(2, dtype=torch.int64)  # (P, nb)
    upto = per_block.cumsum(1)  # (P, nb): True positions up to the end of each block
    count = upto[:, -1:]  # (P, 1)
    rank = torch.minimum((draws[:, tries:] * count).long(), (count - 1).clamp(min=0))  # (P, 1)
    b = torch.searchsorted(upto, rank, right=True).clamp(max=blocks.shape[1] - 1)  # (P, 1)
    rank_in = rank - (upto.gather(1, b) - per_block.gather(1, b))  # rank inside block b
    inner = blocks.gather(1, b[..., None].expand(P, 1, block))[:, 0]  # (P, block)
    j = torch.searchsorted(inner.cumsum(1, dtype=torch.int64), rank_in, right=True)  # (P, 1)
    ranked = (b * block + j.clamp(max=block - 1))[:, 0]  # (P,)
    found = count[:, 0] > 0
    return torch.where(hit, first, ranked.masked_fill(~found, 0)), found


def box_prompts(target: Tensor, valid: Tensor | None = None, *, generator: Generators,
                noise: float = 0.1, max_noise: float = 20.0) -> tuple[Tensor, Tensor]:
    """The bounding box of the ink, each coordinate jittered as in the SAM paper.

    Noise: Gaussian with std ``noise`` x the box side (width for x, height for y; side =
    last - first + 1 pixels), each draw clamped to +-``max_noise`` pixels; the box is then
    clipped to the frame and its corners re-ordered so x0 <= x1, y0 <= y1.
    Returns (boxes float32 [P, 4] XYXY inclusive, present bool [P]). A set without ink has
    no box: present is False and its row is 0; the caller falls back (points or no prompt).
    """
    ink, _ = _truth(target, valid)
    P, H, W = ink.shape
    rows, cols = ink.any(dim=2).to(torch.int32), ink.any(dim=1).to(torch.int32)  # (P,H), (P,W)
    present = rows.any(dim=1)  # (P,)
    y0, y1 = rows.argmax(dim=1), H - 1 - rows.flip(1).argmax(dim=1)  # first/last ink row
    x0, x1 = cols.argmax(dim=1), W - 1 - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()  # (P, 4)
    side = torch.stack([x1 - x0, y1 - y0], dim=1).float().add(1).repeat(1, 2)  # (P, 4) w,h,w,h
    jitter = random_numbers((P, 4), generator, ink.device, normal=True) * noise * side
    boxes = boxes + jitter.clamp(-max_noise, max_noise)
    # the frame's last column / row for x / y, filled on the device: a tensor made there from
    # a list is a copy from host memory that waits for the device
    limit = boxes.new_full((4,), W - 1)
    limit[1::2] = H - 1
    boxes = torch.minimum(boxes.clamp(min=0), limit).round()
    lo = torch.minimum(boxes[:, :2], boxes[:, 2:])  # (P, 2)
    hi = torch.maximum(boxes[:, :2], boxes[:, 2:])  # (P, 2)
    boxes = torch.cat([lo, hi], dim=1) * present[:, None]  # (P, 4), zero rows without ink
    return boxes, present


def corrective_points(pred: Tensor, target: Tensor, valid: Tensor | None = None, *,
                      mode: str = "center", generator: Generators | None = None) -> Points:
    """One new point per set from the error region between a prediction and the truth (SAM
    paper, Appendix A) -> ``([P, 1, 2], [P, 1])``.

    pred: ``[P, 1, h, w]`` mask logits (ink where > 0; upsampled bilinearly to H x W when
        smaller, e.g. the decoder's S/4 output) or a bool mask (resized nearest).
    Error region inside valid: false negatives (missed ink) give a positive point (label 1),
    false positives a negative one (label 0).
    mode "center": the error pixel farthest from its region's boundary, looking at both
        regions (the deeper wins; a tie goes to the missed ink), as RITM does;
    mode "uniform": a pixel drawn uniformly from the union of both regions (needs
        ``generator``), so each kind is chosen in proportion to its area; the SAM paper's
        training sampler, and SAM 2's. It runs on the device of ``target`` with no sync.
    A set with no error (a perfect prediction) gets padding (label -1).
    """
    ink, ok = _truth(target, valid)
    P, H, W = ink.shape
    if not isinstance(pred, Tensor) or pred.dim() != 4 or pred.shape[:2] != (P, 1):
        raise InputError(f"pred: expected [{P}, 1, h, w] logits or bool mask, got {describe(pred)}")
    if mode not in ("center", "uniform"):
        raise InputError(f"mode: expected 'center' or 'uniform', got {mode!r}")
    if pred.dtype == torch.bool:
        hit = F.interpolate(pred.float(), size=(H, W), mode="nearest")[:, 0] > 0.5
    else:
        hit = upsample_logits(pred.float(), (H, W))[:, 0] > 0  # (P, H, W)
    missed, extra = ink & ~hit, ok & ~ink & hit  # false negatives, false positives
    if mode == "uniform":
        if generator is None:
            raise InputError("generator: expected a torch.Generator for mode 'uniform', got None")
        return _uniform_error_point(missed, extra, generator)
    fn_np = missed.cpu().numpy().astype(np.uint8)
    fp_np = extra.cpu().numpy().astype(np.uint8)
    sets = []
    for p in range(P):
        d_fn, d_fp = _depth(fn_np[p]), _depth(fp_np[p])
        m_fn, m_fp = float(d_fn.max()), float(d_fp.max())
        if max(m_fn, m_fp) <= 0:
            sets.append((torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64)))
            continue
        depth, label = (d_fn, 1) if m_fn >= m_fp else (d_fp, 0)
        r, c = divmod(int(np.argmax(depth)), W)
        sets.append((torch.tensor([[c, r]], dtype=torch.float32), torch.tensor([label])))
    return pad_point_sets(sets, device=target.device, length=1)


def select_mask(logits: Tensor, index: Tensor) -> Tensor:
    """The chosen mask of each set, detached, as the next round's mask prompt:
    ``[P, M, h, w]`` logits and ``[P]`` indices (e.g. ``sam_loss(...).selected``) ->
    ``[P, 1, h, w]``."""
    if logits.dim() != 4 or index.shape != logits.shape[:1]:
        raise InputError(f"logits, index: expected [P, M, h, w] and [P], "
                         f"got {describe(logits)} and {describe(index)}")
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits.detach()[rows, index.to(logits.device)].unsqueeze(1)  # (P, 1, h, w)

