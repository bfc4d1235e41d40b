"""``train_step_cached_vit_b_malloc``: the cached vit_b training step (``bench_bf16``'s: 256 px,
batch 4, default prompts, bf16) with glibc's default malloc thresholds against the ones the
``scrollsam`` command sets (:mod:`scrollsam.process`: blocks up to 32 MiB from the heap, 256 MiB
of free heap kept).

mallopt changes a whole process for good, so each side runs in processes of its own, started
alternately (default, kept, kept, default, ...); each reports the median of its steps, and the
entry the median over its processes. Run this file with ``--child default|kept`` to time one.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench_bf16 import _needs_bf16
from common import BENCH_DIR, register


def _child(side: str, steps: int) -> None:
    """Time ``steps`` cached vit_b steps in this process with ``side``'s malloc settings; print
    {"median_s", "malloc_applied"} as JSON."""
    from scrollsam.process import keep_freed_memory

    applied = keep_freed_memory({}) if side == "kept" else False
    from bench_bf16 import _cached_vit_b, _step

    from scrollsam.config import PromptConfig

    model, params, emb, label = _cached_vit_b()
    run = _step(model, params, lambda: emb, label, PromptConfig(), True)
    for _ in range(3):
        run()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    print(json.dumps({"median_s": statistics.median(times), "malloc_applied": applied}))


@register("train_step_cached_vit_b_malloc", goal=None, needs=_needs_bf16,
          about="cached vit_b step (256 px, batch 4, bf16): glibc malloc defaults vs "
                "scrollsam.process thresholds, alternating processes")
def train_step_cached_vit_b_malloc(quick: bool) -> dict[str, Any]:
    rounds, steps = (1, 5) if quick else (3, 15)
    times: dict[str, list[float]] = {"default": [], "kept": []}
    for r in range(rounds):
        for side in ("default", "kept") if r % 2 == 0 else ("kept", "default"):
            out = subprocess.run([sys.executable, str(BENCH_DIR / "bench_process.py"),
                                  "--child", side, str(steps)], check=True,
                                 capture_output=True, text=True)
            reply = json.loads(out.stdout.strip().splitlines()[-1])
            if reply["malloc_applied"] != (side == "kept"):
                raise RuntimeError(f"malloc settings not applied as asked ({side}): {reply}")
            times[side].append(reply["median_s"])
    base, mine = statistics.median(times["default"]), statistics.median(times["kept"])
    return {"ratio": base / mine, "baseline_s": base, "ours_s": mine, "repeats": rounds,
            "baseline_times_s": times["default"], "ours_times_s": times["kept"],
            "settings": {"model": "vit_b", "px": 256, "batch": 4, "embeddings": "cached",
                         "precision": "bf16", "steps_per_process": steps,
                         "baseline": "glibc defaults", "ours": "scrollsam.process thresholds"}}


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2], int(sys.argv[3]))
