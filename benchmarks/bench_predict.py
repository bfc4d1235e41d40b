"""predict_tiny / predict_vit_b_256 (+ gpu_predict_vit_b_256): whole-fragment predict speed, memory.

:meth:`scrollsam.infer.predict.Predictor.predict_fragment` on a synthetic 2048 x 2048 x 65
fragment (1024 x 1024 x 65 with --quick), written once into ``benchmarks/_work/``: the
``slices/triplet`` view, a 256 px model (random weights, seeded: speed does not depend on them),
256 px tiles at stride 128, prompt-free decoding, batch 8 (32 on the GPU), no TTA. Each entry
runs in a fresh process (:func:`common.in_fresh_process`), so ``peak_rss_mb`` (the peak of
resident memory not backed by files, sampled every 20 ms: memory-mapped slices do not count)
is this prediction's and not what earlier entries left behind. Statistics for the view and one
batch of warm-up are done before the clock starts. One timed prediction per entry: a whole
fragment is already hundreds of windows (vit_b takes minutes on a 2-core CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from common import (
    PeakAnonRss,
    in_fresh_process,
    needs_cuda,
    needs_modules,
    register,
    synthetic_fragment,
)

from scrollsam import build_model

IMAGE_SIZE = 256
DEPTH = 65
NEEDS = needs_modules("scrollsam.infer.predict", "scrollsam.data.views")


def _predict(model_type: str, quick: bool, *, device: str, batch: int) -> dict[str, Any]:
    from scrollsam.data.views import make_view
    from scrollsam.infer.predict import Predictor

    side = 1024 if quick else 2048
    path = synthetic_fragment(side, side, DEPTH)
    torch.manual_seed(0)
    view = make_view("slices", "triplet")  # statistics kept in memory
    model = build_model(model_type, image_size=IMAGE_SIZE, in_chans=view.channels)
    predictor = Predictor(model, view, device=device, batch_size=batch)
    fragment = predictor.open(path)  # checks it and computes the view's statistics
    predictor.predict_windows(np.zeros((batch, view.channels, IMAGE_SIZE, IMAGE_SIZE),
                                       np.float32))  # warm-up
    with PeakAnonRss() as memory:
        prediction = predictor.predict_fragment(fragment)
    stats = prediction.stats
    return {
        "metrics": {"mpx_per_s": stats["megapixels_per_s"], "peak_rss_mb": memory.peak_mb},
        "seconds": stats["seconds"],
        "repeats": 1,
        "predict_stats": stats,
        "settings": {"model": model_type, "image_size": IMAGE_SIZE, "device": device,
                     "fragment": f"{side}x{side}x{DEPTH}", "view": "slices/triplet",
                     "tile": predictor.tile, "stride": predictor.stride, "batch": batch,
                     "tta": False, "bf16": predictor.amp, "windows": stats["tiles"]},
    }


def measure_tiny(quick: bool) -> dict[str, Any]:
    return _predict("tiny", quick, device="cpu", batch=8)


def measure_vit_b_256(quick: bool) -> dict[str, Any]:
    return _predict("vit_b", quick, device="cpu", batch=8)


def measure_gpu_vit_b_256(quick: bool) -> dict[str, Any]:
    return _predict("vit_b", quick, device="cuda", batch=32)


@register("predict_tiny", goal=None, needs=NEEDS,
          about="whole-fragment predict, tiny model at 256 px on the CPU: MP/s, peak memory")
def predict_tiny(quick: bool) -> dict[str, Any]:
    return in_fresh_process("bench_predict", "measure_tiny", quick)


@register("predict_vit_b_256", goal=None, needs=NEEDS,
          about="whole-fragment predict, vit_b at 256 px on the CPU: MP/s, peak memory")
def predict_vit_b_256(quick: bool) -> dict[str, Any]:
    return in_fresh_process("bench_predict", "measure_vit_b_256", quick)


@register("gpu_predict_vit_b_256", goal=None,
          needs=lambda: needs_cuda() or NEEDS(),
          about="whole-fragment predict, vit_b at 256 px on the GPU (bf16): MP/s, peak memory")
def gpu_predict_vit_b_256(quick: bool) -> dict[str, Any]:
    return in_fresh_process("bench_predict", "measure_gpu_vit_b_256", quick)
