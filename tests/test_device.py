"""One device rule for training and prediction, with errors that name the setting."""

from __future__ import annotations

import pytest
import torch

from scrollsam.device import resolve_device
from scrollsam.errors import InputError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_names_the_setting(name):
    with pytest.raises(InputError, match=rf"train\.device: {name} was asked for but torch"):
        resolve_device(name, setting="train.device")


def test_unknown_device_names_the_setting():
    with pytest.raises(InputError, match=r"--device: expected auto, cpu or cuda, got 'tpu'"):
        resolve_device("tpu", setting="--device")
