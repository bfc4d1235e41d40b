"""A segment folder whose mask has another name says which file it found and what to rename it
to; a file given where a fragment folder is expected says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from scrollsam.cli import main
from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.errors import FragmentError


def _segment(tmp_path: Path, mask_name: str) -> Path:
    """A segment folder ``20230505`` (layers/) whose mask is named ``mask_name``."""
    seg = write_fragment(tmp_path / "20230505", height=32, width=32, depth=4, seed=2)
    (seg / "surface_volume").rename(seg / "layers")
    (seg / "inklabels.png").rename(seg / "20230505_inklabels.png")
    (seg / "mask.png").rename(seg / mask_name)
    return seg


@pytest.mark.parametrize("mask_name", ["mask.png", "20230510_mask.png"])
def test_a_segment_mask_under_another_name_is_named_with_the_rename(tmp_path, mask_name):
    seg = _segment(tmp_path, mask_name)
    with pytest.raises(FragmentError) as err:
        Fragment(seg)
    assert str(err.value) == (
        f"missing mask: expected 20230505_mask.png; found {mask_name}: rename it to "
        f"20230505_mask.png ({seg / '20230505_mask.png'})")


def test_a_missing_mask_with_nothing_like_it_keeps_the_short_message(tmp_path):
    seg = _segment(tmp_path, "mask.png")
    (seg / "mask.png").unlink()
    with pytest.raises(FragmentError, match=r"^missing mask: expected 20230505_mask.png \("):
        Fragment(seg)


def test_a_file_given_for_a_fragment_folder_says_it_is_a_file(tmp_path, capsys):
    mask = _segment(tmp_path, "20230505_mask.png") / "20230505_mask.png"
    assert main(["inspect", str(mask)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: expected a fragment folder, got a file ({mask})\n", err
    with pytest.raises(FragmentError, match=r"^fragment folder not found \("):
        Fragment(tmp_path / "missing")
