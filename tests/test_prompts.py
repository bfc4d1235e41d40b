"""Prompt samplers: points in the (x, y) input frame, on the right pixels, with the right labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scrollsam import prompts
from scrollsam.errors import InputError
from scrollsam.prompts import (
    append_points,
    box_prompts,
    corrective_points,
    pad_point_sets,
    random_points,
    select_mask,
    uniform_one,
    uniform_pick,
)

H, W = 12, 17  # not square: a (row, col) / (x, y) mix-up indexes out of range or off ink


def _asymmetric() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompt sets: an L of ink, a thin diagonal-free bar, and a tile without ink."""
    target = torch.zeros(3, 1, H, W)
    target[0, 0, 1:10, 2:5] = 1  # vertical stroke of the L
    target[0, 0, 7:10, 5:15] = 1  # its foot, to the right
    target[1, 0, 2:4, 9:16] = 1  # a short horizontal bar near the right edge
    valid = torch.ones_like(target)
    valid[:, :, :, 0] = 0  # first column outside the fragment
    valid[0, 0, 8, 10:13] = 0  # a hole in the foot's ink: not valid, not ink
    return target, valid


def _check_points(coords, labels, target, valid):
    """Every positive on valid ink, every negative on valid background, padding trailing."""
    assert coords.dtype == torch.float32 and labels.dtype == torch.int64
    assert coords.shape == (*labels.shape, 2)
    assert torch.equal(coords, coords.round())  # whole pixel indices
    for p in range(labels.shape[0]):
        pad = labels[p] == -1
        if pad.any():  # padding only at the end, with coords 0
            first = int(pad.nonzero()[0])
            assert pad[first:].all()
            assert (coords[p, first:] == 0).all()
        for (x, y), label in zip(coords[p].long().tolist(), labels[p].tolist(), strict=True):
            if label == -1:
                continue
            assert 0 <= x < W and 0 <= y < H
            assert valid[p, 0, y, x] == 1
            assert target[p, 0, y, x] == label, (p, x, y, label)


@pytest.mark.parametrize("seed", range(5))
def test_every_sampler_puts_points_on_the_right_pixels(seed):
    target, valid = _asymmetric()
    g = torch.Generator().manual_seed(seed)
    results = [
        random_points(target, valid, generator=g, positives=6, negatives=6),
        corrective_points(torch.full((3, 1, 3, 4), -3.0), target, valid),
        corrective_points(torch.full((3, 1, H, W), 3.0), target, valid),
        corrective_points(torch.randn(3, 1, H, W, generator=g), target, valid,
                          mode="uniform", generator=g),
    ]
    for coords, labels in results:
        _check_points(coords, labels, target, valid)
        assert not (labels[2] == 1).any()  # the tile without ink: never a positive


def test_random_counts_padding_and_determinism():
    target, valid = _asymmetric()
    a = random_points(target, valid, generator=torch.Generator().manual_seed(3),
                      positives=2, negatives=1)
    b = random_points(target, valid, generator=torch.Generator().manual_seed(3),
                      positives=2, negatives=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].tolist()[:2] == [[1, 1, 0], [1, 1, 0]]
    assert a[1][2].tolist() == [0, -1, -1]  # no ink: one negative, then padding
    tiny = torch.zeros(1, 1, 3, 3)
    tiny[0, 0, 1, 1] = 1
    coords, labels = random_points(tiny, generator=torch.Generator(), positives=3, negatives=0)
    assert labels.tolist() == [[1, -1, -1]] and coords[0, 0].tolist() == [1, 1]
    with pytest.raises(InputError, match="generator"):
        random_points(tiny, generator=None)


@pytest.mark.parametrize("density", [0.5, 0.02])  # drawn by rejection / listed exactly
def test_uniform_pick_is_uniform_and_distinct(density):
    gen = torch.Generator().manual_seed(0)
    length = 400
    pool = torch.zeros(2000, length, dtype=torch.bool)  # 2000 rows sharing one pool
    members = torch.randperm(length, generator=gen)[:int(length * density)]
    pool[:, members] = True
    index, found = uniform_pick(pool, 3, gen)
    n = members.numel()
    assert found.all() and pool.gather(1, index).all()
    assert (index[:, 0] != index[:, 1]).all() and (index[:, 1] != index[:, 2]).all()
    assert (index[:, 0] != index[:, 2]).all()
    counts = torch.bincount(index[:, 0], minlength=length)[members].double()  # first picks
    expected = 2000 / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < n - 1 + 4 * (2 * (n - 1)) ** 0.5  # mean n - 1, sd sqrt(2 (n - 1))


def test_uniform_pick_short_pools_and_determinism():
    pool = torch.zeros(3, 50, dtype=torch.bool)
    pool[0, [4, 30]] = True  # fewer than asked
    pool[2, :] = True
    index, found = uniform_pick(pool, 3, torch.Generator().manual_seed(5))
    assert found.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert sorted(index[0, :2].tolist()) == [4, 30] and index[1].tolist() == [0, 0, 0]
    again = uniform_pick(pool, 3, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], index) and torch.equal(again[1], found)


def test_global_rng_untouched():
    target, valid = _asymmetric()
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    g = torch.Generator().manual_seed(0)
    random_points(target, valid, generator=g, positives=3, negatives=3)
    box_prompts(target, valid, generator=g)
    corrective_points(torch.zeros(3, 1, H, W), target, valid, mode="uniform", generator=g)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_box_exact_noise_limits_and_missing_ink():
    target, valid = _asymmetric()
    boxes, present = box_prompts(target, valid, generator=torch.Generator(), noise=0.0)
    assert present.tolist() == [True, True, False]
    assert boxes.dtype == torch.float32
    assert boxes[0].tolist() == [2, 1, 14, 9]  # XYXY, inclusive last ink pixel
    assert boxes[1].tolist() == [9, 2, 15, 3]
    assert boxes[2].tolist() == [0, 0, 0, 0]
    big = torch.zeros(100, 1, 240, 240)  # 100 draws in one batch
    big[:, 0, 20:220, 20:220] = 1  # 200 px sides: std 20 px, each draw clamped at 20 px
    g = torch.Generator().manual_seed(0)
    offsets = box_prompts(big, generator=g)[0] - torch.tensor([20.0, 20.0, 219.0, 219.0])
    assert offsets.abs().max() == 20 and offsets.std() > 10
    edge = torch.ones(100, 1, 50, 50)  # ink fills the tile: noise is clipped to the frame
    b = box_prompts(edge, generator=g)[0]
    assert b.min() == 0 and b.max() == 49
    assert (b[:, 0] <= b[:, 2]).all() and (b[:, 1] <= b[:, 3]).all()


def test_corrective_picks_the_deeper_error_with_the_right_label():
    target = torch.zeros(2, 1, 10, 14)
    target[:, 0, 1:6, 1:8] = 1  # 5 x 7 ink block
    pred = torch.full((2, 1, 10, 14), -4.0)
    pred[0, 0, 1:6, 1:3] = 4.0  # set 0 finds its left part: missed 5 x 5, centre (x=5, y=3)
    pred[0, 0, 8, 8] = 4.0  # and one stray false positive (depth 1)
    pred[1] = target[1] * 8 - 4  # set 1 gets the ink right...
    pred[1, 0, 4:10, 9:14] = 4.0  # ...plus a 6 x 5 false positive block beside it
    coords, labels = corrective_points(pred, target)
    assert labels.tolist() == [[1], [0]]
    assert coords[0, 0].tolist() == [5, 3]
    x, y = coords[1, 0].long().tolist()
    assert x == 11 and y in (6, 7)  # the middle of the false positive block
    perfect = corrective_points(target.bool(), target)
    assert perfect[1].tolist() == [[-1], [-1]] and perfect[0].abs().sum() == 0


def test_corrective_uniform_and_low_res_logits():
    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 4:12, 4:12] = 1
    low = torch.full((1, 1, 4, 4), -6.0)  # S/4 logits predicting nothing: all ink missed
    coords, labels = corrective_points(low, target)
    assert labels.tolist() == [[1]] and coords[0, 0].tolist() == [7, 7]
    g = torch.Generator().manual_seed(1)
    everything = torch.full((1, 1, 16, 16), 6.0)  # predicts ink everywhere: errors are FP
    seen = set()
    for _ in range(30):
        coords, labels = corrective_points(everything, target, mode="uniform", generator=g)
        x, y = coords[0, 0].long().tolist()
        assert labels.item() == 0 and target[0, 0, y, x] == 0
        seen.add((x, y))
    assert len(seen) > 20  # spread over the region, not one spot
    with pytest.raises(InputError, match="generator"):
        corrective_points(everything, target, mode="uniform")
    with pytest.raises(InputError, match="pred: expected"):
        corrective_points(torch.zeros(1, 3, 4, 4), target)


def test_append_and_pad_keep_padding_last():
    first = (torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 4.0], [5.0, 6.0]]]),
             torch.tensor([[1, -1], [0, 1]]))
    new = (torch.tensor([[[7.0, 8.0]], [[0.0, 0.0]]]), torch.tensor([[0], [-1]]))
    coords, labels = append_points(first, new)
    assert labels.tolist() == [[1, 0, -1], [0, 1, -1]]
    assert coords.tolist() == [[[1, 2], [7, 8], [0, 0]], [[3, 4], [5, 6], [0, 0]]]
    coords, labels = pad_point_sets([(torch.tensor([[1.0, 1.0]]), torch.tensor([1])),
                                     (torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64))])
    assert labels.tolist() == [[1], [-1]] and coords.shape == (2, 1, 2)
    with pytest.raises(InputError, match="at most 1"):
        pad_point_sets([(torch.zeros(2, 2), torch.ones(2, dtype=torch.int64))], length=1)
    with pytest.raises(InputError, match="points, new"):
        append_points(first, (torch.zeros(3, 1, 2), torch.zeros(3, 1)))


def test_select_mask():
    logits = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    picked = select_mask(logits.requires_grad_(True), torch.tensor([2, 0]))
    assert picked.shape == (2, 1, 2, 2) and not picked.requires_grad
    assert torch.equal(picked[0, 0], logits[0, 2]) and torch.equal(picked[1, 0], logits[1, 0])


def test_bad_ground_truth_is_named():
    with pytest.raises(InputError, match=r"^target: expected \[P, 1, H, W\]"):
        random_points(torch.zeros(4, 4), generator=torch.Generator())
    with pytest.raises(InputError, match="^valid: expected"):
        box_prompts(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5),
                    generator=torch.Generator())


def test_uniform_corrective_point_is_uniform_over_the_error_region():
    """Each error pixel is drawn equally often (chi-square over 4000 draws of 24 pixels), the
    label follows the pixel's kind, and a set's point depends on its own generator alone."""
    target = torch.zeros(2, 1, 6, 8)
    target[:, 0, 1:4, 1:5] = 1  # 12 ink pixels
    pred = torch.full((2, 1, 6, 8), -4.0)
    pred[:, 0, 1:3, 1:5] = 4.0  # finds 8 of them: 4 missed ink pixels (row 3)
    pred[:, 0, 5, :] = 4.0  # and 8 false ink pixels (row 5)
    valid = torch.ones_like(target)
    valid[1, 0, 5, 4:] = 0  # set 1: 4 of its false pixels are outside the fragment
    counts = torch.zeros(2, 6, 8)
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    for _ in range(4000):
        coords, labels = corrective_points(pred, target, valid, mode="uniform", generator=gens)
        _check_points(coords, labels, (target > 0.5).float(), valid)
        for p in range(2):
            x, y = coords[p, 0].long().tolist()
            counts[p, y, x] += 1
    for p, pixels in ((0, 12), (1, 8)):
        hits = counts[p][counts[p] > 0]
        assert hits.numel() == pixels  # every error pixel drawn, nothing else
        expected = 4000 / pixels
        chi2 = float(((hits - expected) ** 2 / expected).sum())
        assert chi2 < 45.0  # dof 11 or 7: p < 1e-5 for a fair draw to exceed this
    alone = corrective_points(pred[1:], target[1:], valid[1:], mode="uniform",
                              generator=[torch.Generator().manual_seed(4)])
    with_other = corrective_points(pred, target, valid, mode="uniform",
                                   generator=[torch.Generator().manual_seed(9),
                                              torch.Generator().manual_seed(4)])
    assert torch.equal(alone[0][0], with_other[0][1]) and torch.equal(alone[1][0], with_other[1][1])


def test_uniform_corrective_point_pads_a_perfect_set_and_takes_the_last_pixel():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, 3, 3] = 1  # set 0 misses only the very last pixel; set 1 has no error
    pred = torch.full((2, 1, 4, 4), -4.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        coords, labels = corrective_points(pred, target, mode="uniform", generator=gen)
        assert coords[0, 0].tolist() == [3, 3] and labels.tolist() == [[1], [-1]]
        assert coords[1].abs().sum() == 0


@pytest.mark.parametrize("tries", [1, 32])
@pytest.mark.parametrize("block", [1, 5, 64, 1024])
def test_uniform_one_across_blocks_is_uniform_and_finds_only_pool_positions(block, tries):
    pool = torch.zeros(3, 37, dtype=torch.bool)
    pool[0, [0, 4, 5, 6, 20, 36]] = True  # spread over blocks, first and last positions too
    pool[2, 36] = True  # a single position, the last one
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    counts = torch.zeros(3, 37)
    for _ in range(1200):
        index, found = uniform_one(pool, gens, block=block, tries=tries)
        assert found.tolist() == [True, False, True] and index[1] == 0
        counts[torch.arange(3), index] += found.float()
    hits = counts[0][pool[0]]
    assert counts[0][~pool[0]].sum() == 0 and hits.numel() == 6
    chi2 = float(((hits - 200) ** 2 / 200).sum())
    assert chi2 < 30.0  # dof 5: p < 1e-5 for a fair draw to exceed this
    assert counts[2, 36] == 1200


def test_uniform_one_gives_the_same_draws_with_and_without_the_cpu_shortcut(monkeypatch):
    pool = torch.rand(4, 3000, generator=torch.Generator().manual_seed(0)) > 0.4
    seeds = range(4)
    fast = uniform_one(pool, [torch.Generator().manual_seed(s) for s in seeds])
    monkeypatch.setattr(prompts, "CPU_SHORTCUT", False)  # what a GPU computes
    full = uniform_one(pool, [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(fast[0], full[0]) and torch.equal(fast[1], full[1])
