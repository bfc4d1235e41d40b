"""Precision choice: bf16 where it is native (CUDA, CPUs with bf16 units), fp32 elsewhere; the
loss stays float32 under autocast; train.amp and predict --precision reach the model."""

from __future__ import annotations

import json

import pytest
import torch
from infer_helpers import make_run

from scrollsam import build_model, precision
from scrollsam.cli import main
from scrollsam.config import LossConfig, PromptConfig
from scrollsam.data.synthetic import write_fragment
from scrollsam.infer.predict import Predictor
from scrollsam.precision import autocast_for, use_bf16
from scrollsam.train.step import prompted_forward


@pytest.fixture(params=[True, False], ids=["cpu-with-bf16", "cpu-without-bf16"])
def cpu_bf16(request, monkeypatch) -> bool:
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: request.param)
    return request.param


def test_choices_resolve_per_device(cpu_bf16):
    assert use_bf16("cpu", True) is cpu_bf16
    assert use_bf16("cpu", "auto") is cpu_bf16
    assert use_bf16("cpu", "bf16") is True  # forced, emulated where there are no bf16 units
    assert use_bf16("cpu", False) is False and use_bf16("cpu", "fp32") is False
    assert use_bf16("cuda", True) is True and use_bf16("cuda", "fp32") is False
    with pytest.raises(ValueError, match="precision"):
        use_bf16("cpu", "fp16")


def test_autocast_for_runs_matmuls_in_the_chosen_dtype(cpu_bf16):
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast_for("cpu", True):
        y = layer(x)
    assert y.dtype == (torch.bfloat16 if cpu_bf16 else torch.float32)
    with autocast_for("cpu", "fp32"):
        assert layer(x).dtype == torch.float32


def test_the_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model("tiny", image_size=64)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    label = (torch.rand(2, 1, 64, 64, generator=gen) > 0.6).float()
    seen = []
    model.sam.image_encoder.blocks[0].attn.qkv.register_forward_hook(
        lambda mod, args, out: seen.append(out.dtype))
    with autocast_for("cpu", "bf16"):
        emb = model.encode(images)
        out = prompted_forward(model, emb, label, torch.ones_like(label),
                               prompt_cfg=PromptConfig(corrective_rounds=1), loss_cfg=LossConfig(),
                               gen=gen)
    assert seen and set(seen) == {torch.bfloat16}  # the model ran in bf16 (4 x 4 tokens in a
    # window of 8: qkv of the real tokens, then of the zero token that pads them)
    for key, value in out.parts.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    out.parts["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_predictor_takes_the_precision(cpu_bf16):
    model = build_model("tiny", image_size=64)
    assert Predictor(model, device="cpu", amp="fp32").amp is False
    assert Predictor(model, device="cpu", amp="bf16").amp is True
    assert Predictor(model, device="cpu", amp=True).amp is cpu_bf16


def test_predict_cli_precision_is_recorded_and_close(tmp_path):
    write_fragment(tmp_path / "a", height=80, width=80, depth=65, seed=3)
    run = make_run(tmp_path / "run", "data.input=ir")
    probs = {}
    for choice in ("fp32", "bf16"):
        out = tmp_path / choice
        assert main(["predict", "--run", str(run), "--fragment", str(tmp_path / "a"), "--out",
                     str(out), "--device", "cpu", "--precision", choice, "--save-tif"]) == 0
        assert json.loads((out / "metrics.json").read_text())["compute_dtype"] == choice
        import tifffile

        probs[choice] = tifffile.imread(out / "prob.tif")
    assert abs(probs["fp32"] - probs["bf16"]).max() < 0.05
