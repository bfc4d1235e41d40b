"""The torchrun environment, the row bands each rank owns and the one-line errors ranks
exchange (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from scrollsam.errors import InputError
from scrollsam.train.distributed import (
    World,
    error_line,
    exchange_errors,
    process_device,
    row_bands,
    world_from_env,
)


def test_world_from_env_alone_and_under_torchrun() -> None:
    assert world_from_env({}) == World()
    w = world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.main, w.distributed) == (3, 4, 1, False, True)


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "x"}])
def test_world_from_env_rejects_inconsistent_values(env: dict[str, str]) -> None:
    with pytest.raises(InputError, match="RANK"):
        world_from_env(env)


def test_process_device_gives_each_rank_its_gpu() -> None:
    assert process_device(torch.device("cuda"), World(1, 2, 1)) == torch.device("cuda", 1)
    assert process_device(torch.device("cuda"), World()) == torch.device("cuda")
    assert process_device(torch.device("cpu"), World(1, 2, 1)) == torch.device("cpu")


@pytest.mark.parametrize("height,band,size", [(100, 32, 3), (64, 64, 2), (1, 8, 4), (257, 16, 1)])
def test_row_bands_cover_every_row_once(height: int, band: int, size: int) -> None:
    rows = [y for r in range(size) for y0, y1 in row_bands(height, band_rows=band,
                                                          world=World(r, size))
            for y in range(y0, y1)]
    assert sorted(rows) == list(range(height))
    for r in range(size):
        bands = row_bands(height, band_rows=band, world=World(r, size))
        assert all(y0 % band == 0 for y0, _ in bands)


def test_exchanged_errors_are_one_line_each() -> None:
    """A multi-line message (a traceback-like text) travels as its first line; a scrollsam
    error's message goes bare unless typed (prediction's settle names every type)."""
    assert exchange_errors(None) == []
    assert exchange_errors(RuntimeError("boom\n  at line 3\n")) == [(0, "RuntimeError: boom")]
    assert exchange_errors(InputError("bad fragment (x)\nmore")) == [(0, "bad fragment (x)")]
    assert error_line(InputError("bad\nmore"), typed=True) == "InputError: bad"
    assert error_line(KeyError()) == "KeyError"
