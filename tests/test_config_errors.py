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
