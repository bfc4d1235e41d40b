"""Read SAM's weights (official parameter names) from a file, whoever wrote it.

Three layouts load as they are: an official file (``sam_vit_b_01ec64.pth``: a flat state dict),
a scrollsam training checkpoint (the weights under ``"model"``) and a state dict wrapped as
``{"state_dict": ...}`` (Lightning and many training scripts). A state dict saved from a
DistributedDataParallel-wrapped model, whose every key starts with ``module.``, loses that
prefix. Anything else is refused in one line, with a hint when its keys look like another
wrapper or prefix (``sam.`` from ``SamSegmenter.state_dict()``, say).

Weights holding NaN or inf (a run that diverged, a damaged copy) are refused where they are
loaded (:func:`check_finite`), instead of as a NaN loss at step 0 or an all-NaN prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from scrollsam.errors import CheckpointError
from scrollsam.model.adapt import PATCH_WEIGHT
from scrollsam.model.lora import lora_rank_of
from scrollsam.torchfile import load_torch, not_a_file

log = logging.getLogger(__name__)

WRAPPERS = ("model", "state_dict")  # keys a file's weights may sit under, tried in this order
DDP_PREFIX = "module."  # DistributedDataParallel's, on every key of model.state_dict()
OFFICIAL_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
WHERE_TO_GET = (
    "official SAM checkpoints ({}) are listed under 'Model Checkpoints' in the README of "
    "github.com/facebookresearch/segment-anything; download one and pass its local path"
).format(", ".join(OFFICIAL_FILES.values()))


def load_sam_state_dict(path: str | Path, *,
                        lora_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Read the SAM weights (official parameter names) from an official or scrollsam file, or
    a state dict under ``"state_dict"`` or with DDP's ``module.`` prefix (module docstring).

    Loads with ``torch.load(weights_only=True)``: a checkpoint cannot run code. A scrollsam
    training checkpoint keeps the weights under its ``"model"`` key; its depth encoder and mask
    head (``"extras"``) are not SAM's, and a warning names them as left out. ``lora_alpha``: the
    alpha of the model the weights go into; the LoRA adapters of a scrollsam checkpoint made
    with another ``model.lora_alpha`` are rescaled (``lora_b`` x old / new alpha) so that they
    compute what they did.
    """
    path = Path(path)
    if path.is_dir():
        raise not_a_file(path)
    if not path.is_file():  # the CLI comes here from model.checkpoint only (not --checkpoint)
        raise CheckpointError(f"checkpoint not found: {path} (model.checkpoint); {WHERE_TO_GET}"
                              f" as model.checkpoint=PATH")
    obj: Any = load_torch(path)  # one-line errors for empty, corrupt and unsafe files
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        if extras := sorted(obj.get("extras") or {}):  # a trained model with scrollsam parts
            log.warning("%s: SAM's weights only; its %s not loaded here (the whole trained "
                        "model: Predictor.from_checkpoint, or model_from_config with the "
                        "checkpoint as weights)", path, " and ".join(extras))
    state = unwrap_state_dict(obj)
    if not isinstance(state, dict) or PATCH_WEIGHT not in state:
        raise CheckpointError(f"{path} is not a SAM checkpoint (no '{PATCH_WEIGHT}' among its "
                              f"tensors{_hint(state)})")
    saved = _run_lora_alpha(obj)
    if (lora_alpha is not None and saved is not None and saved != lora_alpha
            and lora_rank_of(state)):
        log.info("%s: LoRA adapters rescaled from its run's lora_alpha %g to %g", path, saved,
                 lora_alpha)
        state = {k: v * (saved / lora_alpha) if k.endswith(".lora_b") else v
                 for k, v in state.items()}
    return state


def _run_lora_alpha(obj: Any) -> float | None:
    """``model.lora_alpha`` of a scrollsam checkpoint's config, None for any other file."""
    try:
        return float(obj["config"]["model"]["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        return None


def unwrap_state_dict(obj: Any) -> Any:
    """The state dict inside ``obj``: under ``"model"`` or ``"state_dict"`` (the first that
    holds SAM's patch embedding weight, with or without a ``module.`` prefix, else the first
    that is a dict), then without a ``module.`` prefix that every key carries; else ``obj``."""
    if isinstance(obj, dict):
        inner = [obj[key] for key in WRAPPERS if isinstance(obj.get(key), dict)]
        weights = [d for d in inner
                   if PATCH_WEIGHT in d or DDP_PREFIX + PATCH_WEIGHT in d]
        if weights or inner:
            obj = (weights or inner)[0]
        if obj and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in obj):
            obj = {k[len(DDP_PREFIX):]: v for k, v in obj.items()}  # a DDP model's names
    return obj


def _hint(obj: Any) -> str:
    """``; ...`` saying what the keys of a refused ``obj`` look like, or ``""``."""
    if not isinstance(obj, dict):
        return f"; it holds a {type(obj).__name__}, not a dict of tensors"
    if not obj:
        return "; it is an empty dict"
    keys = [k for k in obj if isinstance(k, str)]
    prefixed = next((k for k in keys if k.endswith("." + PATCH_WEIGHT)), None)
    if prefixed is not None:  # SAM's names under some prefix: "sam." from SamSegmenter
        prefix = prefixed[: -len(PATCH_WEIGHT)]
        return (f"; its names carry the prefix '{prefix}' ('{prefixed}'): save the SAM module's "
                f"own state dict (model.sam.state_dict()) or strip the prefix")
    nested = [k for k in keys if isinstance(obj[k], dict)]
    if nested:  # another wrapper: {"ema": {...}, "optimizer": {...}}
        return (f"; it is a dict of dicts ({', '.join(repr(k) for k in nested[:4])}"
                f"{', ...' if len(nested) > 4 else ''}): save the one holding the weights "
                f"alone, as a flat state dict")
    return f"; first of its {len(obj)} keys: {next(iter(obj))!r}"


def check_finite(state: Mapping[str, Any], *, source: str, part: str = "") -> None:
    """CheckpointError naming ``source`` and the first tensor of ``state`` that holds NaN or
    inf (``part``: the model part ``state`` belongs to, e.g. ``mask_head``, named with it).
    One reduction per tensor and no copy of it: a sum is finite unless a value is NaN or inf
    or the sum overflowed, and only then are the values counted (a vit_h file, 641 M values,
    takes about a second on two CPU cores)."""
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
            continue
        # (a 16-bit tensor sums in float32: fp16 cannot overflow it; bf16 can, and then its
        # values are counted below, so a finite tensor still passes)
        total = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
        if bool(torch.isfinite(total)):
            continue
        bad = t.numel() - int(torch.isfinite(t).sum())  # only for a tensor that failed
        if bad:
            raise CheckpointError(
                f"NaN/inf weights: {bad} of the {t.numel()} values of "
                f"{part + '.' if part else ''}{name}, the first such tensor; a run that "
                f"diverged? an earlier checkpoint of it, or the original file, may be whole "
                f"({source})")
