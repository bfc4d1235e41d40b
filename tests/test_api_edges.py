"""The Python API at its edges (QA, session 19): whole numbers of any integer type, labels of
any integer dtype, points anywhere inside the frame, non-finite prompts, empty batches, and
Predictor settings of 0. Each failed or misbehaved before."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scrollsam import build_model
from scrollsam.errors import InputError
from scrollsam.infer.predict import Predictor


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", image_size=64).eval()


def test_sizes_take_numpy_integers_and_refuse_bools_and_floats():
    assert build_model("tiny", image_size=np.int64(64)).image_size == 64  # "got np.int64(64)"
    with pytest.raises(InputError, match=r"in_chans: expected an int, got True"):
        build_model("tiny", image_size=64, in_chans=True)  # was a 1-channel model
    with pytest.raises(InputError, match=r"image_size: expected an int, got 64.0"):
        build_model("tiny", image_size=64.0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_point_labels_of_any_integer_dtype_decode_as_long_ones(tiny, dtype):
    emb = tiny.encode(torch.randn(1, 3, 64, 64))
    coords = torch.tensor([[[10.0, 20.0], [40.0, 5.0]]])
    want, _ = tiny.decode(emb, points=(coords, torch.tensor([[1, 0]])))
    got, _ = tiny.decode(emb, points=(coords, torch.tensor([[1, 0]], dtype=dtype)))
    assert torch.equal(got, want)  # int8: an indexing error; uint8: "got []"


def test_points_anywhere_in_the_last_pixel_are_inside_the_frame(tiny):
    emb = tiny.encode(torch.randn(1, 3, 64, 64))
    tiny.decode(emb, points=(torch.tensor([[[63.5, 63.9]]]), torch.tensor([[1]])))
    with pytest.raises(InputError, match=r"in \[0, 64\) \(box corners: \[0, 64\]\)"):
        tiny.decode(emb, points=(torch.tensor([[[64.0, 3.0]]]), torch.tensor([[1]])))
    tiny.decode(emb, points=(torch.tensor([[[0.0, 0.0], [64.0, 64.0]]]),
                             torch.tensor([[2, 3]])))  # a box's far corner may touch the edge


def test_clicks_anywhere_in_a_window_larger_than_the_model_input(tiny):
    pred = Predictor(tiny, device="cpu", amp="fp32", tile=256)
    window = np.random.default_rng(0).standard_normal((3, 256, 256)).astype(np.float32)
    for xy in ([255, 255], [253, 10], [0, 0]):  # 255 * 64 / 256 = 63.75: was refused
        prob = pred.predict_points(window, np.array([xy], np.float32), np.array([1]))
        assert prob.shape == (256, 256) and np.isfinite(prob).all()


def test_non_finite_boxes_and_mask_prompts_are_refused(tiny):
    emb = tiny.encode(torch.randn(1, 3, 64, 64))
    with pytest.raises(InputError, match="boxes: expected finite"):
        tiny.decode(emb, boxes=torch.tensor([[1.0, 2.0, float("nan"), 9.0]]))
    with pytest.raises(InputError, match="normalised 0..1 coordinates"):
        tiny.decode(emb, boxes=torch.tensor([[0.1, 0.2, 0.5, 0.6]]))
    with pytest.raises(InputError, match="mask_inputs: expected finite"):
        tiny.decode(emb, mask_inputs=torch.full((1, 1, 16, 16), float("nan")))


def test_an_empty_batch_is_named_or_gives_an_empty_answer(tiny):
    with pytest.raises(InputError, match="B >= 1"):
        tiny.encode(torch.zeros(0, 3, 64, 64))
    out = Predictor(tiny, device="cpu", amp="fp32").predict_windows(np.zeros((0, 3, 64, 64)))
    assert out.shape == (0, 64, 64) and out.dtype == np.float32


@pytest.mark.parametrize("setting", [{"stride": 0}, {"batch_size": 0}, {"tile": 0}])
def test_predictor_settings_of_0_are_refused_not_replaced(tiny, setting):
    with pytest.raises(InputError, match=next(iter(setting))):
        Predictor(tiny, device="cpu", amp="fp32", **setting)


def test_coordinates_that_require_grad_raise_no_torch_warning(tiny):
    emb = tiny.encode(torch.randn(1, 3, 64, 64))
    coords = torch.tensor([[[10.0, 20.0]]], requires_grad=True)
    box = torch.tensor([[1.0, 2.0, 30.0, 40.0]], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.decode(emb, points=(coords, torch.tensor([[1]])), boxes=box)
