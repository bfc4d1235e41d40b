"""decode_batched_vs_loop[_1024]: P prompt sets for B images in one decode call vs one per call.

Baseline: the official way, one ``prompt_encoder`` + ``mask_decoder`` call per (image, prompt
set), which is what a batch-size-1 training loop does. Ours: one :meth:`SamSegmenter.decode`
call with ``image_index`` and its default ``chunk`` (:meth:`SamSegmenter.decode_chunk`). vit_b
decoder shapes (the prompt encoder and mask decoder are the same in every variant), random
weights and embeddings (seeded): speed does not depend on their values. Repeats: 15 at 256 px
(about 0.6 s per loop), 7 at 1024 px (about 4 s per loop), one warm-up each; 3 and 2 with
--quick.

How the CPU chunk rule (8192 image tokens per pass) was chosen, 2-core AMD EPYC, torch 2.15
(OMP_WAIT_POLICY unset), 64 sets, 5 points each, ratio = loop median / batched median (minor
page faults per call):

    S = 256  (16 x 16):  chunk 8: 2.46   16: 2.65   32: 2.70   64 (no chunking): 2.15 (20k)
    S = 512  (32 x 32):  chunk 4: 0.97 s  8: 0.89 s  16: 0.92 s  64: 1.6-4.9 s (500k)
    S = 1024 (64 x 64):  chunk 1: 1.09   2: 1.17 (16k)   3: 1.17   4: 1.12 (147k)   8: 0.85 (975k)
                         64 (no chunking): 0.45

Past about 8192 tokens a pass's 32-channel upscaled map outgrows 16 MB and the allocator hands
out fresh pages every pass (the page-fault counts), which is what made the naive batch slower
than the loop.
"""

from __future__ import annotations

from typing import Any

import torch
from common import compare, register

from scrollsam import build_model

IMAGES = 4  # B
SETS_PER_IMAGE = 16  # P per image: 64 prompt sets in all
POINTS = 5  # points per set, labels 0 / 1


def _decode_case(image_size: int, *, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model("vit_b", image_size=image_size).eval()
    sam = model.sam
    gen = torch.Generator().manual_seed(1)
    grid = model.embed_grid
    sets = IMAGES * SETS_PER_IMAGE
    emb = torch.randn(IMAGES, 256, grid, grid, generator=gen)  # (B, 256, g, g)
    coords = torch.randint(0, image_size, (sets, POINTS, 2), generator=gen).float()  # (P, N, 2)
    labels = torch.randint(0, 2, (sets, POINTS), generator=gen)  # (P, N)
    index = torch.arange(IMAGES).repeat_interleave(SETS_PER_IMAGE)  # (P,) image of each set

    def loop() -> None:
        for p in range(sets):
            b = int(index[p])
            sparse, dense = sam.prompt_encoder(
                points=(coords[p:p + 1], labels[p:p + 1]), boxes=None, masks=None)
            sam.mask_decoder(
                image_embeddings=emb[b:b + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=False)

    def batched() -> None:
        model.decode(emb, points=(coords, labels), image_index=index)

    with torch.inference_mode():
        result = compare(loop, batched, repeats=repeats)
    result["settings"] = {
        "model": "vit_b", "image_size": image_size, "grid": grid, "B": IMAGES,
        "P_per_image": SETS_PER_IMAGE, "sets": sets, "points": POINTS,
        "chunk": model.decode_chunk(sets), "multimask": False, "dtype": "float32",
        "mode": "inference_mode",
    }
    return result


@register("decode_batched_vs_loop", goal=2,
          about="64 prompt sets on 4 images, 256 px model: one decode call vs 64 official calls")
def decode_batched_vs_loop(quick: bool) -> dict[str, Any]:
    return _decode_case(256, repeats=3 if quick else 15)


@register("decode_batched_vs_loop_1024", goal=1,
          about="the same with the 1024 px model (64 x 64 embeddings): batched never slower")
def decode_batched_vs_loop_1024(quick: bool) -> dict[str, Any]:
    return _decode_case(1024, repeats=2 if quick else 7)
