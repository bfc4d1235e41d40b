"""Training the default ``data.input: ir`` (configs/demo.yaml) on a fragment without ir.png (a
scroll segment) names the config key and the way out, on one line."""

from __future__ import annotations

from pathlib import Path

from scrollsam.cli import main
from scrollsam.data.synthetic import write_fragment

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_ir_input_on_a_segment_without_ir_png_names_data_input(tmp_path, capsys):
    seg = write_fragment(tmp_path / "data" / "20230505", height=160, width=160, depth=8, ir=False)
    (seg / "surface_volume").rename(seg / "layers")
    (seg / "mask.png").rename(seg / "20230505_mask.png")
    (seg / "inklabels.png").rename(seg / "20230505_inklabels.png")
    code = main(["train", "--config", str(DEMO), f"data.root={tmp_path / 'data'}",
                 "data.train=[20230505]", "data.valid=[]", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.strip() == (
        "error: fragment 20230505 has no ir.png, which view 'ir' needs (data.input=ir); x-ray "
        "slices: train with data.input=slices (see configs/demo_xray.yaml) "
        f"({seg})"), err
