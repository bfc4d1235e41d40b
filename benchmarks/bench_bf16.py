"""CPU entries for bf16 autocast (``scrollsam.precision``) against fp32, side by side.

Skipped on CPUs without bf16 units. Random seeded weights: speed does not depend on them.

- ``encoder_256_bf16_vs_fp32``: vit_b encoder inference at 256 px (batch 4, window 14), with
  the relative difference of the embeddings.
- ``encoder_256_ours_vs_today``: today's path (official attention, window 14, fp32) against
  scrollsam's (fused attention, window 16, bf16). Goal 2.5x (issue 13).
- ``train_step_tiny_bf16_vs_fp32``: the demo's whole training step (tiny, 128 px, batch 8,
  everything trainable, the demo's prompts, default losses, AdamW).
- ``train_step_cached_vit_b_bf16_vs_fp32``: the default config's step with cached embeddings
  (vit_b at 256 px, batch 4, prompt encoder and mask decoder trainable, default prompts and
  losses, AdamW): the decoder's work alone.
- ``train_step_cached_vit_b_ours_vs_today``: the same step as it ran when issue 13 was filed
  ("today" in the issue's words: fp32, corrective points at the error region's centre with
  OpenCV, a decoder call per prompt kind and round: ``prompt_sets.PER_KIND``) against
  scrollsam's now (bf16, the SAM paper's uniform corrective points on the device, every prompt
  kind in one call per round). Goal 1.5x (issue 13). Both run in this process, with whatever
  malloc settings it has (``bench_process.py`` measures those apart).
"""

from __future__ import annotations

from typing import Any

import torch
from bench_attention import SIZE, _encoder, _images, _infer_fn, _needs_bf16
from common import BENCH_DIR, compare, register

from scrollsam import build_model
from scrollsam.train.prompt_sets import FAMILIES, Families


def _step(model: torch.nn.Module, params: list, embed, label: torch.Tensor, prompts,
          bf16: bool, *, families: Families = FAMILIES):
    """One training step (prompted forward, loss, backward, AdamW) as a callable;
    ``families``: the kinds sharing decoder calls."""
    from scrollsam.config import LossConfig
    from scrollsam.train.optim import make_optimizer
    from scrollsam.train.step import prompted_forward

    opt = make_optimizer(params, lr=1e-4, weight_decay=0.01)
    valid = torch.ones_like(label)

    def run() -> None:
        g = torch.Generator().manual_seed(1)  # the same prompts every call
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = prompted_forward(model, embed(), label, valid, prompt_cfg=prompts,
                                   loss_cfg=LossConfig(), gen=g, families=families)
        out.parts["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


@register("encoder_256_bf16_vs_fp32", goal=None, needs=_needs_bf16,
          about="vit_b encoder inference at 256 px, window 14: fp32 vs bf16 autocast")
def encoder_256_bf16_vs_fp32(quick: bool) -> dict[str, Any]:
    enc = _encoder()
    x = _images(4)
    result = compare(_infer_fn(enc, x, False), _infer_fn(enc, x, True),
                     repeats=1 if quick else 5)
    with torch.inference_mode():
        ref = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(x).float()
    result["settings"] = {"model": "vit_b", "px": SIZE, "batch": 4, "attention": "fused",
                          "window": 14, "baseline": "fp32", "ours": "bf16 autocast"}
    result["metrics"] = {"s_per_image_fp32": result["baseline_s"] / 4,
                         "s_per_image_bf16": result["ours_s"] / 4,
                         "relative_difference": float((low - ref).norm() / ref.norm())}
    return result


@register("encoder_256_ours_vs_today", goal=2.5, needs=_needs_bf16,
          about="vit_b encoder inference at 256 px: official/w14/fp32 vs fused/w16/bf16")
def encoder_256_ours_vs_today(quick: bool) -> dict[str, Any]:
    today, ours = _encoder(attention="official"), _encoder(window=16)
    x = _images(4)
    result = compare(_infer_fn(today, x, False), _infer_fn(ours, x, True),
                     repeats=1 if quick else 5)
    result["settings"] = {"model": "vit_b", "px": SIZE, "batch": 4,
                          "baseline": "official attention, window 14, fp32",
                          "ours": "fused attention, window 16, bf16 autocast"}
    result["metrics"] = {"s_per_image_today": result["baseline_s"] / 4,
                         "s_per_image_ours": result["ours_s"] / 4}
    return result


@register("train_step_tiny_bf16_vs_fp32", goal=None, needs=_needs_bf16,
          about="the demo's training step (configs/demo.yaml: tiny, 128 px, batch 8, "
                "full-resolution head, all trainable, new prompts each step): fp32 vs bf16")
def train_step_tiny_bf16_vs_fp32(quick: bool) -> dict[str, Any]:
    from scrollsam.config import load_config
    from scrollsam.model.assemble import model_from_config
    from scrollsam.train.forward import LossModule
    from scrollsam.train.optim import make_optimizer

    cfg = load_config(str(BENCH_DIR.parent / "configs" / "demo.yaml"), [])
    torch.manual_seed(0)
    model = model_from_config(cfg.model, in_chans=3).train()
    params = [p for p in model.parameters() if p.requires_grad]
    step = LossModule(model, None, prompt_cfg=cfg.prompts, loss_cfg=cfg.loss,
                      device=torch.device("cpu"))
    opt = make_optimizer(params, lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    b, s = cfg.train.batch_size, cfg.model.image_size
    images = torch.randn(b, 3, s, s, generator=gen)  # (B, C, S, S)
    label = (torch.rand(b, 1, s, s, generator=gen) > 0.7).float()  # (B, 1, S, S)
    valid = torch.ones_like(label)

    def steps(bf16: bool):
        calls = iter(range(10**6))

        def run() -> None:  # new prompts every call, as in training (the set count per prompt
            n = next(calls)  # kind changes, and with it the shapes); both see the same series
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = step(images, label, valid, list(range(n * b, n * b + b)))
            out.parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    result = compare(steps(False), steps(True), repeats=2 if quick else 7)
    result["settings"] = {"config": "configs/demo.yaml", "model": "tiny", "px": s, "batch": b,
                          "mask_head": cfg.model.mask_head, "baseline": "fp32",
                          "ours": "bf16 autocast"}
    return result


def _cached_vit_b() -> tuple[torch.nn.Module, list, torch.Tensor, torch.Tensor]:
    """The vit_b 256 px model (prompt encoder and decoder trainable), its trainable
    parameters, cached embeddings [4, 256, g, g] and labels [4, 1, S, S]."""
    from scrollsam.model.trainable import set_trainable

    torch.manual_seed(0)
    model = build_model("vit_b", image_size=SIZE).train()
    set_trainable(model, ["prompt_encoder", "mask_decoder"])
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(4, 256, SIZE // 16, SIZE // 16, generator=gen)  # (B, 256, g, g) cached
    label = (torch.rand(4, 1, SIZE, SIZE, generator=gen) > 0.7).float()  # (B, 1, S, S)
    return model, params, emb, label


_CACHED_SETTINGS = {"model": "vit_b", "px": SIZE, "batch": 4,
                    "trainable": "prompt_encoder, mask_decoder", "embeddings": "cached"}


@register("train_step_cached_vit_b_bf16_vs_fp32", goal=None, needs=_needs_bf16,
          about="vit_b 256 px step on cached embeddings (decoder trains), batch 4: fp32 vs bf16")
def train_step_cached_vit_b_bf16_vs_fp32(quick: bool) -> dict[str, Any]:
    from scrollsam.config import PromptConfig

    model, params, emb, label = _cached_vit_b()

    def steps(bf16: bool):
        return _step(model, params, lambda: emb, label, PromptConfig(), bf16)

    result = compare(steps(False), steps(True), repeats=2 if quick else 7)
    result["settings"] = {**_CACHED_SETTINGS, "prompts": "defaults", "baseline": "fp32",
                          "ours": "bf16 autocast"}
    return result


@register("train_step_cached_vit_b_ours_vs_today", goal=1.5, needs=_needs_bf16,
          about="vit_b 256 px step on cached embeddings, batch 4: as filed (fp32, OpenCV "
                "corrective points, a decoder call per prompt kind) vs today's")
def train_step_cached_vit_b_ours_vs_today(quick: bool) -> dict[str, Any]:
    from scrollsam.config import PromptConfig
    from scrollsam.train.prompt_sets import PER_KIND

    model, params, emb, label = _cached_vit_b()
    today = _step(model, params, lambda: emb, label, PromptConfig(corrective="center"), False,
                  families=PER_KIND)
    ours = _step(model, params, lambda: emb, label, PromptConfig(), True)
    result = compare(today, ours, repeats=2 if quick else 7)
    result["settings"] = {**_CACHED_SETTINGS,
                          "baseline": "fp32, corrective points at the error's centre "
                                      "(OpenCV), one decoder call per prompt kind",
                          "ours": "bf16 autocast, uniform corrective points on the device, "
                                  "every prompt kind in one decoder call per round"}
    return result
