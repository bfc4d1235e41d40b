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


def test_cudnn_times_its_convolutions_on_cuda_only(monkeypatch):
    """Fixed tile shapes: on CUDA cuDNN benchmarks each convolution shape once and keeps the
    fastest algorithm; a CPU run leaves the setting alone. (Setting the flag needs no GPU.)"""
    from scrollsam.device import tune_for_fixed_shapes

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tune_for_fixed_shapes(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    tune_for_fixed_shapes(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


def test_prediction_sets_its_device_up_for_fixed_shapes(monkeypatch):
    """The predictor feeds batches of tiles of one size: it asks for the setting on its
    device (training asks only when compiled: ``test_compile.py``)."""
    from scrollsam import build_model
    from scrollsam.infer import predict

    seen = []
    monkeypatch.setattr(predict, "tune_for_fixed_shapes", seen.append)
    predict.Predictor(build_model("tiny", image_size=64), device="cpu", amp="fp32")
    assert seen == [torch.device("cpu")]
