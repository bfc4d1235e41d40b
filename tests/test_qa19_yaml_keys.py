"""A key given twice in a YAML config file or an override value is one error line naming the
key and both lines; YAML loaders silently keep the last value."""

from __future__ import annotations

import pytest

from scrollsam.cli import main
from scrollsam.config import load_config
from scrollsam.config_yaml import parse_yaml
from scrollsam.errors import ConfigError

TWICE = [  # (file text, what the line says)
    ("train:\n  lr: 1e-3\n  lr: 1e-4\n", "train.lr: given twice, at lines 2 and 3"),
    ("train:\n  lr: 1e-3\ndata:\n  tile: 64\ntrain:\n  steps: 3\n",
     "train: given twice, at lines 1 and 5"),
    ("model:\n  trainable: [mask_decoder]\n  trainable: [image_encoder]\n",
     "model.trainable: given twice, at lines 2 and 3"),
]


@pytest.mark.parametrize("text, message", TWICE, ids=range(len(TWICE)))
def test_a_config_file_giving_a_key_twice_is_one_error_line(tmp_path, capsys, text, message):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip() == f"error: {message} ({path})", err
    assert not (tmp_path / "run").exists()


def test_an_override_value_giving_a_key_twice_names_the_dotted_key():
    """Before: "at lines 1 and 1"."""
    with pytest.raises(ConfigError, match=r"^train\.lr: given twice, at line 1, columns 2 and 9 "
                                          r"\(override train=\{lr: 1, lr: 2\}\)$"):
        load_config(None, ["train={lr: 1, lr: 2}"])


def test_keys_given_once_still_load():
    assert load_config(None, ["train={lr: 1e-4, steps: 3}"]).train.lr == 1e-4
    assert parse_yaml("a: {x: 1}\nb: {x: 2}\nc: &r [1, *r]\n")["b"] == {"x": 2}
    assert parse_yaml("") is None
