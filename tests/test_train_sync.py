"""The training step never waits for the device: no value is read back and nothing is copied
to the host, except the selected masks of the corrective rounds when their points come from the
error region's centre (``prompts.corrective=center``; see tests/sync_detector.py)."""

from __future__ import annotations

import pytest
import torch
from sync_detector import SyncCounter

from scrollsam import build_model, prompts
from scrollsam.config import load_config
from scrollsam.errors import InputError
from scrollsam.model.attention import fuse_attention
from scrollsam.model.trainable import set_trainable
from scrollsam.train import step
from scrollsam.train.cache import EmbeddingCache

S, B = 64, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny", image_size=S)
    set_trainable(m, ["prompt_encoder", "mask_decoder"])
    return m


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [B, 3, S, S], ink and fragment mask [B, 1, S, S] (the last tile without ink)."""
    images = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(0))
    label = torch.zeros(B, 1, S, S)
    label[0, 0, 10:30, 5:40] = 1
    label[1, 0, 40:50, 40:60] = 1
    valid = torch.ones_like(label)
    valid[:, :, :, :3] = 0
    return images, label, valid


@pytest.mark.parametrize("overrides", [
    [],  # the defaults: mixed first prompts, 2 sets per tile, 2 uniform corrective rounds
    ["prompts.first=box", "loss.resolution=mask", "prompts.corrective_rounds=1"],
    ["prompts.corrective=center"],
    ["prompts.corrective=center", "prompts.first=box", "prompts.corrective_rounds=1"],
])
def test_training_step_reads_nothing_back_from_the_device(model, monkeypatch, overrides):
    cfg = load_config(None, ["model.type=tiny", f"model.image_size={S}", *overrides])
    images, label, valid = _batch()  # images: "on the device"; label, valid: the CPU batch
    rounds = []
    real = step.corrective_rounds

    def spy(*args, **kwargs):
        rounds.append(kwargs["rounds"])
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "corrective_rounds", spy)
    monkeypatch.setattr(prompts, "CPU_SHORTCUT", False)  # the path a GPU takes
    with SyncCounter([*model.parameters(), *model.buffers(), images]) as syncs:
        emb = model.encode(images, check_values=False)
        out = step.prompted_forward(model, emb, label, valid, prompt_cfg=cfg.prompts,
                                    loss_cfg=cfg.loss, gen=torch.Generator().manual_seed(0))
        out.parts["loss"].backward()
    assert syncs.counts["reads"] == 0, syncs.where
    assert syncs.counts["uploads"] == 0, syncs.where  # e.g. a box's frame limits from a list
    assert sum(rounds) > 0
    # centre: the selected logits and the truth (ink, valid) copied each round, for OpenCV;
    # uniform: nothing
    copies = 3 * sum(rounds) if cfg.prompts.corrective == "center" else 0
    assert syncs.counts["copies"] == copies, syncs.where
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("first", ["mixed", "box"])
def test_truth_prefetched_to_the_device_is_not_read_back_given_the_ink_flags(model, monkeypatch,
                                                                              first):
    """On a GPU the loop hands the step its truth already there: the prompt kinds come from
    the dataset's host flags, not from copying the truth back (which waited for the encoder)."""
    cfg = load_config(None, ["model.type=tiny", f"model.image_size={S}", f"prompts.first={first}"])
    images, label, valid = _batch()
    has_ink = ((label > 0.5) & (valid > 0.5)).flatten(1).any(1)  # (B,) on the host
    monkeypatch.setattr(prompts, "CPU_SHORTCUT", False)
    counts = []
    for flags in (has_ink, None):
        with SyncCounter([*model.parameters(), *model.buffers(), images, label, valid]) as syncs:
            emb = model.encode(images, check_values=False)
            out = step.prompted_forward(model, emb, label, valid, prompt_cfg=cfg.prompts,
                                        loss_cfg=cfg.loss, gen=torch.Generator().manual_seed(0),
                                        has_ink=flags)
            out.parts["loss"].backward()
        counts.append(dict(syncs.counts))
        model.zero_grad(set_to_none=True)
    assert sum(counts[0].values()) == 0, counts[0]
    assert counts[1]["copies"] == 2  # without the flags: label and valid copied back


@pytest.mark.parametrize("first", ["mixed", "point"])
def test_ink_flags_must_be_one_per_tile_on_the_host(model, first):
    cfg = load_config(None, ["model.type=tiny", f"model.image_size={S}", f"prompts.first={first}"])
    images, label, valid = _batch()
    emb = model.encode(images, check_values=False)
    with pytest.raises(InputError, match="has_ink"):
        step.prompted_forward(model, emb, label, valid, prompt_cfg=cfg.prompts,
                              loss_cfg=cfg.loss, gen=torch.Generator().manual_seed(0),
                              has_ink=torch.ones(B + 1, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["fold", "bias", "explicit"])
def test_encoder_reads_nothing_back_in_any_attention_form(mode):
    # 6 x 6 tokens in 4-wide windows: padded windows (four regions) and global blocks; every
    # tensor counts, made on the device or not (fold's F.one_hot read its indices' range)
    torch.manual_seed(0)
    m = build_model("tiny", image_size=96, window_size=4)
    fuse_attention(m.sam.image_encoder, mode=mode)
    images = torch.randn(2, 3, 96, 96)
    with SyncCounter(everything=True) as syncs:
        m.encode(images, check_values=False).square().mean().backward()
    assert sum(syncs.counts.values()) == 0, syncs.where


def test_detector_sees_value_checks_boolean_indexing_and_host_copies(model):
    images, _, _ = _batch()
    emb = torch.randn(B, 256, S // 16, S // 16)
    coords = torch.tensor([[[10.0, 20.0], [30.0, 5.0]]]).repeat(B, 1, 1)
    labels = torch.tensor([[1, 0]]).repeat(B, 1)
    with SyncCounter([emb, coords, labels, images]) as checked:
        model.decode(emb, points=(coords, labels))  # value checks on: reads
        model.encode(images)
    assert checked.counts["reads"] >= 4, checked.where
    with SyncCounter([coords, labels]) as official:
        model.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    assert official.counts["reads"] >= 4  # official SAM's boolean-mask point updates
    with SyncCounter([emb]) as one:
        float(emb.sum())
        emb.mean().cpu()
        torch.tensor([1.0, 2.0], device=emb.device)  # host data made on the device: waits
        torch.as_tensor(torch.ones(2), device=emb.device)  # a host tensor to the device
        torch.as_tensor(emb, device=emb.device)  # already there: free
        torch.tensor([1.0, 2.0])  # host code: free
    assert (one.counts["reads"], one.counts["copies"], one.counts["uploads"]) == (1, 1, 2)


def test_cached_embeddings_of_a_cpu_batch_never_touch_the_device(model):
    images, _, _ = _batch()
    cache = EmbeddingCache()
    cache.encode(images, model.encode)  # misses: encoded once
    with SyncCounter([*model.parameters()]) as syncs:
        emb = cache.encode(images, model.encode, device="cpu")
    assert emb.shape == (B, 256, S // 16, S // 16) and cache.hits == B
    assert sum(syncs.counts.values()) == 0, syncs.where
    with SyncCounter([images]) as device_batch:  # the batch already on the device
        cache.encode(images, model.encode)
    assert device_batch.counts["copies"] == B  # each tile copied back to be hashed
