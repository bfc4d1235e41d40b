"""Point, box and prompt-free sets share the decoder calls of a training step
(``prompt_sets.FAMILIES``): the same loss parts and gradients as decoding each kind on its own
(``PER_KIND``), in 3 calls instead of 7 with the default prompts."""

from __future__ import annotations

import pytest
import torch

from scrollsam.config import load_config
from scrollsam.model.assemble import model_from_config
from scrollsam.train import prompt_sets, step
from scrollsam.train.prompt_sets import FAMILIES, PER_KIND, PromptKind, PromptSets

S, B = 64, 4
SEEDS = [11, 12, 13, 14]  # tile seeds whose 8 sets hold every prompt kind


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [B, 3, S, S], ink and fragment mask [B, 1, S, S]; the last tile has no ink."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, S, S, generator=g)
    label = torch.zeros(B, 1, S, S)
    label[0, 0, 10:30, 5:40] = 1
    label[1, 0, 40:50, 40:60] = 1
    label[2, 0, 5:60, 30:34] = 1  # a thin stroke
    valid = torch.ones_like(label)
    valid[:, :, :, :3] = 0
    return images, label, valid


@pytest.mark.parametrize("head, extra, static", [
    ("sam", [], False),
    ("full", [], False),
    ("sam", ["prompts.multimask=false", "prompts.mask_feedback=false"], False),
    ("sam", ["prompts.corrective=center", "loss.resolution=mask"], False),
    ("full", [], True),
], ids=["defaults", "full-head", "single-mask-no-feedback", "center-mask-resolution",
        "static-shapes"])
def test_every_kind_decoded_together_equals_separate_calls(head, extra, static, monkeypatch):
    """``static`` (what a compiled decoder gets): prompt-free sets decoded in every round,
    unscored after the first, and all four masks asked for: the same loss and gradients."""
    cfg = load_config(None, ["model.type=tiny", f"model.image_size={S}",
                             f"model.mask_head={head}", "prompts.prompt_free_share=0.3", *extra])
    torch.manual_seed(0)
    model = model_from_config(cfg.model, in_chans=3)
    images, label, valid = _batch()
    calls = []
    real = model.decode

    def spy(*args, **kwargs):
        calls.append(kwargs.get("points"))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "decode", spy)

    def run(static: bool, families) -> tuple[dict[str, float], dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        calls.clear()
        emb, features = model.encode_with_pixels(images)
        out = step.prompted_forward(model, emb, label, valid, prompt_cfg=cfg.prompts,
                                    loss_cfg=cfg.loss, seeds=SEEDS, features=features,
                                    static=static, families=families)
        out.parts["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: float(v.detach()) for k, v in out.parts.items()}, grads, len(calls)

    parts, grads, n_calls = run(static, FAMILIES)
    shapes = [(tuple(c[0].shape), tuple(c[1].shape)) for c in calls]  # (coords, labels)
    # the reference: a call per kind and round, each with its own sets
    split_parts, split_grads, n_split = run(False, PER_KIND)
    rounds = cfg.prompts.corrective_rounds
    assert n_split == 3 * (1 + rounds) - rounds  # point, box: every round; none: once
    assert n_calls == 1 + rounds
    # static: every round decodes all P sets, 2 + r tokens each; otherwise the corrective rounds
    # take the prompted sets only (these seeds draw prompt-free ones)
    p = B * cfg.prompts.sets_per_tile
    assert (shapes == [((p, 2 + r, 2), (p, 2 + r)) for r in range(1 + rounds)]) == static
    assert parts.keys() == split_parts.keys()
    for key, value in parts.items():
        # mask_iou counts thresholded pixels: one at the threshold may flip with summation order
        assert value == pytest.approx(split_parts[key], rel=1e-4, abs=1e-5), key
    assert grads.keys() == split_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        # the IoU head's target is the IoU of thresholded masks: a pixel at the threshold may
        # flip with summation order and move its gradient by ~1e-6 (a wrong row or weight
        # would move it by its own size)
        torch.testing.assert_close(g, split_grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_blocks_give_point_sets_three_masks_and_prompt_free_sets_their_own_loss():
    index = torch.zeros(6, dtype=torch.long)
    points = (torch.zeros(6, 2, 2), torch.zeros(6, 2, dtype=torch.long))
    sets = PromptSets(index, points, multimask_rows=2, free_rows=1)
    assert sets.blocks(first=True) == [(slice(0, 2), (1, 4)), (slice(2, 5), (0, 1)),
                                       (slice(5, 6), (0, 1))]
    assert sets.present()[:, 0].tolist() == [True] * 5 + [False]
    later = sets.prompted_only()
    assert later.blocks(first=False) == [(slice(0, 5), (0, 1))] and later.present() is None
    assert PromptSets(index).blocks(first=True) == [(slice(0, 6), (0, 1))]
    free = PromptSets(index, free_rows=6)
    assert free.blocks(first=True) == [(slice(0, 6), (0, 1))] and free.prompted == 0


def test_first_prompts_refuse_rows_out_of_kind_order():
    """Rows are sliced by kind (points, then boxes, then prompt-free): another order would give
    box rows point prompts, so it is an error, not a silent mix-up."""
    from scrollsam.errors import InputError

    kinds = torch.tensor([PromptKind.BOX, PromptKind.POINT])
    truth = torch.ones(2, 1, S, S, dtype=torch.bool)
    with pytest.raises(InputError, match="kinds: expected rows in PromptKind order"):
        prompt_sets.first_prompts(kinds, torch.zeros(2, dtype=torch.long), truth, truth,
                                  boxes=torch.zeros(2, 4), gen=torch.Generator(), multimask=True)
