"""`scrollsam convert`'s OUT folder: what it refuses before any work (the fragment folder, a
folder that holds it or lies inside it, a file, a link, with ``--overwrite`` a folder convert
did not write) and what a failure leaves (no temp folder, the old OUT whole)."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
from zarr_helpers import tiff_pair

import scrollsam.data.convert as convert_mod
from scrollsam.cli import main
from scrollsam.data.convert import convert_fragment
from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.errors import InputError, WriteError


@pytest.fixture(scope="module")
def tiffs(tmp_path_factory):
    return tiff_pair(tmp_path_factory.mktemp("tiff"))


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too) -> a digest of a file's bytes, or "dir"."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else
            hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def siblings(root: Path) -> Path:
    """``root/sib`` holding three fragment folders 1, 2, 3."""
    for name in ("1", "2", "3"):
        write_fragment(root / "sib" / name, height=40, width=48, depth=4, seed=int(name))
    return root / "sib"


@pytest.mark.parametrize("overwrite", [True, False])
def test_out_that_holds_or_is_the_fragment_is_refused_and_nothing_is_lost(
        tmp_path, capsys, overwrite):
    sib = siblings(tmp_path)
    before = tree(tmp_path)
    flag = ["--overwrite"] if overwrite else []
    for out, words in [(sib, "holds the fragment folder"), (tmp_path, "holds the fragment folder"),
                       (sib / "1", "must differ from the fragment folder"),
                       (sib / "1" / "copy", "inside the fragment folder"),
                       (sib / "1" / "surface_volume", "inside the fragment folder")]:
        assert main(["convert", str(sib / "1"), str(out), *flag]) == 2, out
        line = one_error_line(capsys)
        assert words in line and line.endswith(f"({out})"), line
        assert tree(tmp_path) == before, out  # nothing deleted, nothing left behind


def test_overwrite_replaces_only_a_folder_that_convert_wrote(tiffs, tmp_path, capsys):
    src = str(tiffs["kaggle"])
    # a TIFF fragment folder (the data convert reads, never its output) is not replaced
    tiff_out = write_fragment(tmp_path / "tiff", height=40, width=48, depth=4, seed=1)
    before = tree(tmp_path)
    assert main(["convert", src, str(tiff_out), "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert "not a folder that convert wrote" in line and "surface_volume" in line, line
    assert line.endswith(f"({tiff_out})")
    # a folder of unrelated files, or a copy with something of the user's added, neither
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    copy = convert_fragment(src, tmp_path / "copy")
    (copy / "todo.txt").write_text("keep me too")
    before = tree(tmp_path)
    for out in (notes, copy):
        assert main(["convert", src, str(out), "--overwrite"]) == 2
        assert "todo.txt" in one_error_line(capsys)
    assert tree(tmp_path) == before
    # a copy that convert wrote (any format, either layout) and an empty folder are replaced
    (copy / "todo.txt").unlink()
    for out, fmt in [(copy, "ome-zarr"), (copy, "zarr"), (tmp_path / "empty", "zarr")]:
        out.mkdir(exist_ok=True)
        assert main(["convert", src, str(out), "--overwrite", "--format", fmt]) == 0
        assert Fragment(out).zarr_info.kind == fmt
    seg = convert_fragment(tiffs["segment"], tmp_path / "seg")
    assert convert_fragment(tiffs["kaggle"], seg, overwrite=True) == seg
    assert sorted(p.name for p in seg.iterdir()) == [
        "inklabels.png", "ir.png", "mask.png", "surface_volume.zarr"]
    capsys.readouterr()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_that_is_a_file_or_a_link_is_refused_without_leftovers(tiffs, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("hi\n")
    copy = convert_fragment(tiffs["kaggle"], tmp_path / "copy")
    link = tmp_path / "link"
    link.symlink_to(copy)
    under_file = afile / "copy"
    before = tree(tmp_path)
    for out, words in [(afile, "is a file, not a folder"), (link, "is a symbolic link"),
                       (under_file, "is a file, not a folder")]:
        for flag in (["--overwrite"], []):
            assert main(["convert", str(tiffs["kaggle"]), str(out), *flag]) == 2
            line = one_error_line(capsys)
            assert words in line, line
        assert tree(tmp_path) == before
    assert line.endswith(f"({afile})")  # the file in the way is the one named
    assert afile.read_text() == "hi\n"


@pytest.mark.parametrize("where", ["copy", "rename"])
def test_a_failure_mid_convert_keeps_the_old_out_and_leaves_no_temp(
        tiffs, tmp_path, monkeypatch, where):
    old = convert_fragment(tiffs["kaggle"], tmp_path / "copy", format="ome-zarr")
    before = tree(tmp_path)
    if where == "copy":  # the new copy fails half-way: a few images written, then an error
        def fail(*args, **kwargs):
            raise RuntimeError("boom")
        monkeypatch.setattr(convert_mod, "_copy_images", fail)
    else:  # the new copy is complete, but moving it to OUT fails
        real_rename = convert_mod.os.rename

        def rename(src, dst):
            if Path(src).name.startswith(".copy.tmp-"):
                raise OSError(errno.EXDEV, "cross-device link")
            real_rename(src, dst)
        monkeypatch.setattr(convert_mod.os, "rename", rename)
    with pytest.raises((RuntimeError, OSError)):
        convert_fragment(tiffs["kaggle"], old, overwrite=True)
    assert tree(tmp_path) == before  # the old copy whole, no .copy.tmp-* or .copy.old-*


def test_a_failure_removes_the_folders_it_made_and_a_full_disk_is_one_line(
        tiffs, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(convert_mod, "_fill", full)
    out = tmp_path / "new" / "deeper" / "copy"
    with pytest.raises(WriteError, match="no space left on device"):
        convert_fragment(tiffs["kaggle"], out)
    assert main(["convert", str(tiffs["kaggle"]), str(out)]) == 2
    line = one_error_line(capsys)
    assert "no space left on device" in line and line.endswith(f"({out})"), line
    assert list(tmp_path.iterdir()) == []  # new/deeper made for the copy, removed with it


def test_library_call_refuses_before_any_work(tiffs, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "_write_array",
                        lambda *a, **k: pytest.fail("wrote before refusing"))
    with pytest.raises(InputError, match="holds the fragment folder"):
        convert_fragment(tiffs["kaggle"], tiffs["kaggle"].parent, overwrite=True)
    assert tiffs["kaggle"].is_dir()
