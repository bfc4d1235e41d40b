"""encoder_256_vs_upsampled_1024: encode a 256 px tile at its own size, or upsampled to 1024 px.

The seed upsampled small crops to official SAM's 1024 px input; scrollsam builds the encoder at
the tile size instead (positional embeddings resized by ``build_model``), so a 256 px tile costs
16x fewer tokens and the global-attention blocks far less than that. The baseline is the seed's
model, official attention included; scrollsam's default fused attention alone makes the 1024 px
encoder about 2x faster on this CPU (6.9 s against 13.5 s), which is not what this entry
measures. Weights are random (seeded): speed does not depend on their values. The 1024 px
encoder takes about 12-14 s per image on the 2-core CPU of ``results.json``, so this entry runs
3 timed repeats after one warm-up (1 repeat, no warm-up, with --quick).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from common import compare, register

from scrollsam import build_model

TILE = 256
STANDARD = 1024


@register(
    "encoder_256_vs_upsampled_1024",
    goal=20,
    about="vit_b encoder: 256 px tile with a 256 px model vs the tile upsampled to 1024 px",
)
def encoder_256_vs_upsampled_1024(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    small = build_model("vit_b", image_size=TILE).eval()
    standard = build_model("vit_b", image_size=STANDARD, attention="official").eval()
    gen = torch.Generator().manual_seed(0)
    tile = torch.randn(1, 3, TILE, TILE, generator=gen)  # (1, 3, 256, 256) normalised

    def upsampled() -> torch.Tensor:
        big = F.interpolate(tile, size=(STANDARD, STANDARD), mode="bilinear",
                            align_corners=False)  # (1, 3, 1024, 1024)
        return standard.encode(big)  # (1, 256, 64, 64)

    def native() -> torch.Tensor:
        return small.encode(tile)  # (1, 256, 16, 16)

    with torch.inference_mode():
        result = compare(upsampled, native, repeats=1 if quick else 3, warmup=0 if quick else 1)
    result["settings"] = {"model": "vit_b", "batch": 1, "in_chans": 3, "tile_px": TILE,
                          "baseline_px": STANDARD, "baseline_attention": "official",
                          "attention": "fused (the default)", "dtype": "float32",
                          "mode": "inference_mode"}
    return result
