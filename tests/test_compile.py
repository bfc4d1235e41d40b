"""train.compile: the encoder and the decoder compile once per mode (and decoder round) with
static shapes and never again after warm-up; where compile cannot run, one warning and an
eager model."""

from __future__ import annotations

import logging

import pytest
import torch

from scrollsam import build_model
from scrollsam.config import LossConfig, PromptConfig
from scrollsam.model import compile as compile_mod
from scrollsam.precision import autocast_for
from scrollsam.train.loop import train
from scrollsam.train.optim import make_optimizer
from scrollsam.train.step import prompted_forward

dynamo = pytest.importorskip("torch._dynamo")
if compile_mod.compile_unavailable("cpu", "aot_eager") is not None:
    pytest.skip(f"torch.compile cannot run here: "
                f"{compile_mod.compile_unavailable('cpu', 'aot_eager')}", allow_module_level=True)


@pytest.fixture
def fast_backend(monkeypatch):
    """aot_eager: dynamo's graphs and guards (what recompiles) without a C++ build."""
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    dynamo.reset()
    yield
    dynamo.reset()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "encoder+decoder"])
def test_no_recompiles_after_warm_up(fast_backend, decoder):
    torch.manual_seed(0)
    model = build_model("tiny", image_size=64).train()
    assert compile_mod.compile_encoder(model, device="cpu")
    if decoder:  # the loop then decodes static prompt sets
        assert compile_mod.compile_decoder(model, device="cpu")
    opt = make_optimizer(list(model.parameters()), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    counts = []
    for step in range(4):  # new images, new prompt draws (group sizes change) every step
        images = torch.randn(2, 3, 64, 64, generator=gen)
        label = (torch.rand(2, 1, 64, 64, generator=gen) > 0.6).float()
        with autocast_for("cpu", True):
            out = prompted_forward(model, model.encode(images), label, torch.ones_like(label),
                                   prompt_cfg=PromptConfig(corrective_rounds=1),
                                   loss_cfg=LossConfig(), gen=gen, static=decoder)
        out.parts["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 2:  # validation in between: no_grad is one more graph, once
            with torch.no_grad(), autocast_for("cpu", True):
                model.decode(model.encode(images))
        counts.append(_graphs())
    assert counts[0] >= 1
    assert counts[1:] == [counts[1]] * 3, f"graphs after each step: {counts}"


def test_a_run_with_compile_trains(fast_backend, tiny_run_config):
    cfg = tiny_run_config("train.batch_size=2", "train.steps=3", "train.eval_every=3",
                          "train.compile=true")
    run = train(cfg, progress=False)
    assert (run / "best.pt").is_file()
    assert _graphs() >= 1  # the encoder did go through dynamo


@pytest.mark.parametrize("available", [True, False])
def test_static_prompt_sets_only_with_a_compiled_decoder(available, monkeypatch, tmp_path,
                                                        tiny_run_config):
    """Static sets decode more (every set in every round): worth it for a compiled decoder's
    one shape per round, waste for an eager one where compile cannot run. Only then are the
    shapes fixed enough for cuDNN to time each convolution once (eager, the prompt masks'
    convolutions see a new number of sets most steps)."""
    from scrollsam.train.loop import setup

    tuned = []
    monkeypatch.setattr(compile_mod, "tune_for_fixed_shapes", tuned.append)
    dynamo.reset()
    if available:
        monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    else:  # inductor without a C++ compiler: one warning, eager
        monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
        monkeypatch.delenv("CXX", raising=False)
    try:
        s = setup(tiny_run_config("train.compile=true"), tmp_path)
    finally:
        dynamo.reset()
    assert s.static_prompts is available
    assert tuned == ([s.device] if available else [])
    # and the loss's per-pixel terms are compiled with the same backend, or not at all
    assert s.model.compiled_loss == ("aot_eager" if available else None)


def test_unavailable_compile_warns_once_and_stays_eager(monkeypatch, caplog):
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    model = build_model("tiny", image_size=64)
    with caplog.at_level(logging.WARNING, logger="scrollsam.model.compile"):
        assert compile_mod.compile_encoder(model, device="cpu", backend="inductor") is False
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no C++ compiler" in lines[0]
    assert model.sam.image_encoder._compiled_call_impl is None


@pytest.mark.parametrize("bf16", [True, False])
def test_on_a_cpu_under_bf16_inductor_leaves_the_decoder_eager(monkeypatch, caplog, bf16):
    # Before: the decoder compiled with inductor under bf16 autocast on a CPU gave non-finite
    # gradients from the first step (tiny, 128 px), then "loss is nan at step 1".
    if compile_mod.compile_unavailable("cpu", "inductor") is not None:
        pytest.skip("inductor cannot run here")
    monkeypatch.setattr(compile_mod, "BACKEND", "inductor")
    dynamo.reset()
    model = build_model("tiny", image_size=64)
    eager = model._predict_masks
    with caplog.at_level(logging.WARNING):
        static = compile_mod.compile_model(model, device="cpu", bf16=bf16)  # compiles lazily
    assert static is not bf16
    assert (model._predict_masks == eager) is bf16  # a bound method: compare, not identity
    assert model.compiled_loss == "inductor"  # the encoder and the loss compile either way
    warned = [r.getMessage() for r in caplog.records if "stays eager" in r.getMessage()]
    assert len(warned) == int(bf16)
    dynamo.reset()


def test_compiling_for_a_cpu_drops_torchs_no_cuda_runtime_notice(caplog, monkeypatch):
    """Before: every CPU run with train.compile printed torch's "No CUDA runtime is found,
    using CUDA_HOME=..." (inductor's C++ toolchain, a machine with a CUDA toolkit, no GPU)."""
    ext = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(ext, "filters", list(ext.filters))  # restored after the test
    monkeypatch.setattr(compile_mod, "compile_encoder", lambda *a, **k: False)
    compile_mod.compile_model(build_model("tiny", image_size=64), device="cpu")
    with caplog.at_level(logging.WARNING):
        ext.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        ext.warning("another notice")
    assert [r.getMessage() for r in caplog.records] == ["another notice"]
