"""What the model learns, side by side with a plain CNN: ``make bench-learn``.

    .venv/bin/python benchmarks/learn.py                   # every entry, ~30 min on 2 cores
    .venv/bin/python benchmarks/learn.py --only learn_slices_depth_full,learn_cnn_slices
    .venv/bin/python benchmarks/learn.py --list

Every entry trains on the demo's data and budget (``scrollsam demo``'s fragments, config and
300 steps on the CPU) and is scored on the demo's held-back fragment over its whole area: SAM
entries with ``scrollsam predict`` (its default threshold: the one chosen on validation, adapted
to the fragment's probabilities, ``scrollsam.infer.threshold``), the CNN reference
(``cnn_reference.py``) at its best threshold on the same fragment. F0.5, precision, recall and
the training seconds go into ``benchmarks/results.json`` under ``learn_*`` (merged as
``run.py`` does), and the table is printed.

The cross-generator entries train as the x-ray demo does and are scored on fragments made with
generator settings *outside* the training ranges (``OUT_OF_RANGE``: the papyrus sheet and the
ink moved in depth, weaker and stronger ink, more noise, wider strokes, a thin sheet, strong
fibres): the mean F0.5 over those fragments, and each one's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402
from cnn_reference import score_cnn, train_cnn  # noqa: E402

from scrollsam.config import Config, load_config  # noqa: E402
from scrollsam.data.synthetic import write_fragment  # noqa: E402
from scrollsam.demo import HELD_BACK, XRAY_VIEW, demo_overrides, synth_demo_data  # noqa: E402
from scrollsam.infer.pipeline import predict_to_folder  # noqa: E402
from scrollsam.train.loop import train  # noqa: E402

WORK = BENCH_DIR / "_work" / "learn"
SLICE_BAND = ["data.input=slices", "data.strategy=range", "data.z_start=20", "data.z_end=46"]
# the x-ray demo's view of that band: centred on each fragment's sheet, jittered in training,
# each pixel standardised along its depth
CNN_BAND = [*SLICE_BAND, f"data.view={XRAY_VIEW}"]

# name -> (what it is, input, config overrides on top of the demo's config for that input)
SAM_ENTRIES: dict[str, tuple[str, str, list[str]]] = {
    "learn_ir_sam": ("SAM, ir, S/4 mask output", "ir", ["model.mask_head=sam"]),
    "learn_ir_full": ("SAM, ir, full-resolution head", "ir", ["model.mask_head=full"]),
    "learn_slices_triplet": ("SAM, 3 slices (triplet)", "plain",
                             ["data.strategy=triplet", "model.mask_head=sam"]),
    "learn_slices_range": ("SAM, 26 slices as channels", "plain",
                           [*SLICE_BAND, "model.mask_head=sam"]),
    "learn_slices_depth": ("SAM + depth encoder, S/4 output", "slices",
                           ["model.mask_head=sam"]),
    "learn_slices_depth_full": ("SAM + depth encoder + full head (the x-ray demo)", "slices", []),
    "learn_slices_head_only": ("depth encoder + full head, SAM's logits left out", "slices",
                               ["model.head_sam_logits=false"]),
    "learn_slices_depth_pool": ("SAM + depth-pooling encoder + full head", "slices",
                                ["model.depth_kind=pool"]),
}
CNN_ENTRIES: dict[str, tuple[str, list[str]]] = {
    "learn_cnn_ir": ("4-layer CNN reference, ir", ["data.input=ir"]),
    "learn_cnn_slices": ("4-layer CNN reference, 26 slices", CNN_BAND),
    # about the x-ray demo's training time on this CPU (~180 s): the same time, not the same steps
    "learn_cnn_slices_long": ("4-layer CNN reference, 26 slices, 4000 steps",
                              [*CNN_BAND, "train.steps=4000"]),
}
# generator settings outside the ranges the x-ray demo trains on (scrollsam.data.synth_settings)
OUT_OF_RANGE: dict[str, dict[str, float]] = {
    "deep_faint": {"surface": 7.0, "ink_offset": 2.5, "ink_contrast": 0.05},
    "shallow_strong": {"surface": -7.0, "ink_offset": -2.5, "ink_contrast": 0.22, "noise": 0.07,
                       "stroke": 1.8},
    "thin_fibrous": {"sheet": 6.0, "ink_sigma": 1.5, "fibre": 0.22, "drift": 6.0},
}
CROSS_ENTRIES = ("learn_cross_demo_xray", "learn_cross_cnn_slices")


def prepare_data(root: Path) -> Path:
    """The demo's fragments (``synth_demo_data``) and the out-of-range fragments, once."""
    if not (root / HELD_BACK).is_dir():  # none yet, or an older demo's layout
        shutil.rmtree(root / "train", ignore_errors=True)
        synth_demo_data(root)
    for i, (name, settings) in enumerate(OUT_OF_RANGE.items()):
        if not (root / "cross" / name).is_dir():
            write_fragment(root / "cross" / name, height=512, width=512, seed=(7, i),
                           settings=settings)
    return root


def sam_entry(name: str, data: Path, *, quick: bool) -> dict[str, Any]:
    """Train the demo config with the entry's overrides, predict the held-back fragment, score
    it."""
    _, input_, overrides = SAM_ENTRIES[name]
    out = WORK / "runs" / name
    cfg = _config(out, data, input_, overrides, quick=quick)
    start = time.perf_counter()
    run = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    (result,) = predict_to_folder(run, [data / HELD_BACK], out / "pred", device="cpu")
    scores = result.metrics or {}
    return {**{k: float(scores[k]) for k in ("f0.5", "precision", "recall")},
            "train_seconds": round(seconds, 1), "steps": cfg.train.steps,
            "what": SAM_ENTRIES[name][0]}


def cnn_entry(name: str, data: Path, *, quick: bool) -> dict[str, Any]:
    what, overrides = CNN_ENTRIES[name]
    cfg = _config(WORK / "runs" / name, data, "ir", overrides, quick=quick)
    model, view, seconds = train_cnn(cfg, steps=cfg.train.steps)
    scores = score_cnn(model, view, data / HELD_BACK)
    return {**scores, "train_seconds": round(seconds, 1), "steps": cfg.train.steps,
            "what": what}


def cross_entry(name: str, data: Path, *, quick: bool) -> dict[str, Any]:
    """The x-ray demo's model (or the CNN reference) on the out-of-range fragments."""
    frags = {n: data / "cross" / n for n in OUT_OF_RANGE}
    per: dict[str, float] = {}
    if name == "learn_cross_demo_xray":  # the model of learn_slices_depth_full, trained once
        run = WORK / "runs" / "learn_slices_depth_full" / "run"
        if not (run / "best.pt").is_file():
            sam_entry("learn_slices_depth_full", data, quick=quick)
        per = _scores(run, list(frags.values()), run.parent / "cross")
        what = "x-ray demo model on out-of-range generators"
    else:
        cfg = _config(WORK / "runs" / name, data, "ir", CNN_BAND, quick=quick)
        model, view, _ = train_cnn(cfg, steps=cfg.train.steps)
        per = {n: score_cnn(model, view, p)["f0.5"] for n, p in frags.items()}
        what = "CNN reference (26 slices) on out-of-range generators"
    return {"f0.5": sum(per.values()) / len(per), "per_fragment": per, "what": what,
            "settings": OUT_OF_RANGE}


def cross_seeds(data: Path, seeds: list[int], *, quick: bool) -> dict[str, Any]:
    """The x-ray demo trained once per ``train.seed`` in ``seeds``, each model scored on the
    out-of-range fragments and the held-back one: mean, sample std and every seed's scores (one
    seed says little: they differ by about 0.03)."""
    _, input_, overrides = SAM_ENTRIES["learn_slices_depth_full"]
    frags = [data / "cross" / n for n in OUT_OF_RANGE] + [data / HELD_BACK]
    rows: dict[str, dict[str, float]] = {}
    for seed in seeds:
        out = WORK / "runs" / f"learn_cross_seed{seed}"
        cfg = _config(out, data, input_, [*overrides, f"train.seed={seed}"], quick=quick)
        run = train(cfg, progress=False)
        per = _scores(run, frags, out / "pred")
        held = per.pop(Path(HELD_BACK).name)
        rows[str(seed)] = {**per, "cross_mean": sum(per.values()) / len(per), "held_back": held}
        print(f"  seed {seed}: cross {rows[str(seed)]['cross_mean']:.3f} "
              f"({', '.join(f'{k} {v:.3f}' for k, v in per.items())}), held-back {held:.3f}",
              flush=True)
    means = [r["cross_mean"] for r in rows.values()]
    mean = sum(means) / len(means)
    std = (sum((m - mean) ** 2 for m in means) / max(len(means) - 1, 1)) ** 0.5
    held = [r["held_back"] for r in rows.values()]
    return {"f0.5": mean, "std": std, "held_back": sum(held) / len(held), "per_seed": rows,
            "what": f"x-ray demo model on out-of-range generators, seeds {seeds}",
            "settings": OUT_OF_RANGE}


def _scores(run: Path, fragments: list[Path], out: Path) -> dict[str, float]:
    """F0.5 of ``run``'s model on each fragment (``scrollsam predict`` into ``out``)."""
    results = predict_to_folder(run, fragments, out, device="cpu")
    return {r.fragment: float((r.metrics or {})["f0.5"]) for r in results}


def _config(out: Path, data: Path, input_: str, overrides: list[str], *,
            quick: bool) -> Config:
    """The demo's config for ``input_`` (``plain``: slices without the x-ray demo's depth
    encoder and prompting) with the entry's overrides, training into ``out/run`` (emptied
    first) on ``data``."""
    shutil.rmtree(out, ignore_errors=True)
    base = demo_overrides(out, "slices", depth=False) if input_ == "plain" else demo_overrides(
        out, input_)
    return load_config(None, [*base, f"data.root={data}", *overrides,
                              *(["train.steps=20", "train.eval_every=10"] if quick else [])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated entry names")
    p.add_argument("--list", action="store_true")
    p.add_argument("--quick", action="store_true", help="20 steps each: a smoke run only")
    p.add_argument("--out", default=str(BENCH_DIR / "results.json"))
    p.add_argument("--seeds", help="comma-separated training seeds: train the x-ray demo once "
                   "per seed and score the cross fragments (learn_cross_demo_xray_seeds; about "
                   "4 min per seed), instead of the entries")
    args = p.parse_args(argv)
    names = [*SAM_ENTRIES, *CNN_ENTRIES, *CROSS_ENTRIES]
    if args.list:
        print("\n".join(names))
        return 0
    chosen = args.only.split(",") if args.only else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"error: unknown entries {unknown}; see --list", file=sys.stderr)
        return 2
    data = prepare_data(WORK / "data")
    out = Path(args.out)
    if args.seeds:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        r = cross_seeds(data, seeds, quick=args.quick)
        print(f"learn_cross_demo_xray_seeds F0.5 {r['f0.5']:.3f} +- {r['std']:.3f} over seeds "
              f"{seeds}; held-back {r['held_back']:.3f}")
        common.merge_results(out, common.machine_info(), {"learn_cross_demo_xray_seeds": r})
        return 0
    if args.quick and not args.only:
        out = BENCH_DIR / "_work" / "learn-quick.json"
    results: dict[str, Any] = {}
    for name in chosen:
        start = time.perf_counter()
        if name in SAM_ENTRIES:
            results[name] = sam_entry(name, data, quick=args.quick)
        elif name in CNN_ENTRIES:
            results[name] = cnn_entry(name, data, quick=args.quick)
        else:
            results[name] = cross_entry(name, data, quick=args.quick)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        r = results[name]
        print(f"{name:<28} F0.5 {r['f0.5']:.3f}  P {r.get('precision', float('nan')):.3f}  "
              f"R {r.get('recall', float('nan')):.3f}  train {r.get('train_seconds', '-')} s  "
              f"({r['what']})", flush=True)
        # after every entry: an error in a later one keeps what was measured
        common.merge_results(out, common.machine_info(), {name: r})
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
