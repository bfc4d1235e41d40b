"""Process-wide settings for CPU throughput, which the ``scrollsam`` command applies at start.

Two defaults of the C runtime cost a CPU training step much of its time; the command changes
both before torch is imported (``scrollsam.cli``), and a user's own settings always win:

* **OpenMP waiting.** Busy-waiting OpenMP threads make torch several times slower whenever
  another process wants a core (DataLoader workers, a second job, CI), so threads wait
  passively, after a short spin (GNU OpenMP's ``GOMP_SPINCOUNT``, which torch's PyPI builds
  use); never spinning costs an idle CPU much of its speed. ``OMP_WAIT_POLICY=ACTIVE`` suits
  a dedicated CPU.
* **Freed memory kept for reuse (glibc).** A training step allocates and frees tensors of a
  few MB thousands of times. glibc's defaults hand large blocks straight back to the kernel
  (``munmap``, or trimming the heap top beyond 128 KB), so every step faults the same pages in
  again. Blocks up to 32 MiB now come from the heap, and up to 256 MiB of free heap is kept,
  for about the same peak memory. ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
  ``glibc.malloc.*`` tunables of your own turn it off.

What each is worth, measured: ``benchmarks/README.md`` ("Numbers behind choices in the code").
Python programs that train through the library can call :func:`tune_process` first.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

MMAP_THRESHOLD = 32 * 2**20  # bytes: larger blocks are mmap'd and unmapped when freed
TRIM_THRESHOLD = 256 * 2**20  # bytes of free heap top kept before trimming
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_USER_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_process() -> dict[str, bool]:
    """Apply the module's defaults to this process (call before torch is imported): OpenMP
    waiting in the environment, glibc's malloc thresholds with ``mallopt``. Returns what was
    applied: ``{"openmp": ..., "malloc": ...}``."""
    openmp = "OMP_WAIT_POLICY" not in os.environ
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    return {"openmp": openmp, "malloc": keep_freed_memory(os.environ)}


def keep_freed_memory(environ: Mapping[str, str]) -> bool:
    """Raise glibc's mmap and trim thresholds (module docstring) unless ``environ`` sets malloc
    settings of its own (``MALLOC_*_``, ``glibc.malloc.*`` in ``GLIBC_TUNABLES``) or this is
    not glibc on Linux; True when both were set."""
    chosen = any(k in environ for k in _USER_KEYS) or "glibc.malloc." in environ.get(
        "GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or chosen:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
