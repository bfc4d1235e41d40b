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
