"""Test-session setup that must happen before torch is imported by any test module."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make torch many times slower when pytest shares the CPU with
# anything else (see scrollsam/__init__.py); test modules import torch before scrollsam.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
