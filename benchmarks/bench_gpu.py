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
Inputs are random images and blob-shaped ink labels on the host, pinned, as the training loader
gives them, and the loop's prefetch moves them (:mod:`scrollsam.train.prefetch`: each batch is
copied on a side stream while the step before runs); speed does not depend on the values.
Reported per case:

- ``images_per_s``: batch / the median of ``--steps`` timed steps after ``--warmup`` (the first
  compiles);
- ``peak_gpu_mb``: ``torch.cuda.max_memory_allocated`` over the timed steps;
- ``flops_per_image``: one step counted with ``torch.utils.flop_counter.FlopCounterMode``
  (forward and backward; the fold path's wider heads count as more work);
- ``mfu``: the FLOPs the path does per image x images/s / the card's dense bf16 peak
  (``--peak-tflops``, default :data:`CARD_PEAKS`' entry for the card: 989 TFLOP/s for the H100
  and H200 SXM; none for a card not listed); ``mfu_official`` (``MFU/off``): the same
  with the official path's FLOPs per image, a throughput comparable across paths (see
  :func:`add_mfu`).

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

The ``gpu_train_*`` entries of ``make bench`` (``bench_gpu_train.py``) time the same step, the
official path against scrollsam's, with the speed and memory goals as pass / fail.
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
from common import machine_info, measure  # first: it finds scrollsam (src/ if not installed)
from gpu_attention import check_paths, format_blocks, time_blocks
from gpu_profile import profile_step
from gpu_step import (
    GPU_CASES,
    SMOKE_CASES,
    Case,
    case_named,
    count_flops,
    count_syncs,
    make_step,
)
from torch._dynamo.utils import counters

from scrollsam.model import rel_attention

PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16 (the smoke run's stand-in)
# Dense bf16 peaks (TFLOP/s, NVIDIA's data sheets) by a part of the CUDA device name, checked in
# order: the PCIe and NVL H100s run slower clocks than the SXM part the plain name matches.
CARD_PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
              ("H200", 989.0), ("A100", 312.0))


def card_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the card called ``device_name``; None for one not listed."""
    return next((peak for part, peak in CARD_PEAKS if part in device_name), None)


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
            result["reserved_gpu_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
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
    parser.add_argument("--peak-tflops", type=float,
                        help="dense bf16 peak of the card (default: the card's, from "
                        f"CARD_PEAKS; {PEAK_TFLOPS:g} with --smoke)")
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
    peak_tflops = args.peak_tflops
    if peak_tflops is None:
        peak_tflops = PEAK_TFLOPS if args.smoke else card_peak_tflops(machine["device"])
    if peak_tflops is None:
        print(f"no dense bf16 peak known for {machine['device']!r} (--peak-tflops gives one): "
              "no shares of peak", flush=True)
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
    doc: dict[str, Any] = {"machine": machine, "peak_tflops": peak_tflops,
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
        if peak_tflops is not None:
            add_mfu(results, peak_tflops * 1e12)
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


if __name__ == "__main__":
    sys.exit(main())
