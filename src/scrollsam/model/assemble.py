"""The one way to turn a run's ``model`` config into a ready :class:`SamSegmenter`.

Training, prediction, doctor and sweeps all call :func:`model_from_config`; a new model option
touches this function and nothing else. In order it builds the official SAM variant at the
configured size with its LoRA adapters (and ``model.checkpoint``'s weights when training
starts), adds the learned depth encoder and the full-resolution mask head, loads a scrollsam
checkpoint's weights when it is given one (resume, predict), and sets which parts train.

:func:`uses_embedding_cache` is the one place that decides whether training may cache image
embeddings.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from scrollsam.config import Config, ModelConfig
from scrollsam.errors import CheckpointError, ConfigError
from scrollsam.model.build import build_model, load_into
from scrollsam.model.depth import DepthEncoder
from scrollsam.model.heads import MaskHead
from scrollsam.model.sam_file import check_finite
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.model.trainable import EXTRA_PARTS, set_trainable

log = logging.getLogger(__name__)



def model_from_config(
    model_cfg: ModelConfig,
    *,
    in_chans: int,
    weights: dict[str, Any] | None = None,
    source: str = "checkpoint",
) -> SamSegmenter:
    """A :class:`SamSegmenter` for ``model_cfg`` taking ``in_chans`` input channels (the input
    view's: a band of Z slices with the depth encoder, else SAM's own input channels).

    ``weights``: a loaded scrollsam checkpoint (``"model"``: SAM's weights under official names,
    ``"extras"``: the depth encoder's and mask head's); without it the official
    ``model_cfg.checkpoint`` (or random weights) is used. Parameters of the parts in
    ``model_cfg.trainable``, LoRA adapters, the depth encoder and the mask head train.
    """
    sam_chans = model_cfg.depth_out_chans if model_cfg.depth_encoder else in_chans
    official = None if weights is not None else model_cfg.checkpoint
    model = build_model(model_cfg.type, checkpoint=official, image_size=model_cfg.image_size,
                        in_chans=sam_chans, window_size=model_cfg.window_size,
                        attention=model_cfg.attention, lora_rank=model_cfg.lora_rank,
                        lora_alpha=model_cfg.lora_alpha)
    if model_cfg.depth_encoder:
        model.depth_encoder = DepthEncoder(in_chans, out_chans=model_cfg.depth_out_chans,
                                           features=model_cfg.depth_features,
                                           kind=model_cfg.depth_kind)
    if model_cfg.mask_head == "full":  # on the depth encoder's features, else its own stem
        model.mask_head = MaskHead(
            model_cfg.depth_features, stem_from=None if model_cfg.depth_encoder else in_chans,
            use_sam_logits=model_cfg.head_sam_logits)
    if weights is not None:
        load_weights(model, weights, model_type=model_cfg.type, source=source)
    set_trainable(model, model_cfg.trainable)
    return model


def extras_state(model: SamSegmenter) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the scrollsam parts the model has (what a checkpoint's ``"extras"``
    holds)."""
    return {name: getattr(model, name).state_dict() for name in EXTRA_PARTS
            if getattr(model, name) is not None}


def load_weights(model: SamSegmenter, weights: dict[str, Any], *, model_type: str,
                 source: str) -> None:
    """Load a scrollsam checkpoint's SAM weights and extras into ``model``; CheckpointError when
    the checkpoint and the model do not have the same parts."""
    load_into(model.sam, weights["model"], model_type=model_type, source=source)
    extras = weights.get("extras") or {}
    for name in EXTRA_PARTS:
        part = getattr(model, name)
        if (part is None) != (name not in extras):
            raise CheckpointError(
                f"{source} {'has no' if part is not None else 'holds a'} {name} but the model "
                f"{'has one' if part is not None else 'has none'}: build the model from the "
                f"checkpoint's own config")
        if part is not None:
            check_finite(extras[name], source=source, part=name)
            try:
                part.load_state_dict(extras[name])
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0]
                raise CheckpointError(f"{source}: its {name} does not fit the model ({first})"
                                      ) from err


def uses_embedding_cache(cfg: Config) -> bool:
    """Whether training caches image embeddings: ``train.cache`` memory / disk ask for it (a
    ConfigError naming the key when it would be wrong), auto uses it when it is right (a
    frozen encoder, no LoRA, no depth encoder in front of it, no pixel augmentation)."""
    m, mode = cfg.model, cfg.train.cache
    reasons = []
    if "image_encoder" in m.trainable:
        reasons.append("model.trainable includes image_encoder (embeddings would go stale); "
                       "drop it from model.trainable")
    if m.lora_rank:
        reasons.append("model.lora_rank > 0 adapts the encoder while training (embeddings "
                       "would go stale); set model.lora_rank=0")
    if m.depth_encoder:
        reasons.append("model.depth_encoder trains in front of the encoder (embeddings would "
                       "go stale); set model.depth_encoder=false")
    if cfg.data.pixel_augment:
        reasons.append("pixel augmentations (data.pixel_augment=true) make every input "
                       "unique, so nothing could be reused; set data.pixel_augment=false")
    if mode in ("memory", "disk") and reasons:
        raise ConfigError(f"train.cache: the embedding cache needs a frozen image encoder and "
                          f"fixed inputs, but {reasons[0]} or set train.cache=off")
    return mode in ("memory", "disk") or (mode == "auto" and not reasons)
