"""A prediction into a folder that holds an earlier one leaves none of the earlier one's files to
be read as its own; an OME-Zarr prediction is never lost to a PNG one without --restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from infer_helpers import make_run

from scrollsam.cli import main
from scrollsam.data.synthetic import write_fragment


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("replaced")
    write_fragment(root / "a", height=96, width=80, depth=8, seed=1)
    write_fragment(root / "b", height=96, width=80, depth=8, seed=2, labels=False)
    make_run(root / "run", "data.input=ir")
    return root


def predict(data: Path, frag: str, out: Path, *args: str) -> int:
    return main(["predict", "--run", str(data / "run"), "--fragment", str(data / frag),
                 "--out", str(out), "--device", "cpu", *args])


def test_another_fragments_metrics_and_tif_do_not_stay_beside_the_new_pngs(data, tmp_path,
                                                                            capsys):
    """Before: fragment a's metrics.json (it has labels) and prob.tif stayed beside the PNGs of
    fragment b (no labels, no --save-tif), read as b's score and probabilities."""
    out = tmp_path / "out"
    assert predict(data, "a", out, "--save-tif") == 0
    assert {"metrics.json", "prob.tif"} <= {p.name for p in out.iterdir()}
    assert predict(data, "b", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mask.png", "overlay.png", "prob.png"]
    assert predict(data, "a", out, "--format", "zarr") == 0  # PNG files -> OME-Zarr
    names = {p.name for p in out.iterdir()}
    assert not names & {"mask.png", "overlay.png", "prob.png"}, names
    assert {"prob.ome.zarr", "metrics.json", "summary.json", "prob_preview.png"} <= names
    assert json.loads((out / "metrics.json").read_text())["fragment"] == "a"
    capsys.readouterr()


def test_a_png_prediction_over_an_ome_zarr_one_needs_restart(data, tmp_path, capsys):
    """Before: the PNGs were written beside the other fragment's OME-Zarr map, summary and
    previews."""
    out = tmp_path / "out"
    assert predict(data, "a", out, "--format", "zarr") == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert predict(data, "b", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out: {out} holds an OME-Zarr prediction (prob.ome.zarr) "
                          f"and this one writes PNG files; pass --format zarr to continue it, "
                          f"--restart to discard it"), err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing lost
    assert predict(data, "b", out, "--restart") == 0
    assert sorted(p.name for p in out.iterdir()) == ["mask.png", "overlay.png", "prob.png"]
