"""The slice files a process keeps open are bounded (data/open_files.py): reads stay exact when
readers are closed and re-opened, in any byte order, and the limit follows ``ulimit -n``."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scrollsam.data import open_files
from scrollsam.data.formats import SliceReader, probe_slice
from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment

SRC = Path(__file__).resolve().parents[1] / "src"


def _open_slices(folder: Path) -> int:
    """How many of this process's file descriptors are files under ``folder``."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir()
               if os.path.realpath(fd).startswith(str(folder.resolve())))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_reading_every_slice_of_many_fragments_keeps_few_open(tmp_path, monkeypatch):
    # QA: every slice read once (the statistics) stayed open for the whole run: 16 fragments
    # of 65 slices passed a 1024-file limit and training failed with "too many open files".
    monkeypatch.setattr(open_files.OPEN_FILES, "limit", 8)
    frags = [Fragment(write_fragment(tmp_path / str(i), height=40, width=36, depth=12,
                                     seed=i)) for i in range(3)]
    first = [f.read(0, 12, 0, 40, 0, 36) for f in frags]
    assert _open_slices(tmp_path) <= 8
    assert len(open_files.OPEN_FILES) <= 8
    for frag, whole in zip(frags, first, strict=True):  # closed ones re-open: same pixels
        np.testing.assert_array_equal(frag.read(0, 12, 3, 30, 5, 20), whole[:, 3:30, 5:20])
        frag.close()
    assert _open_slices(tmp_path) == 0


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_reader_reads_the_same_after_being_closed(tmp_path, order, compression):
    pixels = (np.arange(30 * 20, dtype=np.uint32) * 97 % 65536).astype(np.uint16).reshape(30, 20)
    tifffile.imwrite(tmp_path / "s.tif", pixels, byteorder=order, compression=compression,
                     rowsperstrip=4)
    info = probe_slice(tmp_path / "s.tif")
    assert info.memmappable == (compression is None)
    reader = SliceReader(info)
    for _ in range(2):
        np.testing.assert_array_equal(reader.read(3, 17, 2, 19), pixels[3:17, 2:19])
        reader.release()  # as OPEN_FILES does for the least recently read


def test_readers_beyond_the_limit_are_released_in_order_and_never_the_one_reading():
    released: list[str] = []

    class Reader:
        def __init__(self, name: str) -> None:
            self.name = name

        def release(self) -> None:
            released.append(self.name)

    files = open_files.OpenFiles(2)
    a, b, c = Reader("a"), Reader("b"), Reader("c")
    for r in (a, b, a, c):  # a read again: b is now the least recent
        files.touch(r)
    assert released == ["b"] and len(files) == 2
    files.forget(a)
    files.touch(b)
    assert released == ["b"] and len(files) == 2
    files.limit = 0  # the one about to read stays open whatever the limit
    files.touch(c)
    assert released == ["b", "b"] and len(files) == 1


def test_a_release_from_another_thread_waits_for_the_read(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "s.tif", np.ones((64, 64), np.uint16), compression="zlib")
    reader = SliceReader(probe_slice(tmp_path / "s.tif"))
    reader.read(0, 1, 0, 1)
    started, go = threading.Event(), threading.Event()
    real = reader._read_segments

    def slow(*args):
        started.set()
        go.wait(5)
        return real(*args)

    monkeypatch.setattr(reader, "_read_segments", slow)
    result: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: result.append(reader.read(0, 64, 0, 64)))
    thread.start()
    started.wait(5)
    releaser = threading.Thread(target=reader.release)
    releaser.start()
    releaser.join(0.2)
    assert releaser.is_alive()  # it waits: the read in flight keeps its file
    go.set()
    thread.join(5)
    releaser.join(5)
    assert result[0].sum() == 64 * 64 and reader._tif is None


def test_the_limit_is_a_quarter_of_ulimit_n_within_bounds():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {hard})); "
            "from scrollsam.data.open_files import OPEN_FILES; print(OPEN_FILES.limit)")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for n, limit in ((1024, 256), (40, 16)):
        if hard != resource.RLIM_INFINITY and n > hard:
            continue
        out = subprocess.run([sys.executable, "-c", code.format(n=n, hard=hard)], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert int(out) == limit


def test_a_forked_child_reads_its_own_file_never_the_parents(tmp_path):
    # Reviewer: DataLoader workers forked after the statistics inherited every open compressed
    # slice with one shared file offset; their seeks and reads interleaved (12 of 6000 windows
    # came back with other windows' pixels, silently).
    pixels = (np.arange(128 * 128, dtype=np.uint32) * 31 % 65536).astype(np.uint16)
    pixels = pixels.reshape(128, 128)
    tifffile.imwrite(tmp_path / "s.tif", pixels, tile=(64, 64))
    reader = SliceReader(probe_slice(tmp_path / "s.tif"))
    reader.read(0, 10, 0, 10)  # open in the parent, as the statistics leave it
    assert reader._tif is not None
    rng = np.random.default_rng(0)
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # the child: its own file, the right pixels, then out without cleanup
            signal.alarm(60)  # never a hung test run: SIGALRM ends a stuck child
            ok = reader._tif is None
            for y, x in rng.integers(0, 100, (300, 2)):
                ok &= bool((reader.read(y, y + 28, x, x + 28) == pixels[y:y + 28,
                                                                        x:x + 28]).all())
            os._exit(0 if ok else 1)
        children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0, 0]
    np.testing.assert_array_equal(reader.read(0, 128, 0, 128), pixels)  # the parent's still


def test_a_reader_nobody_holds_is_not_kept_open_by_the_bound(tmp_path):
    import gc
    import weakref

    tifffile.imwrite(tmp_path / "s.tif", np.ones((8, 8), np.uint16))
    reader = SliceReader(probe_slice(tmp_path / "s.tif"))
    reader.read(0, 1, 0, 1)
    gone = weakref.ref(reader)
    del reader
    gc.collect()
    assert gone() is None  # before: the registry's reference kept its map and fd open


def test_a_slice_rewritten_since_it_was_probed_is_an_error_not_other_pixels(tmp_path):
    # Reviewer: re-opens trust the probed header (offset, order); one hours later, after the
    # file was rewritten with another layout, would read other bytes as pixels.
    from scrollsam.errors import FragmentError

    path = tmp_path / "s.tif"
    tifffile.imwrite(path, np.ones((16, 16), np.uint16))
    reader = SliceReader(probe_slice(path))
    reader.read(0, 1, 0, 1)
    reader.release()
    tifffile.imwrite(path, np.full((16, 16), 7, np.uint16), description="x" * 4000)
    with pytest.raises(FragmentError, match="slice file changed since the fragment was opened"):
        reader.read(0, 1, 0, 1)


def test_a_reader_evicted_between_its_touch_and_its_open_registers_again(tmp_path,
                                                                         monkeypatch):
    # Reviewer: another thread could evict a reader after its touch and before it opened its
    # file; the file then stayed open outside the bound until that reader was read again.
    tifffile.imwrite(tmp_path / "s.tif", np.ones((8, 8), np.uint16))
    reader = SliceReader(probe_slice(tmp_path / "s.tif"))
    files = open_files.OPEN_FILES
    real, calls = files.touch, []

    def touch(r):
        real(r)
        calls.append(r)
        if len(calls) == 1:
            files.forget(r)  # evicted by another thread: nothing open yet to release

    monkeypatch.setattr(files, "touch", touch)
    reader.read(0, 1, 0, 1)
    assert reader._map is not None and files._open[id(reader)]() is reader
