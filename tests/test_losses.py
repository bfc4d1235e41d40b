"""Losses on hand-checked inputs, the valid mask, upsampling and multimask selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scrollsam.errors import InputError
from scrollsam.losses import (
    bce_loss,
    focal_loss,
    iou_mse_loss,
    mask_iou,
    mean_parts,
    sam_loss,
    scalar_parts,
    soft_dice_loss,
    upsample_logits,
)

LN2 = math.log(2)
TARGET = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]  # (1, 1, 2, 2), two ink pixels


def test_focal_hand_checked():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere: BCE = ln 2, (1 - p_t)^2 = 1/4
    # ink pixels: 0.25 * 0.25 * ln2; background: 0.75 * 0.25 * ln2; mean of 2 + 2 pixels
    expected = (2 * 0.25 + 2 * 0.75) * 0.25 * LN2 / 4
    assert focal_loss(logits, TARGET).item() == pytest.approx(expected)
    # gamma = 0 and no alpha is plain BCE
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    assert focal_loss(logits, TARGET, alpha=-1, gamma=0).item() == pytest.approx(
        bce_loss(logits, TARGET).item())
    assert bce_loss(logits, TARGET).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, TARGET).item())


def test_dice_hand_checked():
    half = torch.zeros(1, 1, 2, 2)  # p = 0.5: inter 1, sum p 2, sum t 2
    assert soft_dice_loss(half, TARGET).item() == pytest.approx(1 - 3 / 5)
    perfect = (TARGET * 2 - 1) * 50  # +-50 logits: p == target
    assert soft_dice_loss(perfect, TARGET).item() == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros_like(TARGET)
    assert soft_dice_loss(half, empty).item() == pytest.approx(1 - 1 / 3)  # sum p / (sum p + 1)


def test_mask_iou_and_mse_hand_checked():
    logits = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]]])  # predicted: 3 pixels, 2 of them ink
    assert mask_iou(logits, TARGET).item() == pytest.approx(2 / 3)
    assert mask_iou(-torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 1.0  # both empty
    valid = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    assert mask_iou(logits, TARGET, valid).item() == pytest.approx(2 / 3)
    valid = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])  # hides the false positive
    assert mask_iou(logits, TARGET, valid).item() == pytest.approx(1.0)
    err = iou_mse_loss(torch.tensor([[0.5]]), torch.tensor([[2 / 3]]))
    assert err.item() == pytest.approx(1 / 36)


def test_pixels_outside_valid_are_ignored():
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 6, 6) > 0.5).float()
    valid = torch.ones_like(target)
    valid[..., :, 4:] = 0
    a = torch.randn(2, 1, 6, 6)
    b = a.clone()
    b[..., :, 4:] = 100.0  # anything outside valid
    for fn in (focal_loss, soft_dice_loss, bce_loss, mask_iou):
        torch.testing.assert_close(fn(a, target, valid), fn(b, target, valid))
        torch.testing.assert_close(fn(a[..., :4], target[..., :4]), fn(a, target, valid))
    logits = a.clone().requires_grad_(True)
    sam_loss(logits, torch.zeros(2, 1), target, valid).parts["loss"].backward()
    assert logits.grad[..., 4:].abs().sum() == 0 and logits.grad[..., :4].abs().sum() > 0
    nothing = sam_loss(a, torch.zeros(2, 1), target, torch.zeros_like(valid)).parts
    assert all(math.isfinite(v) for v in scalar_parts(nothing).values())


def test_sam_loss_total_hand_checked():
    out, selected = sam_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[0.5]]), TARGET)
    focal = 0.25 * LN2 / 2  # from test_focal_hand_checked
    dice = 0.4
    iou_mse = 0.25  # nothing predicted (logit 0 is not > 0): IoU 0, predicted 0.5
    assert out["loss"].item() == pytest.approx(20 * focal + dice + iou_mse)
    assert out["focal"].item() == pytest.approx(focal)
    assert out["dice"].item() == pytest.approx(dice)
    assert out["iou_mse"].item() == pytest.approx(iou_mse)
    assert out["mask_iou"].item() == 0.0
    assert selected.tolist() == [0]
    assert "bce" not in out
    parts = scalar_parts(out)
    assert set(parts) == {"loss", "mask", "focal", "dice", "iou_mse", "mask_iou"}
    assert all(isinstance(v, float) for v in parts.values())
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")
    with_bce = sam_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[0.5]]), TARGET,
                        focal_weight=0, dice_weight=0, bce_weight=1, iou_weight=0)
    assert with_bce.parts["loss"].item() == pytest.approx(LN2)


def test_low_res_logits_are_upsampled_bilinearly():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    low = torch.randn(1, 3, 2, 2)
    up = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_logits(low, (8, 8)), up)
    ref = sam_loss(up, torch.zeros(1, 3), target)
    out = sam_loss(low, torch.zeros(1, 3), target)
    torch.testing.assert_close(out.parts["loss"], ref.parts["loss"])
    with pytest.raises(InputError, match="label resolution"):
        focal_loss(low, target)


def _multimask_case():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1  # set 0: top half
    target[1, 0, :, :2] = 1  # set 1: left half
    logits = torch.full((2, 3, 4, 4), -5.0)
    logits[0, 2] = target[0, 0] * 10 - 5  # set 0's mask 2 is right
    logits[1, 1] = target[1, 0] * 10 - 5  # set 1's mask 1 is right
    logits[1, 0] = 5.0  # everything: wrong
    return logits.requires_grad_(True), torch.full((2, 3), 0.3, requires_grad=True), target


def test_multimask_backprops_only_the_lowest_loss_mask():
    logits, iou_pred, target = _multimask_case()
    out, selected = sam_loss(logits, iou_pred, target)
    assert selected.tolist() == [2, 1]
    assert selected.dtype == torch.int64
    out["loss"].backward()
    grad = logits.grad.abs().sum(dim=(2, 3))  # (P, M)
    assert (grad[0, 2] > 0) and (grad[1, 1] > 0)
    assert grad[0, :2].sum() == 0 and grad[1, 0] == 0 and grad[1, 2] == 0
    assert (iou_pred.grad != 0).all()  # default iou_on="all": every output
    # selected masks are exact: actual IoU 1
    assert out["mask_iou"].item() == pytest.approx(1.0)


def test_iou_on_selected_only():
    logits, iou_pred, target = _multimask_case()
    sam_loss(logits, iou_pred, target, iou_on="selected").parts["loss"].backward()
    nonzero = (iou_pred.grad != 0).tolist()
    assert nonzero == [[False, False, True], [False, True, False]]
    with pytest.raises(InputError, match="iou_on"):
        sam_loss(logits, iou_pred, target, iou_on="best")


def test_bf16_logits_give_float32_loss():
    out = sam_loss(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16),
                   torch.tensor([[0.5]], dtype=torch.bfloat16), TARGET).parts
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())


@pytest.mark.parametrize(
    ("logits", "iou", "target", "valid", "name"),
    [
        (torch.zeros(1, 2, 2), torch.zeros(1, 1), TARGET, None, "logits"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1), TARGET[0], None, "target"),
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, 1), TARGET, None, "target"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 3), TARGET, None, "iou_pred"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1), TARGET, torch.ones(1, 1, 3, 3), "valid"),
    ],
)
def test_shape_errors_name_the_argument(logits, iou, target, valid, name):
    with pytest.raises(InputError, match=f"^{name}: expected"):
        sam_loss(logits, iou, target, valid)


def test_mask_resolution_compares_with_area_averaged_labels():
    # 8 x 8 labels, 2 x 2 logits: each low-res pixel covers a 4 x 4 block
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, :4, :4] = 1.0  # block (0, 0) all ink
    target[0, 0, 4:, 4:6] = 1.0  # block (1, 1) half ink
    valid = torch.ones(1, 1, 8, 8)
    valid[0, 0, :4, 4:] = 0.0  # block (0, 1) outside the fragment: ignored
    logits = torch.tensor([[[[2.0, -9.0], [-1.0, 0.5]]]], requires_grad=True)
    out = sam_loss(logits, torch.zeros(1, 1), target, valid, resolution="mask").parts
    soft = torch.tensor([[[[1.0, 0.0], [0.0, 0.5]]]])
    keep = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    want = sam_loss(logits.detach(), torch.zeros(1, 1), soft, keep).parts
    assert out["loss"].item() == pytest.approx(want["loss"].item(), rel=1e-6)
    out["loss"].backward()
    assert logits.grad[0, 0, 0, 1] == 0  # the invalid block gets no gradient
    with pytest.raises(InputError, match="resolution"):
        sam_loss(logits, torch.zeros(1, 1), target, valid, resolution="half")


def test_mean_parts_over_rounds_then_weighted_by_sets():
    rounds = [{"loss": torch.tensor(1.0), "dice": torch.tensor(0.2)},
              {"loss": torch.tensor(3.0), "dice": torch.tensor(0.4)}]
    group = mean_parts(rounds)
    assert group["loss"].item() == pytest.approx(2.0) and group["dice"].item() == pytest.approx(0.3)
    other = {"loss": torch.tensor(5.0), "dice": torch.tensor(0.0)}
    both = mean_parts([group, other], weights=[3, 1])  # 3 sets, then 1 set
    assert both["loss"].item() == pytest.approx((3 * 2.0 + 5.0) / 4)
    assert isinstance(both["dice"], torch.Tensor)
