"""TensorBoard logging: scalars, and the pictures that caught what the seed's numbers hid.

A picture is one row per tile: the input tile, the ground truth, the prediction, and the prompt
points drawn on the tile (green = positive / ink, red = negative / background), exactly what the
seed drew by hand to find its (row, column) mix-up. Pixels outside the fragment mask are shaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import cv2
import numpy as np
import torch

from scrollsam.errors import WriteError
from scrollsam.io import write_failure

GREEN = (40, 220, 40)
RED = (230, 40, 40)
YELLOW = (240, 200, 0)  # a box prompt


def _to_uint8_grey(image: torch.Tensor) -> np.ndarray:
    """Normalised image [C, S, S] -> uint8 [S, S] (mean over channels, 1st-99th percentile)."""
    grey = image.detach().float().mean(0).cpu().numpy()  # (S, S)
    lo, hi = np.percentile(grey, [1, 99]) if grey.size else (0.0, 1.0)
    scaled = (grey - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)  # (S, S, 3)


def tile_panel(
    image: torch.Tensor,
    label: torch.Tensor,
    prob: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    coords: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
) -> np.ndarray:
    """One row of four panels, uint8 [S, 4 * S, 3] (HWC, RGB).

    image [C, S, S] normalised; label, prob, valid [1, S, S] in [0, 1]; coords [N, 2] as (x, y)
    pixels of the tile; point_labels [N] (1 ink, 0 background, -1 padding: not drawn; 2 / 3 a
    box's top-left / bottom-right corner: the box is drawn in yellow).
    """
    tile = _rgb(_to_uint8_grey(image))
    truth = _rgb((label[0].detach().float().cpu().numpy() * 255).astype(np.uint8))
    pred = _rgb((prob[0].detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8))
    points = tile.copy()
    if coords is not None and point_labels is not None:
        radius = max(2, tile.shape[0] // 64)
        pairs = list(zip(coords.detach().cpu().tolist(), point_labels.detach().cpu().tolist(),
                         strict=True))
        corners = {lab: (int(round(x)), int(round(y))) for (x, y), lab in pairs if lab in (2, 3)}
        if len(corners) == 2:
            cv2.rectangle(points, corners[2], corners[3], YELLOW, max(1, radius // 2))
        for (x, y), lab in pairs:
            if lab not in (0, 1):
                continue
            colour = GREEN if lab == 1 else RED
            cv2.circle(points, (int(round(x)), int(round(y))), radius, colour, -1)
            cv2.circle(points, (int(round(x)), int(round(y))), radius, (0, 0, 0), 1)
    panels = [tile, truth, pred, points]
    if valid is not None:
        outside = valid[0].detach().cpu().numpy() < 0.5
        for p in panels:
            p[outside] = (p[outside] * 0.35 + np.array([0, 0, 90]) * 0.65).astype(np.uint8)
    return np.concatenate(panels, axis=1)  # (S, 4S, 3)


class TensorBoard:
    """Thin wrapper over ``SummaryWriter`` writing into ``run_dir/tb``; no-op when disabled.

    ``purge_step``: a resumed run's first step; TensorBoard hides the events an earlier
    process logged at that step and later (a run killed after its last checkpoint had logged
    steps it now trains again), so each step's curve point appears once."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True,
                 purge_step: int | None = None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(run_dir) / "tb"
            _check_writable(folder)  # SummaryWriter's thread would print its own traceback
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int, *, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def picture(self, tag: str, rows: list[np.ndarray], step: int) -> None:
        """Stack panel rows (each uint8 [S, W, 3]) vertically and log one image."""
        if self.writer is None or not rows:
            return
        grid = np.concatenate(rows, axis=0)  # (rows * S, W, 3)
        self.writer.add_image(tag, grid, step, dataformats="HWC")

    def example(self, batch: dict, example: dict | None, step: int, *,
                upscale: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The training step's prompted example (:class:`~.step.StepOutput`'s ``example``:
        tile index, logits [h, w] at the model's output size, points) as one panel of its tile:
        image, truth, prediction (``upscale``: the model's logits to the tile size), points."""
        if example is None:
            return
        i = int(example["tile"])
        prob = torch.sigmoid(upscale(example["logits"][None].float()))[0].cpu()
        panel = tile_panel(batch["image"][i], batch["label"][i], prob, valid=batch["valid"][i],
                           coords=example["coords"], point_labels=example["labels"])
        self.picture("train/tile_truth_prediction_points", [panel], step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_writable(folder: Path) -> None:
    """Make ``folder`` and create (then remove) a file in it; WriteError saying why when the
    file system refuses. SummaryWriter writes its first event from a thread of its own, whose
    failure printed a traceback beside the error line."""
    probe = folder / f".write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        probe.unlink()
    except OSError as err:
        cause = write_failure(err, folder)
        if cause is None:
            raise
        raise WriteError(f"{cause} while writing TensorBoard events ({folder})") from None
