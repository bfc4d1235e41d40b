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


@register(
    "patch_embed_product_vs_conv",
    goal=1.0,
    about="vit_b patch embedding, 256 px, batch 8, bf16 training step part: the official "
          "convolution vs one matrix product (model.patch_embed.PatchProduct)",
)
def patch_embed_product_vs_conv(quick: bool) -> dict[str, Any]:
    """Forward and the weight's backward (training: the images need no gradient) under bf16
    autocast, as the CPU trains; the same weights."""
    from segment_anything.modeling.image_encoder import PatchEmbed

    from scrollsam.model.patch_embed import PatchProduct

    torch.manual_seed(0)
    conv = PatchEmbed(kernel_size=(16, 16), stride=(16, 16), in_chans=3, embed_dim=768)
    product = PatchProduct(conv)
    images = torch.randn(8, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))

    def step(module: torch.nn.Module) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = module(images)  # (8, 16, 16, 768)
        tokens.float().sum().backward()

    result = compare(lambda: step(conv), lambda: step(product), repeats=3 if quick else 15,
                     warmup=1 if quick else 2)
    result["settings"] = {"model": "vit_b", "batch": 8, "tile_px": TILE, "autocast": "bf16",
                          "mode": "forward + weight backward"}
    return result
