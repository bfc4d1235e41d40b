"""cached_vs_recompute_train: training prompts per second, embedding cache vs the seed's loop.

Both ways train the prompt encoder and mask decoder of vit_b at 1024 px (frozen encoder, random
weights, seeded) with scrollsam's own step (:func:`scrollsam.train.step.prompted_forward`: SAM
loss, backward, the training loop's AdamW step), so the work per prompt set is the same:

- baseline (the seed): batch size 1, one prompt set, the encoder recomputed every step
  (under ``no_grad``, as it is frozen);
- scrollsam: 4 tiles x 2 prompt sets (the config defaults), embeddings from a warm
  :class:`~scrollsam.train.cache.EmbeddingCache` (all hits: the steady state after the first
  epoch; the cache still hashes every input tile).

To keep the work per set fixed and the seed's, every set is one point prompt decoded once
(``prompts.first=point``, ``prompt_free_share=0``, ``corrective_rounds=0``; the default 2
corrective rounds triple the decoder work per set, both ways) and the prompt generator is
reseeded each step. ``baseline_s`` / ``ours_s`` are seconds per prompt set (step median / sets
per step), so ``ratio`` is the ratio of prompts per second. 3 timed repeats after one warm-up
(the baseline step costs about 12-14 s on the 2-core CPU of results.json, and filling the cache
first encodes the 4 tiles); --quick: 256 px, 1 repeat without warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import compare, needs_modules, register

from scrollsam import build_model

TILES, SETS_PER_TILE = 4, 2
CORRECTIVE_ROUNDS = 0  # one decode per prompt set, as the seed trained


def _labels(gen: torch.Generator, b: int, s: int) -> torch.Tensor:
    """A few ink rectangles per tile: float [B, 1, S, S] in {0, 1}."""
    label = torch.zeros(b, 1, s, s)
    for i in range(b):
        for _ in range(4):
            y, x = torch.randint(0, s - s // 8, (2,), generator=gen).tolist()
            h, w = torch.randint(s // 32, s // 8, (2,), generator=gen).tolist()
            label[i, 0, y:y + h, x:x + w] = 1.0
    return label


@register(
    "cached_vs_recompute_train",
    goal=100,
    about="vit_b 1024 px decoder training: cached embeddings, 4x2 sets vs encoder every step, "
          "batch 1",
    needs=needs_modules("scrollsam.train.cache", "scrollsam.train.step", "scrollsam.train.loop",
                       "scrollsam.config"),
)
def cached_vs_recompute_train(quick: bool) -> dict[str, Any]:
    from scrollsam.config import LossConfig, PromptConfig, TrainConfig
    from scrollsam.model.trainable import set_trainable
    from scrollsam.train.cache import EmbeddingCache
    from scrollsam.train.optim import make_optimizer
    from scrollsam.train.step import prompted_forward

    torch.manual_seed(0)
    size = 256 if quick else 1024
    model = build_model("vit_b", image_size=size).train()
    set_trainable(model, ["prompt_encoder", "mask_decoder"])
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                         weight_decay=TrainConfig().weight_decay)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(TILES, 3, size, size, generator=gen)  # (B, 3, S, S)
    label = _labels(gen, TILES, size)  # (B, 1, S, S)
    valid = torch.ones_like(label)
    # The loss at the decoder's S/4 grid (loss.resolution=mask), both ways: at 1024 px the
    # full-resolution loss and its backward cost more than the decoder itself on a CPU. The
    # cached step at label resolution is reported too (ours_label_resolution_step_s).
    loss_cfg = LossConfig(resolution="mask")
    cache = EmbeddingCache()

    def step(embed: Callable[[torch.Tensor], torch.Tensor], b: int, sets: int) -> None:
        prompt_cfg = PromptConfig(sets_per_tile=sets, first="point", prompt_free_share=0.0,
                                  corrective_rounds=CORRECTIVE_ROUNDS)
        prompt_gen = torch.Generator().manual_seed(2)
        emb = embed(images[:b])  # (b, 256, g, g)
        out = prompted_forward(model, emb, label[:b], valid[:b], prompt_cfg=prompt_cfg,
                               loss_cfg=loss_cfg, gen=prompt_gen)
        out.parts["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def recompute_encoder(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(x)

    def baseline() -> None:
        step(recompute_encoder, 1, 1)

    def cached() -> None:
        step(lambda x: cache.encode(x, model.encode), TILES, SETS_PER_TILE)

    cached()  # fills the cache: every later call is all hits, like training after one epoch
    result = compare(baseline, cached, repeats=1 if quick else 3, warmup=0 if quick else 1)
    loss_cfg = LossConfig(resolution="label")
    label_res = []
    for _ in range(1 if quick else 3):
        start = time.perf_counter()
        cached()
        label_res.append(time.perf_counter() - start)
    result["ours_label_resolution_step_s"] = statistics.median(label_res)
    sets = TILES * SETS_PER_TILE
    result["baseline_step_s"], result["ours_step_s"] = result["baseline_s"], result["ours_s"]
    result["ours_s"] = result["ours_step_s"] / sets  # seconds per prompt set
    result["ratio"] = result["baseline_s"] / result["ours_s"]
    result["baseline_prompts_per_s"] = 1 / result["baseline_s"]
    result["ours_prompts_per_s"] = 1 / result["ours_s"]
    result["settings"] = {
        "model": "vit_b", "image_size": size, "trainable": "prompt_encoder+mask_decoder",
        "baseline": "1x1,encoder-every-step", "ours": f"{TILES}x{SETS_PER_TILE},cache",
        "prompts": f"point+{CORRECTIVE_ROUNDS}-corrective-rounds", "times_per": "prompt-set",
        "loss_resolution": "mask (S/4) both ways",
        "cache_hits": cache.hits, "cache_misses": cache.misses,
    }
    return result
