"""Sliding-window core: exact stitching, the mask, blending without seams, streaming reads."""

from __future__ import annotations

import numpy as np
import pytest

from scrollsam.errors import InputError
from scrollsam.infer.sliding_window import (
    Grid,
    blend_weight,
    blend_windows,
    sliding_window_array,
    sliding_window_inference,
    window_starts,
)


def identity(windows: np.ndarray) -> np.ndarray:
    """The first channel of each window: [B, C, T, T] -> [B, T, T]."""
    return windows[:, 0]


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (65, 31), (11, 70), (5, 7)])
@pytest.mark.parametrize("tile, stride", [(16, 8), (16, 5), (16, 16), (32, 11)])
@pytest.mark.parametrize("blend", ["hann", "gaussian", "constant"])
def test_identity_predictor_reproduces_input_across_seams_and_borders(shape, tile, stride, blend):
    rng = np.random.default_rng(0)
    image = rng.random((2, *shape), dtype=np.float32)  # (C, H, W)
    out = sliding_window_array(image, identity, tile=tile, stride=stride, batch_size=3,
                               blend=blend)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, image[0], rtol=0, atol=2e-6)


def test_windows_cover_every_pixel_and_end_flush_with_the_border():
    for length in (1, 15, 16, 17, 40, 41, 100):
        starts = window_starts(length, 16, 6)
        covered = np.zeros(max(length, 16), bool)
        for s in starts:
            covered[s:s + 16] = True
        assert covered[:length].all()
        assert starts[-1] == max(length - 16, 0)  # flush: no window starts past the border
        assert all(b - a <= 6 for a, b in zip(starts, starts[1:], strict=False))


def test_cells_partition_the_image_for_progress():
    grid = Grid.make((101, 67), tile=32, stride=12)
    assert sum(area for _, _, area in grid.cells()) == 101 * 67
    seen = []
    rng = np.random.default_rng(1)
    sliding_window_array(rng.random((1, 101, 67), dtype=np.float32), identity, tile=32,
                         stride=12, progress=seen.append, mask=rng.random((101, 67)) > 0.999)
    assert sum(seen) == 101 * 67  # skipped windows advance progress too


def test_only_windows_with_mask_pixels_are_read_and_nothing_is_left_outside_the_mask():
    h, w, tile = 90, 70, 16
    mask = np.zeros((h, w), bool)
    mask[20:45, 10:30] = True
    mask[70, 60] = True  # a single isolated pixel still gets predicted
    reads = []

    def read(y0, x0):
        reads.append((y0, x0))
        return np.ones((1, tile, tile), np.float32)

    out = sliding_window_inference(read, lambda b: np.full((len(b), tile, tile), 0.7, np.float32),
                                   shape=(h, w), tile=tile, stride=8, mask=mask, batch_size=4)
    assert all(mask[y:y + tile, x:x + tile].any() for y, x in reads)
    grid = Grid.make((h, w), tile=tile, stride=8)
    expected = [(y, x) for y, x in grid.windows() if mask[y:y + tile, x:x + tile].any()]
    assert sorted(reads) == sorted(expected) and len(reads) < len(grid)
    np.testing.assert_allclose(out[mask], 0.7, atol=1e-6)
    assert (out[~mask] == 0).all()


def test_smooth_blending_hides_seams_that_constant_blending_shows():
    """Each window predicts its own constant (a model whose output drifts between tiles): plain
    averaging jumps at window edges, smooth weights hand over gradually."""
    rng = np.random.default_rng(2)

    def per_window_constant(windows):
        return np.repeat(rng.random((len(windows), 1, 1), dtype=np.float32), 64, 1).repeat(64, 2)

    def max_step(blend):
        out = sliding_window_array(np.zeros((1, 320, 320), np.float32), per_window_constant,
                                   tile=64, stride=32, blend=blend)
        return max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max())

    plain = max_step("constant")
    assert max_step("hann") < 0.2 * plain
    assert max_step("gaussian") < 0.4 * plain


def test_prefetch_gives_the_same_map_and_windows_may_carry_depth():
    rng = np.random.default_rng(3)
    image = rng.random((4, 2, 50, 45), dtype=np.float32)  # (K, C, H, W)

    def mean_over_k(windows):  # [B, K, C, T, T] -> [B, T, T]
        return windows[:, :, 0].mean(axis=1)

    a = sliding_window_array(image, mean_over_k, tile=16, stride=7, prefetch=True)
    b = sliding_window_array(image, mean_over_k, tile=16, stride=7, prefetch=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, image[:, 0].mean(axis=0), atol=2e-6)


@pytest.mark.parametrize("blend", ["hann", "gaussian"])
def test_blend_weight_is_smooth_positive_and_peaks_in_the_middle(blend):
    g = blend_weight(64, blend=blend)
    assert g.min() > 0 and g.max() == pytest.approx(1.0)
    assert np.argmax(g) in (31, 32) and g[0] < 0.01
    np.testing.assert_allclose(g, g[::-1])


def test_blend_windows_at_arbitrary_corners():
    rng = np.random.default_rng(4)
    image = rng.random((60, 50), dtype=np.float32)
    corners = [(0, 0), (5, 30), (40, 20), (-4, 44)]  # overlapping, one past the border
    preds = []
    for y0, x0 in corners:
        win = np.zeros((16, 16), np.float32)
        ys, xs = slice(max(y0, 0), y0 + 16), slice(max(x0, 0), x0 + 16)
        part = image[ys, xs]
        win[ys.start - y0:ys.start - y0 + part.shape[0],
            xs.start - x0:xs.start - x0 + part.shape[1]] = part
        preds.append((y0, x0, win))
    out, covered = blend_windows(preds, shape=(60, 50), tile=16)
    np.testing.assert_allclose(out[covered], image[covered], atol=2e-6)
    assert (out[~covered] == 0).all() and covered[5:21, 30:46].all() and not covered[30, 5]


def test_bad_arguments_name_themselves():
    img = np.zeros((1, 20, 20), np.float32)
    with pytest.raises(InputError, match="stride"):
        sliding_window_array(img, identity, tile=8, stride=9)
    with pytest.raises(InputError, match=r"predictor: expected output \[B, tile, tile\]"):
        sliding_window_array(img, lambda b: b[:, 0, :4], tile=8, stride=4)
    with pytest.raises(InputError, match="mask: expected bool"):
        sliding_window_array(img, identity, tile=8, stride=4, mask=np.ones((20, 20)))
    with pytest.raises(InputError, match="blend"):
        sliding_window_array(img, identity, tile=8, stride=4, blend="max")



def test_a_large_window_costs_no_float64_weight():
    """QA: --tile 100000 failed allocating the float64 outer product of the blending weight
    (74.5 GiB) before its float32 copy, and each window's weighted prediction was made whole
    before the part inside the image was taken (3 windows' memory; now 2)."""
    import tracemalloc

    tile = 2048  # one window over a 16 x 16 image: the weight is most of the memory
    one = np.broadcast_to(np.float32(0.5), (1, tile, tile))  # no memory of its own
    tracemalloc.start()
    try:
        out = sliding_window_inference(lambda y0, x0: one[0], lambda w: one, shape=(16, 16),
                                       tile=tile, stride=tile, batch_size=1, prefetch=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(out, 0.5, rtol=1e-6)
    window = tile * tile * 4  # bytes of one float32 [tile, tile]
    assert peak < 2.5 * window, peak / window  # the weight, the stacked window, a little more


@pytest.mark.parametrize("tile, blend", [(16, "hann"), (300, "gaussian"), (1000, "hann"),
                                         (64, "constant")])
def test_the_2d_weight_is_the_outer_product_to_the_bit(tile, blend):
    from scrollsam.infer.sliding_window import weight_2d

    g = blend_weight(tile, blend=blend)
    np.testing.assert_array_equal(weight_2d(g), np.outer(g, g).astype(np.float32))
