"""The GPU goals as ``make bench`` entries: scrollsam's training step against the official one.

Each entry times two cases of ``gpu_step`` with :func:`bench_gpu.run_case` (the real training
step: SAM prompts, default losses, whole model trainable, bf16, fused AdamW, the loss read back;
median of the timed steps after the warm-up, peak memory over the timed steps) and passes when
scrollsam's case meets its targets. On the card a run reports (``machine.device``):

- ``gpu_train_vit_b_1024_b2``: batch 2 at 1024 px, both eager; target: scrollsam's peak memory
  ``peak_gb`` <= 8 (10^9 bytes of tensors at the peak, ``max_memory_allocated``: vit_b
  fine-tuning fits a 12 GB card; ``reserved_gb``, what PyTorch's allocator held, is reported
  beside it; the CUDA context comes on top of both).
- ``gpu_train_vit_b_1024_b32_compiled``: scrollsam at batch 32, ``auto`` attention, compiled
  (``train.compile``), against the official path at batch 4 (batch 32 does not fit it);
  targets: ``images_per_s`` >= 60 and ``share_of_peak`` >= 0.25.
- ``gpu_train_vit_b_256_b256_compiled``: scrollsam at batch 256 with 16 x 16 windows, compiled,
  against the official path at batch 32; target: ``images_per_s`` >= 800.

``share_of_peak`` is the official model's FLOPs per image (one official step counted with
``torch.utils.flop_counter``, forward and backward) x scrollsam's images/s / the card's dense
bf16 peak (:func:`bench_gpu.card_peak_tflops`; absent for a card it does not know, which fails
the target rather than guess). ``baseline_s`` / ``ours_s`` are seconds per image, so ``ratio``
is scrollsam's throughput over the official path's. A compiled case warms up for minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from bench_gpu import add_mfu, card_peak_tflops, run_case
from common import compare, cuda_sync, measure, needs_cuda, register
from gpu_step import Case


def train_goal(baseline: Case, ours: Case, *, device: torch.device, quick: bool,
               backend: str = "inductor", peak_tflops: float | None = None) -> dict[str, Any]:
    """Time ``baseline`` (the official path, eager: its FLOPs are counted) then ``ours``; the
    comparison per image, scrollsam's ``metrics`` and both cases' full records (``cases``).
    ``peak_tflops``: the card's dense bf16 peak (default: :func:`bench_gpu.card_peak_tflops`
    of the CUDA device; none on a CPU). A baseline that fails (out of memory, say) is recorded
    as ``baseline_error`` and scrollsam's case still runs: its goals are its own numbers (the
    share of peak, which needs the official FLOPs, is then missing and fails)."""
    steps, warmup = (3, 1) if quick else (8, 3)
    runs = {case.name: run_case(case, device, steps=steps, warmup=warmup,
                                compile_backend=backend) for case in (baseline, ours)}
    base, mine = runs[baseline.name], runs[ours.name]
    if "images_per_s" not in mine:
        raise RuntimeError(f"{ours.name}: {mine.get('error') or mine.get('skipped')}")
    peak = peak_tflops
    if peak is None and device.type == "cuda":
        peak = card_peak_tflops(torch.cuda.get_device_name(device))
    if peak is not None:
        add_mfu(runs, peak * 1e12)
    metrics = {"images_per_s": mine["images_per_s"]}
    if "mfu_official" in mine:
        metrics["share_of_peak"] = mine["mfu_official"]
    if "peak_gpu_mb" in mine:  # tensors at their peak; and what the allocator held then
        metrics["peak_gb"] = mine["peak_gpu_mb"] * 2**20 / 1e9
        metrics["reserved_gb"] = mine["reserved_gpu_mb"] * 2**20 / 1e9
    result: dict[str, Any] = {"repeats": steps, "warmup": warmup, "cases": runs}
    if "images_per_s" in base:
        metrics["images_per_s_official"] = base["images_per_s"]
        if "peak_gpu_mb" in base:
            metrics["peak_gb_official"] = base["peak_gpu_mb"] * 2**20 / 1e9
        per_image = base["step_s"] / baseline.batch, mine["step_s"] / ours.batch
        result.update(baseline_s=per_image[0], ours_s=per_image[1],
                      ratio=per_image[0] / per_image[1])
    else:
        result["baseline_error"] = base.get("error") or base.get("skipped")
    result["metrics"] = metrics
    result["settings"] = {"baseline": baseline.name, "ours": ours.name, "timed": "s per image",
                          "step": "prompted, default losses, all trainable, bf16, AdamW",
                          "peak_tflops": peak}
    return result


@register("gpu_train_vit_b_1024_b2", goal=None, needs=needs_cuda,
          targets={"peak_gb": ("<=", 8.0)},
          about="vit_b training step at 1024 px, batch 2, eager: official vs scrollsam (memory)")
def gpu_train_vit_b_1024_b2(quick: bool) -> dict[str, Any]:
    return train_goal(Case("vit_b", 1024, 2, "official"), Case("vit_b", 1024, 2, "auto"),
                      device=torch.device("cuda"), quick=quick)


@register("gpu_train_vit_b_1024_b32_compiled", goal=None, needs=needs_cuda,
          targets={"images_per_s": (">=", 60.0), "share_of_peak": (">=", 0.25)},
          about="vit_b training step at 1024 px: official (batch 4) vs scrollsam compiled "
                "(batch 32)")
def gpu_train_vit_b_1024_b32_compiled(quick: bool) -> dict[str, Any]:
    return train_goal(Case("vit_b", 1024, 4, "official"),
                      Case("vit_b", 1024, 32, "auto", compile=True),
                      device=torch.device("cuda"), quick=quick)


@register("gpu_train_vit_b_256_b256_compiled", goal=None, needs=needs_cuda,
          targets={"images_per_s": (">=", 800.0)},
          about="vit_b training step at 256 px: official (batch 32) vs scrollsam compiled with "
                "16 x 16 windows (batch 256)")
def gpu_train_vit_b_256_b256_compiled(quick: bool) -> dict[str, Any]:
    return train_goal(Case("vit_b", 256, 32, "official"),
                      Case("vit_b", 256, 256, "auto", window=16, compile=True),
                      device=torch.device("cuda"), quick=quick)


# --- encoder inference ---------------------------------------------------------------------


def _encoder(image_size: int, batch: int, quick: bool) -> dict[str, Any]:
    from scrollsam import build_model

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model("vit_b", image_size=image_size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()
    model.eval()

    def encode() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.encode(images)

    result = measure(encode, sync=cuda_sync,
                     **({"repeats": 3, "warmup": 1} if quick else {"repeats": 10, "warmup": 3}))
    result["metrics"] = {"images_per_s": batch / result["seconds"],
                         "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    result["settings"] = {"model": "vit_b", "image_size": image_size, "batch": batch,
                          "autocast": "bf16", "mode": "inference_mode"}
    return result


@register("gpu_encoder_vit_b_1024_bf16", goal=None, needs=needs_cuda,
          about="vit_b encoder-only inference at 1024 px, bf16 autocast: images/s")
def gpu_encoder_vit_b_1024_bf16(quick: bool) -> dict[str, Any]:
    return _encoder(1024, 8, quick)


@register("gpu_encoder_vit_b_256_bf16", goal=None, needs=needs_cuda,
          about="vit_b encoder-only inference at 256 px, bf16 autocast: images/s")
def gpu_encoder_vit_b_256_bf16(quick: bool) -> dict[str, Any]:
    return _encoder(256, 64, quick)


# --- validation ----------------------------------------------------------------------------


def validation_host_vs_device(model_type: str, size: int, batch: int, *, device: torch.device,
                              quick: bool) -> dict[str, Any]:
    """Validation's prompt-free pass over 2 batches of random tiles: baseline, the batches as
    the loader gives them and numpy's histogram on the host; ours, the batches prefetched
    (pinned, on CUDA) and the histogram counted on the device."""
    from scrollsam import build_model
    from scrollsam.precision import autocast_for
    from scrollsam.train.prefetch import DevicePrefetch
    from scrollsam.train.validate import prediction_histogram

    torch.manual_seed(0)
    with device:
        model = build_model(model_type, image_size=size, attention="fused").eval()
    gen = torch.Generator().manual_seed(0)
    pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
    batches = [{"image": pin(torch.randn(batch, 3, size, size, generator=gen)),
                "label": pin((torch.rand(batch, 1, size, size, generator=gen) > 0.7).float()),
                "valid": pin(torch.ones(batch, 1, size, size))} for _ in range(2)]

    def score(on_device: bool) -> Callable[[], object]:
        def run() -> object:
            given = DevicePrefetch(batches, device) if on_device else batches
            return prediction_histogram(model, None, given, device=device, on_device=on_device,
                                        autocast=lambda: autocast_for(device, True))
        return run

    result = compare(score(False), score(True), sync=cuda_sync if device.type == "cuda" else None,
                     **({"repeats": 2, "warmup": 1} if quick else {"repeats": 5, "warmup": 1}))
    tiles = 2 * batch
    result["metrics"] = {"tiles_per_s_host": tiles / result["baseline_s"],
                         "tiles_per_s_device": tiles / result["ours_s"]}
    result["settings"] = {"model": model_type, "image_size": size, "tiles": tiles,
                          "batch": batch, "autocast": "bf16", "attention": "fused"}
    return result


@register("gpu_validate_vit_b_1024", goal=None, needs=needs_cuda,
          about="validation's prompt-free pass, vit_b at 1024 px, 2 batches of 32 tiles: "
                "histogram by numpy on the host vs on the GPU, batches prefetched")
def gpu_validate_vit_b_1024(quick: bool) -> dict[str, Any]:
    return validation_host_vs_device("vit_b", 1024, 32, device=torch.device("cuda"), quick=quick)
