"""Checks at the model's public boundary: each names the argument, the expected form, the value.

These catch the seed's mistakes where they are made, instead of as a shape mismatch three calls
deep: points given as [B, 2], labels as floats, coordinates in 0..1 instead of pixels, raw 0..255
pixels instead of normalised images, or P prompt sets that do not say which image they are for.

Floating dtypes: the model's own (float32: scrollsam keeps fp32 weights) for images and mask
prompts, or a 16-bit float under ``torch.autocast`` on the model's device, which casts them for
every layer; embeddings may be 16-bit anywhere (the decoder adds them to its float32 prompt
embeddings, which promotes them). float64, or 16-bit images outside autocast, would fail deep
in torch ("mat1 and mat2 must have the same dtype").

Two kinds of check: form (type, rank, shape, dtype, device), always run, free; and values
(ranges, NaN, the label set), run with ``values=True``, the default. Reading values makes a GPU
wait for the host (``.item()``, ``.all()``, boolean indexing), so the training step, whose
prompts come from scrollsam's own samplers, passes ``values=False``; user data (the Predictor,
doctor, direct calls) keeps them.
"""

from __future__ import annotations

import torch

from scrollsam.errors import InputError, describe

# Normalised inputs are roughly zero-mean / unit-std; anything this large is raw pixel values.
MAX_NORMALISED = 100.0
HALF = (torch.float16, torch.bfloat16)  # what autocast computes in


def _tensor(name: str, t: object, *, ndim: int, form: str, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor {form}, got {describe(t)}")
    if t.ndim != ndim:
        raise InputError(f"{name}: expected {form}, got {describe(t)}")
    if t.device != device:
        raise InputError(f"{name}: expected a tensor on {device} (the model's device), "
                         f"got {describe(t)}")
    return t


def _has_autocast(kind: str) -> bool:
    try:
        return torch.amp.is_autocast_available(kind)
    except RuntimeError:  # a device type this torch build does not know
        return False


# Device types that have an autocast to ask about, read once at import (``meta`` has none).
# Asked inside a forward instead, torch 2.11's dynamo could not trace the question: a graph
# break at the start of every compiled encoder (``train.compile``).
AUTOCAST_DEVICE_TYPES = frozenset(
    kind for kind in ("cpu", "cuda", "mps", "xpu", "hpu", "xla", "mtia", "maia", "ipu", "hip",
                      "lazy", "privateuseone")
    if _has_autocast(kind))


def autocast_enabled(kind: str) -> bool | None:
    """Whether ``torch.autocast`` is on for device type ``kind`` here; None where the type has
    no autocast (``meta``). Traceable by ``torch.compile`` for the types known at import; any
    other (a renamed custom backend such as ``npu``) is asked at call time."""
    if kind in AUTOCAST_DEVICE_TYPES or (kind != "meta" and _has_autocast(kind)):  # set first
        return torch.is_autocast_enabled(kind)
    return None


def _autocast_on(device: torch.device) -> bool:
    """Whether ``torch.autocast`` is on for ``device``'s type here; True on a device with no
    autocast to ask (``meta``, where benchmarks/step_traffic.py emulates CUDA's)."""
    return autocast_enabled(device.type) is not False


def _check_dtype(name: str, t: torch.Tensor, *, dtype: torch.dtype, half: str) -> None:
    """InputError unless floating ``t`` has the model's ``dtype``, or is 16-bit where ``half``
    allows it: ``"always"`` or ``"autocast"`` (only under torch.autocast on its device)."""
    if t.dtype == dtype or (t.dtype in HALF and (
            half == "always" or (half == "autocast" and _autocast_on(t.device)))):
        return
    also = ("or 16-bit" if half == "always" else
            "or 16-bit under torch.autocast" if _autocast_on(t.device) else
            "16-bit only under torch.autocast")
    raise InputError(f"{name}: expected {dtype}, the model's dtype ({also}), got {describe(t)} "
                     f"(convert with .to({dtype}))")


def check_images(images: object, *, in_chans: int, image_size: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, values: bool = True) -> torch.Tensor:
    """Images: float [B, C, S, S] of the model's ``dtype`` (16-bit under autocast),
    normalised (roughly mean 0, std 1 per channel)."""
    form = f"float [B, {in_chans}, {image_size}, {image_size}] normalised images"
    t = _tensor("images", images, ndim=4, form=form, device=device)
    if not t.is_floating_point() or tuple(t.shape[1:]) != (in_chans, image_size, image_size):
        raise InputError(f"images: expected {form}, got {describe(t)}")
    if t.shape[0] == 0:
        raise InputError(f"images: expected {form} with B >= 1, got {describe(t)}")
    _check_dtype("images", t, dtype=dtype, half="autocast")
    if not values:
        return t
    peak = float(t.detach().abs().amax()) if t.numel() else 0.0
    if peak > MAX_NORMALISED or peak != peak:
        raise InputError(
            f"images: expected normalised values (about mean 0, std 1), got max |value| {peak:g}"
            " (raw 0..255 or 0..65535 pixels? normalise first, see scrollsam.data.views)"
        )
    return t


def check_embeddings(embeddings: object, *, grid: int, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Image embeddings: float [B, 256, S/16, S/16] from :meth:`SamSegmenter.encode`, of the
    model's ``dtype`` or 16-bit."""
    form = f"float [B, 256, {grid}, {grid}] image embeddings"
    t = _tensor("embeddings", embeddings, ndim=4, form=form, device=device)
    if not t.is_floating_point() or tuple(t.shape[1:]) != (256, grid, grid):
        raise InputError(f"embeddings: expected {form}, got {describe(t)}")
    _check_dtype("embeddings", t, dtype=dtype, half="always")
    return t


def check_points(points: object, *, image_size: int, device: torch.device,
                 values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Points: coords float [P, N, 2] as (x, y) pixels in [0, S) (pixel i spans [i, i + 1),
    as SAM reads them: it adds 0.5; box corners in [0, S]); labels int [P, N] of any integer
    dtype, returned as long: 1 ink, 0 background, -1 padding, 2 / 3 a box's top-left /
    bottom-right corner."""
    if not isinstance(points, (tuple, list)) or len(points) != 2:
        raise InputError(f"points: expected a (coords, labels) pair, got {describe(points)}")
    frame = f"(x, y) pixels of the {image_size} x {image_size} input frame"
    coords = _tensor("points coords", points[0], ndim=3,
                     form=f"float32 [P, N, 2] as {frame}", device=device)
    labels = _tensor("points labels", points[1], ndim=2,
                     form="int [P, N] with 1 ink, 0 background, -1 padding", device=device)
    if coords.shape[-1] != 2:
        raise InputError(f"points coords: expected [P, N, 2] as {frame}, got {describe(coords)}")
    if not coords.is_floating_point():
        raise InputError(f"points coords: expected float32 [P, N, 2] as {frame}, got "
                         f"{describe(coords)} (convert with .float())")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(f"points labels: expected an integer tensor [P, N] (1, 0, -1), got "
                         f"{describe(labels)} (convert with .long())")
    if tuple(labels.shape) != tuple(coords.shape[:2]):
        raise InputError(f"points labels: expected [P, N] = {list(coords.shape[:2])} to match "
                         f"coords, got {describe(labels)}")
    labels = labels.long()  # int8 / uint8 / int16 labels index embeddings as SAM's do
    if not values:
        return coords.float(), labels
    if labels.numel() and not bool(((labels >= -1) & (labels <= 3)).all()):
        bad = sorted({int(v) for v in labels.unique().tolist()} - {-1, 0, 1, 2, 3})
        raise InputError(f"points labels: expected values in {{-1, 0, 1}} (2 / 3: box "
                         f"corners), got {bad}")
    kept = labels >= 0
    real = coords.detach()[kept]  # (K, 2) the non-padding points
    if real.numel():
        if not bool(torch.isfinite(real).all()):
            raise InputError("points coords: expected finite pixel coordinates, got NaN/inf")
        lo, hi = float(real.amin()), float(real.amax())
        corner = (labels[kept] >= 2)[:, None]  # (K, 1): box corners may touch the far edge
        if lo < 0 or bool(((real >= image_size) & ~corner).any() | (real > image_size).any()):
            raise InputError(f"points coords: expected {frame} in [0, {image_size}) (box "
                             f"corners: [0, {image_size}]), got values in [{lo:g}, {hi:g}]")
        if hi <= 1.0 and image_size > 2 and bool((real != real.round()).any()):
            raise InputError(f"points coords: expected {frame}, got values in [{lo:g}, "
                             f"{hi:g}]: normalised 0..1 coordinates? multiply by {image_size}")
    return coords.float(), labels


def check_boxes(boxes: object, *, image_size: int, device: torch.device,
                values: bool = True) -> torch.Tensor:
    """Boxes: float [P, 4] as XYXY pixels of the input frame, x0 <= x1 and y0 <= y1."""
    form = f"float32 [P, 4] XYXY pixels of the {image_size} x {image_size} input frame"
    t = _tensor("boxes", boxes, ndim=2, form=form, device=device)
    if t.shape[-1] != 4 or not t.is_floating_point():
        raise InputError(f"boxes: expected {form}, got {describe(t)}")
    if values and t.numel():
        v = t.detach()
        if not bool(torch.isfinite(v).all()):
            raise InputError("boxes: expected finite pixel coordinates, got NaN/inf")
        if bool((v[:, 2] < v[:, 0]).any() | (v[:, 3] < v[:, 1]).any()):
            raise InputError(f"boxes: expected {form} with x0 <= x1 and y0 <= y1, got a box "
                             "with its corners swapped")
        lo, hi = float(v.amin()), float(v.amax())
        if lo < 0 or hi > image_size:
            raise InputError(f"boxes: expected {form} in [0, {image_size}], got values in "
                             f"[{lo:g}, {hi:g}]")
        if hi <= 1.0 and image_size > 2 and bool((v != v.round()).any()):
            raise InputError(f"boxes: expected {form}, got values in [{lo:g}, {hi:g}]: "
                             f"normalised 0..1 coordinates? multiply by {image_size}")
    return t.float()


def check_mask_inputs(mask_inputs: object, *, image_size: int, device: torch.device,
                      dtype: torch.dtype = torch.float32, values: bool = True) -> torch.Tensor:
    """Mask prompts: float logits [P, 1, S/4, S/4] (e.g. the previous round's low-res logits)
    of the model's ``dtype`` (16-bit under autocast), finite (checked with ``values``)."""
    m = image_size // 4
    form = f"float logits [P, 1, {m}, {m}]"
    t = _tensor("mask_inputs", mask_inputs, ndim=4, form=form, device=device)
    if not t.is_floating_point() or tuple(t.shape[1:]) != (1, m, m):
        raise InputError(f"mask_inputs: expected {form}, got {describe(t)}")
    _check_dtype("mask_inputs", t, dtype=dtype, half="autocast")
    if values and t.numel() and not bool(torch.isfinite(t.detach()).all()):
        raise InputError("mask_inputs: expected finite logits, got NaN/inf")
    return t


def resolve_image_index(image_index: object, *, num_sets: int | None, num_images: int,
                        device: torch.device, values: bool = True) -> torch.Tensor:
    """Which image each prompt set belongs to: long [P] with values in [0, B).

    Default (``None``): set p -> image p when P == B (or when there is no prompt, P := B); all
    sets -> image 0 when B == 1. Any other P needs an explicit ``image_index``.
    """
    if image_index is None:
        if num_sets is None or num_sets == num_images:
            return torch.arange(num_images, device=device)
        if num_images == 1:
            return torch.zeros(num_sets, dtype=torch.long, device=device)
        raise InputError(
            f"image_index: {num_sets} prompt sets for {num_images} images; pass image_index "
            f"[{num_sets}] saying which image each prompt set belongs to"
        )
    form = f"int [P] with values in [0, {num_images})"
    t = _tensor("image_index", image_index, ndim=1, form=form, device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise InputError(f"image_index: expected {form}, got {describe(t)}")
    if num_sets is not None and t.shape[0] != num_sets:
        raise InputError(f"image_index: expected one entry per prompt set ({num_sets}), got "
                         f"{describe(t)}")
    if values and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_images):
        raise InputError(f"image_index: expected {form}, got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t.long()
