"""Search spaces: which config keys a sweep varies, over which ranges, read from a YAML file.

A space file maps dotted config keys to a range or a list of choices::

    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}   # float key: log-uniform
    loss.dice_weight: {low: 0.5, high: 2.0}            # float key: uniform
    train.warmup: {low: 0, high: 50, step: 10}         # int key: 0, 10, ..., 50
    data.z_start: [16, 20, 24]                         # any key: one of these values
    model.trainable: [[mask_decoder], [prompt_encoder, mask_decoder]]

Whether a range is sampled as float or int follows the key's type in :mod:`scrollsam.config`
(``int | None`` keys are ints). A range needs a number key; any key takes a list of choices.
A ``step`` must divide ``high - low``, and no key may be given twice (YAML would keep the last).
Every bound and every choice is checked against the base config when the file is read, so a
typo fails before the first trial, as one :class:`~scrollsam.errors.ConfigError` naming the key
and the file. Fixed values belong in the base config, not here.

Optuna's categorical parameters hold only None, bool, int, float and str: a choice that is a
list or mapping is stored as its YAML flow text (``"[mask_decoder]"``) and turned back into the
value when a trial's config is built.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import optuna
import yaml

from scrollsam.config import Config, config_from_dict, config_to_dict
from scrollsam.config_yaml import (  # the configs' YAML: 1e-5 a number
    expect_file,
    flow_yaml,
    load_yaml_file,
    parse_yaml,
)
from scrollsam.errors import ConfigError

RANGE_KEYS = ("low", "high", "log", "step")


@dataclass(frozen=True)
class Param:
    """One swept config key: a float or int range, or a list of choices.

    ``choices`` are config values; ``labels`` are what Optuna stores for them (the value itself
    when it is a plain scalar, else its YAML flow text).
    """

    key: str
    kind: str  # "float", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    labels: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """Sample this parameter in ``trial``; returns the config value."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log,
                                       step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log,
                                     step=self.step or 1)
        return self.value_of(trial.suggest_categorical(self.key, self.labels))

    def value_of(self, stored: Any) -> Any:
        """The config value of what Optuna stored for this parameter."""
        if self.kind != "choice":
            return stored
        for label, value in zip(self.labels, self.choices, strict=True):
            if label == stored and type(label) is type(stored):
                return value
        return _from_label(stored)

    def label_of(self, value: Any) -> Any | None:
        """What Optuna stores for the config ``value``; None when the space does not hold it."""
        if self.kind == "choice":
            label = _label(value)
            return label if label in self.labels else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if (self.kind == "int" and not isinstance(value, int)) or not (
                self.low <= value <= self.high):
            return None
        if self.step is not None:
            k = (value - self.low) / self.step
            if abs(k - round(k)) > 1e-9:
                return None
        return value

    def why_not(self, value: Any) -> str | None:
        """Why the config ``value`` is not in this parameter's space (``key=value is outside
        [low, high]``), or None when it is."""
        if self.label_of(value) is not None:
            return None
        shown = f"{self.key}={_show(value)}"
        if self.kind == "choice":
            return f"{shown} is not one of {', '.join(map(_show, self.choices))}"
        if self.step is not None and isinstance(value, (int, float)) and (
                self.low <= value <= self.high):
            return f"{shown} is not low {self.low} plus a multiple of step {self.step}"
        return f"{shown} is outside [{self.low}, {self.high}]"

    def describe(self) -> Any:
        """A plain summary (stored with the study, compared when a sweep continues)."""
        if self.kind == "choice":
            return list(self.labels)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Space:
    """The parameters of a sweep, in file order."""

    params: tuple[Param, ...]
    source: str  # the file it came from (for messages)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter in ``trial``: dotted key -> config value."""
        return {p.key: p.suggest(trial) for p in self.params}

    def values_of(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Config values of a trial's stored params (keys no longer in the space kept as is)."""
        by_key = {p.key: p for p in self.params}
        return {k: by_key[k].value_of(v) if k in by_key else _from_label(v)
                for k, v in stored.items()}

    def base_params(self, base: Config) -> dict[str, Any] | None:
        """The base config's values as stored params, or None if one lies outside the space."""
        tree = config_to_dict(base)
        out = {}
        for p in self.params:
            label = p.label_of(_get(tree, p.key))
            if label is None:
                return None
            out[p.key] = label
        return out

    def outside(self, base: Config) -> list[str]:
        """Why each base config value that :meth:`base_params` cannot use is not in the space
        (``train.warmup=100 is outside [0, 4]``); empty when the base config is a trial."""
        tree = config_to_dict(base)
        reasons = (p.why_not(_get(tree, p.key)) for p in self.params)
        return [r for r in reasons if r is not None]

    def describe(self) -> dict[str, Any]:
        """key -> range or choices, plain values (stored with the study)."""
        return {p.key: p.describe() for p in self.params}


def apply_params(base: Config, params: Mapping[str, Any], *, out: str | Path) -> Config:
    """``base`` with the dotted ``params`` set and ``out`` as run dir, validated."""
    tree = config_to_dict(base)
    for key, value in params.items():
        _set(tree, key, value)
    tree["out"] = str(out)
    return config_from_dict(tree)


def load_space(path: str | Path, base: Config) -> Space:
    """Read and check a space file against the ``base`` config (see the module docstring)."""
    path = Path(path)
    expect_file(path, "space file")  # not there, a folder, /dev/null, a link to nothing
    data = load_yaml_file(path, sep=": ")  # a key given twice: "train.lr: low: given twice"
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"expected a mapping of config keys to ranges or choices, got "
                          f"{data!r} ({path})")
    params = []
    for key, spec in data.items():
        try:
            params.append(parse_param(str(key), spec, base))
        except ConfigError as err:
            raise ConfigError(f"{err} ({path})") from None
    return Space(tuple(params), str(path))


def parse_param(key: str, spec: Any, base: Config) -> Param:
    """One entry of a space file; every bound and choice is checked against ``base``."""
    if key == "out" or key.startswith("out."):
        raise ConfigError("out: the sweep sets each trial's run dir; it cannot be swept")
    _check_key(key, base)
    if isinstance(spec, list):
        return _parse_choices(key, spec, base)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: expected {{low: .., high: ..}} or a list of choices, got "
                          f"{spec!r} (a fixed value belongs in the base config)")
    unknown = sorted(set(map(str, spec)) - set(RANGE_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown range key {', '.join(unknown)} (expected "
                          f"{', '.join(RANGE_KEYS)}; a list of values is a set of choices)")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{key}: a range needs both low and high, got {dict(spec)!r}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    kind = _number_kind(key)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {name}: expected a number, got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{key}: log: expected true or false, got {log!r}")
    if kind == "float":
        low, high = float(low), float(high)
    if not low <= high:
        raise ConfigError(f"{key}: expected low <= high, got low {low}, high {high}")
    if log and low <= 0:
        raise ConfigError(f"{key}: a log range needs low > 0, got {low}")
    if step is not None:
        ok = (isinstance(step, int) if kind == "int" else isinstance(step, (int, float)))
        if isinstance(step, bool) or not ok or step <= 0:
            raise ConfigError(f"{key}: step: expected a positive {kind}, got {step!r}")
        if log:
            raise ConfigError(f"{key}: a range takes log or step, not both")
        step = float(step) if kind == "float" else step
    for value in (low, high):
        _check_value(key, value, base)
    if step is not None:
        _check_step(key, low, high, step)
    return Param(key, kind, low, high, log, step)


def _check_step(key: str, low: float, high: float, step: float) -> None:
    """Raise unless ``high - low`` is a whole number of ``step``s (else Optuna would lower
    ``high`` to the last multiple, with a warning per trial). Decimal arithmetic on the numbers
    as written, as Optuna checks it, so 0.1 .. 0.5 step 0.1 is exact."""
    span, size = Decimal(str(high)) - Decimal(str(low)), Decimal(str(step))
    if span % size == 0:
        return
    if size > span:
        raise ConfigError(f"{key}: step {step} is larger than the range {low} .. {high}: every "
                          f"trial would get {low}")
    below = Decimal(str(low)) + (span // size) * size
    raise ConfigError(f"{key}: step {step} does not divide the range {low} .. {high} evenly; "
                      f"the nearest valid high is {_number(below)} or {_number(below + size)}")


def _number(value: Decimal) -> str:
    """A bound as a space file would write it (12 not 12.0, 0.0003 not 0.00030)."""
    return str(int(value)) if value == value.to_integral_value() else repr(float(value))


def _parse_choices(key: str, values: list, base: Config) -> Param:
    if not values:
        raise ConfigError(f"{key}: expected a non-empty list of choices, got []")
    labels = tuple(_label(v) for v in values)
    if len(set(map(repr, labels))) != len(labels):
        raise ConfigError(f"{key}: choices repeat a value, got {values!r}")
    for value in values:
        _check_value(key, value, base)
    return Param(key, "choice", choices=tuple(values), labels=labels)


def _check_key(key: str, base: Config) -> None:
    """Raise unless ``key`` names one config value (the config's own message when unknown)."""
    hint = _hint(key)
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"{key}: a config section, not a key (name a key such as "
                          f"{key}.{dataclasses.fields(hint)[0].name})")
    if hint is None:
        _check_value(key, None, base)  # "unknown config key ... (did you mean ...?)"
        raise ConfigError(f"unknown config key {key}")


def _check_value(key: str, value: Any, base: Config) -> None:
    """Raise the config's own error if ``key: value`` is not a valid change of ``base``."""
    tree = config_to_dict(base)
    _set(tree, key, value)
    config_from_dict(tree)


def _hint(key: str) -> Any:
    """The type hint of a dotted config key (None for an unknown key)."""
    hint: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def _number_kind(key: str) -> str:
    hint = _hint(key)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    if hint is float:
        return "float"
    if hint is int:
        return "int"
    raise ConfigError(f"{key}: a range needs a number key, this one is {_type_name(_hint(key))}; "
                      f"give a list of choices instead")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _label(value: Any) -> Any:
    """What Optuna stores for a choice: plain scalars as is, anything else as YAML flow text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"choice {value!r}: not a usable value")
        return value
    return flow_yaml(value)


def _show(value: Any) -> str:
    """A config value as messages show it: numbers as Python writes them, else flow YAML."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return flow_yaml(value)


def _from_label(stored: Any) -> Any:
    """Best guess at the value of a label no longer in the space (flow text is parsed)."""
    if isinstance(stored, str) and stored[:1] in "[{":
        try:
            return parse_yaml(stored)
        except yaml.YAMLError:
            return stored
    return stored


def _get(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node[part]
    return node


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` in the nested dict ``tree`` (made by config_to_dict) in place."""
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
        node[part] = child = dict(child)
        node = child
    node[last] = copy.deepcopy(value)
