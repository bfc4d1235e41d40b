"""GPU entries (CUDA only; listed as skipped elsewhere): vit_b training steps and encoder speed.

Run them on a CUDA machine with the same command, ``make bench`` or
``.venv/bin/python benchmarks/run.py --only gpu_train_vit_b_1024_bf16,...``.

- ``gpu_train_vit_b_{1024,256}_bf16``: one full training step of the whole model (encoder,
  prompt encoder and decoder all trainable, as the x-ray configs train): bf16 autocast forward
  (encode + decode, one 3-point prompt set per image), BCE loss on the low-res logits, backward,
  AdamW step. Reports ``images_per_s`` and ``peak_gpu_mb``. Batch 2 at 1024 px, 16 at 256 px.
- ``gpu_encoder_vit_b_{1024,256}_bf16``: encoder-only inference throughput, bf16 autocast,
  batch 8 at 1024 px, 64 at 256 px.

Weights are random (seeded): speed does not depend on their values. 10 timed repeats after 3
warm-ups (3 after 1 with --quick), each timed call synchronised with ``torch.cuda.synchronize``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from common import cuda_sync, measure, needs_cuda, register

from scrollsam import build_model


def _setup(image_size: int, batch: int) -> tuple[Any, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("vit_b", image_size=image_size).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()
    return model, images


def _repeats(quick: bool) -> dict[str, int]:
    return {"repeats": 3, "warmup": 1} if quick else {"repeats": 10, "warmup": 3}


def _train_step(image_size: int, batch: int, quick: bool) -> dict[str, Any]:
    model, images = _setup(image_size, batch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator(device="cuda").manual_seed(1)
    coords = torch.rand(batch, 3, 2, device="cuda", generator=gen) * image_size  # (B, 3, 2)
    labels = torch.ones(batch, 3, dtype=torch.long, device="cuda")  # (B, 3)
    target = (torch.rand(batch, 1, model.mask_size, model.mask_size, device="cuda",
                         generator=gen) > 0.5).float()  # (B, 1, S/4, S/4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model.decode(model.encode(images), points=(coords, labels))
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        opt.step()

    result = measure(step, sync=cuda_sync, **_repeats(quick))
    result["metrics"] = {"images_per_s": batch / result["seconds"],
                         "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    result["settings"] = {"model": "vit_b", "image_size": image_size, "batch": batch,
                          "trainable": "all", "autocast": "bf16", "optimizer": "AdamW",
                          "prompt": "3 points per image"}
    return result


def _encoder(image_size: int, batch: int, quick: bool) -> dict[str, Any]:
    model, images = _setup(image_size, batch)
    model.eval()

    def encode() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.encode(images)

    result = measure(encode, sync=cuda_sync, **_repeats(quick))
    result["metrics"] = {"images_per_s": batch / result["seconds"],
                         "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    result["settings"] = {"model": "vit_b", "image_size": image_size, "batch": batch,
                          "autocast": "bf16", "mode": "inference_mode"}
    return result


@register("gpu_train_vit_b_1024_bf16", goal=None, needs=needs_cuda,
          about="vit_b full training step at 1024 px, bf16 autocast: images/s")
def gpu_train_vit_b_1024_bf16(quick: bool) -> dict[str, Any]:
    return _train_step(1024, 2, quick)


@register("gpu_train_vit_b_256_bf16", goal=None, needs=needs_cuda,
          about="vit_b full training step at 256 px, bf16 autocast: images/s")
def gpu_train_vit_b_256_bf16(quick: bool) -> dict[str, Any]:
    return _train_step(256, 16, quick)


@register("gpu_encoder_vit_b_1024_bf16", goal=None, needs=needs_cuda,
          about="vit_b encoder-only inference at 1024 px, bf16 autocast: images/s")
def gpu_encoder_vit_b_1024_bf16(quick: bool) -> dict[str, Any]:
    return _encoder(1024, 8, quick)


@register("gpu_encoder_vit_b_256_bf16", goal=None, needs=needs_cuda,
          about="vit_b encoder-only inference at 256 px, bf16 autocast: images/s")
def gpu_encoder_vit_b_256_bf16(quick: bool) -> dict[str, Any]:
    return _encoder(256, 64, quick)
