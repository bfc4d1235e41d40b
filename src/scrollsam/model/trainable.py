"""Choose which parts of SAM train, and count parameters.

The three official parts are ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``. Training
only the decoder (and prompt encoder) keeps the encoder frozen, which lets the training loop cache
image embeddings; training everything is the most expensive and the most adaptable choice for a
modality SAM never saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from scrollsam.errors import InputError
from scrollsam.model.lora import is_lora_parameter

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
EXTRA_PARTS = ("depth_encoder", "mask_head")  # scrollsam's, beside SAM: trained when present


@dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameter counts of one part."""

    trainable: int
    total: int


def set_trainable(model: nn.Module, parts: Iterable[str]) -> dict[str, ParamCount]:
    """Make exactly ``parts`` of ``model.sam`` trainable (requires_grad) and freeze the rest.

    LoRA adapters (:func:`scrollsam.model.lora.add_lora`) train whenever the encoder itself
    does not. Returns the parameter counts per part after the change. Unknown part names are an
    error.
    """
    chosen = set(parts)
    unknown = chosen - set(PARTS)
    if unknown:
        raise InputError(f"trainable parts: expected a subset of {list(PARTS)}, got "
                         f"{sorted(unknown)}")
    for name in PARTS:
        getattr(model.sam, name).requires_grad_(name in chosen)
    if "image_encoder" not in chosen:  # LoRA adapters, where added, train on the frozen encoder
        for name, p in model.sam.image_encoder.named_parameters():
            p.requires_grad_(is_lora_parameter(name))
    for name in EXTRA_PARTS:  # scrollsam's own parts start from scratch: they always train
        part = getattr(model, name, None)
        if part is not None:
            part.requires_grad_(True)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, ParamCount]:
    """Parameter counts per official part, per extra part the model has, plus ``"total"``."""
    counts = {}
    parts = {name: getattr(model.sam, name) for name in PARTS}
    parts.update({name: getattr(model, name) for name in EXTRA_PARTS
                  if getattr(model, name, None) is not None})
    for name, module in parts.items():
        params = list(module.parameters())
        counts[name] = ParamCount(sum(p.numel() for p in params if p.requires_grad),
                                  sum(p.numel() for p in params))
    counts["total"] = ParamCount(sum(c.trainable for c in counts.values()),
                                 sum(c.total for c in counts.values()))
    return counts


def format_counts(counts: dict[str, ParamCount]) -> str:
    """One line per part: ``mask_decoder  4,058,340 / 4,058,340 trainable``."""
    return "\n".join(f"{name:<15} {c.trainable:>12,} / {c.total:>12,} trainable"
                     for name, c in counts.items())
