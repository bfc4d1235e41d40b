"""The patch embedding as a matrix product: the official convolution's values and gradients."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import PatchEmbed

from scrollsam import build_model
from scrollsam.model.patch_embed import PatchProduct, fuse_patch_embed


@pytest.mark.parametrize("chans", [3, 26])
def test_same_tokens_and_gradients_as_the_official_convolution(chans):
    """Images [B, C, H, W] (H != W) -> tokens [B, H/16, W/16, E] as the official
    ``PatchEmbed`` gives them, and the same gradients in its weight, bias and the images."""
    torch.manual_seed(0)
    official = PatchEmbed(kernel_size=(16, 16), stride=(16, 16), in_chans=chans, embed_dim=32)
    ours = PatchProduct(official)
    x = torch.randn(2, chans, 64, 48, requires_grad=True)
    want = official(x)
    got = ours(x)
    assert got.shape == want.shape == (2, 4, 3, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, official.proj.weight, official.proj.bias], g)
    got_grads = torch.autograd.grad(got, [x, ours.proj.weight, ours.proj.bias], g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_fused_models_use_it_with_the_official_parameter_names():
    """``build_model``'s fused encoder embeds patches by the product; checkpoints keep the
    official keys and shapes (``patch_embed.proj.weight`` [E, C, 16, 16])."""
    fused = build_model("tiny", image_size=64, attention="fused")
    official = build_model("tiny", image_size=64, attention="official")
    assert isinstance(fused.sam.image_encoder.patch_embed, PatchProduct)
    assert not isinstance(official.sam.image_encoder.patch_embed, PatchProduct)
    shapes = {k: v.shape for k, v in fused.state_dict().items()}
    assert shapes == {k: v.shape for k, v in official.state_dict().items()}
    assert not fuse_patch_embed(fused.sam.image_encoder)  # already one: nothing to do


def test_only_convolutions_of_whole_patches_and_images_of_whole_patches():
    padded = PatchEmbed(kernel_size=(16, 16), stride=(16, 16), padding=(1, 1))
    with pytest.raises(ValueError, match="kernel is its stride with no padding"):
        PatchProduct(padded)
    ours = PatchProduct(PatchEmbed(kernel_size=(16, 16), stride=(16, 16), embed_dim=8))
    with pytest.raises(ValueError, match="not a whole number of 16 x 16 patches"):
        ours(torch.zeros(1, 3, 40, 32))


def test_runs_on_devices_without_autocast():
    """``meta`` (how benchmarks/step_traffic.py counts a step's bytes) has no autocast to ask
    about: asking raised there."""
    ours = PatchProduct(PatchEmbed(kernel_size=(16, 16), stride=(16, 16), embed_dim=8)).to("meta")
    assert ours(torch.zeros(1, 3, 32, 32, device="meta")).shape == (1, 2, 2, 8)


def test_compiles_into_one_graph_asking_dynamo_nothing_it_cannot_trace(monkeypatch):
    """The forward asked ``torch.amp.is_autocast_available``, which torch 2.11's dynamo cannot
    trace (on the GPU machine: a graph break at the start of every compiled encoder). Which
    device types have an autocast is now read once at import; compiled whole, under bf16
    autocast, it gives the eager tokens."""
    def refuse(kind):
        raise AssertionError("is_autocast_available asked inside the forward")

    ours = PatchProduct(PatchEmbed(kernel_size=(16, 16), stride=(16, 16), embed_dim=8))
    x = torch.randn(2, 3, 32, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ours(x)
        monkeypatch.setattr(torch.amp, "is_autocast_available", refuse)
        assert ours(x).dtype == torch.bfloat16
        torch._dynamo.reset()
        try:
            got = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(got, want)


def test_a_renamed_custom_backend_is_asked_at_call_time(monkeypatch):
    """Device types outside the set read at import (a custom backend renamed after it, such as
    ``npu``) still answer whether autocast is on; ``meta`` has none to ask."""
    from scrollsam.model import checks

    asked = []
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda kind: asked.append(kind) or True)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda kind: kind == "npu")
    assert checks.autocast_enabled("npu") is True
    assert asked == ["npu"]
    assert checks.autocast_enabled("meta") is None
