"""A stand-in for ``time.perf_counter`` that tests advance by hand."""

from __future__ import annotations


class FakeClock:
    """Stands in for time.perf_counter; the code under test (or the test) advances ``now``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
