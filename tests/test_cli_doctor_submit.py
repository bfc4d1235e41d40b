"""One-line errors and defaults of `scrollsam doctor`, `submit` and `evaluate` flags, as QA
found them (the commands' own work is tested in test_train_loop.py and
test_cli_evaluate_submit.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scrollsam.cli import main


@pytest.fixture
def pred(tmp_path: Path) -> str:
    path = tmp_path / "mask.png"
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_submit_into_a_folder_is_one_line_naming_out(pred, tmp_path, capsys, force):
    # QA: with --force a traceback (IsADirectoryError, exit 1); without, "got an existing file"
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert main(["submit", "--pred", f"a={pred}", "--out", str(folder), *force]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out: expected a CSV file path, got a folder ({folder})\n"
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["submit", "evaluate"])
@pytest.mark.parametrize("value", ["2", "-0.5", "nan"])
def test_a_threshold_outside_0_1_names_the_flag_not_the_file(pred, tmp_path, capsys, command,
                                                             value):
    # QA: submit said "error: d11p/mask.png: threshold: expected a number in [0, 1], got 2.0"
    args = (["submit", "--pred", f"a={pred}", "--out", str(tmp_path / "s.csv")]
            if command == "submit" else ["evaluate", "--pred", pred, "--labels", pred])
    assert main([*args, "--threshold", value]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --threshold: expected a number in [0, 1], got {float(value):g}\n"
    assert not (tmp_path / "s.csv").exists()


def test_doctor_overrides_change_the_builtin_case(monkeypatch, capsys, tmp_path):
    # QA: `scrollsam doctor train.amp=false` lost the built-in fragment ("data.train: expected
    # at least one fragment folder, got none"); overrides now apply on top of it.
    import scrollsam.doctor

    seen = {}

    def spy(s, cfg, out) -> int:  # the checks, given the config the doctor built
        seen["cfg"] = cfg
        seen["fragment"] = (Path(cfg.data.root) / "doctor").is_dir()
        return 0

    monkeypatch.setattr(scrollsam.doctor, "_diagnose", spy)
    assert main(["doctor", "train.amp=false", "model.image_size=128"]) == 0
    cfg = seen["cfg"]
    assert cfg.train.amp is False and cfg.model.image_size == 128  # the overrides
    assert cfg.data.train == ["doctor"] and cfg.model.type == "tiny"  # the built-in case
    assert seen["fragment"]  # its synthetic fragment exists while the doctor runs
    assert "built-in synthetic fragment" in capsys.readouterr().out
    own = scrollsam.doctor.default_config(tmp_path)  # no overrides
    assert main(["doctor"]) == 0 and seen["cfg"].model == own.model  # the doctor's own
    assert main(["doctor", "train.nope=1"]) == 2  # an unknown key is still one line
    assert "train.nope" in capsys.readouterr().err
