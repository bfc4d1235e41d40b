"""The depth encoder and the full-resolution mask head: shapes, invariances, gradients, the
exact start from SAM's output, config rules, checkpoints and a short training run each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scrollsam.config import load_config
from scrollsam.errors import CheckpointError, ConfigError, InputError
from scrollsam.model.assemble import model_from_config
from scrollsam.model.depth import DepthEncoder
from scrollsam.model.heads import MaskHead


@pytest.mark.parametrize("kind", ["mix", "pool"])
@pytest.mark.parametrize("batch, band", [(1, 5), (3, 16), (2, 7)])
def test_depth_encoder_shapes_for_odd_batches_and_bands(batch, band, kind):
    enc = DepthEncoder(band, out_chans=3, features=6, kind=kind)
    image, feats = enc(torch.randn(batch, band, 24, 24))
    assert image.shape == (batch, 3, 24, 24) and feats.shape == (batch, 6, 24, 24)
    assert torch.isfinite(image).all() and torch.isfinite(feats).all()
    with pytest.raises(InputError, match=rf"\[B, {band}, S, S\]"):
        enc(torch.randn(batch, band + 1, 24, 24))


def test_depth_encoder_does_not_care_which_slice_holds_the_signal():
    """A density bump moved in depth (inside the band) gives the same features: the property
    that lets a model move to a scroll whose ink sits deeper or shallower."""
    torch.manual_seed(0)
    enc = DepthEncoder(20, features=8, kind="pool").eval()
    bump = torch.randn(1, 5, 16, 16)  # a 5-slice structure
    a, b = torch.zeros(1, 20, 16, 16), torch.zeros(1, 20, 16, 16)
    a[:, 6:11], b[:, 10:15] = bump, bump  # 4 slices deeper, far from the band's ends
    with torch.no_grad():
        fa, fb = enc(a)[1], enc(b)[1]
    torch.testing.assert_close(fa, fb, atol=1e-5, rtol=1e-5)


def test_mask_head_starts_as_the_upsampled_sam_logits_and_learns():
    torch.manual_seed(0)
    head = MaskHead(4, hidden=8)
    feats = head.image_features(torch.randn(2, 4, 32, 32))  # (B, G, S, S)
    logits = torch.randn(5, 3, 8, 8, requires_grad=True)  # (P, M, S/4, S/4)
    index = torch.tensor([0, 1, 1, 0, 1])
    out = head(logits, feats, index)
    assert out.shape == (5, 3, 32, 32)
    up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(out, up)  # zero-initialised correction: exactly SAM's output at start
    out.square().mean().backward()
    assert head.set_out.weight.grad.abs().sum() > 0  # the correction gets a gradient
    assert logits.grad.abs().sum() > 0
    with torch.no_grad():  # once it has moved, every part of the head gets a gradient
        head.set_out.weight.normal_(0, 0.1)
    head.zero_grad()
    head(logits, head.image_features(torch.randn(2, 4, 32, 32)), index).square().mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mask_head_without_sam_logits_ignores_them():
    torch.manual_seed(0)
    head = MaskHead(4, hidden=8, use_sam_logits=False)
    with torch.no_grad():
        head.set_out.weight.normal_(0, 0.1)
    feats = head.image_features(torch.randn(1, 4, 16, 16))
    index = torch.zeros(2, dtype=torch.long)
    one = head(torch.randn(2, 1, 4, 4), feats, index)
    two = head(torch.randn(2, 1, 4, 4) * 10, feats, index)
    torch.testing.assert_close(one, two)


def _cfg(*over: str):
    return load_config(None, ["model.type=tiny", "model.image_size=64", *over])


SLICES = ("data.input=slices", "data.strategy=range", "data.z_start=2", "data.z_end=7")


def test_model_from_config_builds_the_parts_and_trains_them():
    model = model_from_config(_cfg(*SLICES, "model.depth_encoder=true", "model.mask_head=full",
                                   "model.trainable=[mask_decoder]").model, in_chans=5)
    assert model.in_chans == 5 and model.sam.image_encoder.patch_embed.proj.in_channels == 3
    assert all(p.requires_grad for p in model.depth_encoder.parameters())
    assert all(p.requires_grad for p in model.mask_head.parameters())
    assert not any(p.requires_grad for p in model.sam.image_encoder.parameters())
    images = torch.randn(3, 5, 64, 64)
    emb, pixels = model.encode_with_pixels(images)
    assert emb.shape == (3, 256, 4, 4) and pixels.shape[0] == 3 and pixels.shape[-1] == 64
    logits, _ = model.decode(emb, image_index=torch.tensor([0, 2]))
    full = model.refine(logits, pixels, torch.tensor([0, 2]))
    assert full.shape == (2, 1, 64, 64)
    torch.testing.assert_close(full, model.upscale(logits))  # the head starts at SAM's output
    assert torch.equal(model.upscale(full), full)  # full resolution is left as it is
    with pytest.raises(InputError, match="pixel features"):
        model.refine(logits, None)


def test_mask_head_sam_is_the_official_decoder_output():
    torch.manual_seed(0)
    model = model_from_config(_cfg().model, in_chans=3)
    assert model.mask_head is None and model.depth_encoder is None
    logits = torch.randn(2, 1, 16, 16)
    assert model.refine(logits, None) is logits


@pytest.mark.parametrize("over, key", [
    (("model.depth_encoder=true",), "data.input=slices"),
    (("model.depth_encoder=true", "data.input=slices", "data.strategy=triplet"),
     "data.strategy=range"),
    (("model.mask_head=full", "loss.resolution=mask"), "loss.resolution"),
    (("model.head_sam_logits=false",), "model.mask_head=full"),
])
def test_config_rules_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(*over)


def test_checkpoint_extras_must_match_the_model(tmp_path):
    from scrollsam.model.assemble import load_weights
    from scrollsam.train.checkpoint import TrainState, load_checkpoint, save_checkpoint

    cfg = _cfg(*SLICES, "model.depth_encoder=true", "model.mask_head=full")
    model = model_from_config(cfg.model, in_chans=5)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=None, state=TrainState(),
                    config={})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    plain = model_from_config(_cfg(*SLICES).model, in_chans=5)
    with pytest.raises(CheckpointError, match="holds a depth_encoder"):
        load_weights(plain, ckpt, model_type="tiny", source="c.pt")
    again = model_from_config(cfg.model, in_chans=5, weights=ckpt)
    for a, b in zip(again.depth_encoder.state_dict().values(),
                    model.depth_encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_depth_jitter_never_reads_outside_the_volume(data):
    from scrollsam.data.fragment import Fragment
    from scrollsam.data.views import make_view

    frag = Fragment(data / "train" / "1")  # 8 slices
    view = make_view("slices", "range", z0=1, z1=7, depth_shift=5)
    view.prepare(frag)  # statistics read every slice: before the recording starts
    seen = []
    real = frag.read

    def read(z0, z1, *rest):
        seen.append((z0, z1))
        return real(z0, z1, *rest)

    frag.read = read
    rng = np.random.default_rng(0)
    for _ in range(40):
        assert view.train_window(frag, 0, 0, 32, rng=rng).shape == (6, 32, 32)
    assert all(0 <= z0 and z1 <= frag.depth and z1 - z0 == 6 for z0, z1 in seen)
    assert {z0 for z0, _ in seen} == {0, 1, 2}  # the jitter uses all the room there is


@pytest.mark.parametrize("over", [
    (*SLICES, "model.depth_encoder=true"),
    ("data.input=ir", "model.mask_head=full"),
    (*SLICES, "model.depth_encoder=true", "model.mask_head=full"),
])
def test_short_run_trains_and_predict_rebuilds_the_parts_from_the_run(data, tiny_run_config,
                                                                      over):
    from scrollsam.infer.predict import Predictor
    from scrollsam.train.checkpoint import load_checkpoint
    from scrollsam.train.loop import train

    cfg = tiny_run_config("train.steps=2", "train.batch_size=3", "train.eval_every=2",
                          "log.images=false", *over)
    run = train(cfg, progress=False)
    ckpt = load_checkpoint(run / "last.pt")
    pred = Predictor.from_run(run, checkpoint="last", device="cpu")
    for name in ("depth_encoder", "mask_head"):
        part = getattr(pred.model, name)
        assert (part is None) == (name not in ckpt["extras"]), name
        if part is not None:
            for key, value in part.state_dict().items():
                assert torch.equal(value, ckpt["extras"][name][key]), (name, key)
    if pred.model.mask_head is not None:  # it trained: no longer SAM's output alone
        assert ckpt["extras"]["mask_head"]["set_out.weight"].abs().sum() > 0
    prob = pred.predict_fragment(data / "train" / "2").prob
    assert prob.shape == (160, 160) and np.isfinite(prob).all()


def test_mask_head_set_stage_equals_the_concatenated_convolution():
    """The head applies set_in's image part once per image; the result must equal the 1 x 1
    convolution of [the set's image features, its upsampled logits] it stands for."""
    import torch.nn.functional as F

    from scrollsam.losses import upsample_logits
    from scrollsam.model.heads import MaskHead

    torch.manual_seed(0)
    head = MaskHead(5, stem_from=3)
    for p in head.parameters():  # set_out starts at zero: make every part count
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 16, 16)
    logits = torch.randn(3, 2, 4, 4)  # (P, M, S/4, S/4)
    index = torch.tensor([1, 0, 1])
    got = head(logits, head.image_features(x), index)
    stage = head.image_stage(head.stem(x))[index]  # (P, G, S, S): the plain computation
    up = upsample_logits(logits, (16, 16))  # (P, M, S, S)
    want = []
    for m in range(2):
        cat = torch.cat([stage, up[:, m:m + 1]], dim=1)  # (P, G + 1, S, S)
        want.append(head.set_out(F.gelu(head.set_in(cat)))[:, 0] + up[:, m])
    # the head convolves channels-last, the plain computation channels-first: other sums
    torch.testing.assert_close(got, torch.stack(want, dim=1), rtol=1e-4, atol=1e-4)
