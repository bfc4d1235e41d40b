"""The SAM mask loss's sums over pixels, a few sets at a time, no per-mask tensor kept for backward.

:func:`scrollsam.losses.sam_loss` compares every (set, mask) with the truth at label resolution:
the decoder's [P, M, S/4, S/4] logits are upsampled to [P, M, S, S] (16x the pixels), and
focal, dice, BCE and IoU are per-pixel terms summed over the valid pixels. Written as autograd
ops (:func:`~scrollsam.losses.focal_loss` and the others) each call kept several S x S float32
tensors per set and per mask for backward: 736 MiB for 8 sets of 3 masks at 1024 px
(``benchmarks/bench_loss.py``), in every corrective round until the step's backward.

:func:`mask_sums` computes the same sums in a custom autograd function that works on a few sets
at a time (``chunk`` pixels): forward upsamples a chunk, reduces it to sums and drops it;
backward recomputes the chunk's upsampled logits from the low-resolution ones and writes the
gradient of every sum into one per-pixel gradient, which the upsampling's own backward takes
back to [c, M, h, w]. Kept for backward: the logits and two planes per set, t w and w. Sums are
products with those planes (:func:`_weighted_sums`: ``bmm`` on a CPU, a reduction that
``torch.compile`` fuses on a GPU). Values and gradients equal the per-pixel terms' to float32
rounding (``tests/test_mask_loss.py``).

Per pixel, with x the upsampled logit, p = sigmoid(x), t the target (0 / 1, or an ink fraction
at ``resolution="mask"``), w the valid mask (0 / 1), ce = BCE(x, t) = log(1 + e^x) - x t and
m = 1 - p_t = p (1 - 2t) + t, the function sums, per (set, mask):

* f = ce m^gamma against t w and w (a_t w = (2 alpha - 1) t w + (1 - alpha) w, so the focal
  term with its alpha is a combination of the two);  df/dx = (p - t) m^gamma +
  gamma ce m^(gamma - 1) p (1 - p)(1 - 2t);
* ce against w (BCE, when asked);  d/dx = p - t;
* p against t w and w (dice);  dp/dx = p (1 - p);
* the thresholded pixels x > 0 against w and (t > 0.5) w (IoU; no gradient).

Every sum weighs its pixels by t w or w, so t enters only as t w: off the valid mask the terms
are wrong and weigh 0 (finite for the focal exponents the config offers, gamma >= 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["CHUNK", "MaskSums", "mask_sums", "pixel_terms", "upsample_logits"]

CHUNK = {"cpu": 1 << 22, "cuda": 1 << 25}  # label-resolution pixels per chunk (P * M * H * W):
# on a CPU temporaries of 16 MB (larger ones measured slower); on a GPU 128 MB ones, so that
# each kernel fills the device and backward's few temporaries stay near 1 GB (not timed yet)
PRODUCT_SUMS_ON = ("cpu",)  # device types whose pixel sums are batched matrix products
# (:func:`_weighted_sums`); elsewhere a product and a sum


class MaskSums(NamedTuple):
    """Per-(set, mask) loss terms [P, M] (float32) and per-set truth [P, 1]."""

    focal: Tensor  # mean focal term over the set's valid pixels (a_t included)
    bce: Tensor  # mean BCE over them (zeros unless asked for)
    inter: Tensor  # sum of p t over them: dice's intersection
    prob: Tensor  # sum of p: dice's prediction sum
    ink: Tensor  # [P, 1] sum of t: dice's truth sum (no gradient)
    hit: Tensor  # pixels x > 0 on ink (t > 0.5): IoU's intersection (no gradient)
    predicted: Tensor  # pixels x > 0 (no gradient)
    truth: Tensor  # [P, 1] ink pixels (t > 0.5) (no gradient)


def mask_sums(logits: Tensor, target: Tensor, valid: Tensor | None = None, *,
              alpha: float = 0.25, gamma: float = 2.0, bce: bool = False,
              chunk: int | None = None, compiled: str | None = None) -> MaskSums:
    """The loss terms of logits [P, M, h, w] (any float dtype; upsampled bilinearly to the
    target's size when smaller, ``align_corners=False``) against target [P, 1, H, W] inside
    valid [P, 1, H, W] (> 0.5; None: every pixel). ``focal``, ``bce``, ``inter`` and ``prob``
    are differentiable in ``logits``; ``bce`` is computed only when asked. ``chunk``: pixels
    per chunk (default :data:`CHUNK` for the device); a chunk holds whole sets. ``compiled``:
    the ``torch.compile`` backend that fuses the per-pixel terms (:func:`pixel_terms`;
    ``train.compile``), None: eager."""
    w = torch.ones_like(target, dtype=torch.float32) if valid is None else (valid > 0.5).float()
    planes = torch.cat([target.float() * w, w], dim=1)  # (P, 2, H, W): t w, w
    per_set = logits.shape[1] * planes.shape[-2] * planes.shape[-1]
    limit = chunk or CHUNK.get(logits.device.type, CHUNK["cuda"])
    sums = _Sums.apply(logits, planes, gamma, bce, max(1, limit // per_set),
                       compiled)  # (P, 7, M)
    f_tw, f_w, ce_w, p_tw, p_w = sums[:, :5].unbind(1)  # each (P, M), differentiable
    on_w, on_ink = sums[:, 5:].detach().unbind(1)  # the IoU counts: no gradient
    n = w.sum(dim=(2, 3)).clamp(min=1.0)  # (P, 1) valid pixels
    focal = ((2 * alpha - 1) * f_tw + (1 - alpha) * f_w) / n if alpha >= 0 else f_w / n
    tw = planes[:, 0]  # (P, H, W)
    return MaskSums(focal, ce_w / n, p_tw, p_w, tw.sum(dim=(1, 2))[:, None], on_ink, on_w,
                    (tw > 0.5).sum(dim=(1, 2))[:, None].float())


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``[P, M, h, w]`` logits to ``[P, M, *size]`` (no-op if equal), with
    ``align_corners=False`` as SAM's own ``postprocess_masks``. The one upsampling rule of
    decoder logits: the loss, the model's :meth:`~SamSegmenter.upscale` and the corrective
    point sampler all use it (through :mod:`scrollsam.losses`, which re-exports it)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _power(m: Tensor, gamma: float) -> Tensor:
    """m ** gamma, by multiplication for the usual 1 and 2."""
    return m if gamma == 1 else m * m if gamma == 2 else m.pow(gamma)


def _ce(x: Tensor, t: Tensor) -> Tensor:
    """BCE with logits, x [c, M, H, W] against t [c, 1, H, W]: log(1 + e^x) - x t."""
    return torch.addcmul(F.softplus(x), x, t, value=-1)


def pixel_terms(backend: str | None) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """The per-pixel parts of forward and backward (:func:`_pixel_sums`, :func:`_pixel_grad`):
    eager for None, else compiled with ``backend`` (once per process and backend).

    The number of sets in a chunk changes with each step's prompt kinds, so that size is
    dynamic and every other stays static: each function has a graph per mask count and for
    one set or several (dynamo specialises a size of 1), four for the default prompts. (All
    sizes dynamic made more: dynamo adds guards when two sizes happen to be equal.) The
    upsampling and its backward stay outside: that backward operator does not trace with
    symbolic sizes (torch 2.11)."""
    if backend is None:
        return _pixel_sums, _pixel_grad
    if backend not in _COMPILED:
        _COMPILED[backend] = (_sets_dynamic(torch.compile(_pixel_sums, backend=backend)),
                              _sets_dynamic(torch.compile(_pixel_grad, backend=backend)))
    return _COMPILED[backend]


def _sets_dynamic(compiled: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``compiled`` called with its tensors' first size (the sets) dynamic, the rest static,
    and each tensor one of its own (detached, contiguous): at mask resolution float32 logits
    reach the terms as views of the saved logits, whose strides, base and grad dynamo would
    guard, compiling more graphs."""
    import torch._dynamo as dynamo

    def call(*args: object) -> Tensor:
        args = tuple(a.detach().contiguous() if isinstance(a, Tensor) else a for a in args)
        for t in args:
            if isinstance(t, Tensor):
                dynamo.maybe_mark_dynamic(t, 0)
                for dim in range(1, t.dim()):
                    dynamo.mark_static(t, dim)
        return compiled(*args)

    return call


_COMPILED: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {}


def _chunk_sums(low: Tensor, planes: Tensor, *, gamma: float, bce: bool,
                pixels: Callable[..., Tensor]) -> Tensor:
    """Low [c, M, h, w] logits of c whole sets and their planes [c, 2, H, W] (t w, w) ->
    sums [c, 7, M] float32: ``pixels`` (:func:`_pixel_sums`, or it compiled) of the
    upsampled logits."""
    x = upsample_logits(low.float(), tuple(planes.shape[-2:]))  # (c, M, H, W)
    return pixels(x, planes, gamma, bce)


def _pixel_sums(x: Tensor, planes: Tensor, gamma: float, bce: bool) -> Tensor:
    """Upsampled logits x [c, M, H, W] and planes [c, 2, H, W] (t w, w) -> sums [c, 7, M]:
    f against t w and w, ce against w (0 unless ``bce``), p against t w and w, x > 0 against
    w and (t > 0.5) w."""
    c, M = x.shape[:2]
    tw = planes[:, :1]  # (c, 1, H, W)
    cols = torch.cat([planes, tw > 0.5], dim=1).flatten(2)  # (c, 3, H * W): t w, w, ink w
    p = torch.sigmoid(x)
    ce = _ce(x, tw)
    f = ce * _power(torch.addcmul(tw, p, 1 - 2 * tw), gamma) if gamma else ce
    out = [_weighted_sums(cols[:, :2], f.flatten(2)),  # (c, 2, M)
           _weighted_sums(cols[:, 1:2], ce.flatten(2)) if bce else x.new_zeros(c, 1, M),
           _weighted_sums(cols[:, :2], p.flatten(2)),
           _weighted_sums(cols[:, 1:], (x > 0).float().flatten(2))]
    return torch.cat(out, dim=1)  # (c, 7, M)


def _weighted_sums(weights: Tensor, values: Tensor) -> Tensor:
    """Weights [c, a, L] and values [c, M, L] (L pixels) -> [c, a, M], the sums over pixels of
    weight x value. On a CPU a batched matrix product (``bmm``: the fastest form measured
    there); elsewhere a product and a sum, which ``torch.compile`` fuses with the terms into
    one pass over the pixels (eager, it makes a [c, a, M, L] temporary: a x the chunk, at most
    256 MiB on CUDA, read once). On an H100 cuBLAS ran a product this thin (a = 2, M = 3, L a
    million pixels) in a slow small-N float32 kernel (README, Performance), where one pass over
    its inputs is all the work there is."""
    if weights.device.type in PRODUCT_SUMS_ON:
        return torch.bmm(weights, values.transpose(1, 2))
    return (weights[:, :, None] * values[:, None]).sum(-1)


def _chunk_grad(low: Tensor, planes: Tensor, grad: Tensor, *, gamma: float, bce: bool,
                pixels: Callable[..., Tensor]) -> Tensor:
    """The gradient of sum(grad * :func:`_chunk_sums`) in low [c, M, h, w] (float32), for grad
    [c, 7, M] (the counts' rows are ignored): ``pixels`` (:func:`_pixel_grad`, or it
    compiled) of the upsampled logits, taken back through the upsampling."""
    size = tuple(planes.shape[-2:])
    gx = pixels(upsample_logits(low.float(), size), planes, grad, gamma, bce)
    if size == tuple(low.shape[-2:]):
        return gx
    return torch.ops.aten.upsample_bilinear2d_backward(gx, list(size), list(low.shape), False,
                                                       None, None)  # (c, M, h, w)


def _pixel_grad(x: Tensor, planes: Tensor, grad: Tensor, gamma: float, bce: bool) -> Tensor:
    """The gradient [c, M, H, W] of sum(grad * :func:`_pixel_sums`) in the upsampled logits x
    [c, M, H, W]. Nothing passed in is written: the in-place steps work on temporaries made
    here."""
    tw, w = planes[:, :1], planes[:, 1:]  # each (c, 1, H, W)
    g = grad.transpose(1, 2)[..., None, None]  # (c, M, 7, 1, 1)
    # temporaries are reused in place: at most about seven chunk-sized tensors live at once
    ce = _ce(x, tw) if gamma else None
    p = torch.sigmoid(x)
    del x
    slope = torch.addcmul(p, p, p, value=-1)  # dp / dx = p (1 - p)
    gx = slope * torch.addcmul(g[:, :, 3] * tw, g[:, :, 4], w)  # (c, M, H, W): dice's sums
    m = torch.addcmul(tw, p, 1 - 2 * tw) if gamma else None  # 1 - p_t
    d = p.sub_(tw)  # d ce / dx = p - t
    if gamma:  # d (ce m^gamma) / dx = d m^gamma + gamma ce m^(gamma - 1) dm / dx
        dm = slope.mul_(1 - 2 * tw)  # dm / dx = p (1 - p)(1 - 2t)
        df = ce.mul_(dm).mul_(gamma).addcmul_(d, m)  # m^(gamma - 1) (d m + gamma ce dm)
        del dm
        if gamma != 1:
            df.mul_(_power(m, gamma - 1))
        del m
    else:
        df = d
    gx.addcmul_(torch.addcmul(g[:, :, 0] * tw, g[:, :, 1], w), df)
    if bce:
        gx.addcmul_(g[:, :, 2] * w, d)
    return gx


def _float32(like: Tensor) -> torch.autocast:
    """Autocast off on ``like``'s device: the sums stay float32 products, as the loss is
    specified (under an enclosing bf16 autocast the ``bmm`` would round every pixel's term)."""
    return torch.autocast(like.device.type, enabled=False)


class _Sums(torch.autograd.Function):
    """logits [P, M, h, w], planes [P, 2, H, W] -> :func:`_chunk_sums` of every set [P, 7, M],
    chunk by chunk of ``step`` sets; differentiable in its first five rows."""

    @staticmethod
    def forward(ctx, logits: Tensor, planes: Tensor, gamma: float, bce: bool,
                step: int, compiled: str | None) -> Tensor:
        settings = dict(gamma=gamma, bce=bce)
        forward, backward = pixel_terms(compiled)
        with _float32(logits):
            sums = torch.cat([_chunk_sums(logits[lo:lo + step], planes[lo:lo + step],
                                          **settings, pixels=forward)
                              for lo in range(0, logits.shape[0], step)])
        ctx.save_for_backward(logits, planes)
        ctx.settings, ctx.step, ctx.pixels = settings, step, backward
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        logits, planes = ctx.saved_tensors
        step, grad = ctx.step, grad.float()
        with _float32(logits):
            parts = [_chunk_grad(logits[lo:lo + step], planes[lo:lo + step], grad[lo:lo + step],
                                 **ctx.settings, pixels=ctx.pixels)
                     for lo in range(0, logits.shape[0], step)]
        return torch.cat(parts).to(logits.dtype), None, None, None, None, None
