"""Validation's histogram counted on the device equals numpy's on the host, level for level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scrollsam import build_model
from scrollsam.errors import InputError
from scrollsam.metrics import LEVELS, ProbabilityHistogram
from scrollsam.train.histogram import DeviceHistogram
from scrollsam.train.validate import prediction_histogram


def _probabilities(gen: torch.Generator) -> torch.Tensor:
    """Random probabilities and the awkward ones: level edges, half levels, 0, 1 and beyond."""
    k = torch.arange(0, LEVELS, 997, dtype=torch.float32)
    edges = torch.cat([k / (LEVELS - 1), (k + 0.5) / (LEVELS - 1), (k + 0.4999) / (LEVELS - 1),
                       torch.tensor([0.0, 1.0, -0.25, 1.5, 1e-9, 1 - 1e-7])])
    rand = torch.rand(3, 37, 41, generator=gen).reshape(-1)
    return torch.cat([edges, rand])


def test_device_counts_equal_the_host_histogram_level_for_level():
    gen = torch.Generator().manual_seed(0)
    prob = _probabilities(gen)
    ink, valid = torch.rand(prob.shape, generator=gen) > 0.6, torch.rand(prob.shape,
                                                                        generator=gen) > 0.2
    host = ProbabilityHistogram()
    device = DeviceHistogram()
    half = prob.numel() // 2
    for part in (slice(0, half), slice(half, None)):  # two batches add up
        host.add(prob[part].numpy(), ink[part].numpy(), valid[part].numpy())
        device.add(prob[part], ink[part], valid[part])
    got = device.histogram()
    assert got.ink.dtype == np.int64 and got.ink.shape == (LEVELS,)
    np.testing.assert_array_equal(got.ink, host.ink)
    np.testing.assert_array_equal(got.background, host.background)
    assert got.ink.sum() + got.background.sum() == int(valid.sum())


def test_device_histogram_refuses_nan_and_mismatched_shapes_as_the_host_does():
    counts = DeviceHistogram()
    ok = torch.ones(4, dtype=torch.bool)
    with pytest.raises(InputError, match="NaN"):
        counts.add(torch.tensor([0.1, float("nan"), 0.2, 0.3]), ok, ok)
    with pytest.raises(InputError, match="one shape"):
        counts.add(torch.rand(4), ok, torch.ones(5, dtype=torch.bool))
    assert DeviceHistogram().histogram().ink.sum() == 0  # nothing counted: empty, not an error


def test_validation_counts_the_same_on_the_device_as_on_the_host():
    """The GPU's way (counts where the probabilities are) and the CPU's (numpy on the host) give
    the same histogram of one model's prompt-free predictions."""
    torch.manual_seed(0)
    model = build_model("tiny", image_size=64).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(2, 3, 64, 64, generator=gen),
                "label": (torch.rand(2, 1, 64, 64, generator=gen) > 0.5).float(),
                "valid": (torch.rand(2, 1, 64, 64, generator=gen) > 0.1).float()}
               for _ in range(2)]
    hists = [prediction_histogram(model, None, batches, device=torch.device("cpu"),
                                  autocast=torch.no_grad, on_device=on_device)
             for on_device in (False, True)]
    assert hists[0].ink.sum() + hists[0].background.sum() > 0
    np.testing.assert_array_equal(hists[0].ink, hists[1].ink)
    np.testing.assert_array_equal(hists[0].background, hists[1].background)
