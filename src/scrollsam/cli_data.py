"""The `scrollsam` commands that make, check and score data: synth, inspect, convert, evaluate,
submit.

One block per command, as in :mod:`scrollsam.cli` (which registers them): an ``add_<name>``
function that declares its arguments and a ``run_<name>`` function that calls the library and
returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

EXIT_OK = 0
log = logging.getLogger("scrollsam")


# --- synth -------------------------------------------------------------------------------------


def add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write OUT/train/<n>/ (and OUT/test/<letter>/) into")
    p.add_argument("--fragments", type=int, default=3, metavar="N",
                   help="training fragments OUT/train/1..N with labels (default 3)")
    p.add_argument("--height", type=int, default=1024, metavar="PX", help="default 1024")
    p.add_argument("--width", type=int, default=1024, metavar="PX", help="default 1024")
    p.add_argument("--depth", type=int, default=65, metavar="N", help="slices (default 65)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same fragments (default 0)")
    p.add_argument("--ink-contrast", type=float, default=0.1, metavar="C",
                   help="ink density increase in the x-ray volume, fraction of papyrus density "
                   "(0 = invisible, default 0.1 = subtle); ink is always dark in ir.png")
    p.add_argument("--test-fragments", type=int, default=0, metavar="N",
                   help="test fragments OUT/test/a.. without labels (default 0)")
    p.add_argument("--vary", type=int, default=0, choices=(0, 1, 2),
                   help="draw each fragment's generator settings (sheet depth and drift, ink "
                   "depth, spread and contrast, noise, fibres, stroke width, letter size; at 2 "
                   "also the slice count) from ranges that widen with the level (default 0: "
                   "fixed settings); each fragment records them in synth_settings.json")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="fix one generator setting, e.g. --setting ink_offset=3 (repeatable; "
                   "names: see scrollsam.data.synth_settings.SynthSettings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace fragment folders an earlier synth wrote")


def run_synth(args: argparse.Namespace) -> int:
    from scrollsam.data.synth_settings import parse_settings
    from scrollsam.data.synthetic import synth_fragments

    paths = synth_fragments(
        args.out, fragments=args.fragments, height=args.height, width=args.width,
        depth=args.depth, seed=args.seed, ink_contrast=args.ink_contrast,
        test_fragments=args.test_fragments, overwrite=args.overwrite, vary=args.vary,
        settings=parse_settings(args.setting),
    )
    for path in paths:
        print(path)
    return EXIT_OK


# --- inspect -----------------------------------------------------------------------------------


def add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("fragment", help="fragment folder (Kaggle or scroll-segment layout, TIFF "
                   "slices or a Zarr / OME-Zarr volume)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    import json

    from scrollsam.data.fragment import Fragment
    from scrollsam.data.summary import describe, format_description

    summary = describe(Fragment(args.fragment))
    print(json.dumps(summary, indent=2) if args.json else format_description(summary))
    return EXIT_OK


# --- convert -----------------------------------------------------------------------------------


def add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("fragment", help="fragment folder to copy (any layout, TIFF or Zarr volume)")
    p.add_argument("out", help="folder to write the copy into (its name is the copy's id)")
    p.add_argument("--format", default="zarr", choices=("zarr", "ome-zarr"),
                   help="zarr: one (z, y, x) array; ome-zarr: an OME-NGFF image with a small "
                   "y/x pyramid for viewers (default zarr)")
    p.add_argument("--chunks", default="64,256,256", metavar="Z,Y,X",
                   help="chunk shape in voxels, clipped to the volume (default 64,256,256)")
    p.add_argument("--zarr-version", type=int, default=2, choices=(2, 3),
                   help="zarr format: 2 (OME-NGFF 0.4, widest support) or 3 (NGFF 0.5) "
                   "(default 2)")
    p.add_argument("--levels", type=int, metavar="N",
                   help="ome-zarr pyramid levels, 1 = full resolution only (default: halve y "
                   "and x while a level spans a chunk, at most 5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT that an earlier convert wrote (only a Zarr "
                   "store and the PNGs) or that is empty; any other folder is refused, as is "
                   "one that holds or is inside the fragment folder; the old OUT is deleted "
                   "only once the new copy is complete")


def run_convert(args: argparse.Namespace) -> int:
    from scrollsam.data.convert import convert_fragment, parse_chunks

    out = convert_fragment(
        args.fragment, args.out, format=args.format, chunks=parse_chunks(args.chunks),
        zarr_format=args.zarr_version, levels=args.levels, overwrite=args.overwrite,
    )
    print(out)
    return EXIT_OK


# --- evaluate ----------------------------------------------------------------------------------


def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True,
                   help="predicted image: a binary mask (0/255 or 0/1) used as is, or "
                        "probabilities (8-bit /255, 16-bit /65535) thresholded")
    p.add_argument("--labels", required=True, help="ink labels of the same size (inklabels.png)")
    p.add_argument("--mask", help="fragment mask (mask.png): score only inside it")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="ink where probability >= T, for probability images (default 0.5)")
    p.add_argument("--as", dest="kind", choices=("auto", "mask", "prob"), default="auto",
                   help="how --pred is read: auto (default: 0/1 or 0/255 alone is a mask, "
                        "anything else probabilities), mask (nonzero = ink) or prob")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: f0.5, precision, recall, dice, iou, counts")


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from scrollsam.evaluate import evaluate_files
    from scrollsam.metrics import check_threshold

    check_threshold(args.threshold, name="--threshold")  # the flag, before any image is read
    result = evaluate_files(args.pred, args.labels, args.mask, threshold=args.threshold,
                            kind=args.kind)
    print(json.dumps(result.to_dict()) if args.json else result.report())
    return EXIT_OK


# --- submit ------------------------------------------------------------------------------------


def add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", action="append", required=True, metavar="ID=MASK.png",
                   help="fragment id and its predicted mask (repeatable; rows keep this order)")
    p.add_argument("--out", required=True, help="submission CSV to write (Id,Predicted)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="ink where probability >= T, for probability images (default 0.5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")


def run_submit(args: argparse.Namespace) -> int:
    from scrollsam.evaluate import read_prediction
    from scrollsam.metrics import check_threshold
    from scrollsam.rle import parse_pred_specs, write_submission

    check_threshold(args.threshold, name="--threshold")  # the flag, before any image is read
    specs = parse_pred_specs(args.pred)
    _check_submit_out(Path(args.out), specs)
    rows = ((i, read_prediction(path, threshold=args.threshold)[0])
            for i, path in specs)  # lazily: one mask in memory at a time
    count = write_submission(args.out, rows, overwrite=args.force)
    log.info("wrote %d row%s to %s", count, "" if count == 1 else "s", args.out)
    return EXIT_OK


def _check_submit_out(out: Path, specs: list[tuple[str, Path]]) -> None:
    """InputError, before anything is read, when ``submit --out`` would write over data: a file
    inside a fragment folder (a slice, its mask) or one of the predictions it reads."""
    from scrollsam.data.fragment_hosts import fragment_holding
    from scrollsam.errors import InputError

    host = fragment_holding(out)
    if host is not None:
        raise InputError(f"--out: must lie outside every fragment folder, got a path inside "
                         f"{host[0]} (it holds {host[1]}) ({out})")
    real = out.resolve()
    for i, path in specs:
        if Path(path).resolve() == real:
            raise InputError(f"--out: must differ from the predictions it reads, got the file "
                             f"of --pred {i}={path} ({out})")
