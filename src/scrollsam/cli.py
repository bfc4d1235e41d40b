"""The `scrollsam` command: parse arguments, call the library, print. No logic lives here.

Each subcommand is one block below: an ``_add_<name>`` function that declares its arguments
(with an example in the epilog) and a ``_run_<name>`` function that calls the library and
returns the exit code. Errors the user can fix (:class:`scrollsam.errors.ScrollsamError`) end
with one line ``error: ...`` and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from scrollsam.errors import ScrollsamError

log = logging.getLogger("scrollsam")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _not_built(name: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"error: `scrollsam {name}` is not built yet ({issue})", file=sys.stderr)
        return EXIT_USAGE

    return run


# --- synth -------------------------------------------------------------------------------------


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write OUT/train/<n>/ (and OUT/test/<letter>/) into")


_run_synth = _not_built("synth", "fragment data issue")


# --- inspect -----------------------------------------------------------------------------------


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("fragment", help="fragment folder (Kaggle or scroll-segment layout)")


_run_inspect = _not_built("inspect", "fragment data issue")


# --- train -------------------------------------------------------------------------------------


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML holding only what changes")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")


_run_train = _not_built("train", "training issue")


# --- predict -----------------------------------------------------------------------------------


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run folder written by `scrollsam train`")
    p.add_argument("--fragment", action="append", help="fragment folder (repeatable)")
    p.add_argument("--out", help="output folder")


_run_predict = _not_built("predict", "inference issue")


# --- evaluate ----------------------------------------------------------------------------------


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", help="predicted mask or probability PNG")
    p.add_argument("--labels", help="inklabels.png")


_run_evaluate = _not_built("evaluate", "prompts/losses/metrics issue")


# --- submit ------------------------------------------------------------------------------------


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", action="append", help="ID=MASK.png (repeatable)")
    p.add_argument("--out", help="submission CSV")


_run_submit = _not_built("submit", "prompts/losses/metrics issue")


# --- doctor ------------------------------------------------------------------------------------


def _add_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (default: built-in synthetic + tiny model)")


_run_doctor = _not_built("doctor", "training issue")


# --- demo --------------------------------------------------------------------------------------


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="folder for data, run, predictions")


_run_demo = _not_built("demo", "training issue")


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
                 "scrollsam evaluate --pred pred/mask.png --labels data/train/3/inklabels.png",
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


if __name__ == "__main__":
    sys.exit(main())
