"""The image encoder's patch embedding as one matrix product instead of a convolution.

SAM's ``PatchEmbed`` is a convolution whose kernel equals its stride (16 x 16, no padding): each
output token is the product of one 16 x 16 patch of every channel with the weight. So
cutting the image into patches ([B, C, H, W] -> [B, H/16, W/16, C * 256], a reshape and one
copy) and multiplying by the weight as a [E, C * 256] matrix computes the same function, with
the token-major output the encoder wants ([B, H/16, W/16, E], what the official ``permute``
gives). On the CPU the product is several times faster in bf16 training
(``benchmarks/README.md``, "Numbers behind choices in the code"). On GPUs the profiles show
cuDNN running the encoder's convolutions in slow generic kernels, but not which convolution
each served: the product is not timed there yet.
:func:`fuse_patch_embed` swaps it in where the fused attention is
(``build_model(attention="fused")``); parameters keep the official ``patch_embed.proj`` names
and shapes, so checkpoints and :mod:`scrollsam.model.adapt` see no change. One difference: an
image that is not a whole number of patches is an error here, where the convolution drops
the remainder (the encoder's position embedding fixes the size anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scrollsam.model.checks import autocast_enabled

__all__ = ["PatchProduct", "fuse_patch_embed"]


class PatchProduct(nn.Module):
    """An official ``PatchEmbed`` (its ``proj`` convolution taken over, kernel = stride, no
    padding) computed as a matrix product: images [B, C, H, W] (H, W multiples of the patch
    side P) -> tokens [B, H / P, W / P, E]."""

    def __init__(self, official: nn.Module) -> None:
        super().__init__()
        conv = official.proj
        if (conv.kernel_size != conv.stride or any(conv.padding) or conv.groups != 1
                or any(d != 1 for d in conv.dilation)):
            raise ValueError(f"PatchProduct: expected a convolution whose kernel is its stride "
                             f"with no padding, got kernel {conv.kernel_size}, stride "
                             f"{conv.stride}, padding {conv.padding}")
        self.proj = conv

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ph, pw = self.proj.kernel_size
        if h % ph or w % pw:  # the convolution would drop the remainder
            raise ValueError(f"PatchProduct: image {h} x {w} is not a whole number of "
                             f"{ph} x {pw} patches")
        kind = x.device.type  # (``meta`` has no autocast to ask: benchmarks/step_traffic.py)
        if autocast_enabled(kind):
            x = x.to(torch.get_autocast_dtype(kind))  # cut the patches from the image autocast
            # would cast: half the bytes copied
        patches = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, h // ph, w // pw, c * ph * pw)  # (B, H/P, W/P, C P P)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (E, C P P), same order
        return F.linear(patches, weight, self.proj.bias)  # (B, H/P, W/P, E)


def fuse_patch_embed(encoder: nn.Module) -> bool:
    """Swap a SAM ``ImageEncoderViT``'s ``patch_embed`` for a :class:`PatchProduct` (its
    convolution shared, in place); False if it already is one."""
    if isinstance(encoder.patch_embed, PatchProduct):
        return False
    encoder.patch_embed = PatchProduct(encoder.patch_embed)
    return True
