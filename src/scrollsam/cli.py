"""The `scrollsam` command: parse arguments, call the library, print. No logic lives here.

Each subcommand is one block below: an ``_add_<name>`` function that declares its arguments
(with an example in the epilog) and a ``_run_<name>`` function that calls the library and
returns the exit code. Errors the user can fix (:class:`scrollsam.errors.ScrollsamError`) end
with one line ``error: ...`` and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from scrollsam.errors import ScrollsamError

log = logging.getLogger("scrollsam")

# Busy-waiting OpenMP threads make torch 2-3x slower (up to 30x seen) whenever another process
# wants a core: DataLoader workers, a second job, CI. Passive waiting costs at most ~15% on an
# idle CPU (benchmarks/README.md). This runs before torch is imported; a user's setting wins
# (OMP_WAIT_POLICY=ACTIVE for a dedicated CPU).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 128 + 13  # as a shell reports a command ended by SIGPIPE


# --- synth -------------------------------------------------------------------------------------


def _add_synth(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--overwrite", action="store_true", help="replace existing fragment folders")


def _run_synth(args: argparse.Namespace) -> int:
    from scrollsam.data.synthetic import synth_fragments

    paths = synth_fragments(
        args.out, fragments=args.fragments, height=args.height, width=args.width,
        depth=args.depth, seed=args.seed, ink_contrast=args.ink_contrast,
        test_fragments=args.test_fragments, overwrite=args.overwrite,
    )
    for path in paths:
        print(path)
    return EXIT_OK


# --- inspect -----------------------------------------------------------------------------------


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("fragment", help="fragment folder (Kaggle or scroll-segment layout)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _run_inspect(args: argparse.Namespace) -> int:
    import json

    from scrollsam.data.fragment import Fragment
    from scrollsam.data.summary import describe, format_description

    summary = describe(Fragment(args.fragment))
    print(json.dumps(summary, indent=2) if args.json else format_description(summary))
    return EXIT_OK


# --- train -------------------------------------------------------------------------------------


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML holding only what changes (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in out=DIR from its last.pt (its saved config is "
                        "used; train.steps=N may extend it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.steps=500 data.train=[train/1,train/2]")


def _run_train(args: argparse.Namespace) -> int:
    from scrollsam.config import load_config
    from scrollsam.train.loop import train

    cfg = load_config(args.config, args.overrides)
    run = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run: {run}  (checkpoints best.pt / last.pt; tensorboard --logdir {run / 'tb'})")
    return EXIT_OK


# --- predict -----------------------------------------------------------------------------------


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by `scrollsam train`")
    p.add_argument("--fragment", action="append", required=True, metavar="FRAGMENT_DIR",
                   help="fragment folder (repeatable; several write OUT/<id>/)")
    p.add_argument("--out", required=True, help="output folder (prob.png, mask.png, ...)")
    p.add_argument("--checkpoint", default="best", metavar="best|last|PATH",
                   help="checkpoint of the run (default best; last.pt if no best.pt yet)")
    p.add_argument("--threshold", default="auto", metavar="auto|T",
                   help="ink where probability >= T (default: the one saved with the checkpoint)")
    p.add_argument("--tile", type=int, help="window side in fragment pixels (default: the "
                   "model input size; other sizes are resized to it)")
    p.add_argument("--stride", type=int, help="window step (default: the run's, else tile/2)")
    p.add_argument("--batch-size", type=int, help="model inputs per call (default: the run's)")
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


def _run_predict(args: argparse.Namespace) -> int:
    from scrollsam.infer.pipeline import predict_to_folder

    threshold = None if args.threshold == "auto" else _number("--threshold", args.threshold)
    results = predict_to_folder(
        args.run, args.fragment, args.out, checkpoint=args.checkpoint, threshold=threshold,
        tile=args.tile, stride=args.stride, batch_size=args.batch_size, tta=args.tta,
        device=args.device, precision=args.precision, submission=args.submission,
        force=args.force,
        points=args.points, save_tif=args.save_tif, progress=sys.stderr.isatty(),
    )
    for r in results:
        speed = r.stats.get("megapixels_per_s")
        line = f"{r.fragment}: {r.out_dir}"
        if speed is not None:
            line += f"  {speed:.2f} MP/s, peak {r.stats['peak_rss_anon_mb']:.0f} MB"
        if r.metrics is not None:
            m = r.metrics
            line += (f"  F0.5 {m['f0.5']:.4f} (precision {m['precision']:.4f}, recall "
                     f"{m['recall']:.4f}, threshold {m['threshold']:g})")
        print(line)
    if args.submission:
        print(f"submission: {args.submission}")
    return EXIT_OK


def _number(option: str, text: str) -> float:
    from scrollsam.errors import InputError

    try:
        return float(text)
    except ValueError:
        raise InputError(f"{option}: expected auto or a number, got {text!r}") from None


# --- evaluate ----------------------------------------------------------------------------------


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True,
                   help="predicted image: a binary mask (0/255 or 0/1) used as is, or "
                        "probabilities (8-bit /255, 16-bit /65535) thresholded")
    p.add_argument("--labels", required=True, help="ink labels of the same size (inklabels.png)")
    p.add_argument("--mask", help="fragment mask (mask.png): score only inside it")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="ink where probability >= T, for probability images (default 0.5)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: f0.5, precision, recall, dice, iou, counts")


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    from scrollsam.evaluate import evaluate_files

    result = evaluate_files(args.pred, args.labels, args.mask, threshold=args.threshold)
    print(json.dumps(result.to_dict()) if args.json else result.report())
    return EXIT_OK


# --- submit ------------------------------------------------------------------------------------


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", action="append", required=True, metavar="ID=MASK.png",
                   help="fragment id and its predicted mask (repeatable; rows keep this order)")
    p.add_argument("--out", required=True, help="submission CSV to write (Id,Predicted)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="ink where probability >= T, for probability images (default 0.5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")


def _run_submit(args: argparse.Namespace) -> int:
    from scrollsam.evaluate import read_prediction
    from scrollsam.rle import parse_pred_specs, write_submission

    specs = parse_pred_specs(args.pred)
    rows = ((i, read_prediction(path, threshold=args.threshold)[0])
            for i, path in specs)  # lazily: one mask in memory at a time
    count = write_submission(args.out, rows, overwrite=args.force)
    log.info("wrote %d rows to %s", count, args.out)
    return EXIT_OK


# --- doctor ------------------------------------------------------------------------------------


def _add_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (default: built-in synthetic + tiny model)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")


def _run_doctor(args: argparse.Namespace) -> int:
    from scrollsam.config import load_config
    from scrollsam.doctor import run_doctor

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    return run_doctor(cfg)


# --- demo --------------------------------------------------------------------------------------


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="folder for data, run, predictions")
    p.add_argument("--input", choices=("ir", "slices"), default="ir",
                   help="ir: the infrared toy problem; slices: x-ray slice triplets")
    p.add_argument("--steps", type=int, help="training steps (default: the demo's 300)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args: argparse.Namespace) -> int:
    from scrollsam.demo import run_demo

    r = run_demo(args.out, input=args.input, steps=args.steps, progress=not args.no_progress)
    print(f"\ndemo finished in {r.seconds:.0f} s")
    print(f"  data         {r.out / 'data'}")
    print(f"  run          {r.run}  (config.yaml, best.pt, last.pt)")
    print(f"  prediction   {r.pred}  (prob.png, mask.png, overlay.png, metrics.json)")
    print(f"  metrics      {r.out / 'metrics.json'}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in r.metrics.items()))
    print(f"  tensorboard  tensorboard --logdir {r.run / 'tb'}")
    return EXIT_OK


# --- entry point -------------------------------------------------------------------------------

# name -> (one-line help, example, add-arguments, run)
COMMANDS: dict[str, tuple[str, str, Callable, Callable]] = {
    "synth": ("write synthetic fragments in the Kaggle layout",
              "scrollsam synth data --fragments 3 --height 1024 --width 1024",
              _add_synth, lambda a: _run_synth(a)),
    "inspect": ("validate a fragment folder and summarise it",
                "scrollsam inspect data/train/1",
                _add_inspect, lambda a: _run_inspect(a)),
    "train": ("fine-tune SAM on fragments (config file + key=value overrides)",
              "scrollsam train --config configs/demo.yaml out=runs/demo train.steps=200",
              _add_train, lambda a: _run_train(a)),
    "predict": ("segment whole fragments with a trained run",
                "scrollsam predict --run runs/demo --fragment data/test/a --out pred",
                _add_predict, lambda a: _run_predict(a)),
    "evaluate": ("score a predicted mask against ink labels (F0.5 ...)",
                 "scrollsam evaluate --pred pred/3/mask.png --labels data/train/3/inklabels.png "
                 "--mask data/train/3/mask.png --json",
                 _add_evaluate, lambda a: _run_evaluate(a)),
    "submit": ("write a Kaggle submission CSV from predicted masks",
               "scrollsam submit --pred a=pred/a/mask.png --out submission.csv",
               _add_submit, lambda a: _run_submit(a)),
    "doctor": ("trace one batch through every stage and check that loss falls",
               "scrollsam doctor --config configs/demo.yaml",
               _add_doctor, lambda a: _run_doctor(a)),
    "demo": ("synth + train + predict + evaluate on a CPU in minutes",
             "scrollsam demo --out demo",
             _add_demo, lambda a: _run_demo(a)),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; each subcommand has --help with an example."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    common.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    parser = argparse.ArgumentParser(
        prog="scrollsam",
        description="Fine-tune Segment Anything to find ink in scans of the Herculaneum scrolls.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_line, example, add, _) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_line, description=help_line, parents=[common],
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `scrollsam` with ``argv`` (default: sys.argv[1:]) and return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
    )
    run = COMMANDS[args.command][3]
    try:
        return int(run(args) or EXIT_OK)
    except ScrollsamError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left early (`scrollsam evaluate ... | head -1`)
        _silence_stdout()
        return EXIT_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush of a closed pipe is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no real file descriptor behind stdout
        pass


if __name__ == "__main__":
    sys.exit(main())
