"""``scrollsam demo``: from nothing to an evaluated ink map on a CPU in minutes.

Synthesises nine small fragments into ``OUT/data``, each with its own generator settings
(``scrollsam synth --vary 1``), trains the ``tiny`` model (random weights: no download) on
fragments 1-8 with fragment 9 held back for validation, predicts fragment 9 with the
whole-fragment predictor into ``OUT/pred``, and writes ``OUT/metrics.json``. ``--input ir``
(the default) is the infrared toy problem; ``--input slices`` the x-ray volume, where the ink is
only a faint density change: a band of slices through the learned depth encoder. Both use the
full-resolution mask head (SAM's own S/4 output caps thin strokes near F0.5 0.88).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scrollsam.errors import InputError, RunDirError
from scrollsam.out_path import check_out_folder
from scrollsam.shell import shell_command, shell_word
from scrollsam.train.stop import TrainingStopped

if TYPE_CHECKING:
    from scrollsam.config import Config

log = logging.getLogger(__name__)

# (imports stay light: the CLI reads demo_settings for `scrollsam demo --help` on every call)

# the x-ray demo's band view: centred on each fragment's papyrus sheet, jittered by up to 3
# slices in training, each pixel's band standardised along its own depth (profile)
XRAY_VIEW = "{depth_shift: 3, align: sheet, profile: true}"
XRAY = [  # the x-ray demo on top of the common settings (see demo_overrides)
    "data.strategy=range", "data.z_start=20", "data.z_end=46", f"data.view={XRAY_VIEW}",
    "data.pixel_augment=true",
    "model.depth_encoder=true", "prompts.prompt_free_share=0.75", "prompts.corrective_rounds=0",
    "train.steps=700", "train.eval_every=100", "train.save_every=100", "log.image_every=100",
]
MARKER = ".scrollsam-demo"  # a demo folder may be replaced by the next demo, nothing else
FRAGMENTS = 9  # 1..8 to train on, the last held back
SIZE = 384  # fragment side in px
DEPTH = 65
TRAIN = [f"train/{i}" for i in range(1, FRAGMENTS)]
HELD_BACK = f"train/{FRAGMENTS}"


@dataclass
class DemoResult:
    """Where the demo wrote things and what it scored."""

    out: Path
    run: Path
    pred: Path
    metrics: dict[str, float]
    seconds: float


def demo_overrides(out: Path, input: str, *, depth: bool = True) -> list[str]:
    """The demo's training config as ``key=value`` overrides (configs/demo.yaml and
    configs/demo_xray.yaml hold the same): the tiny model from random weights, 300 steps on the
    CPU, fragments 1-8 to train on and fragment 9 held back. Both inputs use the
    full-resolution mask head; x-ray slices go through the learned depth encoder (a band of 26
    slices centred on each fragment's papyrus sheet, jittered by up to 3 slices in training,
    each pixel's band standardised along its own depth),
    with brightness / contrast / noise augmentation, mostly prompt-free sets and no corrective
    rounds, which is what whole-fragment prediction needs; those steps are cheaper, so it takes
    700 of them, about 1.6 times the ir demo's training time (``make bench-learn``).
    ``depth=False``: slices as the plain views take them (for comparisons)."""
    common = [
        f"out={out / 'run'}", f"data.root={out / 'data'}", f"data.train=[{','.join(TRAIN)}]",
        f"data.valid=[{HELD_BACK}]", f"data.input={input}", "data.pixel_augment=false",
        "model.type=tiny", "model.checkpoint=null", "model.image_size=128",
        "model.trainable=[image_encoder,prompt_encoder,mask_decoder]", "model.mask_head=full",
        "prompts.prompt_free_share=0.5", "prompts.corrective_rounds=1",
        "train.steps=300", "train.batch_size=8", "train.lr=1e-3", "train.warmup=20",
        "train.eval_every=50", "train.save_every=50", "train.device=cpu",
        "log.image_every=50",
    ]
    if input != "slices" or not depth:
        return common
    return [*common, *XRAY]


def demo_config(out: Path, input: str) -> Config:
    """The demo's training config (also shipped as configs/demo.yaml / configs/demo_xray.yaml)."""
    from scrollsam.config import load_config

    return load_config(None, demo_overrides(out, input))


def demo_settings(input: str) -> dict[str, str]:
    """The demo's config values for ``input`` as text, key -> value (a later override of a key
    wins), read from :func:`demo_overrides` without building the config (no torch import)."""
    return dict(o.split("=", 1) for o in demo_overrides(Path("demo"), input))


def describe_input(input: str) -> str:
    """What the demo's model sees for ``input``, in words (``scrollsam demo --help``)."""
    s = demo_settings(input)
    if s["data.input"] != "slices":
        return "the infrared image (ir.png)"
    strategy, z0, z1 = s.get("data.strategy", "triplet"), s.get("data.z_start"), s.get("data.z_end")
    what = (f"a {int(z1) - int(z0)}-slice {strategy} band" if z0 and z1 else
            f"the {strategy} view")
    via = " through the learned depth encoder" if s.get("model.depth_encoder") == "true" else ""
    return f"the x-ray volume, {what}{via}"


def synth_demo_data(root: Path) -> list[Path]:
    """The demo's fragments under ``root``, ``train/1..9``, as ``scrollsam synth ROOT
    --fragments 9 --height 384 --width 384 --vary 1`` writes them: every fragment with its own
    generator settings (sheet depth, thickness and drift, ink depth, spread, contrast and its
    variation, noise, fibres, strokes), so a model learns what transfers rather than one
    generator's constants. Many small fragments sample those settings better than a few large
    ones of the same area (``make bench-learn``)."""
    from scrollsam.data.synthetic import synth_fragments

    return synth_fragments(root, fragments=FRAGMENTS, height=SIZE, width=SIZE, depth=DEPTH,
                           seed=0, vary=1)


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise RunDirError(f"demo folder exists and was not made by scrollsam demo ({out}); "
                              "choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by scrollsam demo; the next demo may replace it\n")


def run_demo(out: str | Path = "demo", *, input: str = "ir", steps: int | None = None,
             progress: bool = True) -> DemoResult:
    """Synthesise, train, predict and evaluate; see the module docstring."""
    from scrollsam.infer.pipeline import predict_to_folder
    from scrollsam.io import atomic_write_text
    from scrollsam.train.loop import train

    if steps is not None and (isinstance(steps, bool) or steps < 1):  # before anything goes
        raise InputError(f"--steps: expected a positive integer, got {steps}")
    start = time.perf_counter()
    out = Path(out)
    check_out_folder(out, name="--out", replaced=True)  # a demo replaces its folder
    _prepare(out)
    log.info("1/4 synthesising %d fragments of %dx%dx%d into %s", FRAGMENTS, SIZE, SIZE, DEPTH,
             out / "data")
    synth_demo_data(out / "data")
    cfg = demo_config(out, input)
    if steps is not None:
        cfg.train.steps = steps
    log.info("2/4 training the tiny model on fragments 1-%d (%s input, %d steps, CPU)",
             FRAGMENTS - 1, input, cfg.train.steps)
    try:
        run = train(cfg, progress=progress)
    except TrainingStopped as stop:  # train's own hint (train --resume) would not finish it
        stop.args = (_stopped_line(stop, out, input),)
        raise
    log.info("3/4 predicting the held-back fragment %d", FRAGMENTS)
    pred = out / "pred"
    (result,) = predict_to_folder(run, [out / "data" / HELD_BACK], pred, device="cpu",
                                  progress=progress)
    scores = result.metrics or {}
    metrics = {k: float(scores[k]) for k in ("f0.5", "precision", "recall", "threshold")
               if k in scores}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    seconds = time.perf_counter() - start
    nan = float("nan")
    log.info("4/4 held-back fragment %d: F0.5 %.3f (precision %.3f, recall %.3f) at threshold "
             "%.2f", FRAGMENTS, metrics.get("f0.5", nan), metrics.get("precision", nan),
             metrics.get("recall", nan), metrics.get("threshold", nan))
    return DemoResult(out, run, pred, metrics, seconds)


def _stopped_line(stop: TrainingStopped, out: Path, input: str) -> str:
    """What to do after a Ctrl-C or SIGTERM stopped the demo's training: run the demo again
    (it starts over), or finish the training and predict by hand."""
    again = ["scrollsam", "demo", "--out", out] + (["--input", input] if input != "ir" else [])
    predict = ["scrollsam", "predict", "--run", out / "run", "--fragment",
               out / "data" / HELD_BACK, "--out", out / "pred"]
    return (f"stopped by {signal.Signals(stop.signum).name} after step {stop.step}, before the "
            f"prediction: run `{shell_command(*again)}` again (it starts over), or finish the "
            f"training with `scrollsam train out={shell_word(out / 'run')} --resume` and then "
            f"`{shell_command(*predict)}`")
