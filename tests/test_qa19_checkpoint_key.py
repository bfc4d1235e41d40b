"""A preset's missing official SAM file (model.checkpoint) is named by its config key."""

from __future__ import annotations

from pathlib import Path

from scrollsam.cli import main
from scrollsam.data.synthetic import write_fragment

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_a_missing_model_checkpoint_names_the_key(tmp_path, capsys):
    write_fragment(tmp_path / "data" / "a", height=160, width=160, depth=8, seed=1)
    missing = tmp_path / "checkpoints" / "sam_vit_b_01ec64.pth"
    code = main(["train", "--config", str(DEMO), f"data.root={tmp_path / 'data'}",
                 "data.train=[a]", "data.valid=[]", f"model.checkpoint={missing}",
                 f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: checkpoint not found: {missing} (model.checkpoint); "), err
    assert "Model Checkpoints" in err and err.endswith(
        "download one and pass its local path as model.checkpoint=PATH\n"), err
