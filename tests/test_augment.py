"""augment_sample: inputs untouched, the noise's statistics and seeding, and the blocked copy of a
quarter turn equal to numpy's."""

from __future__ import annotations

import numpy as np
import pytest

from scrollsam.data.augment import Augment, augment_sample, contiguous
from scrollsam.data.views import CLIP


def _sample(c: int = 4, s: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image float32 [C, S, S], label / valid float32 [1, S, S] (valid: the left 2/3)."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((c, s, s)).astype(np.float32)
    label = (rng.random((1, s, s)) > 0.7).astype(np.float32)
    valid = np.zeros((1, s, s), np.float32)
    valid[..., : 2 * s // 3] = 1
    return image, label, valid


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [None, 1, 2])
@pytest.mark.parametrize("shape", [(3, 96, 96), (2, 70, 45), (1, 33, 33)])
def test_contiguous_is_numpys_copy_for_every_turn_and_flip(k, flip, shape):
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    view = np.rot90(a, k, axes=(1, 2))
    if flip:
        view = np.flip(view, axis=flip)
    out = contiguous(view, block=16)
    assert out.flags.c_contiguous and out.dtype == a.dtype
    assert np.array_equal(out, np.ascontiguousarray(view))


def test_inputs_are_never_written_to():
    image, label, valid = _sample()
    before = [a.copy() for a in (image, label, valid)]
    for seed in range(8):  # every turn and flip, with pixel noise
        out = augment_sample(image, label, valid, rng=np.random.default_rng(seed),
                             augment=Augment())
        assert all(o.flags.c_contiguous for o in out) and out[0].dtype == np.float32
    assert all(np.array_equal(a, b) for a, b in zip((image, label, valid), before, strict=True))


def test_pixel_noise_has_the_set_spread_zero_outside_and_depends_only_on_the_seed():
    image, label, valid = _sample(c=8, s=128)
    aug = Augment(flips=False, rot90=False, brightness=0.0, contrast=0.0, noise=0.2)
    out, _, _ = augment_sample(image, label, valid, rng=np.random.default_rng(5), augment=aug)
    inside = np.broadcast_to(valid > 0, out.shape)
    noise = (out - np.clip(image, -CLIP, CLIP))[inside]
    assert abs(noise.mean()) < 0.01 and noise.std() == pytest.approx(0.2, rel=0.02)
    assert not out[~inside].any()
    again, _, _ = augment_sample(image, label, valid, rng=np.random.default_rng(5), augment=aug)
    other, _, _ = augment_sample(image, label, valid, rng=np.random.default_rng(6), augment=aug)
    assert np.array_equal(out, again) and not np.array_equal(out, other)
