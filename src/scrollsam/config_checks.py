"""The checks behind :meth:`scrollsam.config.Config.validate`: every numeric key's accepted range
(:data:`RANGES`), then the rules that tie keys together.

A value outside its range is a :class:`ConfigError` of one line naming the dotted key, the
range and the value (``train.clip: expected 0 (off) or a positive number, got -1.0``), before
anything is built or written, so a bad value never surfaces later as a traceback from torch or
as a run that trains on silently (a negative learning rate, loss weights that make it ascend).
NaN and infinity are outside every range.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scrollsam.errors import ConfigError

if TYPE_CHECKING:
    from scrollsam.config import Config

log = logging.getLogger(__name__)

SEED_MAX = 2**64 - 1  # the largest seed torch.manual_seed takes


@dataclass(frozen=True)
class Range:
    """What a numeric key accepts: ``low <= value <= high`` (``low < value`` when
    ``open_low``), finite, a multiple of ``multiple``; ``words`` say it in the message."""

    words: str
    low: float
    high: float = math.inf
    open_low: bool = False
    multiple: int = 1

    def accepts(self, value: float) -> bool:
        """Whether ``value`` is in the range (NaN and infinity never are)."""
        if isinstance(value, float) and not math.isfinite(value):
            return False  # (an int of any size is finite; math.isfinite would overflow)
        above = value > self.low if self.open_low else value >= self.low
        return (above and value <= self.high
                and (self.multiple == 1 or value % self.multiple == 0))


POSITIVE_INT = Range("a positive integer", 1)
COUNT = Range("an integer >= 0", 0)
SHARE = Range("a share in [0, 1]", 0, 1)
POSITIVE = Range("a positive number", 0, open_low=True)
WEIGHT = Range("a number >= 0", 0)

# Every numeric key of the config (a test keeps this in step with the dataclasses). A key whose
# value may be null (None) is checked only when it holds a number.
RANGES: dict[str, Range] = {
    "data.valid_band": SHARE,
    "data.z_start": Range("null (the ink band) or an integer >= 0", 0),
    "data.z_end": Range("null (the view's default) or an integer >= 1", 1),
    "data.stride": Range("0 (half the tile) or a positive integer", 0),
    "data.ink_share": SHARE,
    "data.workers": COUNT,
    "model.image_size": Range("a multiple of 16, >= 16", 16, multiple=16),
    "model.lora_rank": Range("0 (off) or a positive rank", 0),
    "model.lora_alpha": POSITIVE,
    "model.depth_features": POSITIVE_INT,
    "model.depth_out_chans": POSITIVE_INT,
    "model.window_size": Range("null (the variant's) or a positive integer", 1),
    "prompts.sets_per_tile": POSITIVE_INT,
    "prompts.corrective_rounds": COUNT,
    "prompts.prompt_free_share": SHARE,
    "loss.mask_weight": WEIGHT,
    "loss.dice_weight": WEIGHT,
    "loss.iou_weight": WEIGHT,
    "train.steps": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.accumulate": POSITIVE_INT,
    "train.lr": POSITIVE,
    "train.weight_decay": WEIGHT,
    "train.warmup": COUNT,
    "train.min_lr_ratio": Range("a ratio in [0, 1]", 0, 1),
    "train.clip": Range("0 (off) or a positive number", 0),
    "train.cache_gb": POSITIVE,
    "train.seed": Range("an integer in [0, 2**64 - 1]", 0, SEED_MAX),
    "train.eval_every": POSITIVE_INT,
    "train.save_every": POSITIVE_INT,
    "log.every": POSITIVE_INT,
    "log.image_every": POSITIVE_INT,
}


def value_of(cfg: Config, key: str) -> object:
    """The value of the dotted ``key`` (``"train.lr"``) in ``cfg``."""
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# Keys that only steer training: a run an older scrollsam trained with a value now refused
# (train.warmup=-5, a negative loss weight) still resumes and predicts, with a warning.
TRAINING_ONLY = ("train.", "loss.", "log.", "prompts.")


def _refuse(key: str, message: str, *, stored: bool) -> None:
    """ConfigError(message); a warning instead for a training-only ``key`` of a stored config."""
    if stored and key.startswith(TRAINING_ONLY):
        log.warning("the run's saved config: %s; kept as saved", message)
        return
    raise ConfigError(message)


def check_ranges(cfg: Config, *, stored: bool = False) -> None:
    """ConfigError for the first key of :data:`RANGES` whose value is outside its range
    (``stored``: a config a run saved: see :data:`TRAINING_ONLY`)."""
    for key, allowed in RANGES.items():
        value = value_of(cfg, key)
        if value is not None and not allowed.accepts(value):
            _refuse(key, f"{key}: expected {allowed.words}, got {value}", stored=stored)


def check_config(cfg: Config, *, stored: bool = False) -> None:
    """Every key's range (:func:`check_ranges`), then the rules between keys; ConfigError
    naming the key(s) for the first that fails. ``stored``: ``cfg`` is a config a run saved,
    whose training-only values (:data:`TRAINING_ONLY`) are only warned about."""
    check_ranges(cfg, stored=stored)
    weights = (cfg.loss.mask_weight, cfg.loss.dice_weight, cfg.loss.iou_weight)
    if not any(weights):
        _refuse("loss.mask_weight",
                f"loss.mask_weight / loss.dice_weight / loss.iou_weight: expected at least one "
                f"> 0 (with all at 0 nothing trains), got "
                f"{', '.join(f'{w:g}' for w in weights)}", stored=stored)
    if not cfg.data.valid and not 0.0 < cfg.data.valid_band < 1.0:
        raise ConfigError(f"data.valid_band: expected a share of each training fragment to "
                          f"hold out for validation, > 0 and < 1, when data.valid names no "
                          f"fragment, got {cfg.data.valid_band:g}")
    z0, z1 = cfg.data.z_start, cfg.data.z_end
    if z0 is not None and z1 is not None and z1 <= z0:
        raise ConfigError(f"data.z_start / data.z_end: expected 0 <= z_start < z_end, got "
                          f"{z0}, {z1}")
    from scrollsam.data.views import view_from_config

    view_from_config(cfg.data, cache_dir=None)  # data.view checked by the view itself
    _check_model(cfg)


def _check_model(cfg: Config) -> None:
    """The rules between model keys and the data and loss keys they need."""
    from scrollsam.model.trainable import PARTS

    model = cfg.model
    bad = sorted(set(model.trainable) - set(PARTS))
    if bad or not model.trainable:
        raise ConfigError(f"model.trainable: expected a non-empty subset of {list(PARTS)}, "
                          f"got {model.trainable}")
    if model.lora_rank and "image_encoder" in model.trainable:
        raise ConfigError("model.lora_rank: LoRA adapts a frozen image encoder, but "
                          "model.trainable includes image_encoder; drop it from "
                          "model.trainable or set model.lora_rank=0")
    if model.depth_encoder and cfg.data.input != "slices":
        raise ConfigError("model.depth_encoder: the depth encoder takes a band of x-ray "
                          "slices; set data.input=slices with data.strategy=range")
    if model.depth_encoder and cfg.data.strategy != "range":
        raise ConfigError(f"model.depth_encoder: expected data.strategy=range (a band of "
                          f"slices), got {cfg.data.strategy}")
    if model.mask_head == "full" and cfg.loss.resolution != "label":
        raise ConfigError("loss.resolution: model.mask_head=full predicts at the label "
                          "resolution; set loss.resolution=label")
    if not model.head_sam_logits and model.mask_head != "full":
        raise ConfigError("model.head_sam_logits=false needs model.mask_head=full")
