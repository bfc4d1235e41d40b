"""`scrollsam predict`: segment whole fragments with a trained run.

As in :mod:`scrollsam.cli` (which registers it): :func:`add_predict` declares the arguments and
:func:`run_predict` calls :func:`scrollsam.infer.pipeline.predict_to_folder` and prints one
line per fragment.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK = 0
log = logging.getLogger("scrollsam")


# --- predict -----------------------------------------------------------------------------------


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--run-dir", dest="run",
                   help="run folder written by `scrollsam train` (optional with --checkpoint "
                   "PATH: a checkpoint file holds everything predict needs); spell it --run-dir "
                   "after torchrun, whose parser mistakes --run for its --run-path")
    p.add_argument("--fragment", action="append", required=True, metavar="FRAGMENT_DIR",
                   help="fragment folder (repeatable; several write OUT/<id>/)")
    p.add_argument("--out", required=True, help="output folder (prob.png, mask.png, ...)")
    p.add_argument("--checkpoint", default="best", metavar="best|last|PATH",
                   help="checkpoint of the run (default best; last.pt if no best.pt yet), or "
                   "a checkpoint file, used alone (its own config)")
    p.add_argument("--threshold", default="auto", metavar="auto|saved|T",
                   help="ink where probability >= T; auto (default): the run's validation "
                   "threshold, moved with each fragment's probabilities (with --points: as "
                   "saved); saved: the run's as it is")
    p.add_argument("--tile", type=int, help="window side in fragment pixels, >= 16 and <= 4096 "
                   "(default: the model input size; other sizes are resized to it)")
    p.add_argument("--stride", type=int, help="window step in pixels, >= 1 (default: the run's "
                   "data.stride, else tile/2)")
    p.add_argument("--batch-size", type=int, help="model inputs per call, >= 1 (default: the "
                   "run's train.batch_size)")
    p.add_argument("--tta", action="store_true",
                   help="average over flips and 90 degree rotations (8x slower)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="bf16 autocast or fp32 (default auto: the run's train.amp, i.e. bf16 "
                   "on CUDA and on CPUs with bf16 units)")
    p.add_argument("--submission", metavar="FILE.csv",
                   help="also write the Kaggle CSV for all fragments (ids = folder names)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --submission")
    p.add_argument("--points", metavar="FILE.json",
                   help="predict around clicks [{x, y, label}] (fragment pixels) with the "
                   "prompted decoder instead of everywhere")
    p.add_argument("--save-tif", action="store_true", help="also write prob.tif (float32)")
    p.add_argument("--format", default="auto", choices=("auto", "png", "zarr"),
                   help="png: prob.png, mask.png, overlay.png; zarr: prob.ome.zarr (chunked "
                   "OME-Zarr with a pyramid, resumable) + PNG previews; auto (default): zarr "
                   "above 64 Mpx")
    p.add_argument("--dtype", default="uint8", choices=("uint8", "float16"),
                   help="OME-Zarr values: uint8 = round(255 * p) (default) or float16 = p")
    p.add_argument("--chunk", type=int, default=1024, metavar="N",
                   help="OME-Zarr chunk side in pixels, >= 16 (default 1024)")
    p.add_argument("--band-rows", type=int, metavar="N",
                   help="rows per band, a multiple of --chunk (default: the smallest multiple "
                   "of at least 4 windows); more rows recompute fewer windows, use more memory")
    p.add_argument("--restart", action="store_true",
                   help="discard an OME-Zarr prediction in --out made with other (or unknown) "
                   "settings, or that PNG files would replace (default: refuse; the same "
                   "settings resume where a killed run stopped)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="MIN",
                   help="under torchrun: minutes a process waits for the others before the job "
                   "ends with an error (default 60)")


def run_predict(args: argparse.Namespace) -> int:
    from scrollsam.infer.pipeline import predict_to_folder
    from scrollsam.infer.threshold import threshold_choice
    from scrollsam.train.distributed import world_from_env

    if not world_from_env().main:  # under torchrun rank 0 tells; the others only warn
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    threshold = threshold_choice(args.threshold)
    results = predict_to_folder(
        args.run, args.fragment, args.out, checkpoint=args.checkpoint, threshold=threshold,
        tile=args.tile, stride=args.stride, batch_size=args.batch_size, tta=args.tta,
        device=args.device, precision=args.precision, submission=args.submission,
        force=args.force,
        points=args.points, save_tif=args.save_tif, progress=sys.stderr.isatty(),
        fmt=args.format, dtype=args.dtype, chunk=args.chunk, band_rows=args.band_rows,
        restart=args.restart, timeout_min=args.timeout,
    )
    if not world_from_env().main:
        return EXIT_OK  # rank 0 reports for every process
    for r in results:
        speed = r.stats.get("megapixels_per_s")
        line = f"{r.fragment}: {r.out_dir}"
        if speed is not None:
            line += f"  {speed:.2f} MP/s, peak {r.stats['peak_rss_anon_mb']:.0f} MB"
        if r.stats.get("bands_skipped"):
            line += f" ({r.stats['bands_skipped']} of {r.stats['bands']} bands already done)"
        if r.metrics is not None:
            m = r.metrics
            line += (f"  F0.5 {m['f0.5']:.4f} (precision {m['precision']:.4f}, recall "
                     f"{m['recall']:.4f}, threshold {m['threshold']:g})")
        print(line)
    if args.submission:
        print(f"submission: {args.submission}")
    return EXIT_OK
