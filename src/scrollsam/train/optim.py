"""The optimizer and its schedule: AdamW (fused where it can be), linear warm-up, then cosine."""

from __future__ import annotations

import math

import torch

from scrollsam.config import Config


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine decay to lr * min_lr_ratio."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], *, lr: float,
                   weight_decay: float) -> torch.optim.AdamW:
    """AdamW, with the fused kernel where every parameter allows it (float32 on CPU or CUDA;
    several times faster per step, ``benchmarks/README.md``)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
