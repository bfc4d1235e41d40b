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
