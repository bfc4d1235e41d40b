"""Output locations that are links or lie under files: one ``error:`` line before any work,
nothing already there lost, no folder left behind (train, synth, demo; the shared check)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import scrollsam.data.synthetic as synthetic
from scrollsam.cli import main
from scrollsam.demo import MARKER, run_demo
from scrollsam.errors import InputError
from scrollsam.out_path import check_out_folder

SMALL = ["--fragments", "1", "--height", "32", "--width", "32", "--depth", "4"]


@pytest.fixture
def places(tmp_path, monkeypatch):
    """In ``tmp_path``: ``dang`` -> nowhere, ``loopA`` <-> ``loopB``, a file ``afile``."""
    monkeypatch.chdir(tmp_path)
    os.symlink("nowhere", "dang")
    os.symlink("loopB", "loopA")
    os.symlink("loopA", "loopB")
    Path("afile").write_text("x\n")
    return tmp_path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("path", "replaced", "says"), [
    ("dang", False, "dang is a symbolic link to nowhere (dang -> nowhere)"),
    ("dang/sub", False, "dang is a symbolic link to nowhere (dang -> nowhere) on the way"),
    ("loopA", False, "symbolic link loop at loopA"),
    ("loopA/x/y", False, "symbolic link loop at loopA on the way to loopA/x/y"),
    ("afile/sub/run", False, "afile is a file, so afile/sub/run cannot be made in it"),
    ("afile", False, "is a file, not a folder (afile)"),
    ("real_link", True, "is a symbolic link, and the folder it names would be replaced"),
])
def test_the_shared_check_names_the_link_loop_or_file(places, path, replaced, says):
    Path("real").mkdir()
    os.symlink("real", "real_link")
    with pytest.raises(InputError, match="^out: ") as err:
        check_out_folder(path, name="out", replaced=replaced)
    assert says in str(err.value)
    for fine in ("new/folder", "real", "real_link/sub", "real_link"):  # writing into: fine
        check_out_folder(fine, name="out")


@pytest.mark.parametrize(("out", "says"), [
    ("dang", "out: dang is a symbolic link to nowhere"),
    ("loopA", "out: symbolic link loop at loopA"),
    ("afile/run", "out: afile is a file, so afile/run cannot be made in it"),
])
def test_train_refuses_a_link_to_nowhere_a_loop_or_a_file_above_before_any_work(
        places, capsys, out, says):
    # before: FileNotFoundError 'dang/.lock', RuntimeError: Symlink loop, NotADirectoryError
    assert main(["train", f"out={out}", "data.root=nowhere_data", "data.train=[train/1]",
                 "model.type=tiny", "train.device=cpu", "--no-progress"]) == 2
    assert says in _one_error_line(capsys)
    assert not Path("nowhere").exists() and Path("afile").read_text() == "x\n"


def test_train_with_data_root_a_link_loop_is_one_line(places, capsys):
    # before: RuntimeError: Symlink loop from '.../loopA/train/1' (checking out= against it)
    assert main(["train", "out=run", "data.root=loopA", "data.train=[train/1]",
                 "model.type=tiny", "train.device=cpu", "--no-progress"]) == 2
    assert "loopA" in _one_error_line(capsys)
    assert not Path("run").exists()


def test_a_train_failing_before_its_first_step_removes_the_parents_it_made(places, capsys):
    Path("kept").mkdir()
    Path("kept/other").mkdir()  # a parent that existed stays, with what it holds
    assert main(["train", "out=kept/np1/np2/run", "data.root=/nonexistent",
                 "data.train=[train/1]", "model.type=tiny", "train.device=cpu",
                 "--no-progress"]) == 2
    assert "fragment folder not found" in _one_error_line(capsys)
    assert not Path("kept/np1").exists()  # before: kept/np1/np2 stayed
    assert Path("kept/other").is_dir()


@pytest.mark.parametrize(("out", "says"), [
    ("dang", "out: dang is a symbolic link to nowhere"),
    ("loopA", "out: symbolic link loop at loopA"),
    ("afile/x", "out: afile is a file, so afile/x cannot be made in it"),
])
def test_synth_refuses_a_link_to_nowhere_a_loop_or_a_file_above(places, capsys, out, says):
    assert main(["synth", *SMALL, out]) == 2  # before: FileExistsError, RuntimeError, ...
    assert says in _one_error_line(capsys)
    assert not Path("nowhere").exists()


def test_synth_overwrite_never_replaces_a_linked_fragment_and_leaves_no_temp(places, capsys):
    # before: rmtree's OSError traceback, and sv/train/.1.tmp-PID/ left behind
    synthetic.write_fragment("prec", height=32, width=32, depth=4)
    before = sorted(p.name for p in Path("prec").rglob("*"))
    Path("sv/train").mkdir(parents=True)
    os.symlink("../../prec", "sv/train/1")
    assert main(["synth", *SMALL, "--overwrite", "sv"]) == 2
    line = _one_error_line(capsys)
    assert "is a symbolic link" in line and "sv/train/1 -> ../../prec" in line
    assert sorted(os.listdir("sv/train")) == ["1"]
    assert sorted(p.name for p in Path("prec").rglob("*")) == before


def test_synth_checks_every_fragment_before_writing_the_first(places, capsys):
    Path("two/test/a").mkdir(parents=True)  # the last fragment to be written exists
    assert main(["synth", *SMALL, "--test-fragments", "1", "two"]) == 2
    assert "fragment folder already exists" in _one_error_line(capsys)
    assert not Path("two/train").exists()  # before: train/1 was written, then the error


def test_synth_without_overwrite_never_replaces_a_fragment_written_meanwhile(places,
                                                                            monkeypatch):
    # Two synth runs into one OUT: the other one renames its fragment into place while this
    # one writes. Before: this one removed it (rmtree) and put its own there, exit 0.
    write = synthetic._write_contents

    def other_run_finishes_first(tmp, *args, **kwargs):
        write(tmp, *args, **kwargs)
        Path("out/train/1").mkdir(parents=True)
        Path("out/train/1/theirs.txt").write_text("the other run's\n")

    monkeypatch.setattr(synthetic, "_write_contents", other_run_finishes_first)
    with pytest.raises(InputError, match="fragment folder already exists; --overwrite"):
        synthetic.synth_fragments("out", fragments=1, height=32, width=32, depth=4)
    assert sorted(os.listdir("out/train")) == ["1"]  # no temp folder of ours left
    assert os.listdir("out/train/1") == ["theirs.txt"]


def test_synth_overwrite_replaces_an_earlier_fragment(places):
    synthetic.synth_fragments("out", fragments=1, height=32, width=32, depth=4, seed=1)
    old = Path("out/train/1/ir.png").read_bytes()
    synthetic.synth_fragments("out", fragments=1, height=32, width=32, depth=4, seed=2,
                              overwrite=True)
    assert Path("out/train/1/ir.png").read_bytes() != old
    assert sorted(os.listdir("out/train")) == ["1"]


@pytest.mark.parametrize(("out", "says"), [
    ("dl", "--out: is a symbolic link, and the folder it names would be replaced"),
    ("dang", "--out: dang is a symbolic link to nowhere"),
    ("loopA", "--out: symbolic link loop at loopA"),
    ("afile", "--out: is a file, not a folder (afile)"),
])
def test_demo_refuses_a_link_in_place_of_its_folder_and_the_rest_before_any_work(places, out,
                                                                                 says):
    # before: OSError 'Cannot call rmtree on a symbolic link', FileExistsError, ...
    Path("d1").mkdir()
    (Path("d1") / MARKER).write_text("an earlier demo\n")
    (Path("d1") / "metrics.json").write_text("{}\n")
    os.symlink("d1", "dl")
    with pytest.raises(InputError) as err:
        run_demo(out, steps=1, progress=False)
    assert says in str(err.value)
    assert sorted(os.listdir("d1")) == sorted([MARKER, "metrics.json"])
    assert Path("afile").read_text() == "x\n"
    shutil.rmtree("d1")


@pytest.mark.parametrize(("extra", "says"), [
    (None, "it has no synth_settings.json: a real fragment"),  # the same layout, no settings
    ("notes.txt", "it holds notes.txt"),
    ("surface_volume/65.tif.bak", "it holds surface_volume/65.tif.bak"),
    ("surface_volume/70.tif/", "it holds surface_volume/70.tif"),  # a folder of the user's
])
def test_synth_overwrite_never_replaces_a_fragment_it_did_not_write(places, capsys, extra,
                                                                    says):
    # before: --overwrite removed any folder at OUT/train/1, a real fragment's included
    synthetic.synth_fragments("sv", fragments=1, height=32, width=32, depth=4)
    frag = Path("sv/train/1")
    if extra is None:
        (frag / synthetic.SETTINGS_FILE).unlink()
    elif extra.endswith("/"):
        (frag / extra).mkdir()
        (frag / extra / "mine.txt").write_text("the user's\n")
    else:
        (frag / extra).write_text("the user's\n")
    before = {p: p.read_bytes() for p in frag.rglob("*") if p.is_file()}
    assert main(["synth", *SMALL, "--overwrite", "sv"]) == 2
    line = _one_error_line(capsys)
    assert says in line and "--overwrite replaces only synthetic fragments" in line
    assert {p: p.read_bytes() for p in frag.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir("sv/train")) == ["1"]


def test_synth_overwrite_replaces_an_empty_folder(places):
    Path("sv/train/1").mkdir(parents=True)
    synthetic.synth_fragments("sv", fragments=1, height=32, width=32, depth=4, overwrite=True)
    assert (Path("sv/train/1") / synthetic.SETTINGS_FILE).is_file()
