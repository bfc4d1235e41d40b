"""SIGTERM outside training's and sweep's own stop handlers unwinds a command as Ctrl-C does
(cleanup, one line ``terminated``, exit 143), and an interrupted synth says what it wrote.

Real signals: sent to this process (the handlers under test are installed by the code itself)
or to a real ``scrollsam`` subprocess paused at a known point of its work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scrollsam.cli import main
from scrollsam.sigterm import Terminated, sigterm_as_interrupt

SRC = Path(__file__).resolve().parents[1] / "src"


def _wait(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_sigterm_raises_terminated_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated), sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            _wait(lambda: False, 1.0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert main(["inspect", "/nonexistent/fragment"]) == 2  # an error, then restored
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        mine = lambda signum, frame: None  # noqa: E731 - a caller's own handler stays
        signal.signal(signal.SIGTERM, mine)
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


CHILD = r"""
import signal, sys, time, pathlib
# Ctrl-C as in a terminal: pytest-xdist's workers ignore SIGINT, and a child inherits that
signal.signal(signal.SIGINT, signal.default_int_handler)
ready, go, module, name = (pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3],
                           sys.argv[4])
import importlib
mod = importlib.import_module(module)
real, calls = getattr(mod, name), [0]

def paused(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:  # the second call: the first piece of work is done
        ready.touch()
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return real(*args, **kwargs)

setattr(mod, name, paused)
from scrollsam.cli import main
sys.exit(main(sys.argv[5:]))
"""


def _run_stopped(tmp: Path, hook: tuple[str, str], args: list[str], sig: int
                 ) -> tuple[int, str]:
    """Run ``scrollsam ARGS`` pausing in the second call of ``hook`` (module, function), send
    ``sig`` there, and return the exit code and stderr."""
    ready, go = tmp / "ready", tmp / "go"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), str(go), *hook, *args],
                            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait(lambda: ready.exists() or proc.poll() is not None, 60)
        assert ready.exists(), proc.communicate()[1]
        proc.send_signal(sig)
        time.sleep(0.2)
        go.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize(("sig", "word", "code"), [(signal.SIGTERM, "terminated", 143),
                                                   (signal.SIGINT, "interrupted", 130)])
def test_a_stopped_synth_says_what_it_wrote_and_leaves_no_temp(tmp_path, sig, word, code):
    # Before: SIGTERM killed synth on the spot (exit 143, no line) and left sy/train/.2.tmp-PID
    # with a partial fragment; Ctrl-C printed only "interrupted", though the same command then
    # failed on the fragment it had written.
    rc, err = _run_stopped(tmp_path, ("scrollsam.data.synthetic", "_write_volume"),
                           ["synth", "sy", "--fragments", "3", "--height", "32", "--width",
                            "32", "--depth", "4"], sig)
    assert rc == code, err
    assert err.strip().splitlines()[-1] == (
        f"{word}: 1 of 3 fragments written (sy/train/1); run again with --overwrite to start "
        f"over"), err
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "sy" / "train").iterdir()) == ["1"]


def test_a_terminated_convert_removes_its_temp_folder(tmp_path):
    # Before: SIGTERM killed convert on the spot (exit 143, no line), leaving cv/.n.tmp-*.
    from scrollsam.data.synthetic import write_fragment

    write_fragment(tmp_path / "frag", height=32, width=32, depth=4)
    rc, err = _run_stopped(tmp_path, ("scrollsam.data.convert", "_fill"),  # pyramid level 1
                           ["convert", "frag", "cv/n", "--format", "ome-zarr", "--chunks",
                            "2,16,16"], signal.SIGTERM)
    assert rc == 143, err
    assert err.strip().splitlines()[-1] == "terminated", err
    assert not (tmp_path / "cv").exists()  # nor the folder made for it


AT_EXIT = r"""
import atexit, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist's workers ignore it

def late_ctrl_c():  # a Ctrl-C that lands while the interpreter shuts down
    os.kill(os.getpid(), signal.SIG)
    time.sleep(2)
    print("the shutdown went on", file=sys.stderr)

atexit.register(late_ctrl_c)
from scrollsam.cli import console
sys.argv = ["scrollsam", "synth", sys.argv[1], "--fragments", "1", "--height", "32",
            "--width", "32", "--depth", "4"]
console()
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_command_finished_ends_it_quietly_with_its_code(tmp_path, sig):
    # Before (QA): a Ctrl-C as the command ended printed "Exception ignored in atexit
    # callback ... KeyboardInterrupt" with a traceback, and SIGTERM then killed it (143).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", AT_EXIT.replace("signal.SIG)", f"signal.{sig})"),
                           str(tmp_path / "sy")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (tmp_path / "sy" / "train" / "1" / "synth_settings.json").is_file()
