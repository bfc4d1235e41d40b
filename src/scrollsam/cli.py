"""The `scrollsam` command: parse arguments, call the library, print. No logic lives here.

Each subcommand is one block below: an ``_add_<name>`` function that declares its arguments
(with an example in the epilog) and a ``_run_<name>`` function that calls the library and
returns the exit code. Errors the user can fix (:class:`scrollsam.errors.ScrollsamError`) end
with one line ``error: ...`` and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from scrollsam import zarr_tasks
from scrollsam.cli_data import (
    add_convert,
    add_evaluate,
    add_inspect,
    add_submit,
    add_synth,
    run_convert,
    run_evaluate,
    run_inspect,
    run_submit,
    run_synth,
)
from scrollsam.cli_predict import add_predict, run_predict
from scrollsam.errors import ScrollsamError
from scrollsam.process import tune_process
from scrollsam.sigterm import EXIT_TERMINATED, Terminated, sigterm_as_interrupt
from scrollsam.train.stop import TrainingStopped

log = logging.getLogger("scrollsam")

# OpenMP waiting and glibc's malloc thresholds, before torch is imported (scrollsam.process);
# a user's own settings win.
tune_process()

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 128 + 13  # as a shell reports a command ended by SIGPIPE


# --- train -------------------------------------------------------------------------------------


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML holding only what changes (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in out=DIR from its last checkpoint with its saved "
                        "config (--config is not needed); key=value may extend train.steps or "
                        "change where things are (out, data.root, train.device, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, anywhere on the line, e.g. train.steps=500 "
                        "data.train=[train/1,train/2]")


def _run_train(args: argparse.Namespace) -> int:
    from scrollsam.config import given_keys, load_config
    from scrollsam.shell import shell_command, shell_word
    from scrollsam.train.distributed import world_from_env
    from scrollsam.train.loop import train
    from scrollsam.train.ranks import agree_before_start

    world = world_from_env()  # under torchrun: rank 0 speaks, the others only warn
    if not world.main:
        log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    try:
        cfg = load_config(args.config, args.overrides)
    except ScrollsamError as err:  # under torchrun: printed once, not once per process
        raise agree_before_start(err) from None
    if args.resume and args.config:
        log.info("--resume continues the run's saved config; %s is not used (key=value "
                 "overrides may change out, data.root, train.steps, ...)", args.config)
    run = train(cfg, resume=args.resume, progress=not args.no_progress,
                given=given_keys(args.overrides))
    if world.main:
        print(f"run: {shell_word(run)}  (checkpoints best.pt / last.pt; "
              f"{shell_command('tensorboard', '--logdir', run / 'tb')})")
    return EXIT_OK


# --- doctor ------------------------------------------------------------------------------------


def _add_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (default: built-in synthetic + tiny model)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of --config, or of the built-in case without it")


def _run_doctor(args: argparse.Namespace) -> int:
    from scrollsam.config import load_config
    from scrollsam.doctor import run_doctor

    if args.config:
        return run_doctor(load_config(args.config, args.overrides))
    return run_doctor(overrides=args.overrides)  # on top of the built-in case


# --- demo --------------------------------------------------------------------------------------


def _add_demo(p: argparse.ArgumentParser) -> None:
    from scrollsam.demo import demo_settings, describe_input

    inputs = ("ir", "slices")
    p.add_argument("--out", default="demo", help="folder for data, run, predictions")
    p.add_argument("--input", choices=inputs, default="ir",
                   help="; ".join(f"{i}: {describe_input(i)}" for i in inputs))
    p.add_argument("--steps", type=int, help="training steps (default: the demo's " + ", ".join(
        f"{demo_settings(i)['train.steps']} for {i}" for i in inputs) + ")")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args: argparse.Namespace) -> int:
    from scrollsam.demo import run_demo
    from scrollsam.shell import shell_command, shell_word

    r = run_demo(args.out, input=args.input, steps=args.steps, progress=not args.no_progress)
    print(f"\ndemo finished in {r.seconds:.0f} s")
    print(f"  data         {shell_word(r.out / 'data')}")
    print(f"  run          {shell_word(r.run)}  (config.yaml, best.pt, last.pt, train.log)")
    print(f"  prediction   {shell_word(r.pred)}  (prob.png, mask.png, overlay.png, metrics.json)")
    print(f"  metrics      {shell_word(r.out / 'metrics.json')}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in r.metrics.items()))
    print(f"  tensorboard  {shell_command('tensorboard', '--logdir', r.run / 'tb')}")
    return EXIT_OK


# --- sweep -------------------------------------------------------------------------------------


def _add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="base experiment YAML every trial starts from")
    p.add_argument("--space", required=True, metavar="SPACE.yaml",
                   help="config keys to search: `train.lr: {low: 1.0e-5, high: 1.0e-3, log: "
                   "true}` (float or int range) or `data.z_start: [16, 20, 24]` (choices)")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="run until the study holds N complete or pruned trials (failed ones "
                   "do not count, but a call stops once N of its trials failed; the same "
                   "command continues a killed sweep; workers share the target)")
    p.add_argument("--out", default="runs/sweep", metavar="DIR",
                   help="trial run dirs DIR/trial_0000/..., study.db, best_config.yaml "
                   "(default runs/sweep)")
    p.add_argument("--study", metavar="NAME", help="study name (default: the name of DIR)")
    p.add_argument("--storage", metavar="URL", help="SQLAlchemy URL of the study, e.g. "
                   "postgresql://user:pw@host/db for many machines (default sqlite in DIR)")
    p.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="stop trials whose F0.5 falls below the median of earlier trials at "
                   "the same step (default median)")
    p.add_argument("--startup-trials", type=int, default=3, metavar="N",
                   help="trials that run to the end before the pruner acts (default 3)")
    p.add_argument("--warmup-steps", type=int, default=0, metavar="N",
                   help="no pruning before this training step (default 0)")
    p.add_argument("--seed", type=int, help="sampler seed (give each worker its own)")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not start a new study with the base config's own values")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the base config, e.g. train.steps=200")


def _run_sweep(args: argparse.Namespace) -> int:
    import optuna

    from scrollsam.config import load_config
    from scrollsam.sweep import format_report, load_space, make_pruner, run_sweep

    base = load_config(args.config, args.overrides)
    result = run_sweep(
        base, load_space(args.space, base), trials=args.trials, out=args.out,
        study_name=args.study, storage=args.storage,
        pruner=make_pruner(args.pruner, startup_trials=args.startup_trials,
                           warmup_steps=args.warmup_steps),
        sampler=optuna.samplers.TPESampler(seed=args.seed), baseline=not args.no_baseline,
    )
    print(format_report(result))
    return EXIT_OK if result.best or args.trials == 0 else EXIT_FAIL  # no trial completed


# --- evaluate, submit (their arguments: cli_data.py) -------------------------------------------


# --- entry point -------------------------------------------------------------------------------

# name -> (one-line help, example, add-arguments, run)
COMMANDS: dict[str, tuple[str, str, Callable, Callable]] = {
    "synth": ("write synthetic fragments in the Kaggle layout",
              "scrollsam synth data --fragments 3 --height 1024 --width 1024",
              add_synth, run_synth),
    "inspect": ("validate a fragment folder and summarise it",
                "scrollsam inspect data/train/1",
                add_inspect, run_inspect),
    "convert": ("copy a fragment folder with its volume as Zarr or OME-Zarr",
                "scrollsam convert data/train/1 data/zarr/1 --format ome-zarr --chunks 64,256,256",
                add_convert, run_convert),
    "train": ("fine-tune SAM on fragments (config file + key=value overrides)",
              "scrollsam train --config configs/demo.yaml out=runs/demo train.steps=200",
              _add_train, _run_train),
    "predict": ("segment whole fragments with a trained run",
                "scrollsam predict --run runs/demo --fragment data/test/a --out pred",
                add_predict, run_predict),
    "evaluate": ("score a predicted mask against ink labels (F0.5 ...)",
                 "scrollsam evaluate --pred pred/9/mask.png --labels data/train/9/inklabels.png "
                 "--mask data/train/9/mask.png --json",
                 add_evaluate, run_evaluate),
    "submit": ("write a Kaggle submission CSV from predicted masks",
               "scrollsam submit --pred a=pred/a/mask.png --out submission.csv",
               add_submit, run_submit),
    "doctor": ("trace one batch through every stage and check that loss falls",
               "scrollsam doctor --config configs/demo.yaml",
               _add_doctor, _run_doctor),
    "demo": ("synth + train + predict + evaluate on a CPU in minutes",
             "scrollsam demo --out demo",
             _add_demo, _run_demo),
    "sweep": ("search config values with Optuna; each trial an ordinary run dir",
              "scrollsam sweep --config configs/sweep_demo.yaml --space "
              "configs/sweep_demo_space.yaml --trials 8 --out runs/sweep_demo",
              _add_sweep, _run_sweep),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; each subcommand has --help with an example."""
    parser = argparse.ArgumentParser(
        prog="scrollsam",
        description="Fine-tune Segment Anything to find ink in scans of the Herculaneum scrolls.",
        parents=[_common()],
    )
    parser.set_defaults(debug=False, verbose=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common()  # given before or after COMMAND: the same
    for name, (help_line, example, add, _) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_line, description=help_line, parents=[common],
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(command_parser=p)  # errors in its arguments show its usage
        add(p)
    return parser


def _common() -> argparse.ArgumentParser:
    """--debug and -v, accepted before and after the command; no default of their own (SUPPRESS),
    so a subcommand's parser does not reset what was given before the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log more detail")
    return common


def console() -> None:
    """The ``scrollsam`` program (console script, ``python -m scrollsam``): :func:`main`, then
    exit with its code. A Ctrl-C or SIGTERM after the command has finished ends the process at
    once with that code, instead of printing tracebacks from the interpreter's shutdown
    (atexit hooks, weakref callbacks)."""
    code = main()
    _exit_on_signal(code)
    sys.exit(code)


def _exit_on_signal(code: int) -> None:
    """From now on SIGINT / SIGTERM flush the standard streams and exit with ``code``; an
    ignored signal stays ignored."""
    def leave(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    for sig in (signal.SIGINT, signal.SIGTERM):  # console() runs in the main thread
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, leave)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `scrollsam` with ``argv`` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after flags: train out=runs/x --resume a.b=1
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e
                                                 for e in extra):
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    _expand_home(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
    )
    run = COMMANDS[args.command][3]
    try:
        with sigterm_as_interrupt():  # a scheduler's SIGTERM unwinds as Ctrl-C does
            return int(run(args) or EXIT_OK)
    except ScrollsamError as err:
        if args.debug:
            raise
        zarr_tasks.settle()  # a failed zarr read or write leaves tasks behind: end them quietly
        if not getattr(err, "echo", False):  # torchrun: the first failed process reports it
            print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_USAGE)
    except TrainingStopped as stop:  # Ctrl-C / SIGTERM, last.pt written: say how to go on
        if stop.main:  # once for a torchrun run, not once per process
            print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated); str(): what is left
        terminated = isinstance(stop, Terminated)
        detail = f": {stop}" if str(stop) else ""
        if not getattr(stop, "echo", False):  # torchrun: the process that speaks for the job
            print(f"{'terminated' if terminated else 'interrupted'}{detail}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else 130
    except BrokenPipeError:  # the reader left early (`scrollsam evaluate ... | head -1`)
        _silence_stdout()
        return EXIT_PIPE
    except OSError as err:  # a refused write outside scrollsam's writers, a permission, ...
        from scrollsam.fs_errors import os_error_line

        line = os_error_line(err, getattr(args, "out", None))
        if line is None or args.debug:
            raise
        zarr_tasks.settle()
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE


def _expand_home(args: argparse.Namespace) -> None:
    """``~`` and ``~user`` at the start of an option's value (a path), as the shell expands
    it in a word of its own but not in ``--out=~/x``; ``key=value`` overrides are expanded by
    the config loader (:data:`scrollsam.config.PATH_KEYS`)."""
    for name, value in vars(args).items():
        if name == "overrides":
            continue
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list) and any(isinstance(v, str) and v.startswith("~")
                                               for v in value):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v
                                 for v in value])


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush of a closed pipe is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no real file descriptor behind stdout
        pass


if __name__ == "__main__":
    console()
