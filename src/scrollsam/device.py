"""Choosing the torch device once, for training and prediction alike."""

from __future__ import annotations

import torch

from scrollsam.errors import InputError


def resolve_device(name: str = "auto", *, setting: str = "device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu``, ``cuda`` or ``cuda:N`` as given.

    ``setting`` names where the value came from (``train.device``, ``--device``) so an error
    says what to change. Asking for CUDA without a GPU torch can see is an InputError.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"{setting}: expected auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{setting}: {name} was asked for but torch sees no CUDA GPU; "
                         "use cpu or auto")
    return torch.device(name)


def tune_for_fixed_shapes(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the
    fastest (``torch.backends.cudnn.benchmark``); elsewhere nothing. For runs whose shapes are
    fixed: prediction (batches of tiles of one size) and compiled training
    (:func:`scrollsam.model.compile.compile_model`: static prompt sets, the last partial batch
    dropped). Eager training leaves it off: there the
    prompt encoder's mask convolutions see a new number of sets most steps, and each new shape
    would be timed. Measured: ``benchmarks/README.md``."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
