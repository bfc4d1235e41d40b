"""`scrollsam.io.within`: the one "path is the folder or lies inside it" test."""

from __future__ import annotations

from pathlib import Path

import pytest

from scrollsam.io import within


@pytest.mark.parametrize("path, folder, expected", [
    ("/a/b", "/a/b", True),  # the folder itself
    ("/a/b/c", "/a/b", True),
    ("/a/b/c/d.png", "/a/b", True),
    ("/a/bc", "/a/b", False),  # a sibling sharing the name's start
    ("/a", "/a/b", False),  # the folder's parent
    ("/x/b", "/a/b", False),
    ("/a/b", "/", True),
])
def test_within_compares_whole_components(path, folder, expected):
    assert within(Path(path), Path(folder)) is expected


def test_within_follows_links_only_when_given_resolved_paths(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    inside = tmp_path / "link" / "x"
    assert not within(inside, tmp_path / "real")  # as given: two different names
    assert within(inside.resolve(), (tmp_path / "real").resolve())
