"""Tiny run folders and synthetic fragments for the inference tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

from scrollsam import build_model
from scrollsam.config import config_to_dict, load_config, save_config
from scrollsam.data.views import view_from_config
from scrollsam.train.checkpoint import TrainState, save_checkpoint


def make_run(path: Path, *overrides: str, best: float | None = 0.4, last: float | None = None,
             image_size: int = 64, seed: int = 0) -> Path:
    """A run folder as `scrollsam train` writes it: config.yaml plus best.pt (threshold
    ``best``) and / or last.pt (threshold ``last``), tiny model with random weights."""
    path.mkdir(parents=True)
    cfg = load_config(None, ["model.type=tiny", f"model.image_size={image_size}",
                             "train.batch_size=16", *overrides])
    save_config(cfg, path / "config.yaml")
    channels = view_from_config(cfg.data, cache_dir=None).channels
    import torch

    torch.manual_seed(seed)
    model = build_model("tiny", image_size=image_size, in_chans=channels)
    for name, threshold in (("best.pt", best), ("last.pt", last)):
        if threshold is not None:
            save_checkpoint(path / name, model=model, optimizer=None,
                            state=TrainState(step=7, best_threshold=threshold),
                            config=config_to_dict(cfg))
    return path
