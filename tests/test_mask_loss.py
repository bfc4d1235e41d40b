"""The chunked loss sums against the per-pixel autograd terms: values, gradients, memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from scrollsam import mask_loss
from scrollsam.losses import (
    bce_loss,
    focal_loss,
    mask_iou,
    sam_loss,
    soft_dice_loss,
    upsample_logits,
)
from scrollsam.mask_loss import mask_sums


def _case(P: int = 5, M: int = 3, low: int = 6, up: int = 4, *, soft: bool = False,
          valid: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Logits [P, M, low, low] (some exactly 0: the IoU threshold), target and valid
    [P, 1, low * up, low * up]; one set with no valid pixels, one with no ink."""
    g = torch.Generator().manual_seed(seed)
    size = low * up
    logits = (torch.randn(P, M, low, low, generator=g) * 3).to(dtype)
    logits[0, 0, 0, :3] = 0.0
    target = torch.rand(P, 1, size, size, generator=g)
    target = target if soft else (target > 0.6).float()
    target[1] = 0.0  # no ink
    mask = (torch.rand(P, 1, size, size, generator=g) > 0.2).float() if valid else None
    if mask is not None:
        mask[2] = 0.0  # nothing valid
    return logits.requires_grad_(), target, mask


def _reference(logits, target, valid, *, alpha, gamma):
    """The per-pixel terms of scrollsam.losses on upsampled logits, as sam_loss used them."""
    up = upsample_logits(logits.float(), tuple(target.shape[-2:]))
    return {"focal": focal_loss(up, target, valid, alpha=alpha, gamma=gamma),
            "dice": soft_dice_loss(up, target, valid), "bce": bce_loss(up, target, valid),
            "iou": mask_iou(up, target, valid)}


def _fused(logits, target, valid, *, alpha, gamma, chunk=None):
    s = mask_sums(logits, target, valid, alpha=alpha, gamma=gamma, bce=True, chunk=chunk)
    union = s.predicted + s.truth - s.hit
    return {"focal": s.focal, "dice": 1 - (2 * s.inter + 1) / (s.prob + s.ink + 1),
            "bce": s.bce,
            "iou": torch.where(union > 0, s.hit / union.clamp(min=1), torch.ones_like(union))}


def _combined(parts, weights):
    """One scalar that weighs every differentiable part differently per (set, mask)."""
    return sum((parts[k] * w).sum() for k, w in weights.items())


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.0), (0.25, 1.5),
                                              (0.1, 3.0)])
@pytest.mark.parametrize("chunk", [None, 1, 2 * 3 * 24 * 24])  # default, a set, 2 of 5 sets
def test_values_and_gradients_match_the_autograd_terms(alpha, gamma, chunk):
    logits, target, valid = _case()
    weights = {k: torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
               for k in ("focal", "dice", "bce")}
    want = _reference(logits, target, valid, alpha=alpha, gamma=gamma)
    (want_grad,) = torch.autograd.grad(_combined(want, weights), logits)
    got = _fused(logits, target, valid, alpha=alpha, gamma=gamma, chunk=chunk)
    (got_grad,) = torch.autograd.grad(_combined(got, weights), logits)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    assert got_grad[2].abs().sum() == 0  # the set with no valid pixel learns nothing


@pytest.mark.parametrize("kind", ["soft", "no_valid", "same_size", "bf16"])
def test_other_inputs_match(kind):
    """Soft targets (resolution "mask"), no valid mask, logits at the target's size (a mask
    head's) and bf16 logits (autocast)."""
    logits, target, valid = _case(
        soft=kind == "soft", valid=kind != "no_valid", up=1 if kind == "same_size" else 4,
        dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    weights = {k: torch.rand(5, 3, generator=torch.Generator().manual_seed(2))
               for k in ("focal", "dice", "bce")}
    want = _reference(logits, target, valid, alpha=0.25, gamma=2.0)
    (want_grad,) = torch.autograd.grad(_combined(want, weights), logits)
    got = _fused(logits, target, valid, alpha=0.25, gamma=2.0, chunk=1)
    (got_grad,) = torch.autograd.grad(_combined(got, weights), logits)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert got_grad.dtype == logits.dtype
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-4, atol=1e-7)


def test_sam_loss_keeps_nothing_full_size_for_backward():
    """The old autograd terms kept several [P, M, H, W] float32 tensors per call (736 MiB for
    8 sets of 3 masks at 1024 px); now only the low-resolution logits and two truth planes."""
    logits, target, valid = _case(P=4, M=3, low=8, up=4)
    iou = torch.zeros(4, 3, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sam_loss(logits, iou, target, valid).parts["loss"]
    full = logits.shape[0] * logits.shape[1] * target.shape[-1] * target.shape[-2] * 4
    assert sum(saved.values()) <= logits.numel() * 4 + 2 * target.numel() * 4 + 1024
    assert sum(saved.values()) < full
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_under_bf16_autocast_the_sums_stay_float32():
    """Autocast is off inside: a bf16 ``bmm`` would round every sum (counts past 256 too)."""
    logits, target, valid = _case(P=3, M=2, low=16, up=4)
    want = _reference(logits, target, valid, alpha=0.25, gamma=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _fused(logits, target, valid, alpha=0.25, gamma=2.0)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_only_the_loss_carries_a_graph():
    logits, target, valid = _case(P=3, M=3)
    parts = sam_loss(logits, torch.zeros(3, 3, requires_grad=True), target, valid).parts
    assert parts["loss"].requires_grad
    assert not any(v.requires_grad for k, v in parts.items() if k != "loss"), parts


def _sums_and_grad(logits, target, valid, **kw):
    x = logits.detach().clone().requires_grad_()
    s = mask_sums(x, target, valid, **kw)
    (s.focal.sum() + s.bce.sum() + 0.1 * s.inter.sum() + 0.01 * s.prob.sum()).backward()
    return s, x.grad


def _skip_without_compile(backend: str) -> None:
    from scrollsam.model.compile import compile_unavailable

    reason = compile_unavailable("cpu", backend)
    if reason is not None:
        pytest.skip(reason)


@contextmanager
def _fresh_dynamo() -> Iterator[Callable[[], int]]:
    """dynamo started afresh; yields a function that counts the graphs compiled since, and
    starts dynamo afresh again on leaving (other tests' limits of 8 graphs stay untouched)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    try:
        yield lambda: int(counters["stats"]["unique_graphs"])
    finally:
        dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_pixel_terms_give_the_eager_sums_and_gradients(backend):
    _skip_without_compile(backend)
    logits, target, valid = _case(P=4, M=3)
    for chunk in (None, 3 * 24 * 24):  # all sets in one chunk; one set a chunk
        ref, ref_grad = _sums_and_grad(logits, target, valid, bce=True, chunk=chunk)
        got, grad = _sums_and_grad(logits, target, valid, bce=True, chunk=chunk,
                                   compiled=backend)
        for name, value in ref._asdict().items():
            assert torch.allclose(getattr(got, name), value, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_compiled_pixel_terms_take_any_number_of_sets_in_four_graphs_at_most():
    """The sets in a chunk change with each step's prompt kinds: that size is dynamic, and
    one set, and each mask count, get graphs of their own (2 x 2, for sums and gradients)."""
    _skip_without_compile("aot_eager")
    with _fresh_dynamo() as graphs:
        for P, M in [(3, 3), (5, 3), (1, 3), (4, 1), (1, 1), (7, 3), (2, 1), (6, 3), (1, 1)]:
            logits, target, valid = _case(P=max(P, 3), M=M, seed=P)
            _sums_and_grad(logits[:P], target[:P], valid[:P], compiled="aot_eager")
        assert graphs() == 8  # sums and gradient, four each


def test_compiled_terms_at_mask_resolution_make_no_extra_graphs():
    """At mask resolution float32 logits need no upsampling: the terms still get a tensor of
    their own, not the saved logits (whose strides, view and grad made more graphs)."""
    _skip_without_compile("aot_eager")
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(4, 1, 16, 16, generator=g) > 0.5).float()
    four = torch.randn(4, 4, 16, 16, generator=g)  # a decoder's four masks; multimask keeps 3

    def call(logits: torch.Tensor) -> None:
        s = mask_sums(logits, target[:logits.shape[0]], torch.ones_like(target)[:logits.shape[0]],
                      compiled="aot_eager")
        if logits.requires_grad:
            s.focal.sum().backward()

    with _fresh_dynamo() as graphs:
        call(four[:, 1:].contiguous().requires_grad_())  # contiguous, with grad
        call(four.clone().requires_grad_()[:, 1:])  # a strided view, as multimask slices are
        call(four[:, 1:].contiguous())  # no grad
        call(four[:3, 1:].contiguous().requires_grad_())  # fewer sets: dynamic
        assert graphs() == 2  # sums and gradient, once each


@pytest.mark.parametrize("backend", [None, "inductor"])
def test_sums_as_reductions_give_the_products_sums_and_gradients(backend, monkeypatch):
    """Off the CPU the pixel sums are a product and a sum (cuBLAS ran the thin ``bmm`` far
    below bandwidth on an H100), eager or compiled: the same values and gradients."""
    if backend:
        _skip_without_compile(backend)
    logits, target, valid = _case(P=4, M=3)
    ref, ref_grad = _sums_and_grad(logits, target, valid, bce=True, chunk=2 * 3 * 24 * 24)
    monkeypatch.setattr(mask_loss, "PRODUCT_SUMS_ON", ())
    monkeypatch.setattr(mask_loss, "_COMPILED", {})  # compile the reduction form afresh
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with _fresh_dynamo() as graphs:
        got, grad = _sums_and_grad(logits, target, valid, bce=True, chunk=2 * 3 * 24 * 24,
                                   compiled=backend)
        # compiled: one graph each for the sums and their gradient (not a silent eager run)
        assert graphs() == (2 if backend else 0)
    assert not calls  # no matrix product left
    for name, value in ref._asdict().items():
        torch.testing.assert_close(getattr(got, name), value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
