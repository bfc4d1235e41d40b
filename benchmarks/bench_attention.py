"""CPU entries for the encoder's attention: fused vs official, its modes, window size.

All on the vit_b encoder at 256 px (random seeded weights: speed does not depend on them), each
compared side by side in one process (``common.compare``); bf16 entries: ``bench_bf16.py``.

- ``encoder_attention_fused_vs_official_{train,infer}_{fp32,bf16}``: the encoder (batch 2),
  forward + backward or inference, segment_anything's attention against
  :mod:`scrollsam.model.attention` in its ``auto`` mode (on a CPU: SDPA with the bias as
  ``attn_mask`` for inference, the explicit product when gradients flow).
- ``encoder_attention_bias_vs_explicit_train_bf16``: why: SDPA's CPU backward against the
  explicit product. ``encoder_attention_fold_vs_bias_infer_fp32``: the folded form (what
  flash kernels take on a GPU) against the bias form on a CPU.
- ``encoder_windows_real_tokens_vs_padded_{train,infer}_{fp32,bf16}``: the fused encoder with
  official padded windowed blocks (qkv and proj over the 28 x 28 padded grid of four 14 x 14
  windows) against :class:`~scrollsam.model.attention.FusedBlock` (qkv and proj over the 16 x 16
  real tokens, the padding as qkv of a zero token): the default window 14.
- ``encoder_flops_real_tokens_vs_padded``: the same two layouts' forward FLOPs per image
  (``torch.utils.flop_counter`` on meta tensors) at 256 and 1024 px.
- ``encoder_256_window16_vs_14``: encoder inference with 16 x 16 windows (the 16 x 16 token
  grid in one window, no padding) against 14 x 14 ones (padded to 28 x 28: four windows).

Entries comparing bf16 are skipped on CPUs without bf16 units (``scrollsam.precision``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from common import compare, register

from scrollsam import build_model
from scrollsam.model.attention import FusedAttention, fuse_attention
from scrollsam.precision import cpu_has_bf16

SIZE = 256


def _needs_bf16() -> str | None:
    return None if cpu_has_bf16() else "needs a CPU with bf16 units (AVX512-BF16 / AMX)"


def _encoder(*, window: int = 14, attention: str = "fused", size: int = SIZE) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit_b", image_size=size, window_size=window,
                       attention=attention).sam.image_encoder


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _train_fn(enc: torch.nn.Module, x: torch.Tensor, bf16: bool):
    def run() -> None:
        enc.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = enc(x)  # (B, 256, 16, 16)
        out.float().square().mean().backward()
    return run


def _infer_fn(enc: torch.nn.Module, x: torch.Tensor, bf16: bool):
    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            enc(x)
    return run


def _pair(base_enc: torch.nn.Module, our_enc: torch.nn.Module, /, *, train: bool, bf16: bool,
          quick: bool, **settings: Any) -> dict[str, Any]:
    x = _images(2)
    fn = _train_fn if train else _infer_fn
    result = compare(fn(base_enc, x, bf16), fn(our_enc, x, bf16), repeats=1 if quick else 5)
    result["settings"] = {"model": "vit_b", "px": SIZE, "batch": 2, "window": 14,
                          "pass": "forward+backward" if train else "inference",
                          "dtype": "bf16" if bf16 else "fp32", **settings}
    return result


def _moded(mode: str) -> torch.nn.Module:
    enc = _encoder()
    fuse_attention(enc, mode=mode)
    return enc


def _register_four(prefix: str, about: str,
                   pair: Callable[[bool, bool, bool], dict[str, Any]]) -> None:
    """Register ``PREFIX_{train,infer}_{fp32,bf16}``, each ``pair(train, bf16, quick)``."""
    for train in (True, False):
        for bf16 in (False, True):
            register(f"{prefix}_{'train' if train else 'infer'}_{'bf16' if bf16 else 'fp32'}",
                     goal=None, needs=_needs_bf16 if bf16 else None,
                     about=f"vit_b encoder {'fwd+bwd' if train else 'inference'} at 256 px, "
                           f"{'bf16' if bf16 else 'fp32'}: {about}")(
                lambda quick, t=train, b=bf16: pair(t, b, quick))


def _padded_windows(size: int = SIZE) -> torch.nn.Module:
    """The fused encoder as it was before :class:`FusedBlock`: fused attention inside the
    official blocks, which pad the grid to whole windows before qkv."""
    enc = _encoder(attention="official", size=size)
    for block in enc.blocks:
        side = block.window_size or size // 16
        block.attn = FusedAttention(block.attn, grid=(side, side))
    return enc


_register_four("encoder_attention_fused_vs_official", "official attention vs fused",
               lambda train, bf16, quick: _pair(
                   _encoder(attention="official"), _encoder(attention="fused"), train=train,
                   bf16=bf16, quick=quick, baseline="official", ours="fused (auto mode)"))
_register_four("encoder_windows_real_tokens_vs_padded",
               "fused, qkv / proj over padded windows vs real tokens",
               lambda train, bf16, quick: _pair(
                   _padded_windows(), _encoder(), train=train, bf16=bf16, quick=quick,
                   baseline="fused attention in official blocks (padded qkv / proj)",
                   ours="FusedBlock (qkv / proj over real tokens)"))


@register("encoder_attention_bias_vs_explicit_train_bf16", goal=None, needs=_needs_bf16,
          about="vit_b encoder fwd+bwd at 256 px, bf16: explicit softmax vs SDPA with the bias")
def encoder_attention_bias_vs_explicit_train_bf16(quick: bool) -> dict[str, Any]:
    return _pair(_moded("explicit"), _moded("bias"), train=True, bf16=True, quick=quick,
                 baseline="explicit", ours="bias")


@register("encoder_attention_fold_vs_bias_infer_fp32", goal=None,
          about="vit_b encoder inference at 256 px, fp32: SDPA with the bias as mask vs folded")
def encoder_attention_fold_vs_bias_infer_fp32(quick: bool) -> dict[str, Any]:
    return _pair(_moded("bias"), _moded("fold"), train=False, bf16=False, quick=quick,
                 baseline="bias", ours="fold")


@register("encoder_256_window16_vs_14", goal=None,
          about="vit_b encoder inference at 256 px, fp32: 14 x 14 windows vs 16 x 16")
def encoder_256_window16_vs_14(quick: bool) -> dict[str, Any]:
    w14, w16 = _encoder(window=14), _encoder(window=16)
    x = _images(4)
    result = compare(_infer_fn(w14, x, False), _infer_fn(w16, x, False),
                     repeats=1 if quick else 5)
    result["settings"] = {"model": "vit_b", "px": SIZE, "batch": 4, "attention": "fused",
                          "dtype": "fp32", "baseline": "window 14", "ours": "window 16"}
    result["metrics"] = {"s_per_image_w14": result["baseline_s"] / 4,
                         "s_per_image_w16": result["ours_s"] / 4}
    return result


@register("encoder_flops_real_tokens_vs_padded", goal=None,
          about="vit_b encoder forward GFLOP per image (flop_counter, meta tensors): official "
                "padded windows vs FusedBlock, 256 and 1024 px, window 14")
def encoder_flops_real_tokens_vs_padded(quick: bool) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    metrics = {}
    for size in (256, 1024):
        for name, build in (("padded", _padded_windows), ("fused", _encoder)):
            with torch.device("meta"):
                enc = build(size=size)
                x = torch.empty(1, 3, size, size)
            with FlopCounterMode(display=False) as counter:
                enc(x)
            metrics[f"gflop_{size}_{name}"] = counter.get_total_flops() / 1e9
    return {"settings": {"model": "vit_b", "window": 14, "batch": 1, "pass": "forward"},
            "metrics": metrics}
