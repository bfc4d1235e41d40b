"""Self-describing training checkpoints, written atomically and read without running code.

A checkpoint holds everything resume and predict need: the SAM weights under ``"model"`` with
official parameter names (so :func:`scrollsam.model.sam_file.load_sam_state_dict` reads it like an
official file), scrollsam's own parts (depth encoder, mask head) under ``"extras"``, the
optimizer state, the step, the merged config, the best validation F0.5 and its threshold (with
the threshold the validation probabilities expect, ``best_expected_threshold``, by which
prediction adapts the threshold to each fragment: :mod:`scrollsam.infer.threshold`), and the
number of processes that trained it (``world_size``: with the config's batch size it gives
the global batch a resume must keep). No random state: the data order and each tile's prompts
are pure functions of the seed and the sample index (:mod:`.order`); the ``rng`` entry of
older checkpoints (a prompt generator's state) is read and ignored. Only
tensors and plain Python values are stored, so ``torch.load(weights_only=True)`` reads it.
Files are written to a temp file and renamed: an interrupted write never leaves a partial
``last.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scrollsam.errors import CheckpointError
from scrollsam.io import atomic_path
from scrollsam.model.assemble import extras_state
from scrollsam.torchfile import load_torch, save_torch

FORMAT = "scrollsam-checkpoint-1"


@dataclass
class TrainState:
    """What the loop carries between steps besides the model and the optimizer."""

    step: int = 0
    best_f05: float = -1.0
    best_threshold: float = 0.5
    best_step: int = -1
    # the expected-F0.5 threshold of the best validation's probabilities (None: not known)
    best_expected_threshold: float | None = None
    # the latest validation's threshold and expected threshold, and its step (None / -1: none
    # yet): those of the weights a checkpoint holds, best.pt's and last.pt's alike
    threshold: float | None = None
    expected_threshold: float | None = None
    threshold_step: int = -1

    def record(self, scores: dict[str, float]) -> bool:
        """Note the scores of a validation at :attr:`step` (none: a step without one); True
        when it is the best so far (then it is also the best's)."""
        if not scores:
            return False
        self.threshold, self.threshold_step = scores["threshold"], self.step
        self.expected_threshold = scores["expected_threshold"]
        if not scores["f0.5"] > self.best_f05:
            return False
        self.best_f05, self.best_step = scores["f0.5"], self.step
        self.best_threshold, self.best_expected_threshold = (scores["threshold"],
                                                             scores["expected_threshold"])
        return True


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: TrainState,
    config: dict[str, Any],
    world_size: int = 1,
) -> Path:
    """Write a checkpoint atomically (temp file + rename) and return its path. A refused write
    (full disk, read-only folder) raises WriteError and leaves an existing ``path`` intact.
    ``model``: the unwrapped SamSegmenter (not its DDP wrapper); ``world_size``: processes."""
    payload = {
        "format": FORMAT,
        "model": model.sam.state_dict(),
        "extras": extras_state(model),
        "model_type": model.model_type,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": state.step,
        "best_f05": state.best_f05,
        "best_threshold": state.best_threshold,
        "best_step": state.best_step,
        "best_expected_threshold": state.best_expected_threshold,
        "threshold": state.threshold,
        "expected_threshold": state.expected_threshold,
        "threshold_step": state.threshold_step,
        "config": config,
        "world_size": world_size,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_torch(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a scrollsam checkpoint (``weights_only=True``); CheckpointError if it is not one
    (empty, corrupt, unsafe or another kind of file: see :func:`scrollsam.torchfile.load_torch`)."""
    path = Path(path)
    obj = load_torch(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"not a scrollsam training checkpoint ({path}); official SAM "
                              "files go in model.checkpoint")
    return obj


def train_state_of(ckpt: dict[str, Any]) -> TrainState:
    """The :class:`TrainState` stored in a loaded checkpoint."""
    return TrainState(step=int(ckpt["step"]), best_f05=float(ckpt["best_f05"]),
                      best_threshold=float(ckpt["best_threshold"]),
                      best_step=int(ckpt["best_step"]),
                      best_expected_threshold=_number(ckpt.get("best_expected_threshold")),
                      threshold=_number(ckpt.get("threshold")),
                      expected_threshold=_number(ckpt.get("expected_threshold")),
                      threshold_step=int(ckpt.get("threshold_step", -1)))


def thresholds_of(ckpt: dict[str, Any]) -> tuple[float, float | None]:
    """The threshold for the weights in a loaded checkpoint and the expected-F0.5 threshold of
    the same validation (None where not known): the latest validation's, that of these weights
    (last.pt's own, not the best step's); checkpoints written before it was stored give the
    best validation's."""
    if ckpt.get("threshold") is not None:
        return float(ckpt["threshold"]), _number(ckpt.get("expected_threshold"))
    return float(ckpt.get("best_threshold", 0.5)), _number(ckpt.get("best_expected_threshold"))


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
