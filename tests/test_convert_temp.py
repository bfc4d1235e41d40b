"""convert's temporary folder: removed after an interrupt also when a zarr write was still in
flight, and removed by the next convert into the same OUT when a killed convert left it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from zarr.core import sync

import scrollsam.data.convert as convert
from scrollsam.data.convert import convert_fragment
from scrollsam.data.convert_temp import remove_stale_temps
from scrollsam.data.synthetic import write_fragment


@pytest.fixture
def frag(tmp_path) -> Path:
    return write_fragment(tmp_path / "frag", height=32, width=32, depth=4)


def test_an_interrupt_with_a_zarr_write_in_flight_leaves_no_temp(frag, tmp_path, monkeypatch):
    # Before: a Ctrl-C stops only the main thread's wait for zarr's writes; one still running
    # on zarr's event loop re-created a chunk (.ow.tmp-PID-HEX/surface_volume.zarr/2/1/0/0)
    # after the cleanup had removed the folder, so about 3 in 25 interrupts left it.
    def interrupted(frag_, folder: Path, *, new_id: str) -> None:
        async def late_chunk() -> None:  # a chunk write zarr has not finished yet
            await asyncio.sleep(0.3)
            chunk = folder / "surface_volume.zarr" / "2" / "1" / "0" / "0"
            chunk.parent.mkdir(parents=True, exist_ok=True)
            chunk.write_bytes(b"chunk")

        pending.append(asyncio.run_coroutine_threadsafe(late_chunk(), sync._get_loop()))
        raise KeyboardInterrupt

    pending: list = []

    monkeypatch.setattr(convert, "_copy_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_fragment(frag, tmp_path / "cv" / "ow", format="ome-zarr", chunks=(2, 16, 16))
    pending[0].result(5)  # the late write has happened, before or after the cleanup
    assert not (tmp_path / "cv").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_converts_temp_folder_goes_with_the_next_convert(frag, tmp_path):
    # Before: the .OUT.tmp-* folder a SIGKILLed convert left stayed for good, also after a
    # later convert --overwrite into the same OUT.
    out = tmp_path / "cv" / "ow"
    convert_fragment(frag, out)
    dead = _dead_pid()
    stale = out.parent / f".ow.tmp-{dead}-0123abcd"
    (stale / "surface_volume.zarr" / "0").mkdir(parents=True)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            running = out.parent / f".ow.tmp-{alive.pid}-0123abcd"  # a convert still writing
            kept = [running, out.parent / f".other.tmp-{dead}-0123abcd",  # another OUT's
                    out.parent / f".ow.tmp-{dead}-notmine", out.parent / "ow.tmp-1-0123abcd"]
            for folder in kept:
                folder.mkdir()
            convert_fragment(frag, out, overwrite=True)
            assert not stale.exists()
            assert all(folder.is_dir() for folder in kept)
            assert remove_stale_temps(out.resolve()) == []
        finally:
            alive.kill()


def test_an_interrupt_during_the_renames_waits_and_says_the_copy_is_complete(frag, tmp_path,
                                                                             monkeypatch):
    # Before: a Ctrl-C between the two renames of --overwrite was handled there (the old copy
    # renamed back), or, just after them, ended with a bare "interrupted" (exit 130) though
    # the new copy was whole.
    import os
    import signal

    out = tmp_path / "copy"
    convert_fragment(frag, out)
    write_fragment(frag, height=32, width=32, depth=6, overwrite=True)  # the source changed
    real, calls = os.rename, []

    def rename(src, dst):
        real(src, dst)
        calls.append(Path(dst).name)
        if len(calls) == 1:  # the old copy is aside, the new one not yet in place
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(convert.os, "rename", rename)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match=r"the copy is complete \(.*copy\); the copy "
                                                    r"it replaced, left as \.copy\.old-.*, goes"):
            convert_fragment(frag, out, overwrite=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls[1] == "copy"  # both renames happened
    assert convert.Fragment(out).shape[0] == 6
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".copy.old-")]) == 1


def test_an_interrupt_while_the_replaced_copy_is_deleted_says_the_copy_is_complete(
        frag, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    convert_fragment(frag, out)

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"^the copy is complete \(.*copy\); the copy"):
        convert_fragment(frag, out, overwrite=True)
    assert convert.Fragment(out).shape == (4, 32, 32)


def test_a_replaced_copy_left_aside_goes_with_the_next_convert_only_beside_its_successor(
        frag, tmp_path):
    # Reviewer: a signal held back during the renames left the whole old copy as
    # .OUT.old-PID-HEX, which no later convert removed.
    dead = _dead_pid()
    out = tmp_path / "ow"
    aside = tmp_path / f".ow.old-{dead}-0123abcd"  # killed between its two renames: no ow
    (aside / "surface_volume.zarr").mkdir(parents=True)
    assert remove_stale_temps(out) == []  # the only copy there is: kept
    convert_fragment(frag, tmp_path / "other")
    assert aside.is_dir()
    (aside.parent / "ow").mkdir()  # now the new copy is in place beside it
    assert remove_stale_temps(out) == [aside]
