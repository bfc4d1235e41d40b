"""The threshold a prediction uses: the expected-F0.5 threshold of a fragment's probabilities
(labels unused, the plug-in optimum), and the run's validation threshold moved by it, in PNG
and OME-Zarr outputs alike; ``--threshold saved`` and a number keep a fixed one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from infer_helpers import make_run, zarr_files

from scrollsam.cli import main
from scrollsam.data.synthetic import write_fragment
from scrollsam.errors import InputError
from scrollsam.infer.pipeline import predict_to_folder
from scrollsam.infer.predict import Predictor
from scrollsam.infer.threshold import (
    ThresholdRule,
    candidate_index,
    candidate_ranks,
    threshold_choice,
)
from scrollsam.io import read_image
from scrollsam.metrics import LEVELS, ProbabilityHistogram, binarize_prediction, expected_threshold

CANDIDATES = np.round(np.arange(1, 100) / 100, 2)


def _hist(prob: np.ndarray, labels: np.ndarray | None = None) -> ProbabilityHistogram:
    h = ProbabilityHistogram()
    h.add(prob, np.zeros(prob.shape, bool) if labels is None else labels)
    return h


def _brute_force(prob: np.ndarray) -> float:
    p = np.rint(prob.astype(np.float64) * 65535) / 65535  # the histogram's 16-bit levels
    best, best_f = None, -1.0
    for t in CANDIDATES:
        sel = p >= t - 1e-9
        tp, fp = p[sel].sum(), (1 - p[sel]).sum()
        fn = p.sum() - tp
        f = 1.25 * tp / (1.25 * tp + 0.25 * fn + fp)
        if f > best_f + 1e-12:
            best, best_f = t, f
    return float(best)


@pytest.mark.parametrize("a,b", [(0.5, 3.0), (2.0, 2.0), (0.3, 0.6)])
def test_expected_threshold_is_the_plug_in_optimum_and_ignores_labels(a, b):
    prob = np.random.default_rng(0).beta(a, b, size=20000).astype(np.float32)
    t = expected_threshold(_hist(prob))
    assert t == _brute_force(prob)
    labels = np.random.default_rng(1).random(prob.shape) < 0.3
    assert expected_threshold(_hist(prob, labels)) == t  # only the probabilities count


def test_expected_threshold_moves_down_with_the_probabilities():
    prob = np.random.default_rng(2).beta(0.5, 3.0, size=20000).astype(np.float32)
    ts = [expected_threshold(_hist(prob * s)) for s in (1.0, 0.7, 0.4)]
    assert ts[0] > ts[1] > ts[2]


def test_the_rule_keeps_the_validation_offset_and_stays_in_range():
    prob = np.random.default_rng(3).beta(0.5, 3.0, size=20000).astype(np.float32)
    ref = expected_threshold(_hist(prob))
    rule = ThresholdRule(0.55, ref)
    assert rule.adaptive and rule.for_fragment(prob, None) == 0.55  # validation: its own
    fainter = rule.for_fragment(prob * 0.5, None)
    assert fainter == round(0.55 + expected_threshold(_hist(prob * 0.5)) - ref, 2) < 0.55
    inside = np.zeros(prob.shape, bool)
    inside[:100] = True  # only pixels inside the mask count
    assert rule.for_fragment(prob, inside) == rule.for_histogram(_hist(prob[:100]))
    assert ThresholdRule(0.02, 0.9).for_fragment(prob, None) == 0.01  # clipped
    assert ThresholdRule(0.98, 0.01).for_fragment(prob, None) == 0.99
    assert ThresholdRule(0.55, ref).for_fragment(np.zeros(50, np.float32), None) == 0.55  # nothing


def test_threshold_choices():
    assert ThresholdRule.choose(None, saved=0.4, reference=0.3) == ThresholdRule(0.4, 0.3)
    assert ThresholdRule.choose("auto", saved=0.4, reference=None) == ThresholdRule(0.4)
    assert ThresholdRule.choose("saved", saved=0.4, reference=0.3) == ThresholdRule(0.4)
    assert ThresholdRule.choose("0.25", saved=0.4, reference=0.3) == ThresholdRule(0.25)
    assert not ThresholdRule.choose(0.7, saved=0.4, reference=0.3).adaptive
    for bad in ("often", "1.5", -0.1, "nan"):
        with pytest.raises(InputError, match="--threshold: expected auto, saved or a number"):
            threshold_choice(bad)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("thr")
    write_fragment(root / "frag", height=150, width=120, depth=8, seed=5)
    make_run(root / "adaptive", "data.input=ir", best=0.5, reference=0.3)
    make_run(root / "old", "data.input=ir", best=0.5)  # written before the reference existed
    return root


def test_png_prediction_uses_the_fragment_threshold_and_says_so(data, tmp_path):
    pred = Predictor.from_run(data / "adaptive", device="cpu")
    result = pred.predict_fragment(data / "frag")
    mask = read_image(data / "frag" / "mask.png") > 0
    want = round(float(np.clip(0.5 + expected_threshold(_hist(result.prob[mask])) - 0.3,
                               0.01, 0.99)), 2)
    assert result.threshold == want != 0.5
    (r,) = predict_to_folder(data / "adaptive", [data / "frag"], tmp_path / "a", device="cpu")
    written = read_image(tmp_path / "a" / "mask.png") > 0
    np.testing.assert_array_equal(written, (result.prob >= want) & mask)
    assert r.metrics["threshold"] == want and r.metrics["threshold_rule"] == "adapted"
    assert r.metrics["validation_threshold"] == 0.5
    for run, flags in (("adaptive", ["--threshold", "saved"]), ("old", [])):
        out = tmp_path / f"{run}-{len(flags)}"
        assert main(["predict", "--run", str(data / run), "--fragment", str(data / "frag"),
                     "--out", str(out), "--device", "cpu", *flags]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["threshold"] == 0.5 and metrics["threshold_rule"] == "fixed"


def _same_as_png(png_dir: Path, zarr_dir: Path) -> None:
    """The OME-Zarr prediction in ``zarr_dir`` has the threshold, mask and submission of the
    PNG prediction in ``png_dir`` (``<dir>.csv``)."""
    masks = zarr_files(zarr_dir)[1]
    np.testing.assert_array_equal(masks[0] > 0, read_image(png_dir / "mask.png") > 0)
    summary = json.loads((zarr_dir / "summary.json").read_text())
    root = zarr.open_group(zarr_dir / "prob.ome.zarr", mode="r")
    assert root.attrs["scrollsam"]["threshold"] == summary["threshold"]
    png_csv, zarr_csv = (Path(f"{d}.csv").read_text() for d in (png_dir, zarr_dir))
    assert png_csv == zarr_csv


@pytest.fixture(scope="module")
def own(data):
    """The expected-F0.5 threshold of the fragment's own probabilities (the tiny model's lie
    between 0.45 and 0.56): a run with threshold v and reference ``own - s`` adapts v to
    ``v + s``. 0.51 lies among the probabilities and inside a uint8 step (130 / 255 < 0.51 <
    130.5 / 255), so the stored values cannot tell some pixels' side of it (0.5 is the edge
    of a step: they can)."""
    prob = Predictor.from_run(data / "adaptive", device="cpu").predict_fragment(data / "frag").prob
    return expected_threshold(_hist(prob[read_image(data / "frag" / "mask.png") > 0]))


def test_zarr_prediction_adapts_its_mask_like_png(data, own, tmp_path):
    """QA: the adapted OME-Zarr mask was rewritten from the stored (uint8) values, its threshold
    computed from them too: tp/fp/fn 2351/3050/2283 where PNG mode, and the same threshold
    given by hand, gave 2379/3097/2255. Now both come from the exact probabilities: threshold,
    mask, metrics and submission equal PNG mode's, for uint8 and float16 stores."""
    run = make_run(tmp_path / "run", "data.input=ir", best=0.5, reference=own - 0.01)
    common = dict(device="cpu", chunk=32, band_rows=64)
    (png,) = predict_to_folder(run, [data / "frag"], tmp_path / "png", fmt="png",
                               submission=tmp_path / "png.csv", **common)
    t = png.metrics["threshold"]
    assert t == 0.51 and png.metrics["threshold_rule"] == "adapted"
    for dtype in ("uint8", "float16"):
        out = tmp_path / dtype
        (zr,) = predict_to_folder(run, [data / "frag"], out, fmt="zarr",
                                  dtype=dtype, submission=tmp_path / f"{dtype}.csv", **common)
        assert zr.metrics == png.metrics, dtype
        _same_as_png(tmp_path / "png", out)
    out, masks = tmp_path / "uint8", zarr_files(tmp_path / "uint8")[1]
    root = zarr.open_group(out / "prob.ome.zarr", mode="r+")
    assert root.attrs["scrollsam"]["threshold"] == t
    # a run killed while rewriting the mask: the next run redoes the rewrite whole
    root["labels/ink/0"][:40] = 1 - root["labels/ink/0"][:40]
    predict_to_folder(run, [data / "frag"], out, fmt="zarr", **common)
    np.testing.assert_array_equal(zarr_files(out)[1][0], masks[0])
    # a store that kept no rounding (an older version's): predicted again, the same
    shutil.rmtree(out / ".predict" / "rounding.zarr")
    (again,) = predict_to_folder(run, [data / "frag"], out, fmt="zarr", **common)
    assert again.stats["bands_skipped"] == 0 and again.metrics == png.metrics
    np.testing.assert_array_equal(zarr_files(out)[1][0], masks[0])


def test_zarr_keeps_the_bands_mask_when_the_adapted_threshold_is_the_runs(data, own, tmp_path,
                                                                          caplog):
    """QA: with --threshold auto resolving to the run's own threshold, the mask written from
    the exact probabilities was rewritten from the stored ones; now it is kept. Also a fragment
    without labels (its threshold from the bands' histograms alone)."""
    frag = tmp_path / "frag"
    shutil.copytree(data / "frag", frag)
    run = make_run(tmp_path / "run", "data.input=ir", best=0.51, reference=own)
    (frag / "inklabels.png").unlink()
    common = dict(device="cpu", chunk=32, band_rows=64)
    caplog.set_level(logging.INFO, logger="scrollsam")
    for name, threshold, fmt in (("png", None, "png"), ("auto", None, "zarr"),
                                 ("fixed", 0.51, "zarr")):
        predict_to_folder(run, [frag], tmp_path / name, fmt=fmt, threshold=threshold,
                          submission=tmp_path / f"{name}.csv", **common)
    kept = [m for m in caplog.messages if "the run's, also adapted to the fragment" in m]
    assert len(kept) == 1, caplog.messages  # the zarr auto run: no rewrite
    for name in ("auto", "fixed"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["threshold"] == 0.51
        _same_as_png(tmp_path / "png", tmp_path / name)


def test_candidate_ranks_decide_as_binarize_prediction_does():
    rng = np.random.default_rng(0)
    edges = CANDIDATES.astype(np.float32)
    prob = np.concatenate([rng.random(20000, dtype=np.float32), edges,
                           np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(1)),
                           (np.arange(LEVELS) / (LEVELS - 1)).astype(np.float32)])
    for values in (prob, prob.astype(np.float16), np.arange(256, dtype=np.uint8)):
        ranks = candidate_ranks(values)
        for k, t in enumerate(CANDIDATES, 1):
            assert candidate_index(float(t)) == k
            want = binarize_prediction(values, threshold=float(t), binary=False)[0]
            np.testing.assert_array_equal(ranks >= k, want)
    for t in (0.0, 0.505, 1.0):
        with pytest.raises(ValueError, match="not one of the candidates"):
            candidate_index(t)


def test_clicks_use_the_saved_threshold_and_the_log_says_so(data, tmp_path, caplog):
    """QA: `predict --points` logged "threshold 0.500 (the checkpoint's, adapted to each
    fragment)" and then used the saved threshold as it is (metrics: threshold_rule fixed)."""
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps([{"x": 60, "y": 70}]))
    with caplog.at_level(logging.INFO, logger="scrollsam"):
        assert main(["predict", "--run", str(data / "adaptive"), "--fragment",
                     str(data / "frag"), "--out", str(tmp_path / "out"), "--device", "cpu",
                     "--points", str(clicks)]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["threshold"] == 0.5 and metrics["threshold_rule"] == "fixed"
    said = [m for m in caplog.messages if "threshold" in m]
    assert said and not any("adapted" in m for m in said), said
    loaded = [m for m in said if m.startswith("loaded")]
    assert len(loaded) == 1 and "threshold 0.500 (the checkpoint's, as saved)" in loaded[0]
