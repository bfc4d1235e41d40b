"""GPU benchmark of the real training step: official attention vs scrollsam's, vit_b and vit_h.

Standalone (what a lent H100 / H200 runs; scrollsam need not be installed, ``src/`` is used)::

    bash benchmarks/gpu_setup.sh          # segment-anything from wheels/ (no network there)
    python benchmarks/bench_gpu.py --out $OUT/gpu.json [--attention] [--profile CASE,...]
    python benchmarks/bench_gpu.py --smoke --out /tmp/gpu-smoke.json   # CPU: tiny, 1 step

Each case times the step ``scrollsam.train.loop`` runs, whole model trainable (as the x-ray
configs train it): bf16 autocast, :func:`scrollsam.train.step.prompted_forward` with the default
prompts (``PromptConfig()``: 2 sets per tile, mixed point / box first prompts, 2 corrective
rounds with mask feedback, a quarter prompt-free) and losses (``LossConfig()``: focal + dice +
IoU), backward, gradient clipping at 1, fused AdamW, and the loss read back (the loop logs it).
Inputs are random images on the device and blob-shaped ink labels on the host, pinned, as the
training loader gives them (speed does not depend on the values). Reported per case:

- ``images_per_s``: batch / the median of ``--steps`` timed steps after ``--warmup`` (the first
  compiles);
- ``peak_gpu_mb``: ``torch.cuda.max_memory_allocated`` over the timed steps;
- ``flops_per_image``: one step counted with ``torch.utils.flop_counter.FlopCounterMode``
  (forward and backward; the fold path's wider heads count as more work);
- ``mfu``: the FLOPs the path does per image x images/s / ``--peak-tflops`` (989 for H100 /
  H200 dense bf16); ``mfu_official`` (``MFU/off``): the same with the official path's FLOPs per
  image, a throughput comparable across paths (see :func:`add_mfu`).

Paths: ``official`` (segment_anything attention), ``fold`` (the bias folded into q / k so
flash kernels apply: what ``auto`` runs on CUDA for windows and at 256 px), ``bias`` (the bias as
SDPA's ``attn_mask``: memory-efficient kernel), ``triton`` (the bias added inside scrollsam's
own flash kernel, ``scrollsam.model.rel_attention``), ``auto`` (``FusedAttention``'s own
choice on CUDA, what training runs: triton for 16-bit global blocks of 64 x 64 tokens and
more, fold for the rest), ``+w16`` (16 x 16 windows: no padding
at 256 px), ``+compile`` (``nn.Module.compile`` of the encoder, static shapes;
``unique_graphs`` shows it compiled once). Prompts: the default (uniform corrective points, on
the device), ``+center`` (corrective points at the error's centre: OpenCV on the host, the
sampler before) or ``+free`` (prompt-free sets only: what the encoder and decoder alone cost).
``+xray``: the recommended x-ray model and prompts of ``configs/xray_depth.yaml`` (26 slices
through the depth encoder, the full-resolution mask head) around the SAM variant, the training
parts that config sets. The forward is the loop's own ``LossModule`` (encode without a value
check of the images, then the prompted loss, prompts seeded per tile as in training).
Before timing, ``exactness`` records how far each fused mode's encoder output and parameter
gradients are from the official encoder's on the device (``gpu_attention.check_paths``);
``--attention`` times one attention block per mode and token grid (``gpu_attention``);
``--profile`` profiles 3 more steps of named cases after their timing (``gpu_profile``:
device busy time and idle gaps, time by kernel class and by kernel, the op table). Cases run
in order of importance and stop at ``--budget-s`` (the rest are listed as skipped); a case
that runs out of memory is recorded as such and the next one runs. The JSON is rewritten after
every part, so a run stopped at its time limit keeps what it measured.

The ``gpu_*`` entries registered below run the same step under ``benchmarks/run.py`` (``make
bench`` on a CUDA machine) as an official-vs-scrollsam comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

try:  # standalone on a machine where scrollsam is not installed: use the checkout's src/
    import scrollsam  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import compare, cuda_sync, machine_info, measure, needs_cuda, register  # noqa: E402
from gpu_attention import check_paths, format_blocks, time_blocks  # noqa: E402
from gpu_profile import profile_step  # noqa: E402
from gpu_step import (  # noqa: E402
    GPU_CASES,
    SMOKE_CASES,
    Case,
    case_named,
    count_flops,
    count_syncs,
    make_step,
)

from scrollsam.model import rel_attention  # noqa: E402

PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, device: torch.device, *, steps: int, warmup: int,
             compile_backend: str, profile_to: Path | None = None) -> dict[str, Any]:
    """Time ``case``; returns its metrics (or ``error``). ``profile_to``: then profile 3 more
    steps of the same built step (``gpu_profile``) into that file."""
    result: dict[str, Any] = {"case": asdict(case)}
    if case.path == "triton" and not rel_attention.available(device):
        result["skipped"] = ("no Triton kernel here (CUDA with Triton, or a CPU under "
                             "TRITON_INTERPRET=1)")
        return result
    try:
        if case.compile:  # compile_model (in make_step) starts dynamo afresh; count from here
            counters.clear()
        t0 = time.perf_counter()
        step, model = make_step(case, device, compile_backend=compile_backend)
        for _ in range(warmup):
            step()
        _sync(device)
        result["warmup_s"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = measure(step, repeats=steps, warmup=0, sync=lambda: _sync(device))
        result.update(images_per_s=case.batch / timed["seconds"], step_s=timed["seconds"],
                      times_s=timed["times_s"])
        if device.type == "cuda":
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            try:  # a diagnosis: its failure costs the case nothing
                result["syncs_per_step"] = count_syncs(step)
            except Exception as err:
                result["syncs_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if case.compile:
            result["unique_graphs"] = int(counters["stats"]["unique_graphs"])
        else:
            result["flops_per_image"] = count_flops(step) / case.batch
        if profile_to is not None:
            _profile(step, device, profile_to)
        del step, model
    except torch.cuda.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0][:160]}"
    except Exception as err:  # report and go on with the next case
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _profile(step: Callable[[], object], device: torch.device, path: Path) -> None:
    """Write :func:`gpu_profile.profile_step`'s report of ``step`` to ``path``; a failure is
    written there instead (a diagnosis: the timings go on)."""
    try:
        report = profile_step(step, device)
    except Exception as err:
        report = f"profile failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    path.write_text(report + "\n")
    print(f"profile -> {path.name}:\n" + "\n".join(report.splitlines()[:24]), flush=True)


def add_mfu(results: dict[str, dict[str, Any]], peak_flops: float) -> None:
    """Shares of ``peak_flops`` for each timed case.

    ``mfu``: the FLOPs this path really does (its own count, or its eager twin's for a
    compiled case) x images/s / peak: how busy the card is. ``mfu_official``: the official
    path's FLOPs per image at the same model and size (window 14) x images/s / peak: a
    throughput in units of the official model's work, comparable across paths (padding the
    official path wastes counts as work there, and the fold path's wider heads do not; for an
    ``+xray`` case plain SAM's work, so its depth encoder and mask head count as nothing).
    """
    counted = {}
    for r in results.values():
        c = r["case"]
        if "flops_per_image" in r:
            counted[_work_key(c)] = r["flops_per_image"]
    for r in results.values():
        c = r["case"]
        if "images_per_s" not in r:
            continue
        own = counted.get(_work_key(c))
        official = counted.get((c["model"], c["size"], "official", None, False))
        if own:
            r["mfu"] = own * r["images_per_s"] / peak_flops
        if official:
            r["official_flops_per_image"] = official
            r["mfu_official"] = official * r["images_per_s"] / peak_flops


def _work_key(case: dict[str, Any]) -> tuple:
    """What fixes a case's FLOPs per image: model, size, attention path, window, x-ray parts."""
    return case["model"], case["size"], case["path"], case["window"], case.get("xray", False)


def format_rows(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'case':34s} {'batch':>5s} {'img/s':>8s} {'step ms':>8s} {'peak MB':>8s} " \
           f"{'GF/img':>8s} {'MFU':>6s} {'MFU/off':>7s}  note"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        c = r.get("case", {})
        if "images_per_s" not in r:
            lines.append(f"{name:34s} {c.get('batch', ''):>5} {'-':>8s} {'-':>8s} {'-':>8s} "
                         f"{'-':>8s} {'-':>6s} {'-':>7s}  {r.get('error') or r.get('skipped')}")
            continue
        peak = r.get("peak_gpu_mb")
        flops = r.get("flops_per_image")
        mfu, mfu_off = r.get("mfu"), r.get("mfu_official")
        note = f"graphs={r['unique_graphs']} " if "unique_graphs" in r else ""
        if "syncs_per_step" in r:
            note += f"syncs {r['syncs_per_step']}"
        lines.append(
            f"{name:34s} {c['batch']:>5d} {r['images_per_s']:8.1f} {r['step_s'] * 1e3:8.1f} "
            f"{(f'{peak:.0f}' if peak is not None else '-'):>8s} "
            f"{(f'{flops / 1e9:.0f}' if flops else '-'):>8s} "
            f"{(f'{mfu:.1%}' if mfu is not None else '-'):>6s} "
            f"{(f'{mfu_off:.1%}' if mfu_off is not None else '-'):>7s}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, 1 step, CPU: checks the script runs (numbers mean "
                        "nothing)")
    parser.add_argument("--cases", help="comma-separated case names, listed or of their form "
                        "(gpu_step.case_named), run in the order named (default: all listed, "
                        "in order of importance)")
    parser.add_argument("--steps", type=int, help="timed steps per case (default 8; 1 smoke)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 smoke)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="start no new case after this many seconds (default 270)")
    parser.add_argument("--attention", action="store_true",
                        help="also time one attention block per mode and shape (gpu_attention)")
    parser.add_argument("--attention-modes", default="",
                        help="comma-separated modes for --attention (default: official, plain, "
                        "fold, bias, triton); MODE/cudnn|efficient|flash too")
    parser.add_argument("--profile", default="",
                        help="comma-separated names of cases run to profile too, 3 steps after "
                        "their timing (gpu_profile: reports under --out's folder as "
                        "profile_CASE.txt)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                        help=f"dense bf16 peak of the card (default {PEAK_TFLOPS:g}: H100/H200)")
    args = parser.parse_args(argv)

    if args.smoke:
        device, cases, backend = torch.device("cpu"), SMOKE_CASES, "aot_eager"
        steps, warmup = args.steps or 1, args.warmup or 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here; use --smoke for a CPU check of the script")
        device, cases, backend = torch.device("cuda"), GPU_CASES, "inductor"
        steps, warmup = args.steps or 8, args.warmup or 3
    if args.cases:  # in the order named: the budget cuts from the end
        wanted = list(dict.fromkeys(n.strip() for n in args.cases.split(",") if n.strip()))
        try:  # listed or not: any name of the case form
            cases = [case_named(n) for n in wanted]
        except ValueError as err:
            parser.error(f"--cases: {err}")

    profiled = set(filter(None, (n.strip() for n in args.profile.split(","))))
    if profiled - {c.name for c in cases}:
        parser.error(f"--profile: {sorted(profiled - {c.name for c in cases})} not among the "
                     "cases run (--cases)")

    machine = machine_info()
    print(f"device {machine['device']}, torch {machine['torch']}, {len(cases)} cases, "
          f"{steps} timed steps after {warmup} warm-up", flush=True)
    start = time.perf_counter()
    try:
        exactness = check_paths(device, model="tiny" if args.smoke else "vit_b",
                                size=128 if args.smoke else 256)
    except Exception as err:  # report it with the timings, do not stop them
        exactness = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    print("fused vs official, relative difference: " + ", ".join(
        f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in exactness.items()),
        flush=True)
    doc: dict[str, Any] = {"machine": machine, "peak_tflops": args.peak_tflops,
                           "smoke": args.smoke, "exactness": exactness, "steps": steps,
                           "warmup": warmup}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run stopped at its time limit keeps what it did
        doc["wall_s"] = round(time.perf_counter() - start, 1)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")

    if args.attention and device.type == "cuda":
        modes = tuple(args.attention_modes.split(",")) if args.attention_modes else None
        doc["attention_blocks"] = time_blocks(device, **({"modes": modes} if modes else {}))
        save()
        print(format_blocks(doc["attention_blocks"]), flush=True)
    results: dict[str, dict[str, Any]] = {}
    doc["results"] = results
    for case in cases:
        if time.perf_counter() - start > args.budget_s:
            results[case.name] = {"case": asdict(case), "skipped": "over --budget-s"}
            continue
        where = (args.out.parent / f"profile_{case.name.replace('+', '-')}.txt"
                 if case.name in profiled else None)
        r = run_case(case, device, steps=steps, warmup=warmup, compile_backend=backend,
                     profile_to=where)
        results[case.name] = r
        add_mfu(results, args.peak_tflops * 1e12)
        save()
        shown = (f"{r['images_per_s']:.1f} img/s" if "images_per_s" in r else r.get("error"))
        print(f"  {case.name}: {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
    doc["triton_tiles"] = rel_attention.tuned_tiles()  # what the triton path's timings used
    save()
    wall = doc["wall_s"]
    print()
    print(format_rows(results))
    print(f"\n{wall:.0f} s; written to {args.out}")
    return 0 if all("error" not in r for r in results.values()) else 1


# --- entries for benchmarks/run.py (make bench on a CUDA machine) ------------------------------


def _repeats(quick: bool) -> dict[str, int]:
    return {"repeats": 3, "warmup": 1} if quick else {"repeats": 10, "warmup": 3}


def _train_official_vs_ours(size: int, batch: int, quick: bool) -> dict[str, Any]:
    dev = torch.device("cuda")
    official, _m1 = make_step(Case("vit_b", size, batch, "official"), dev)
    ours, _m2 = make_step(Case("vit_b", size, batch, "fold"), dev)
    result = compare(official, ours, sync=cuda_sync, **_repeats(quick))
    result["metrics"] = {"images_per_s_official": batch / result["baseline_s"],
                         "images_per_s_ours": batch / result["ours_s"]}
    result["settings"] = {"model": "vit_b", "image_size": size, "batch": batch,
                          "trainable": "all", "autocast": "bf16", "optimizer": "AdamW",
                          "step": "prompted_forward, default prompts and losses"}
    return result


def _setup_encoder(image_size: int, batch: int) -> tuple[Any, torch.Tensor]:
    from scrollsam import build_model

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model("vit_b", image_size=image_size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()
    return model, images


def _encoder(image_size: int, batch: int, quick: bool) -> dict[str, Any]:
    model, images = _setup_encoder(image_size, batch)
    model.eval()

    def encode() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.encode(images)

    result = measure(encode, sync=cuda_sync, **_repeats(quick))
    result["metrics"] = {"images_per_s": batch / result["seconds"],
                         "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    result["settings"] = {"model": "vit_b", "image_size": image_size, "batch": batch,
                          "autocast": "bf16", "mode": "inference_mode"}
    return result


@register("gpu_train_vit_b_1024_bf16", goal=None, needs=needs_cuda,
          about="vit_b real training step at 1024 px, bf16: official vs fused attention")
def gpu_train_vit_b_1024_bf16(quick: bool) -> dict[str, Any]:
    return _train_official_vs_ours(1024, 2, quick)


@register("gpu_train_vit_b_256_bf16", goal=None, needs=needs_cuda,
          about="vit_b real training step at 256 px, bf16: official vs fused attention")
def gpu_train_vit_b_256_bf16(quick: bool) -> dict[str, Any]:
    return _train_official_vs_ours(256, 32, quick)


@register("gpu_encoder_vit_b_1024_bf16", goal=None, needs=needs_cuda,
          about="vit_b encoder-only inference at 1024 px, bf16 autocast: images/s")
def gpu_encoder_vit_b_1024_bf16(quick: bool) -> dict[str, Any]:
    return _encoder(1024, 8, quick)


@register("gpu_encoder_vit_b_256_bf16", goal=None, needs=needs_cuda,
          about="vit_b encoder-only inference at 256 px, bf16 autocast: images/s")
def gpu_encoder_vit_b_256_bf16(quick: bool) -> dict[str, Any]:
    return _encoder(256, 64, quick)


if __name__ == "__main__":
    sys.exit(main())
