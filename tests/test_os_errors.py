"""OSErrors end in one line that says what happened, never a traceback, and a read is never
called a write: folders and files that cannot be read (simulated where root reads anything:
``os.stat`` / ``open`` raise PermissionError for the locked paths), links to nothing, names over
255 bytes (made for real), valid names near 255 bytes whose temp names used to pass the limit,
a folder or device given as a config file, and an output that is a link to nothing."""

from __future__ import annotations

import builtins
import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest

from scrollsam.cli import main
from scrollsam.config import load_config
from scrollsam.data.convert import convert_fragment
from scrollsam.data.fragment import Fragment
from scrollsam.data.stats import StatsCache
from scrollsam.data.synthetic import write_fragment
from scrollsam.errors import ConfigError
from scrollsam.fs_errors import bounded_name, os_error_line
from scrollsam.io import atomic_write_text, refused_write, write_png
from scrollsam.train.rundir import STALE_TEMPS

LONG = "x" * 300  # over the 255-byte limit of one name
VALID = "v" * 250  # within it, but not with ".tmp-12345678" added


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def frag(tmp_path: Path) -> Path:
    return write_fragment(tmp_path / "frag", height=48, width=48, depth=4, seed=1)


def _deny(monkeypatch: pytest.MonkeyPatch, *, inside: Path | None = None,
          files: tuple[Path, ...] = ()) -> None:
    """What the kernel does for a non-root user: stat of anything ``inside`` a folder without
    search permission, and opening ``files`` (mode 000), raise PermissionError."""
    real_stat, real_open = os.stat, builtins.open

    def denied(path: object, *, opening: bool) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        p = Path(os.path.abspath(os.fsdecode(path)))
        return (inside is not None and p != inside and p.is_relative_to(inside)) or (
            opening and p in files)

    def stat(path, *args, **kwargs):
        if denied(path, opening=False):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_stat(path, *args, **kwargs)

    def open_(path, *args, **kwargs):
        if denied(path, opening=True):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(builtins, "open", open_)


def test_refused_write_never_raises_for_ancestors_it_cannot_look_into(tmp_path, monkeypatch):
    # Before: Path.exists() on the ancestors raised, a second traceback during the first.
    long_parent = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / LONG / "f"))
    assert refused_write(long_parent) == \
        f"no space left on device while writing f ({tmp_path / LONG})"
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny(monkeypatch, inside=locked)
    inside = OSError(errno.ENOSPC, "No space left on device", str(locked / "a" / "f"))
    assert refused_write(inside) == f"no space left on device while writing f ({locked / 'a'})"
    assert refused_write(OSError(errno.EDQUOT, "quota"), locked / "a" / "out") == \
        f"disk quota exceeded while writing output ({locked / 'a' / 'out'})"


def test_a_missing_permission_is_a_write_only_inside_the_output(tmp_path):
    out = tmp_path / "out"
    denied = PermissionError(errno.EACCES, "Permission denied", str(out / "prob.png"))
    assert os_error_line(denied, out) == f"permission denied while writing prob.png ({out})"
    elsewhere = PermissionError(errno.EACCES, "Permission denied", "data/1/surface_volume")
    assert os_error_line(elsewhere, out) == "permission denied (data/1/surface_volume)"
    assert os_error_line(elsewhere) == "permission denied (data/1/surface_volume)"
    assert os_error_line(OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug: traceback


def test_an_unreadable_fragment_folder_is_not_called_a_write(frag, tmp_path, monkeypatch,
                                                             capsys):
    # Before: "permission denied while writing surface_volume (.../frag)" for every command.
    _deny(monkeypatch, inside=frag)
    for argv in (["inspect", str(frag)], ["convert", str(frag), str(tmp_path / "copy")]):
        assert main(argv) == 2
        assert _one_line(capsys.readouterr().err) == \
            f"error: cannot read fragment folder: permission denied ({frag})"
    labels = frag / "inklabels.png"
    assert main(["evaluate", "--pred", str(labels), "--labels", str(labels)]) == 2
    assert _one_line(capsys.readouterr().err) == \
        f"error: cannot read image: permission denied ({labels})"


@pytest.mark.parametrize("name", ["surface_volume/02.tif", "mask.png", "inklabels.png"])
def test_an_unreadable_file_names_the_file_once_and_says_why(frag, monkeypatch, capsys, name):
    # Before: "corrupt or unreadable TIFF: [Errno 13] Permission denied: '/abs/02.tif' (02.tif)"
    path = frag / name
    _deny(monkeypatch, files=(path,))
    assert main(["inspect", str(frag)]) == 2
    kind = "TIFF" if name.endswith(".tif") else "PNG"
    assert _one_line(capsys.readouterr().err) == \
        f"error: cannot read {kind}: permission denied ({path})"


@pytest.mark.parametrize("name", ["surface_volume/02.tif", "mask.png", "inklabels.png"])
def test_a_link_to_a_missing_file_is_named_so(frag, tmp_path, capsys, name):
    # Before: a slice was "corrupt or unreadable", a mask "missing", labels silently absent.
    path = frag / name
    path.unlink()
    path.symlink_to(tmp_path / "gone")
    assert main(["inspect", str(frag)]) == 2
    kind = "TIFF" if name.endswith(".tif") else "PNG"
    assert _one_line(capsys.readouterr().err) == \
        f"error: cannot read {kind}: it is a link to a missing file, {tmp_path / 'gone'} ({path})"


def test_evaluate_names_a_link_to_nothing(frag, tmp_path, capsys):
    # Before: "expected an image Pillow can read, got [Errno 2] ..."
    link = tmp_path / "pred.png"
    link.symlink_to("gone.png")
    assert main(["evaluate", "--pred", str(link), "--labels", str(frag / "inklabels.png")]) == 2
    assert _one_line(capsys.readouterr().err) == \
        f"error: cannot read image: it is a link to a missing file, gone.png ({link})"


def test_names_over_255_bytes_are_one_line(data, frag, tmp_path, capsys, monkeypatch):
    # Before: an OSError traceback ([Errno 36] File name too long) in every command.
    monkeypatch.chdir(tmp_path)
    cases = [
        (["synth", LONG, "--fragments", "1", "--height", "32", "--width", "32", "--depth", "2"],
         f"{LONG}/train/1"),
        (["inspect", LONG], LONG),
        (["convert", str(frag), LONG], LONG),
        (["train", f"out={LONG}", f"data.root={data}", "data.train=[train/1]",
          "data.valid=[train/2]", "model.type=tiny", "model.image_size=64"], LONG),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        line = _one_line(capsys.readouterr().err)
        assert "name too long: 300 bytes, at most 255" in line, line
        assert line.endswith(f"({named})") or line.endswith(f"({tmp_path / named})"), line


def test_predict_with_names_over_255_bytes_is_one_line(frag, tmp_path, capsys):
    from infer_helpers import make_run

    run = make_run(tmp_path / "run", "data.input=ir")
    for argv in (["predict", "--run", str(run), "--fragment", str(frag), "--out",
                  str(tmp_path / LONG)],
                 ["predict", "--run", str(tmp_path / LONG), "--fragment", str(frag), "--out",
                  str(tmp_path / "p")]):
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err)
        assert "name too long: 300 bytes, at most 255" in line, line


def test_files_with_valid_names_near_255_bytes_can_be_written(tmp_path):
    # Before: the temp name (".NAME.tmp-12345678.txt") passed 255 bytes: [Errno 36].
    atomic_write_text(tmp_path / f"{VALID[:-4]}.txt", "a")
    write_png(tmp_path / f"{VALID[:-4]}.png", np.zeros((4, 4), np.uint8))
    assert (tmp_path / f"{VALID[:-4]}.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{VALID[:-4]}.png",
                                                          f"{VALID[:-4]}.txt"]


def test_convert_into_a_valid_name_near_255_bytes(frag, tmp_path):
    # Before: [Errno 36] for the temp folder ".NAME.tmp-PID-hex".
    convert_fragment(frag, tmp_path / VALID)
    convert_fragment(frag, tmp_path / VALID, overwrite=True)  # the old copy renamed aside
    assert Fragment(tmp_path / VALID).shape == Fragment(frag).shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frag", VALID]


def test_stats_of_a_fragment_named_near_255_bytes_are_cached(frag, tmp_path, caplog):
    # Before: "could not cache statistics" on every run: the cache file's name passed 255 bytes.
    long_id = tmp_path / ("f" * 250)
    frag.rename(long_id)
    StatsCache(tmp_path / "run", seed=0).get(Fragment(long_id))
    assert "could not cache" not in caplog.text
    assert len(list((tmp_path / "run" / "stats").glob("*.json"))) == 1
    assert not list((tmp_path / "run" / "stats").glob(".*"))


def test_temp_names_stay_as_before_where_they_fit_and_match_stale_patterns():
    assert bounded_name("last", ".tmp-1a2b3c4d.pt") == ".last.tmp-1a2b3c4d.pt"
    patterns = dict(STALE_TEMPS)
    assert patterns[""].match(bounded_name("best", ".tmp-1a2b3c4d.pt"))
    assert patterns["embeddings"].match(bounded_name("0a1b2c", ".tmp-1a2b3c4d.pt"))
    long_stats = bounded_name("é" * 200 + "-0123456789abcdef", ".json.tmp-4242")
    assert len(os.fsencode(long_stats)) <= 255 and patterns["stats"].match(long_stats)
    suffix = bounded_name("a", ".tmp-1a2b3c4d." + "s" * 250)  # an absurd suffix is cut too
    assert len(os.fsencode(suffix)) == 255 and suffix.startswith(".a.tmp-1a2b3c4d.")
    assert re.fullmatch(r"\.é+", bounded_name("é" * 200, ""))  # never half a character


@pytest.mark.parametrize(("given", "message"), [
    (".", "expected a config file, got a folder (.)"),
    ("/dev/null", "expected a config file, got a device or other special file (/dev/null)"),
    ("link.yaml", "cannot read the config file: it is a link to a missing file, gone.yaml "
                  "(link.yaml)"),
    ("none.yaml", "config file not found (none.yaml)"),
])
def test_a_config_path_that_is_no_file_says_what_it_is(tmp_path, monkeypatch, given, message):
    # Before: "config file not found" for a folder, a device and a link alike.
    monkeypatch.chdir(tmp_path)
    Path("link.yaml").symlink_to("gone.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(given)
    assert str(err.value) == message


def test_submit_out_that_is_a_link_to_nothing_needs_force(frag, tmp_path, capsys):
    # Before: the link was replaced without --force.
    out = tmp_path / "sub.csv"
    out.symlink_to(tmp_path / "gone.csv")
    argv = ["submit", "--pred", f"a={frag / 'inklabels.png'}", "--out", str(out)]
    assert main(argv) == 2
    assert _one_line(capsys.readouterr().err) == \
        f"error: --out: expected a new file (--force to overwrite), got an existing link ({out})"
    assert out.is_symlink()
    assert main([*argv, "--force"]) == 0
    assert out.is_file() and not out.is_symlink()
