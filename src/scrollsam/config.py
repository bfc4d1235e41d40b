"""Configuration: dataclass defaults, then an experiment YAML holding only what changes, then
``key=value`` overrides from the command line. The merged result is saved as ``config.yaml`` in
the run dir and inside every checkpoint, so a run can be resumed or used for prediction from
its folder alone.

Keys are dotted paths (``train.lr``, ``data.train``). Values of overrides are YAML
(``data.train=[train/1,train/2]``, ``model.checkpoint=null``, ``log.images=false``). An unknown
key, a value of the wrong type, or a value outside a key's allowed set or range
(:mod:`scrollsam.config_checks`) is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scrollsam.config_checks import check_config
from scrollsam.config_yaml import expect_file, load_yaml_file, parse_yaml, yaml_error_text
from scrollsam.errors import ConfigError
from scrollsam.io import atomic_write_text


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass
class DataConfig:
    """Which fragments, which input view, how tiles are cut and augmented."""

    root: str = "."  # folder the fragment paths below are relative to
    train: list[str] = field(default_factory=list)  # fragment folders to train on
    valid: list[str] = field(default_factory=list)  # held-out fragments (empty: a held-out band)
    valid_band: float = 0.2  # with no valid fragments: share of each train fragment held out
    input: str = field(default="ir", metadata=_choices("ir", "slices"))
    strategy: str = field(default="triplet",
                          metadata=_choices("triplet", "every", "range", "project", "mosaic"))
    z_start: int | None = None  # first slice of the slice views' band (null: the ink band)
    z_end: int | None = None  # one past its last slice (null: the view's default)
    view: dict[str, Any] = field(default_factory=dict)  # view parameters, e.g. {centre: 30}
    stride: int = 0  # tile stride in px for validation / prediction (0: half the tile)
    ink_share: float = 0.5  # share of training tiles drawn centred on ink
    augment: bool = True  # flips, 90 degree rotations
    pixel_augment: bool = True  # brightness / contrast / noise (disables the embedding cache)
    workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    """SAM variant, weights, input size and which parts train."""

    type: str = field(default="vit_b", metadata=_choices("vit_b", "vit_l", "vit_h", "tiny"))
    checkpoint: str | None = None  # official SAM file (local path); null: random weights
    image_size: int = 256  # model input side S = tile side, a multiple of 16
    trainable: list[str] = field(default_factory=lambda: ["prompt_encoder", "mask_decoder"])
    lora_rank: int = 0  # > 0: rank-r LoRA adapters on the frozen encoder's qkv train too
    lora_alpha: float = 8.0  # LoRA update scale alpha / rank
    depth_encoder: bool = False  # learned depth encoder: a band of slices -> SAM's input
    depth_kind: str = field(default="mix", metadata=_choices("mix", "pool"))  # see model/depth
    depth_features: int = 32  # its full-resolution feature channels (seen by mask_head: full)
    depth_out_chans: int = 3  # channels it makes for SAM (3: an official RGB patch filter)
    mask_head: str = field(default="sam", metadata=_choices("sam", "full"))  # S/4 or full res
    head_sam_logits: bool = True  # false: the full head without SAM's logits (for comparison)
    window_size: int | None = None  # encoder attention window (null: the variant's, 14 official)
    attention: str = field(default="fused", metadata=_choices("fused", "official"))  # encoder


@dataclass
class PromptConfig:
    """SAM-paper prompting: a first prompt, corrective rounds, and prompt-free samples."""

    sets_per_tile: int = 2  # P / B: prompt sets decoded per tile in one call
    first: str = field(default="mixed", metadata=_choices("point", "box", "mixed", "none"))
    corrective_rounds: int = 2  # extra rounds, each adding a point from the error region
    # where a corrective point comes from: uniform over the error region (the SAM paper's
    # training sampler; on the device, no sync) or its centre (RITM's; CPU distance transforms)
    corrective: str = field(default="uniform", metadata=_choices("uniform", "center"))
    mask_feedback: bool = True  # feed the previous round's logits back as the mask prompt
    prompt_free_share: float = 0.25  # share of prompt sets with no prompt (how inference runs)
    multimask: bool = True  # 3 masks for ambiguous first prompts, lowest loss trained


@dataclass
class LossConfig:
    """Focal + dice (20:1 as in the SAM paper) + IoU-head MSE."""

    kind: str = field(default="focal", metadata=_choices("focal", "bce"))
    mask_weight: float = 20.0  # weight of the focal (or BCE) term
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    iou_on: str = field(default="all", metadata=_choices("all", "selected"))
    resolution: str = field(default="label", metadata=_choices("label", "mask"))  # see losses


@dataclass
class TrainConfig:
    """Optimisation, schedule, device and checkpoints."""

    steps: int = 2000
    batch_size: int = 4  # B tiles per step
    accumulate: int = 1  # gradient accumulation steps per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    clip: float = 1.0  # gradient-norm clip (0: off; negative values are errors)
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with bf16 units; fp32 elsewhere
    compile: bool = False  # torch.compile the encoder (static shapes; falls back if unavailable)
    cache: str = field(default="auto", metadata=_choices("auto", "off", "memory", "disk"))
    cache_gb: float = 4.0  # the embedding cache's size at most (memory per process, or disk)
    seed: int = 0
    eval_every: int = 200  # validate and keep the best checkpoint every N steps
    save_every: int = 200  # write last.pt every N steps


@dataclass
class LogConfig:
    """TensorBoard scalars and pictures."""

    every: int = 10  # scalars every N steps
    images: bool = True  # pictures (tile, truth, prediction, points) in TensorBoard
    image_every: int = 100


@dataclass
class Config:
    """Everything a run needs; saved in the run dir and inside every checkpoint."""

    out: str = "runs/run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self, *, stored: bool = False) -> Config:
        """Every numeric key's range and the rules between keys
        (:mod:`scrollsam.config_checks`; ``stored``: a config a run saved); returns self."""
        check_config(self, stored=stored)
        return self


# --- dict <-> dataclass ------------------------------------------------------------------------


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type ``hint`` of ``key``; return it (ints widen to floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # data.train=train/1 means a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping such as {{name: value}}, got {value!r}")
        return {_coerce(key, k, key_hint): v if value_hint is Any else
                _coerce(f"{key}.{k}", v, value_hint) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # folder names like 1, 2, 3
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


def _from_dict(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = [f"{prefix}{n}" for n in difflib.get_close_matches(str(name), fields, n=3)]
            typed = key  # bogus.key=1 or a section bogus: {key: 1}: name what was written
            while isinstance(value, Mapping) and len(value) == 1:
                inner, value = next(iter(value.items()))
                typed = f"{typed}.{inner}"
            notes = ([f"in {typed}"] if typed != key else []) + (
                [f"did you mean {', '.join(close)}?"] if close else [])
            raise ConfigError(f"unknown config key {key}"
                              + (f" ({'; '.join(notes)})" if notes else ""))
        hint_t = hints[name]
        if dataclasses.is_dataclass(hint_t):
            kwargs[name] = _from_dict(hint_t, value or {}, f"{key}.")
            continue
        kwargs[name] = _coerce(key, value, hint_t)
        choices = fields[name].metadata.get("choices")
        if choices and kwargs[name] not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], *, stored: bool = False) -> Config:
    """Build a validated :class:`Config` from a nested dict (unknown keys are errors).

    stored: ``data`` is a config a run saved (a checkpoint's, a run's ``config.yaml``), maybe by
    an older scrollsam, which took a negative ``train.clip`` for off: it reads as 0 (off), so
    that run still resumes and predicts; a user's negative value is an error. Other
    training-only values that scrollsam now refuses (``train.warmup=-5``, a negative loss
    weight) are kept there, with a warning (:data:`scrollsam.config_checks.TRAINING_ONLY`)."""
    cfg = _from_dict(Config, data, "")
    if stored and cfg.train.clip < 0:
        cfg.train.clip = 0.0
    return cfg.validate(stored=stored)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested dict of plain values (what is saved)."""
    return dataclasses.asdict(cfg)


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict (:func:`config_to_dict`) as dotted key -> value (``{"train": {"lr": 1}}``
    -> ``{"train.lr": 1}``); an empty dict (``data.view: {}``) is a value of its own."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 0.0003}}`` (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=100")
    try:
        value = parse_yaml(raw, key=key) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: value {raw!r} is not valid YAML: "
                          f"{yaml_error_text(err, raw)}") from err
    except ConfigError as err:  # a key given twice in a mapping value
        raise ConfigError(f"{err} (override {text})") from None
    node: dict[str, Any] = {}
    cur = node
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return node


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                stored: bool = False) -> Config:
    """Defaults, then the YAML at ``path`` (only what changes), then ``key=value`` overrides.
    ``stored``: ``path`` is a run's ``config.yaml`` (see :func:`config_from_dict`)."""
    merged = config_to_dict(Config())
    if path is not None:
        path = Path(path)
        expect_file(path, "config file")
        loaded = load_yaml_file(path) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"expected a mapping of config keys ({path})")
        _from_dict(Config, loaded, "")  # unknown keys reported by their own name
        merged = _merge(merged, loaded)
    for text in overrides:
        update = parse_override(text)
        _from_dict(Config, update, "")
        merged = _merge(merged, update)
    for section, key in PATH_KEYS:  # "~/runs/x" is the home folder's, as a shell reads it
        tree = merged[section] if section else merged
        if isinstance(tree.get(key), str) and tree[key].startswith("~"):
            tree[key] = os.path.expanduser(tree[key])
    return config_from_dict(merged, stored=stored)


PATH_KEYS = (("", "out"), ("data", "root"), ("model", "checkpoint"))  # paths a user gives


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the merged config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))



def given_keys(overrides: Sequence[str]) -> set[str]:
    """Dotted keys that ``key=value`` overrides set (``["train.steps=60"]`` ->
    ``{"train.steps"}``): what the user asked for on the command line, as opposed to defaults."""
    for text in overrides:
        parse_override(text)  # the same checks as when the override is applied
    return {text.partition("=")[0].strip() for text in overrides}
