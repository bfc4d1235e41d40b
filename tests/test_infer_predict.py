"""Predictor API: windows, TTA, depth averaging, threshold from the checkpoint, streaming
memory, and predicting around clicks. Tiny model with random weights on small fragments."""

from __future__ import annotations

import logging
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from infer_helpers import make_run

from scrollsam import build_model
from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.errors import CheckpointError, InputError, RunDirError
from scrollsam.infer.points import Click, click_tiles, load_clicks, predict_clicks
from scrollsam.infer.predict import (
    DIHEDRAL,
    MAX_TILE,
    MIN_TILE,
    Predictor,
    dihedral,
    predict_fragment,
    undo_dihedral,
)
from scrollsam.infer.sliding_window import Grid
from scrollsam.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    write_fragment(root / "frag", height=150, width=118, depth=65, seed=5)
    write_fragment(root / "big", height=400, width=300, depth=65, seed=6, ir=False)
    write_fragment(root / "small", height=72, width=80, depth=65, seed=7)
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", image_size=64, in_chans=3)


def manual_probs(model, x):
    """sigmoid(upscale(decode(encode(x)))) [N, S, S]: the model path without the Predictor."""
    with torch.no_grad():
        logits, _ = model.decode(model.encode(x))
        return torch.sigmoid(model.upscale(logits))[:, 0].numpy()


# --- windows -------------------------------------------------------------------------------------


def test_predict_windows_is_the_prompt_free_model_in_batches(model):
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = Predictor(model, device="cpu", amp="fp32", batch_size=2).predict_windows(x.numpy())
    assert got.shape == (5, 64, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, manual_probs(model, x), atol=1e-5)
    assert torch.is_grad_enabled()  # the predictor left grad mode as it was


def test_tta_is_the_average_of_transformed_predictions(model):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    plain = Predictor(model, device="cpu", amp="fp32")
    tta = Predictor(model, device="cpu", amp="fp32", tta=True).predict_windows(x)
    expected = np.mean([
        undo_dihedral(torch.from_numpy(plain.predict_windows(dihedral(x, k, flip))), k, flip)
        .numpy() for k, flip in DIHEDRAL], axis=0)
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    assert np.abs(tta - plain.predict_windows(x)).max() > 1e-3  # the model is not invariant
    for k, flip in DIHEDRAL:  # undo really inverts
        assert torch.equal(undo_dihedral(dihedral(x, k, flip), k, flip), x)


def test_depth_windows_are_averaged_over_k(model):
    x = torch.randn(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # (B, K, C, T, T)
    pred = Predictor(model, device="cpu", amp="fp32", batch_size=3)
    got = pred.predict_windows(x)
    expected = np.mean([pred.predict_windows(x[:, k]) for k in range(4)], axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_tiles_other_than_the_model_size_are_resized_both_ways(model):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    got = Predictor(model, device="cpu", amp="fp32", tile=96).predict_windows(x)
    small = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        logits, _ = model.decode(model.encode(small))
        expected = torch.sigmoid(F.interpolate(logits, size=(96, 96), mode="bilinear",
                                               align_corners=False))[:, 0].numpy()
    assert got.shape == (2, 96, 96)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_predict_array_blends_normalised_images(model):
    img = np.random.default_rng(5).normal(size=(3, 90, 70)).astype(np.float32)
    mask = np.zeros((90, 70), bool)
    mask[10:80, 5:60] = True
    out = Predictor(model, device="cpu", amp="fp32").predict_array(img, mask=mask)
    assert out.shape == (90, 70) and (out[~mask] == 0).all() and (out[mask] > 0).all()


def test_bad_windows_name_the_argument(model):
    pred = Predictor(model, device="cpu", amp="fp32")
    with pytest.raises(InputError, match="images: expected float"):
        pred.predict_windows(np.zeros((1, 3, 64, 64), np.uint16))
    with pytest.raises(InputError, match=r"images: expected \[B, C, T, T\]"):
        pred.predict_windows(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(InputError, match="view"):
        pred.predict_fragment("nowhere")


# --- runs and fragments --------------------------------------------------------------------------


def test_threshold_and_weights_come_from_the_checkpoint_used(tmp_path, caplog):
    run = make_run(tmp_path / "run", "data.input=ir", best=0.4, last=0.3)
    best = Predictor.from_run(run, device="cpu")
    assert best.threshold == pytest.approx(0.4)
    saved = load_checkpoint(run / "best.pt")["model"]
    for name, value in best.model.sam.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert Predictor.from_run(run, checkpoint="last").threshold == pytest.approx(0.3)
    assert Predictor.from_run(run, checkpoint=str(run / "best.pt")).threshold == pytest.approx(0.4)
    assert Predictor.from_run(run, threshold=0.25).threshold == 0.25  # explicit wins

    only_last = make_run(tmp_path / "young", "data.input=ir", best=None, last=0.35)
    with caplog.at_level(logging.INFO, logger="scrollsam"):
        assert Predictor.from_run(only_last).threshold == pytest.approx(0.35)
    assert "no best.pt" in caplog.text and "using last.pt" in caplog.text


def test_missing_run_parts_are_clear_errors(tmp_path):
    with pytest.raises(RunDirError, match="run folder not found"):
        Predictor.from_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="no config.yaml"):
        Predictor.from_run(tmp_path / "empty")
    run = make_run(tmp_path / "run", best=None, last=None)
    with pytest.raises(CheckpointError, match="expected best.pt or last.pt"):
        Predictor.from_run(run)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        Predictor.from_run(run, checkpoint="last")


def test_whole_fragment_is_zero_outside_the_mask_and_stats_are_reported(tmp_path, data):
    run = make_run(tmp_path / "run", "data.input=ir")
    result = predict_fragment(run, data / "frag", device="cpu")
    frag = Fragment(data / "frag")
    mask = frag.mask()
    assert result.prob.shape == (150, 118) and result.prob.dtype == np.float32
    assert (result.prob[~mask] == 0).all() and (result.prob[mask] > 0).all()
    assert result.prob.max() <= 1.0 and result.threshold == pytest.approx(0.4)
    s = result.stats
    assert s["megapixels"] == pytest.approx(150 * 118 / 1e6) and s["megapixels_per_s"] > 0
    assert 0 < s["tiles"] <= len(Grid.make((150, 118), tile=64, stride=32))
    assert s["peak_rss_anon_mb"] > 0
    assert (run / "stats").is_dir()  # statistics cached in the run, never in the fragment
    assert not any(p.name == "stats" for p in (data / "frag").iterdir())


def test_streaming_reads_only_the_windows_and_never_holds_the_volume(tmp_path, data):
    """The 65 x 400 x 300 volume is 15.6 MB; prediction reads each window's three slices once
    and allocates well under a fifth of the volume (numpy allocations, traced)."""
    run = make_run(tmp_path / "run", "data.input=slices", "data.strategy=triplet")
    pred = Predictor.from_run(run, device="cpu")
    frag = pred.open(Fragment(data / "big"))  # statistics sampled before measuring
    before = frag.bytes_read
    tracemalloc.start()
    try:
        result = pred.predict_fragment(frag)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    volume = 65 * 400 * 300 * 2
    assert peak < volume / 5, f"peak {peak / 2**20:.1f} MB"
    mask = frag.mask()
    grid = Grid.make((400, 300), tile=64, stride=32)
    run_windows = [(y, x) for y, x in grid.windows() if mask[y:y + 64, x:x + 64].any()]
    assert result.stats["tiles"] == len(run_windows) < len(grid)
    expected = sum((min(y + 64, 400) - y) * (min(x + 64, 300) - x) for y, x in run_windows)
    expected *= 3 * 2  # three uint16 slices per window
    probe = MIN_TILE * MIN_TILE * 3 * 2  # one MIN_TILE x MIN_TILE read to learn K
    assert expected <= frag.bytes_read - before <= expected + probe


def test_every_strategy_averages_all_slices_of_the_band(tmp_path, data):
    run = make_run(tmp_path / "run", "data.input=slices", "data.strategy=every",
                   "data.z_start=30", "data.z_end=33")
    pred = Predictor.from_run(run, device="cpu")
    frag = pred.open(Fragment(data / "small"))
    windows = pred.view.infer_windows(frag, 5, 10, 64)
    assert windows.shape == (3, 3, 64, 64)  # K = 3 slices, each as 3 channels
    result = pred.predict_fragment(frag)
    assert result.stats["images"] == 3 * result.stats["tiles"]
    assert (result.prob[~frag.mask()] == 0).all()


# --- clicks --------------------------------------------------------------------------------------


def test_clicks_map_to_tiles_centred_on_them():
    clicks = [Click(10, 12), Click(20, 18, 0), Click(100, 70), Click(106, 66)]
    tiles = click_tiles(clicks, shape=(120, 160), tile=32)
    assert [(t.y0, t.x0) for t in tiles] == [(0, 0), (54, 84)]  # clamped at the border
    assert tiles[0].clicks == (clicks[0], clicks[1])  # the negative click joins the first tile
    assert tiles[1].clicks == (clicks[2], clicks[3])
    with pytest.raises(InputError, match="inside the 160 x 120"):
        click_tiles([Click(160, 5)], shape=(120, 160), tile=32)


def test_clicks_file_forms_and_errors(tmp_path):
    f = tmp_path / "clicks.json"
    f.write_text('[{"x": 3, "y": 4}, {"x": 5.5, "y": 6, "label": 0}]')
    assert load_clicks(f, ["a"]) == {"a": [Click(3, 4, 1), Click(5.5, 6, 0)]}
    with pytest.raises(InputError, match="exactly one --fragment"):
        load_clicks(f, ["a", "b"])
    f.write_text('{"a": [{"x": 1, "y": 2}], "c": []}')
    with pytest.raises(InputError, match="not predicted: c"):
        load_clicks(f, ["a", "b"])
    f.write_text('[{"x": 1, "y": 2, "label": 2}]')
    with pytest.raises(InputError, match="label: expected 1"):
        load_clicks(f, ["a"])
    f.write_text("[{x: 1}]")
    with pytest.raises(InputError, match="expected JSON"):
        load_clicks(f, ["a"])


def test_prediction_around_clicks_uses_the_prompted_decoder(tmp_path, data):
    run = make_run(tmp_path / "run", "data.input=ir")
    pred = Predictor.from_run(run, device="cpu", precision="fp32")  # compared with fp32 below
    frag = pred.open(Fragment(data / "frag"))
    clicks = [Click(60, 70), Click(58, 80, 0)]
    result, covered = predict_clicks(pred, frag, clicks)
    y0, x0 = 70 - 32, 60 - 32
    assert covered[y0:y0 + 64, x0:x0 + 64].sum() == frag.mask()[y0:y0 + 64, x0:x0 + 64].sum()
    assert (result.prob[~covered] == 0).all() and covered.sum() < frag.mask().sum()
    # the centre of the single tile is that tile's prompted prediction
    image = torch.from_numpy(pred.view.infer_windows(frag, y0, x0, 64))  # (1, 3, 64, 64)
    coords = torch.tensor([[[32.0, 32.0], [30.0, 42.0]]])  # (x, y) - (x0, y0)
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        logits, _ = pred.model.decode(pred.model.encode(image), points=(coords, labels))
        expected = torch.sigmoid(pred.model.upscale(logits))[0, 0].numpy()
    inside = frag.mask()[y0:y0 + 64, x0:x0 + 64]
    np.testing.assert_allclose(result.prob[y0:y0 + 64, x0:x0 + 64][inside], expected[inside],
                               atol=1e-5)
    assert np.abs(expected - pred.predict_windows(image)[0]).max() > 1e-3  # prompts matter
    assert len(pred._embeddings) == 1  # a second click on the tile reuses its embedding
    predict_clicks(pred, frag, [Click(60, 70), Click(50, 62)])  # same tile, new prompt
    assert len(pred._embeddings) == 1


@pytest.mark.filterwarnings("error")
def test_progress_bar_ends_exactly_at_the_fragment_area(tmp_path):
    # The bar's total was rounded to 0.001 MP while updates sum to the exact area, so tqdm
    # warned "clamping frac to range [0, 1]" at the end of every prediction.
    run = make_run(tmp_path / "run", "data.input=ir")
    frag = write_fragment(tmp_path / "frag", height=120, width=110, depth=4, seed=3)  # 0.0132 MP
    pred = Predictor.from_run(run, device="cpu").predict_fragment(frag, progress=True)
    assert pred.prob.shape == (120, 110)


def test_the_smallest_tile_is_one_constant(monkeypatch, capsys):
    """QA: the Predictor refused tiles below a hard-coded 16 beside pipeline's MIN_TILE."""
    import scrollsam.infer.plan as pipeline  # the checks before the first tile
    import scrollsam.infer.predict as predict
    from scrollsam.cli import build_parser

    assert pipeline.MIN_TILE is predict.MIN_TILE
    model = build_model("tiny", image_size=64)
    assert Predictor(model, device="cpu", tile=predict.MIN_TILE).tile == predict.MIN_TILE
    monkeypatch.setattr(predict, "MIN_TILE", 32)
    with pytest.raises(InputError, match="expected 32 <= tile"):
        Predictor(model, device="cpu", tile=24)
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    assert (f"window side in fragment pixels, >= {pipeline.MIN_TILE} and <= {MAX_TILE} "
            in capsys.readouterr().out)


def test_a_tile_above_the_largest_is_refused_unless_it_is_the_model_input():
    """QA: --tile 100000 ended in a 74.5 GiB allocation; windows are read whole."""
    model = build_model("tiny", image_size=64)
    assert Predictor(model, device="cpu", tile=MAX_TILE).tile == MAX_TILE
    with pytest.raises(InputError, match=f"16 <= tile <= {MAX_TILE} .* got 100000"):
        Predictor(model, device="cpu", tile=100000)
    big = build_model("tiny", image_size=MAX_TILE + 16)  # a model input above it is its own
    assert Predictor(big, device="cpu").tile == MAX_TILE + 16
