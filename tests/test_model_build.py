"""Variants, checkpoint loading, resolution / channel adaptation, wrong-variant refusal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scrollsam import build_model
from scrollsam.errors import CheckpointError, InputError
from scrollsam.model.adapt import inflate_patch_embed, resize_pos_embed, resize_rel_pos
from scrollsam.model.build import VARIANTS, load_sam_state_dict


@pytest.fixture(scope="module")
def tiny_1024_ckpt(tmp_path_factory) -> Path:
    """An official-format file: a flat Sam state dict, 1024 px, 3 channels (tiny variant)."""
    torch.manual_seed(0)
    sam = build_model("tiny", image_size=1024).sam
    # non-trivial rel-pos tables (official init is zero) so interpolation is visible
    for name, p in sam.named_parameters():
        if "rel_pos" in name:
            p.data.normal_()
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny_1024.pth"
    torch.save(sam.state_dict(), path)
    return path


def test_official_format_round_trip(tiny_1024_ckpt):
    state = torch.load(tiny_1024_ckpt, weights_only=True)  # loads unchanged, no code run
    model = build_model("tiny", checkpoint=tiny_1024_ckpt, image_size=1024)
    got = model.sam.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_scrollsam_training_checkpoint_loads(tiny_1024_ckpt, tmp_path):
    state = torch.load(tiny_1024_ckpt, weights_only=True)
    path = tmp_path / "last.pt"
    torch.save({"model": state, "step": 7, "config": {"model": {"type": "tiny"}}}, path)
    model = build_model("tiny", checkpoint=path, image_size=1024)
    assert torch.equal(model.sam.mask_decoder.iou_token.weight,
                       state["mask_decoder.iou_token.weight"])


def test_a_trained_checkpoints_own_parts_are_named_as_left_out(tiny_1024_ckpt, tmp_path,
                                                                caplog):
    # QA: build_model(checkpoint=a run's best.pt) dropped its depth encoder and mask head
    # silently; the model it returned was not the trained one.
    state = torch.load(tiny_1024_ckpt, weights_only=True)
    path = tmp_path / "best.pt"
    torch.save({"model": state, "extras": {"mask_head": {}, "depth_encoder": {}}}, path)
    with caplog.at_level("WARNING"):
        build_model("tiny", checkpoint=path, image_size=1024)
    assert "its depth_encoder and mask_head not loaded here" in caplog.text
    assert "Predictor.from_checkpoint" in caplog.text


def test_256px_8ch_from_1024px_3ch_weights(tiny_1024_ckpt):
    model = build_model("tiny", checkpoint=tiny_1024_ckpt, image_size=256, in_chans=8)
    state = torch.load(tiny_1024_ckpt, weights_only=True)
    enc = model.sam.image_encoder
    assert enc.pos_embed.shape == (1, 16, 16, VARIANTS["tiny"].embed_dim)
    torch.testing.assert_close(enc.pos_embed.data,
                               resize_pos_embed(state["image_encoder.pos_embed"], 16))
    for i in VARIANTS["tiny"].global_attn_indexes:  # global blocks follow the token grid
        assert enc.blocks[i].attn.rel_pos_h.shape[0] == 2 * 16 - 1
    w = VARIANTS["tiny"].window_size  # windowed blocks keep their window tables unchanged
    key = "image_encoder.blocks.0.attn.rel_pos_h"
    assert torch.equal(enc.blocks[0].attn.rel_pos_h.data, state[key])
    assert state[key].shape[0] == 2 * w - 1
    with torch.no_grad():
        emb = model.encode(torch.randn(2, 8, 256, 256))
    assert emb.shape == (2, 256, 16, 16)
    assert torch.isfinite(emb).all()


def test_vit_b_adapts_from_1024_to_256_and_8_channels():
    torch.manual_seed(0)
    state = build_model("vit_b", image_size=1024).sam.state_dict()
    from scrollsam.model.build import _build_sam, load_into

    sam = _build_sam(VARIANTS["vit_b"], image_size=256, in_chans=8)
    load_into(sam, state, model_type="vit_b", source="memory")
    assert sam.image_encoder.pos_embed.shape == (1, 16, 16, 768)
    for i in VARIANTS["vit_b"].global_attn_indexes:
        assert sam.image_encoder.blocks[i].attn.rel_pos_w.shape == (31, 64)


def test_channel_inflation_keeps_activations_for_grey_input():
    torch.manual_seed(0)
    w3 = torch.randn(12, 3, 16, 16)
    grey = torch.randn(1, 1, 32, 32)
    for c in (1, 2, 8, 65):
        wc = inflate_patch_embed(w3, c)
        assert wc.shape == (12, c, 16, 16)
        want = F.conv2d(grey.expand(1, 3, -1, -1), w3, stride=16)
        got = F.conv2d(grey.expand(1, c, -1, -1), wc, stride=16)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_rel_pos_resize_is_linear_and_identity_at_same_size():
    t = torch.linspace(0, 1, 127).unsqueeze(1).repeat(1, 4)  # (127, 4) a linear ramp
    assert resize_rel_pos(t, 127) is t
    r = resize_rel_pos(t, 31)
    assert r.shape == (31, 4)
    assert torch.all(r[1:] >= r[:-1])  # monotone ramp stays monotone


def test_missing_checkpoint_says_where_to_get_official_ones(tmp_path):
    with pytest.raises(CheckpointError) as err:
        build_model("vit_b", checkpoint=tmp_path / "sam_vit_b_01ec64.pth")
    msg = str(err.value)
    assert "not found" in msg and "sam_vit_b_01ec64.pth" in msg
    assert "segment-anything" in msg and "Model Checkpoints" in msg


def test_wrong_variant_is_refused_naming_both(tmp_path):
    # A vit_b-shaped state dict (only what identifies the variant): refused before any build.
    fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)})
    path = tmp_path / "sam_vit_b.pth"
    torch.save(fake, path)
    with pytest.raises(CheckpointError, match=r"holds vit_b weights but the model type is vit_l"):
        build_model("vit_l", checkpoint=path)


def test_tiny_weights_into_vit_b_refused(tiny_1024_ckpt):
    with pytest.raises(CheckpointError, match="tiny.*vit_b"):
        build_model("vit_b", checkpoint=tiny_1024_ckpt, image_size=256)


def test_corrupt_and_unsafe_checkpoints_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_sam_state_dict(bad)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {"x": Path("/")}}, unsafe)  # needs pickle beyond weights_only
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_sam_state_dict(unsafe)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        load_sam_state_dict(other)


@pytest.mark.parametrize("wrap", [
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # saved from a DDP-wrapped model
    lambda sd: {"state_dict": sd},  # Lightning and many training scripts
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    lambda sd: {"model": {"name": "sam_vit_b"}, "state_dict": sd},  # "model": not the weights
], ids=["ddp", "state_dict", "both", "model_is_metadata"])
def test_ddp_prefixed_and_state_dict_wrapped_files_load(tiny_1024_ckpt, tmp_path, wrap):
    # QA: both were "not a SAM checkpoint (no 'image_encoder.patch_embed.proj.weight' ...)"
    state = torch.load(tiny_1024_ckpt, weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(state), path)
    assert set(load_sam_state_dict(path)) == set(state)
    model = build_model("tiny", checkpoint=path, image_size=1024)
    assert torch.equal(model.sam.mask_decoder.iou_token.weight,
                       state["mask_decoder.iou_token.weight"])


@pytest.mark.parametrize("wrap, hint", [
    (lambda sd: {f"sam.{k}": v for k, v in sd.items()},  # SamSegmenter.state_dict()
     r"its names carry the prefix 'sam\.' \('sam\.image_encoder\.patch_embed\.proj\.weight'\)"),
    (lambda sd: {"ema": sd, "optimizer": {}}, r"a dict of dicts \('ema', 'optimizer'\)"),
    (lambda sd: {("module." if i else "") + k: v for i, (k, v) in enumerate(sd.items())},
     r"prefix 'module\.'"),  # on all keys but the first (pos_embed): not a DDP model's
], ids=["sam_prefix", "other_wrapper", "partial_prefix"])
def test_other_wrappers_and_prefixes_are_refused_with_a_hint(tiny_1024_ckpt, tmp_path, wrap,
                                                             hint):
    state = torch.load(tiny_1024_ckpt, weights_only=True)
    path = tmp_path / "other.pth"
    torch.save(wrap(state), path)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint") as err:
        load_sam_state_dict(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert re.search(hint, msg), msg


def test_a_folder_as_checkpoint_is_named_a_folder_in_train_and_predict(tiny_1024_ckpt, tmp_path,
                                                                       data, capsys):
    # QA: model.checkpoint=DIR and predict --checkpoint DIR said "checkpoint not found"
    from scrollsam.cli import main
    from scrollsam.infer.predict import Predictor
    from scrollsam.infer.run_files import resolve_checkpoint

    one, run = tmp_path / "one", tmp_path / "run"
    one.mkdir()
    run.mkdir()
    (one / "sam_tiny.pth").write_bytes(tiny_1024_ckpt.read_bytes())
    (one / "notes.txt").write_text("")
    for name in ("best.pt", "last.pt"):
        (run / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint is a folder, not a file: did you mean {one / 'sam_tiny.pth'}? ({one})")):
        build_model("tiny", checkpoint=one, image_size=1024)
    with pytest.raises(CheckpointError, match=re.escape(
            f"is a folder, not a file: give one of its files (best.pt, last.pt) ({run})")):
        build_model("tiny", checkpoint=run, image_size=1024)
    with pytest.raises(CheckpointError, match="is a folder, not a file: did you mean"):
        resolve_checkpoint(run, str(one))  # predict --run RUN --checkpoint DIR
    with pytest.raises(CheckpointError, match=r"is a folder, not a file: give one of its"):
        Predictor.from_run(None, checkpoint=str(run))  # predict --checkpoint DIR
    assert main(["predict", "--checkpoint", str(one), "--fragment", str(data / "train" / "1"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint is a folder, not a file: did you mean "
                   f"{one / 'sam_tiny.pth'}? ({one})"], err


def test_nan_or_inf_weights_are_refused_naming_the_file_and_the_first_bad_tensor(
        tmp_path, data, capsys):
    # QA: such a file loaded, and training then said "loss is nan at step 0 ...; try a lower
    # train.lr"
    from scrollsam.cli import main
    from scrollsam.model.assemble import extras_state, load_weights
    from scrollsam.model.heads import MaskHead

    torch.manual_seed(0)
    model = build_model("tiny", image_size=64)
    state = {k: v.clone() for k, v in model.sam.state_dict().items()}
    state["image_encoder.patch_embed.proj.weight"] = torch.full_like(
        state["image_encoder.patch_embed.proj.weight"], float("nan"))
    state["mask_decoder.iou_token.weight"][0, 3] = float("inf")  # a later one: not named
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    n = state["image_encoder.patch_embed.proj.weight"].numel()
    with pytest.raises(CheckpointError, match=re.escape(
            f"NaN/inf weights: {n} of the {n} values of image_encoder.patch_embed.proj.weight, "
            f"the first such tensor;")) as refused:
        build_model("tiny", checkpoint=path, image_size=64)
    assert str(refused.value).endswith(f"({path})")  # error: <what> (<file>)
    assert main(["train", f"out={tmp_path / 'run'}", f"data.root={data}",
                 "data.train=[train/1]", "data.valid=[train/2]", "model.type=tiny",
                 "model.image_size=64", "train.device=cpu", "train.steps=2", "log.images=false",
                 f"model.checkpoint={path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: NaN/inf weights: "), err
    assert err[0].endswith(f"({path})"), err
    # a scrollsam checkpoint's own parts (resume, predict): the mask head's weights
    model.mask_head = MaskHead(8, stem_from=3)
    extras = extras_state(model)
    next(iter(extras["mask_head"].values())).view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match=r"NaN/inf weights: 1 of the \d+ values of "
                                              r"mask_head\.\S+, .*\(run/last.pt\)$"):
        load_weights(model, {"model": model.sam.state_dict(), "extras": extras},
                     model_type="tiny", source="run/last.pt")


@pytest.mark.parametrize("kwargs, match", [
    (dict(type="vit_q"), "model type"),
    (dict(type="tiny", image_size=250), "image_size"),
    (dict(type="tiny", image_size=256, in_chans=0), "in_chans"),
])
def test_bad_build_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        build_model(kwargs.pop("type"), **kwargs)


@pytest.mark.parametrize("size", [64, 256, 512])
def test_tiny_geometry_follows_image_size(size):
    model = build_model("tiny", image_size=size)
    assert (model.image_size, model.embed_grid, model.mask_size) == (size, size // 16, size // 4)
    pe = model.sam.prompt_encoder
    assert pe.input_image_size == (size, size)
    assert pe.image_embedding_size == (size // 16, size // 16)
    with torch.no_grad():
        logits, iou = model(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 1, size // 4, size // 4) and iou.shape == (1, 1)
