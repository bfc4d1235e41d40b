"""The CLI's process setup, before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("given", "expected"), [
    ({}, ("PASSIVE", "1000")),
    ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "5"}, ("ACTIVE", "5")),
])
def test_cli_sets_passive_waiting_after_a_short_spin_unless_the_user_chose(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import os, scrollsam.cli; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **given}, check=True,
                         capture_output=True, text=True).stdout.split()
    assert tuple(out) == expected


def _glibc() -> bool:
    """glibc 2.33 or later (mallopt and mallinfo2) is this process's C library."""
    import ctypes

    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt and mallinfo2")
@pytest.mark.parametrize(("given", "expected"), [
    ({}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, False),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, True),  # not a malloc setting
])
def test_cli_keeps_freed_memory_for_reuse_unless_the_user_chose(given, expected):
    """The thresholds are set with mallopt (glibc) when the user set none of their own; the
    malloc statistics then show large freed blocks kept in the heap instead of unmapped."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    code = ("import ctypes\n"
            "from scrollsam.process import tune_process\n"
            "applied = tune_process()['malloc']\n"
            "libc = ctypes.CDLL(None)\n"
            "libc.malloc.restype = ctypes.c_void_p\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "libc.free(libc.malloc(8 * 2**20))  # 8 MiB: unmapped at once by default\n"
            "class Info(ctypes.Structure):\n"
            "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', "
            "'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
            "libc.mallinfo2.restype = Info\n"
            "print(applied, libc.mallinfo2().fordblks >= 8 * 2**20)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **given}, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(expected), str(expected)]


def test_demo_help_names_what_each_input_trains_with(tmp_path, monkeypatch, capsys):
    """QA: `scrollsam demo --help` said "slices: x-ray slice triplets" and "default: the demo's
    300" steps; the slices demo trains a range band through the depth encoder for 700 steps.
    The expected words come from the demo's own config."""
    from scrollsam.cli import build_parser
    from scrollsam.demo import demo_config

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    ir, xray = demo_config(tmp_path, "ir"), demo_config(tmp_path, "slices")
    assert ir.data.input == "ir" and not ir.model.depth_encoder
    assert xray.data.z_start is not None and xray.data.z_end is not None
    band = f"{xray.data.z_end - xray.data.z_start}-slice {xray.data.strategy} band"
    assert f"slices: the x-ray volume, a {band}" in text, text
    assert ("through the learned depth encoder" in text) == xray.model.depth_encoder
    assert "triplet" not in text
    assert (f"(default: the demo's {ir.train.steps} for ir, {xray.train.steps} for slices)"
            in text), text


def test_building_the_parser_does_not_load_torch():
    """Every `scrollsam` call builds the whole parser (the demo's help included) first."""
    code = "import sys, scrollsam.cli; scrollsam.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == ["False"]


@pytest.mark.parametrize("argv", [["--debug", "inspect"], ["inspect", "--debug"],
                                  ["-v", "inspect", "--debug"], ["--debug", "-v", "inspect"]])
def test_debug_before_or_after_the_command_shows_the_traceback(tmp_path, argv):
    # Before: --debug (and -v) before the command were reset by the command's own defaults.
    from scrollsam.cli import build_parser, main
    from scrollsam.errors import FragmentError

    with pytest.raises(FragmentError, match="fragment folder not found"):
        main([*argv, str(tmp_path / "missing")])
    args = build_parser().parse_args(["-v", "inspect", "x"])
    assert (args.verbose, args.debug) == (True, False)


def test_an_unknown_flag_shows_the_commands_usage(tmp_path, capsys):
    # Before: the top-level usage ("usage: scrollsam [-h] [--debug] [-v] COMMAND ...").
    from scrollsam.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", "configs/demo.yaml", f"out={tmp_path / 'r'}", "--bogus"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: scrollsam train ")
    assert err.strip().endswith("scrollsam train: error: unrecognized arguments: --bogus")


def test_an_error_another_process_reports_is_not_printed_again(monkeypatch, capsys):
    # Before: under torchrun every process printed the same error line (and "rank 1: ..." too).
    from scrollsam import cli
    from scrollsam.errors import ConfigError
    from scrollsam.train.distributed import mark_echo

    for echo, printed in ((True, ""), (False, "error: bad value (train.lr)\n")):
        def fail(args, echo=echo):
            raise mark_echo(ConfigError("bad value (train.lr)"), echo)

        name, example, add, _ = cli.COMMANDS["inspect"]
        monkeypatch.setitem(cli.COMMANDS, "inspect", (name, example, add, fail))
        assert cli.main(["inspect", "x"]) == 2
        assert capsys.readouterr().err == printed


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_demo_refuses_steps_below_1_before_touching_its_folder(tmp_path, capsys, steps):
    # Before: --steps -1 deleted the previous demo (run/, pred/, metrics.json), synthesised the
    # data, then failed with "length: expected a non-negative integer, got -8"; --steps 0
    # reported an untrained model's F0.5 as the demo's.
    from scrollsam.cli import main

    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")  # an earlier demo's
    assert main(["demo", "--out", str(out), "--steps", steps]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: --steps: expected a positive integer, got {steps}"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "run"]
