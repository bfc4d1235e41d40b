"""Bad config input (broken YAML in a file or an override, values out of range) ends with exit
code 2 and one line ``error: <what> (<file or key>)``."""

from __future__ import annotations

import pytest

from scrollsam.cli import main
from scrollsam.config import load_config
from scrollsam.errors import ConfigError

BROKEN_YAML = [  # (file text, what the line says)
    ("train:\n  steps: [3\n",
     "expected ',' or ']', but got '<stream end>' at line 3, column 1; while parsing a flow "
     "sequence at line 2, column 10"),
    ("train:\n  steps: 3\n \x01\n", "unacceptable character #x0001"),
    ("train: !!python/object:os.system x\n", "could not determine a constructor for the tag"),
    ("train: {steps: 3}\n[a]: 1\n", "found unhashable key at line 2, column 1"),
    ("train:\n\tsteps: 3\n", "found character '\\t' that cannot start any token at line 2"),
]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    return captured.err.strip()


@pytest.mark.parametrize("text, message", BROKEN_YAML, ids=range(len(BROKEN_YAML)))
def test_a_config_file_that_is_not_valid_yaml_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), f"out={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: not valid YAML: ") and message in line, line
    assert line.endswith(f"({path})"), line
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_text_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"train:\n  steps: \xa2\xff\n")
    assert main(["train", "--config", str(path), f"out={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys)
    assert "not UTF-8 text" in line and line.endswith(f"({path})"), line


@pytest.mark.parametrize("override, message", [
    ("data.train=[a", "data.train: value '[a' is not valid YAML: expected ',' or ']', but got "
                      "'<stream end>' at line 1, column 3"),
    ("data.train=\x01", "data.train: value '\\x01' is not valid YAML: unacceptable character "
                        "#x0001: special characters are not allowed at line 1, column 1"),
    ("train.steps={a: [1}", "train.steps: value '{a: [1}' is not valid YAML"),
])
def test_an_override_that_is_not_valid_yaml_is_one_line_naming_its_key(tmp_path, capsys,
                                                                       override, message):
    assert main(["train", override, f"out={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {message}"), line


@pytest.mark.parametrize("band", ["0", "0.0", "1"])
def test_a_held_out_band_of_nothing_or_everything_is_refused_naming_the_value(tmp_path, capsys,
                                                                              band):
    assert main(["train", "data.train=[a]", "data.valid=[]", f"data.valid_band={band}",
                 f"out={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: data.valid_band: ") and "data.valid" in line, line
    assert line.endswith(f"got {float(band):g}"), line
    assert "(1.0, 1.0)" not in line and not (tmp_path / "run").exists()


def test_the_held_out_band_may_be_0_when_validation_fragments_are_named():
    assert load_config(None, ["data.valid=[b]", "data.valid_band=0"]).data.valid_band == 0.0
    with pytest.raises(ConfigError, match=r"data.valid_band: expected a share in \[0, 1\]"):
        load_config(None, ["data.valid=[b]", "data.valid_band=1.5"])


OUT_OF_RANGE = [  # (override, the line after "error: ")
    ("prompts.corrective_rounds=-1", "prompts.corrective_rounds: expected an integer >= 0, got -1"),
    ("data.workers=-1", "data.workers: expected an integer >= 0, got -1"),
    ("train.weight_decay=-1", "train.weight_decay: expected a number >= 0, got -1.0"),
    ("train.min_lr_ratio=-2", "train.min_lr_ratio: expected a ratio in [0, 1], got -2.0"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio: expected a ratio in [0, 1], got 1.5"),
    ("train.warmup=-5", "train.warmup: expected an integer >= 0, got -5"),
    ("loss.mask_weight=-1", "loss.mask_weight: expected a number >= 0, got -1.0"),
    ("loss.dice_weight=-1", "loss.dice_weight: expected a number >= 0, got -1.0"),
    ("loss.iou_weight=-1", "loss.iou_weight: expected a number >= 0, got -1.0"),
    ("train.clip=-1", "train.clip: expected 0 (off) or a positive number, got -1.0"),
    ("train.clip=.inf", "train.clip: expected 0 (off) or a positive number, got inf"),
    ("train.lr=.nan", "train.lr: expected a positive number, got nan"),
    ("model.lora_alpha=.nan", "model.lora_alpha: expected a positive number, got nan"),
    ("train.seed=-1", "train.seed: expected an integer in [0, 2**64 - 1], got -1"),
    ("train.seed=18446744073709551616",
     "train.seed: expected an integer in [0, 2**64 - 1], got 18446744073709551616"),
    ("data.stride=-8", "data.stride: expected 0 (half the tile) or a positive integer, got -8"),
    ("data.z_end=0", "data.z_end: expected null (the view's default) or an integer >= 1, got 0"),
]


@pytest.mark.parametrize("command", ["train", "doctor"])
@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_a_value_out_of_range_is_one_line_naming_key_and_range(tmp_path, capsys, command,
                                                               override, message):
    # Before: a negative corrective_rounds ended in an UnboundLocalError from the step, a
    # negative data.workers or weight decay in torch's ValueError (both after the run dir was
    # made), data.stride=-8 named "stride"; the rest trained on silently (a negative learning
    # rate late in the run, loss weights that make it ascend, a seed numpy refuses).
    out = [f"out={tmp_path / 'run'}"] if command == "train" else []
    assert main([command, override, *out]) == 2
    assert _one_error_line(capsys) == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_every_numeric_key_has_a_range():
    import dataclasses
    import typing

    from scrollsam.config import Config
    from scrollsam.config_checks import RANGES

    numeric = set()
    for section, cls in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(cls):
            for name, hint in typing.get_type_hints(cls).items():
                if {int, float} & {hint, *typing.get_args(hint)}:
                    numeric.add(f"{section}.{name}")
    assert numeric and numeric == set(RANGES)


@pytest.mark.parametrize("overrides", [
    ["train.clip=0"], ["train.warmup=0"], ["train.min_lr_ratio=0"], ["train.min_lr_ratio=1"],
    ["train.weight_decay=0"], ["prompts.corrective_rounds=0"], ["data.workers=0"],
    ["data.stride=0"], ["data.stride=500"], ["train.seed=0"], ["train.seed=18446744073709551615"],
    ["loss.mask_weight=0", "loss.dice_weight=0"], ["loss.iou_weight=0"], ["data.z_end=1"],
    ["train.warmup=5000", "train.steps=3"], ["data.valid=[b]", "data.valid_band=0"],
])
def test_the_edges_of_each_range_stay_valid(overrides):
    load_config(None, overrides)


def test_all_loss_weights_at_0_are_refused():
    # Before: accepted, and the run trained nothing for its whole length.
    with pytest.raises(ConfigError, match=r"^loss.mask_weight / loss.dice_weight / "
                                          r"loss.iou_weight: expected at least one > 0"):
        load_config(None, ["loss.mask_weight=0", "loss.dice_weight=0", "loss.iou_weight=0"])


def test_a_negative_clip_saved_by_a_run_reads_as_off():
    # An older scrollsam took train.clip < 0 for off: a checkpoint or config.yaml holding one
    # still resumes and predicts; a user's negative value is an error.
    from scrollsam.config import config_from_dict, config_to_dict

    saved = config_to_dict(load_config(None, ["model.type=tiny"]))
    saved["train"]["clip"] = -1.0
    assert config_from_dict(saved, stored=True).train.clip == 0.0
    with pytest.raises(ConfigError, match=r"^train.clip: expected 0 \(off\)"):
        config_from_dict(saved)


@pytest.mark.parametrize(("key", "value"), [("train", {"warmup": -5}),
                                            ("train", {"min_lr_ratio": 1.5}),
                                            ("loss", {"iou_weight": -1.0}),
                                            ("loss", {"mask_weight": 0.0, "dice_weight": 0.0,
                                                      "iou_weight": 0.0})])
def test_training_values_an_older_run_saved_are_kept_with_a_warning(key, value, caplog):
    # Before: a run trained with train.warmup=-5 (accepted then) could no longer resume or
    # predict: its saved config was refused. Data and model values stay errors.
    from scrollsam.config import config_from_dict, config_to_dict

    saved = config_to_dict(load_config(None, ["model.type=tiny"]))
    saved[key].update(value)
    with caplog.at_level("WARNING"):
        cfg = config_from_dict(saved, stored=True)
    assert getattr(cfg, key).__dict__.items() >= value.items()
    assert any("the run's saved config: " in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError):
        config_from_dict(saved)  # a user's value: refused
    saved[key].update({k: v for k, v in config_to_dict(load_config(None, [])).get(key).items()
                       if k in value})
    saved["model"]["image_size"] = 250
    with pytest.raises(ConfigError, match="model.image_size"):
        config_from_dict(saved, stored=True)
