"""DataWait: the share of wall time the loop waited for batches, and the one-time GPU hint."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from scrollsam.train import progress
from scrollsam.train.progress import DataWait


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


def _loader(clock: FakeClock, load_s: float):
    """Batches that each take ``load_s`` seconds to arrive."""
    i = 0
    while True:
        clock.now += load_s
        yield i
        i += 1


def test_share_is_the_waiting_part_of_each_interval(clock):
    batches = DataWait(_loader(clock, 0.3), workers=0, device="cpu")
    for _ in range(4):
        next(batches)
        clock.now += 0.7  # the step itself
    assert batches.share() == pytest.approx(0.3)
    assert [next(batches), next(batches)] == [4, 5]
    clock.now += 2.4  # a validation, say: time without waiting
    assert batches.share() == pytest.approx(0.6 / 3.0)
    assert batches.share() == 0.0  # nothing since


def _interval(batches: DataWait, clock: FakeClock, step_s: float) -> None:
    """One batch and a step of ``step_s`` seconds, then a log step's share."""
    next(batches)
    clock.now += step_s
    batches.share()


def test_hint_once_on_a_gpu_that_waited_and_never_on_a_cpu(clock):
    gpu = DataWait(_loader(clock, 0.5), workers=2, device="cuda")
    _interval(gpu, clock, 0.5)
    assert gpu.hint() is None  # the first interval starts the workers (also after a resume)
    _interval(gpu, clock, 0.5)
    hint = gpu.hint()
    assert "waited for data 50%" in hint and "data.workers=2" in hint
    _interval(gpu, clock, 0.5)
    assert gpu.hint() is None  # once per run
    cpu = DataWait(_loader(clock, 0.5), workers=0, device="cpu")
    for _ in range(2):
        _interval(cpu, clock, 0.5)
    assert cpu.hint() is None  # loading in the training process is the CPU's own work
    quick = DataWait(_loader(clock, 0.1), workers=8, device="cuda")
    for _ in range(2):
        _interval(quick, clock, 0.9)
    assert quick.hint() is None  # 10%: below HINT_SHARE
