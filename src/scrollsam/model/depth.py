"""A learned depth encoder: a band of x-ray slices -> SAM's C input channels + full-res features.

The ink in the x-ray volume is a faint density change a slice or two from a papyrus surface
whose depth drifts across the fragment and differs between scrolls. Three fixed slices miss it
where the surface moves, and a ViT patch embedding must learn depth from a single linear layer.
:class:`DepthEncoder` does the depth work before SAM, cheaply (one core-second budget matters
on a CPU), and in a way that does not care *which* slice holds the signal:

1. every slice goes through the same small 2D convolution (slices folded into the batch, so this
   is a 3D convolution with a (1, 3, 3) kernel and shared weights): local smoothing and texture;
2. a convolution along z only (kernel ``depth_kernel``) finds local density bumps in each
   pixel's depth profile;
3. max and mean over z pool them: the result is the same wherever in the band the bump lies
   (shift-invariant in depth), which is what lets a model move to a scroll whose ink sits
   deeper or shallower;
4. 2D convolutions (dilations 1 and 2) combine the pooled maps over space into ``features``
   full-resolution channels, and a 1 x 1 convolution makes the C channels SAM's patch embedding
   sees (C = 3 keeps an official checkpoint's RGB patch filter as it is).

Shapes: input ``[B, Z, S, S]`` (Z = band width, standardised slices as the slice views give
them, axis order (z, y, x)), outputs ``image [B, C, S, S]`` and ``features [B, F, S, S]``.
The band's jitter in depth during training comes from the view (``data.depth_shift``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scrollsam.errors import InputError

SLICE_CHANNELS = 4  # maps of each slice made by the shared 2D convolution ("pool")
KINDS = ("mix", "pool")


class DepthEncoder(nn.Module):
    """Slices [B, Z, S, S] -> (image [B, out_chans, S, S], features [B, features, S, S])."""

    def __init__(
        self,
        band: int,
        *,
        out_chans: int = 3,
        features: int = 16,
        width: int = 8,
        depth_kernel: int = 5,
        kind: str = "mix",
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"depth encoder kind: expected one of {', '.join(KINDS)}, got "
                             f"{kind!r}")
        self.kind = kind
        for name, value in (("band", band), ("out_chans", out_chans), ("features", features),
                            ("width", width), ("depth_kernel", depth_kernel)):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"depth encoder {name}: expected a positive int, got {value!r}")
        self.band = band
        self.out_chans = out_chans
        self.features = features
        if kind == "mix":  # slices as channels: a learned mixing, then dilated 2D convolutions
            self.mix = nn.Sequential(
                nn.Conv2d(band, features, 3, padding=1), nn.GELU(),
                nn.Conv2d(features, features, 3, padding=2, dilation=2), nn.GELU(),
                nn.Conv2d(features, features, 3, padding=4, dilation=4), nn.GELU(),
            )
            self.to_image = nn.Conv2d(features, out_chans, 1)
            return
        self.slice_conv = nn.Conv2d(1, SLICE_CHANNELS, 3, padding=1)  # shared over slices
        # along z only: a (k, 1) kernel over the (z, pixel) plane of [B, c, Z, S*S]
        self.depth_conv = nn.Conv2d(SLICE_CHANNELS, width, (depth_kernel, 1),
                                    padding=(depth_kernel // 2, 0))
        self.spatial = nn.Sequential(
            nn.Conv2d(2 * width, features, 3, padding=1), nn.GELU(),
            nn.Conv2d(features, features, 3, padding=2, dilation=2), nn.GELU(),
        )
        self.to_image = nn.Conv2d(features, out_chans, 1)

    def forward(self, slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``slices`` [B, Z, S, S] -> (image [B, C, S, S], features [B, F, S, S])."""
        if slices.ndim != 4 or slices.shape[1] != self.band:
            raise InputError(f"depth encoder input: expected [B, {self.band}, S, S] "
                             f"(a band of {self.band} slices), got {list(slices.shape)}")
        if self.kind == "mix":
            # channels last (the memory order, not the shape): oneDNN's and cuDNN's faster
            # convolutions; the x-ray demo's bf16 CPU step 153 -> 139 ms (README, benchmarks)
            feats = self.mix(slices.contiguous(memory_format=torch.channels_last))  # (B, F, S, S)
            return self.to_image(feats), feats
        b, z, h, w = slices.shape
        x = self.slice_conv(slices.reshape(b * z, 1, h, w))  # (B*Z, c0, S, S)
        x = x.reshape(b, z, -1, h * w).transpose(1, 2)  # (B, c0, Z, S*S)
        x = F.gelu(self.depth_conv(x))  # (B, c, Z, S*S)
        pooled = torch.cat([x.amax(dim=2), x.mean(dim=2)], dim=1)  # (B, 2c, S*S)
        feats = self.spatial(pooled.reshape(b, -1, h, w))  # (B, F, S, S)
        return self.to_image(feats), feats
