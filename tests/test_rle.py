"""Kaggle run-length encoding: hand-checked strings, validation, and hypothesis round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scrollsam.errors import InputError
from scrollsam.io import atomic_path, atomic_write_text
from scrollsam.rle import (
    is_submission_id,
    parse_pred_specs,
    rle_decode,
    rle_encode,
    write_submission,
)


def test_encode_hand_checked_row_major_one_indexed():
    mask = np.array([[0, 1, 1],
                     [1, 0, 1]])
    # row-major pixels 1..6 = 0 1 1 1 0 1: one run 2..4, one run at 6 (the last pixel)
    assert rle_encode(mask) == "2 3 6 1"
    # the transpose gives a different string: column-major would be wrong
    assert rle_encode(mask.T) == "2 2 5 2"


def test_runs_at_first_and_last_pixel_empty_and_full():
    assert rle_encode(np.array([[1, 0], [0, 1]])) == "1 1 4 1"
    assert rle_encode(np.zeros((3, 4), bool)) == ""
    assert rle_encode(np.ones((3, 4), bool)) == "1 12"
    assert rle_encode(np.zeros((0, 5), bool)) == ""
    assert rle_decode("", (3, 4)).sum() == 0
    assert rle_decode("1 12", (3, 4)).all()


def test_encode_accepts_any_nonzero_as_ink():
    assert rle_encode(np.array([[0, 255, 7]], np.uint8)) == "2 2"


def test_decode_hand_checked_and_touching_runs():
    expected = np.array([[0, 1, 1], [1, 0, 1]], bool)
    np.testing.assert_array_equal(rle_decode("2 3 6 1", (2, 3)), expected)
    np.testing.assert_array_equal(rle_decode(" 2 3\n6\t1 ", (2, 3)), expected)
    # touching runs are accepted; encoding merges them
    touching = rle_decode("2 1 3 2 6 1", (2, 3))
    np.testing.assert_array_equal(touching, expected)
    assert rle_encode(touching) == "2 3 6 1"


@pytest.mark.parametrize(
    ("rle", "fragment"),
    [
        ("1 2 3", "pairs"),  # odd count
        ("1 0", "lengths >= 1"),
        ("0 2", "starts >= 1"),
        ("5 1 2 1", "sorted"),  # unsorted
        ("1 3 2 1", "sorted"),  # overlapping
        ("5 3", "inside 6 pixels"),  # past the end
        ("7 1", "inside 6 pixels"),
        ("1 -1", "whole numbers"),
        ("1 2.0", "whole numbers"),
        ("a b", "whole numbers"),
        ("1 99999999999999999999", "numbers up to"),
    ],
)
def test_decode_rejects_malformed(rle, fragment):
    with pytest.raises(InputError, match=fragment):
        rle_decode(rle, (2, 3))


def test_decode_rejects_bad_shape():
    with pytest.raises(InputError, match="shape"):
        rle_decode("1 1", (2, 3, 4))


@st.composite
def masks(draw):
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    mask = draw(arrays(bool, (h, w)))
    # force the corner cases often: first and last pixel on or off
    if draw(st.booleans()):
        mask.flat[0] = draw(st.booleans())
        mask.flat[-1] = draw(st.booleans())
    return mask


@settings(max_examples=200, deadline=None)
@given(masks())
def test_round_trip(mask):
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask)
    numbers = [int(t) for t in rle.split()]
    starts, lengths = numbers[0::2], numbers[1::2]
    assert all(n >= 1 for n in lengths)
    # sorted, non-touching runs inside the mask, 1-indexed
    for (s0, l0), s1 in zip(zip(starts, lengths, strict=True), starts[1:], strict=False):
        assert s1 > s0 + l0
    assert not starts or starts[-1] + lengths[-1] - 1 <= mask.size
    assert sum(lengths) == int(mask.sum())


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from([0, 1]))
def test_round_trip_constant_masks(h, w, value):
    mask = np.full((h, w), bool(value))
    assert rle_encode(mask) == ("" if value == 0 else f"1 {h * w}")
    np.testing.assert_array_equal(rle_decode(rle_encode(mask), (h, w)), mask)


def test_parse_pred_specs():
    assert parse_pred_specs(["a=x/m.png", "b=y=z.png"]) == [
        ("a", Path("x/m.png")), ("b", Path("y=z.png"))]
    for bad in (["a"], ["=m.png"], ["a="], ["a,b=m.png"], ["a b=m.png"]):
        with pytest.raises(InputError, match="--pred"):
            parse_pred_specs(bad)
    with pytest.raises(InputError, match="twice"):
        parse_pred_specs(["a=1.png", "a=2.png"])


def test_write_submission_format_order_and_overwrite(tmp_path):
    out = tmp_path / "submission.csv"
    rows = [("b", np.array([[0, 1], [1, 1]])), ("a", np.zeros((2, 2)))]
    assert write_submission(out, rows) == 2
    assert out.read_text() == "Id,Predicted\nb,2 3\na,\n"
    with pytest.raises(InputError, match="--force"):
        write_submission(out, [("c", np.ones((1, 1)))])
    assert out.read_text() == "Id,Predicted\nb,2 3\na,\n"
    write_submission(out, [("c", np.ones((1, 1)))], overwrite=True)
    assert out.read_text() == "Id,Predicted\nc,1 1\n"


def test_write_submission_failure_leaves_nothing(tmp_path):
    out = tmp_path / "submission.csv"

    def rows():
        yield "a", np.ones((2, 2))
        raise InputError("b.png: expected an image file, got no such file")

    with pytest.raises(InputError, match="b.png"):
        write_submission(out, rows())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="unique"):
        write_submission(out, [("a", np.ones((1, 1))), ("a", np.ones((1, 1)))])
    assert list(tmp_path.iterdir()) == []


def test_write_submission_refuses_a_folder_before_reading_a_row(tmp_path):
    # QA: with overwrite, os.replace failed "Is a directory" (a traceback, exit 1); without,
    # the message said "got an existing file".
    folder = tmp_path / "outdir"
    folder.mkdir()

    def rows():
        raise AssertionError("a row was read")
        yield  # a generator

    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"^--out: expected a CSV file path, got a folder "
                                             r"\(.*outdir\)$"):
            write_submission(folder, rows(), overwrite=overwrite)
    with pytest.raises(InputError, match="^--submission: expected a CSV file path"):
        write_submission(folder, rows(), flag="--submission")
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


def test_submission_ids():
    assert is_submission_id("20231012184423") and is_submission_id("a-1_b.2")
    for bad in ("", "a b", "a,b", 'a"b', "a'b", "a\tb"):
        assert not is_submission_id(bad), bad


def test_atomic_helpers(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    with pytest.raises(FileExistsError):
        atomic_write_text(target, "three", overwrite=False)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".txt"
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
