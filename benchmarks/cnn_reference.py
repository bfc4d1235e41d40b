"""The plain-CNN reference of ``make bench-learn``: what a researcher would try before SAM.

A 4-layer 2D CNN (32 channels, dilations 1 / 2 / 4, then a 1 x 1 output) over the same input
view scrollsam trains on (standardised slices of a band as channels, or ir.png), trained on 64 px
crops of the training fragments with BCE + dice, AdamW, warm-up + cosine, then run fully
convolutionally over the whole held-back fragment. It reads tiles through scrollsam's own
datasets, so the data, normalisation and split are exactly SAM's. Not part of the package.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scrollsam.config import Config
from scrollsam.data.augment import Augment
from scrollsam.data.dataset import make_datasets
from scrollsam.data.fragment import Fragment
from scrollsam.data.views import View, view_from_config
from scrollsam.metrics import ProbabilityHistogram, search_threshold


class SmallCNN(nn.Module):
    """[B, C, H, W] -> logits [B, 1, H, W]."""

    def __init__(self, in_chans: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.GELU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_cnn(cfg: Config, *, steps: int = 300, batch: int = 16, crop: int = 64,
              lr: float = 3e-3, seed: int = 0) -> tuple[SmallCNN, View, float]:
    """Train on ``cfg.data.train`` (relative to ``cfg.data.root``) through the run's view;
    returns (model, view, seconds)."""
    torch.manual_seed(seed)
    root = Path(cfg.data.root)
    view = view_from_config(cfg.data, cache_dir=None)
    frags = [Fragment(root / p) for p in [*cfg.data.train, *cfg.data.valid]]
    held = [f.id for f in frags[len(cfg.data.train):]]  # never trained on; no band held out
    train_set, _ = make_datasets(frags, view, size=crop, valid_fragments=held,
                                 valid_band=None if held else (0.8, 1.0),
                                 samples_per_epoch=steps * batch, augment=Augment(pixel=False),
                                 seed=seed)
    model = SmallCNN(view.channels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch,
                                         sampler=range(len(train_set)))
    start = time.perf_counter()
    for step, item in enumerate(loader):
        warm = min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + np.cos(np.pi * step / steps))
        x, y, v = item["image"], item["label"], item["valid"]
        logits = model(x)
        bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * v).sum()
        bce = bce / v.sum().clamp(min=1)
        p = torch.sigmoid(logits) * v
        dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + (y * v).sum() + 1)
        opt.zero_grad()
        (bce + dice).backward()
        opt.step()
    return model, view, time.perf_counter() - start


@torch.no_grad()
def score_cnn(model: SmallCNN, view: View, fragment: str | Path) -> dict[str, Any]:
    """F0.5, precision, recall at the best threshold over the whole fragment (labels needed)."""
    frag = Fragment(fragment)
    view.prepare(frag)
    _, h, w = frag.shape
    side = max(h, w)
    x = torch.from_numpy(view.eval_window(frag, 0, 0, side))[None]  # (1, C, side, side)
    prob = torch.sigmoid(model.eval()(x))[0, 0, :h, :w].numpy()
    hist = ProbabilityHistogram()
    hist.add(prob, frag.labels(), frag.mask())
    found = search_threshold([hist])
    scores = found.counts.scores()
    return {k: float(scores[k]) for k in ("f0.5", "precision", "recall")} | {
        "threshold": float(found.threshold)}
