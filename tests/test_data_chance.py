"""Where the per-slice contrast's chance level moves the labels (scrollsam.data.chance)."""

from __future__ import annotations

import numpy as np

from scrollsam.data.chance import DIRECTIONS, _phi, unrelated_shifts


def _blobs(side: int, scale: int, seed: int = 0) -> np.ndarray:
    """Random square blobs of ``scale`` pixels (bool [side, side]), about 15% of the area."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((side // scale, side // scale)) < 0.15
    return np.kron(coarse, np.ones((scale, scale), dtype=bool))


def test_shifts_follow_the_patterns_size_in_pixels():
    """The same labels at four times the resolution move four times as far: the reach is the
    pattern's, not a number of pixels tuned to one scan."""
    small, large = _blobs(256, 4), _blobs(1024, 16)
    mask_s, mask_l = np.ones_like(small), np.ones_like(large)
    near = unrelated_shifts(small, mask_s)
    far = unrelated_shifts(large, mask_l)
    for (ay, ax), (by, bx), (uy, ux) in zip(near, far, DIRECTIONS, strict=True):
        a, b = max(abs(ay), abs(ax)), max(abs(by), abs(bx))
        assert 2 <= a <= 8 and 3 * a <= b <= 5 * a, (near, far)
        assert (np.sign(ay), np.sign(ax)) == (uy, ux)
        assert _phi(large, mask_l, by, bx) <= 0.1 < _phi(large, mask_l, by // 4, bx // 4)


def test_large_label_maps_are_measured_subsampled_and_stay_in_pixels():
    labels = _blobs(2048, 32)
    shifts = unrelated_shifts(labels, np.ones_like(labels))  # measured every 2nd pixel
    assert all(max(abs(dy), abs(dx)) % 2 == 0 for dy, dx in shifts)
    assert all(16 <= max(abs(dy), abs(dx)) <= 64 for dy, dx in shifts), shifts


def test_labels_that_never_decorrelate_take_the_largest_shift_tried():
    half = np.zeros((64, 64), dtype=bool)
    half[:, :32] = True  # the same in every row: moving down never changes them
    shifts = unrelated_shifts(half, np.ones_like(half))
    assert shifts[0] == (32, 0)  # half the fragment, the largest shift tried
    assert 8 <= shifts[1][1] <= 20 and _phi(half, np.ones_like(half), *shifts[1]) <= 0.1


def test_no_labels_need_no_shift():
    empty, inside = np.zeros((32, 32), dtype=bool), np.ones((32, 32), dtype=bool)
    assert unrelated_shifts(empty, inside) == [(1, 0), (0, 1), (1, 1), (1, -1)]
