"""`scrollsam synth` and `scrollsam inspect` through scrollsam.cli.main."""

from __future__ import annotations

import json

from scrollsam.cli import main


def test_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "data"
    code = main(["synth", str(out), "--fragments", "2", "--height", "96", "--width", "128",
                 "--depth", "12", "--seed", "5", "--ink-contrast", "0.3", "--test-fragments", "1"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "train" / "1"), str(out / "train" / "2"), str(out / "test" / "a")]
    assert not (out / "test" / "a" / "inklabels.png").exists()

    assert main(["inspect", str(out / "train" / "1")]) == 0
    text = capsys.readouterr().out
    for expected in ["layout      kaggle (surface_volume/00.tif..11.tif)",
                     "96 x 128 x 12 (height x width x depth), uint16, uncompressed",
                     "% of the image", "% of the mask", "contrast", "ink signal  strongest in"]:
        assert expected in text, expected
    assert len([line for line in text.splitlines() if ".tif " in line]) == 12

    assert main(["inspect", str(out / "test" / "a"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["height"], d["width"], d["depth"], d["dtype"]) == (96, 128, 12, "uint16")
    assert d["has_labels"] is False and d["ink_fraction"] is None and d["ink_band"] is None
    assert 0.3 < d["mask_coverage"] < 0.9 and d["bytes_on_disk"] > 96 * 128 * 12 * 2
    assert [s["z"] for s in d["slices"]] == list(range(12))


def test_inspect_json_reports_ink(tmp_path, capsys):
    main(["synth", str(tmp_path), "--fragments", "1", "--height", "128", "--width", "128"])
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "train" / "1"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert 0.01 < d["ink_fraction"] < 0.4 and d["depth"] == 65
    z0, z1 = d["ink_band"]
    assert 20 <= z0 <= z1 <= 45  # the synthetic ink sits in the middle slices


def test_broken_folder_exit_2_with_one_line(tmp_path, capsys):
    main(["synth", str(tmp_path), "--fragments", "1", "--height", "32", "--width", "32",
          "--depth", "4"])
    capsys.readouterr()
    frag = tmp_path / "train" / "1"
    (frag / "surface_volume" / "02.tif").unlink()
    assert main(["inspect", str(frag)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "02.tif)" in err


def test_synth_refuses_to_overwrite_and_bad_arguments(tmp_path, capsys):
    args = ["synth", str(tmp_path), "--fragments", "1", "--height", "32", "--width", "32",
            "--depth", "2"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["synth", str(tmp_path / "x"), "--height", "4"]) == 2
    assert "height" in capsys.readouterr().err


def test_inspect_names_dead_slices(tmp_path, capsys):
    # Before: a blank slice showed as mean 0.0, std 0.0 without a word, though it wrecked
    # profile views and moved align: sheet bands.
    import numpy as np
    import tifffile

    main(["synth", str(tmp_path), "--fragments", "1", "--height", "64", "--width", "64",
          "--depth", "8"])
    frag = tmp_path / "train" / "1"
    capsys.readouterr()
    assert main(["inspect", str(frag), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dead_slices"] == []
    for z in (3, 7):
        path = sorted((frag / "surface_volume").iterdir())[z]
        tifffile.imwrite(path, np.zeros_like(tifffile.imread(path)))
    capsys.readouterr()
    assert main(["inspect", str(frag), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dead_slices"] == [3, 7]
    assert main(["inspect", str(frag)]) == 0
    assert "  dead slices 3, 7: one value inside the mask" in capsys.readouterr().out


def test_inspect_names_no_ink_band_where_moved_labels_contrast_as_much(tmp_path, capsys):
    """A volume without ink but with labels: fibres and the drifting sheet still give each
    slice some |contrast| (0.06-0.15 pooled std); so do the labels moved elsewhere, and no
    ink band is named. The same fragment with ink names its band, well above chance."""
    for name, contrast in (("ink", "0.1"), ("none", "0")):
        main(["synth", str(tmp_path / name), "--fragments", "1", "--height", "256", "--width",
              "256", "--ink-contrast", contrast, "--seed", "2"])
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "none" / "train" / "1"), "--json"]) == 0
    none = json.loads(capsys.readouterr().out)
    peak = max(abs(s["contrast"]) for s in none["slices"])
    assert none["ink_band"] is None and 0 < peak < 2 * none["chance_contrast"]
    assert main(["inspect", str(tmp_path / "none" / "train" / "1")]) == 0
    assert "ink signal  none that stands out" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "ink" / "train" / "1"), "--json"]) == 0
    ink = json.loads(capsys.readouterr().out)
    peak = max(abs(s["contrast"]) for s in ink["slices"])
    assert ink["ink_band"] is not None and peak > 3 * ink["chance_contrast"]
