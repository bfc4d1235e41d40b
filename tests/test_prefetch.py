"""DevicePrefetch: batches pass through untouched off CUDA; on CUDA (its stream calls recorded
here, on a CPU) the copy of batch n + 1 is queued on the side stream before batch n is handed
out, and the compute stream waits for it and marks every moved tensor as its own."""

from __future__ import annotations

import contextlib

import pytest
import torch

from scrollsam.train.prefetch import DevicePrefetch


def _batches(n: int) -> list[dict]:
    return [{"image": torch.full((1, 2, 2), float(i)), "label": torch.zeros(1, 1, 2, 2),
             "fragment": f"f{i}"} for i in range(n)]


def test_off_cuda_the_batches_pass_through_as_they_are():
    given = _batches(3)
    got = list(DevicePrefetch(iter(given), torch.device("cpu")))
    assert all(a is b for a, b in zip(got, given, strict=True))


class _Recorder:
    """Fakes of the CUDA stream calls DevicePrefetch makes, each logged in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple] = []
        rec = self

        class Stream:
            def __init__(self, device: object = None) -> None:
                self.name = "side"

            def wait_stream(self, other: Stream) -> None:
                rec.log.append(("wait", self.name, other.name))

        compute = Stream()
        compute.name = "compute"
        self.stream = "compute"

        @contextlib.contextmanager
        def on(stream: Stream):
            before, self.stream = self.stream, stream.name
            yield
            self.stream = before

        def to(t: torch.Tensor, device: object, non_blocking: bool = False) -> torch.Tensor:
            rec.log.append(("copy", float(t.flatten()[0]), rec.stream, non_blocking))
            return t.clone()

        def record_stream(t: torch.Tensor, stream: Stream) -> None:
            rec.log.append(("record", float(t.flatten()[0]), stream.name))

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
        monkeypatch.setattr(torch.cuda, "stream", on)
        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)


def test_on_cuda_the_next_copy_is_queued_on_the_side_stream_before_a_batch_is_used(
        monkeypatch):
    rec = _Recorder(monkeypatch)
    pulled: list[int] = []
    given = _batches(2)

    def loader():
        for i, b in enumerate(given):
            pulled.append(i)
            yield b

    batches = DevicePrefetch(loader(), torch.device("cuda"), move=("image",))
    assert pulled == [] and rec.log == []  # nothing is read before the first batch is asked
    first = next(batches)
    assert rec.log == [
        ("copy", 0.0, "side", True),  # batch 0 (its label stays on the host)
        ("wait", "compute", "side"),  # the step waits for its copy...
        ("record", 0.0, "compute"),  # ...and owns its tensors
        ("copy", 1.0, "side", True),  # batch 1 crosses while step 0 runs
    ]
    assert first["fragment"] == "f0" and first["image"][0, 0, 0] == 0.0
    assert first["label"] is given[0]["label"]  # named to stay on the host: not copied
    assert first["image"] is not given[0]["image"]
    rec.log.clear()
    second = next(batches)
    assert second["fragment"] == "f1"
    assert rec.log == [("wait", "compute", "side"), ("record", 1.0, "compute")]
    with pytest.raises(StopIteration):
        next(batches)
    assert pulled == [0, 1]
