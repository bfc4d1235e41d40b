"""TileDataset: CPU tensors of the documented shapes, deterministic, augmentations kept aligned."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from scrollsam.data.augment import NO_AUGMENT, Augment
from scrollsam.data.dataset import TileDataset, make_datasets, require_validation_ink
from scrollsam.data.fragment import Fragment
from scrollsam.data.synthetic import write_fragment
from scrollsam.data.tiles import Region, tile_windows
from scrollsam.data.views import make_view
from scrollsam.errors import ConfigError, FragmentError, InputError

H = W = 96
S = 64


def _pattern_fragment(path: Path) -> Fragment:
    """Ink = random blocks (asymmetric under every flip / rotation); ir dark and slices dense
    where ink; mask = everything but an off-centre notch."""
    rng = np.random.default_rng(0)
    ink = cv2.resize((rng.random((12, 12)) < 0.4).astype(np.uint8), (W, H),
                     interpolation=cv2.INTER_NEAREST).astype(bool)
    mask = np.ones((H, W), bool)
    mask[10:30, 0:40] = False
    (path / "surface_volume").mkdir(parents=True)
    for z in range(4):
        vol = np.where(ink, 20000, 8000) + rng.integers(0, 50, (H, W))
        tifffile.imwrite(path / "surface_volume" / f"{z:02d}.tif", vol.astype(np.uint16))
    cv2.imwrite(str(path / "mask.png"), mask.astype(np.uint8) * 255)
    cv2.imwrite(str(path / "inklabels.png"), ink.astype(np.uint8) * 255)
    cv2.imwrite(str(path / "ir.png"), np.where(ink, 60, 200).astype(np.uint8))
    return Fragment(path)


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return _pattern_fragment(tmp_path_factory.mktemp("pattern") / "p")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return [Fragment(write_fragment(root / str(i), height=160, width=160, depth=8, seed=i))
            for i in (1, 2)]


def _tiles(frag: Fragment):
    return tile_windows(frag, Region(frag.id, 0, frag.height, 0, frag.width), size=S, stride=16,
                        min_valid=0.3)


@pytest.mark.parametrize("view_args", [("ir",), ("slices", "range")])
@pytest.mark.parametrize("augment", [Augment(pixel=False), Augment()])
def test_augmentation_keeps_image_label_valid_aligned(pattern, view_args, augment):
    params = {} if view_args == ("ir",) else {"depth": 4, "z0": 0, "z1": 4, "depth_shift": 0}
    view = make_view(*view_args, **params)
    ds = TileDataset([pattern], _tiles(pattern), view, augment=augment, seed=3, length=48)
    transforms = set()
    for i in range(len(ds)):
        item = ds[i]
        image, label, valid = item["image"].numpy(), item["label"][0].numpy(), item["valid"][0]
        valid = valid.numpy()
        inside = valid > 0
        # ir: ink dark (negative); slices: ink dense (positive).
        signal = -image if view_args == ("ir",) else image
        for c in range(image.shape[0]):
            np.testing.assert_array_equal(signal[c][inside] > 0, label[inside] > 0)
        assert not image[:, ~inside].any()
        # Which of the 8 flips / rotations was applied: must map the source label AND valid.
        y0, x0 = item["y0"], item["x0"]
        src_label = pattern.labels_window(y0, y0 + S, x0, x0 + S)
        src_valid = pattern.mask_window(y0, y0 + S, x0, x0 + S)
        matches = [(k, f) for k in range(4) for f in (False, True)
                   if np.array_equal(_dihedral(src_label, k, f), label > 0)
                   and np.array_equal(_dihedral(src_valid, k, f), inside)]
        assert matches, f"item {i}: label / valid not a common flip-rotation of the source"
        transforms.add(matches[0])
    assert len(transforms) >= 4  # augmentation really happens


def _dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    a = np.rot90(a, k)
    return np.flip(a, 1) if flip else a


def test_items_are_cpu_tensors_of_documented_shapes(synth):
    view = make_view("slices", "triplet", depth=8)
    train, valid = make_datasets(synth, view, size=S, samples_per_epoch=10, seed=0)
    for ds in (train, valid):
        item = ds[0]
        assert set(item) == {"image", "label", "valid", "has_ink", "fragment", "y0", "x0"}
        assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
        assert item["label"].shape == (1, S, S) and item["label"].dtype == torch.float32
        assert item["valid"].shape == (1, S, S) and item["valid"].dtype == torch.float32
        for key in ("image", "label", "valid"):
            assert item[key].device.type == "cpu" and item[key].is_contiguous()
        assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0}
        assert set(torch.unique(item["valid"]).tolist()) <= {0.0, 1.0}
        assert isinstance(item["fragment"], str) and isinstance(item["y0"], int)
    for ds in (train, valid):  # the flag the step picks prompt kinds by, without the truth
        for i in range(min(len(ds), 10)):
            item = ds[i]
            inked = bool(((item["label"] > 0.5) & (item["valid"] > 0.5)).any())
            assert item["has_ink"] is inked
    batch = next(iter(DataLoader(train, batch_size=4, pin_memory=False)))
    assert batch["image"].shape == (4, 3, S, S) and batch["image"].device.type == "cpu"
    assert batch["has_ink"].shape == (4,) and batch["has_ink"].dtype == torch.bool
    assert isinstance(batch["fragment"], list) and batch["y0"].dtype == torch.int64
    if torch.cuda.is_available():
        assert batch["image"].pin_memory().is_pinned()


def test_deterministic_per_seed_epoch_and_index(synth):
    view = make_view("slices", "every", depth=8)
    tiles = _tiles(synth[0])
    a = TileDataset(synth, tiles, view, seed=1, length=6)
    b = TileDataset(synth, tiles, view, seed=1, length=6)
    for i in (0, 5, 3):
        for key in ("image", "label", "valid"):
            assert torch.equal(a[i][key], b[i][key])
    first = a[2]["image"]
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], first)
    assert not torch.equal(TileDataset(synth, tiles, view, seed=2, length=6)[2]["image"], first)
    clone = pickle.loads(pickle.dumps(b))
    assert torch.equal(clone[4]["image"], b[4]["image"])


def test_dataloader_workers_give_the_same_batches(synth):
    view = make_view("ir")
    ds = TileDataset(synth, _tiles(synth[1]), view, seed=4, length=8)
    serial = [b["image"] for b in DataLoader(ds, batch_size=4)]
    parallel = [b["image"] for b in DataLoader(ds, batch_size=4, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(serial, parallel, strict=True))


def test_validation_items_are_the_tiles_unaugmented(synth):
    view = make_view("slices", "triplet", depth=8)
    train, valid = make_datasets(synth, view, size=S, valid_band=(0.6, 1.0), seed=0)
    assert len(valid) == len(valid.tiles) and valid.augment is None
    for i in range(len(valid)):
        item, tile = valid[i], valid.tiles[i]
        assert (item["fragment"], item["y0"], item["x0"]) == (tile.fragment, tile.y0, tile.x0)
        frag = valid.fragments[tile.fragment]
        assert torch.equal(item["image"], torch.from_numpy(view.eval_window(frag, tile.y0,
                                                                            tile.x0, S)))
        assert tile.y0 >= round(0.6 * frag.height)  # inside the held-out band
    assert all(t.y1 <= round(0.6 * 160) for t in train.tiles)


def test_whole_fragment_validation(synth):
    view = make_view("ir")
    train, valid = make_datasets(synth, view, size=S, valid_fragments=["2"], augment=NO_AUGMENT)
    assert {t.fragment for t in train.tiles} == {"1"}
    assert {t.fragment for t in valid.tiles} == {"2"}


def test_unlabelled_fragment_is_refused(tmp_path):
    frag = Fragment(write_fragment(tmp_path / "a", height=64, width=64, depth=2, labels=False))
    with pytest.raises(FragmentError, match="a has no ink labels"):
        TileDataset([frag], _tiles(frag), make_view("ir"))


def test_a_validation_fragment_without_tiles_is_an_error_at_start(tmp_path):
    # Before: a warning, and training ran with validation silently off.
    frags = [Fragment(write_fragment(tmp_path / str(i), height=96, width=96, depth=2, seed=i))
             for i in (1, 2)]
    cv2.imwrite(str(frags[1].mask_path), np.zeros((96, 96), np.uint8))
    frags[1] = Fragment(frags[1].path)
    with pytest.raises(InputError, match=r"validation fragment 2 has no pixel inside its mask.*"
                                         r"data\.valid \(.*2/mask\.png\)$"):
        make_datasets(frags, make_view("ir"), size=S, valid_fragments=["2"])
    with pytest.raises(InputError, match=r"^data\.valid_band: expected a share > 0"):
        make_datasets(frags[:1], make_view("ir"), size=S, valid_band=(1.0, 1.0))


def test_validation_without_labelled_ink_is_an_error_at_start(tmp_path, caplog):
    # Before: validation scored F0.5 1.0 for predicting no ink, and best.pt was chosen on it.
    frags = [Fragment(write_fragment(tmp_path / str(i), height=96, width=96, depth=2, seed=i))
             for i in (1, 2)]
    cv2.imwrite(str(frags[1].labels_path), np.zeros((96, 96), np.uint8))
    frags[1] = Fragment(frags[1].path)
    with pytest.raises(ConfigError, match=r"^the validation fragments 2 hold no labelled ink "
                                         r"inside the masks"):
        require_validation_ink(make_datasets(frags, make_view("ir"), size=S,
                                             valid_fragments=["2"])[1], ["2"])
    band = Fragment(write_fragment(tmp_path / "3", height=96, width=96, depth=2, seed=1))
    labels = cv2.imread(str(band.labels_path), cv2.IMREAD_UNCHANGED)
    labels[48:] = 0  # no ink in the held-out half
    cv2.imwrite(str(band.labels_path), labels)
    with pytest.raises(ConfigError, match=r"^the held-out band of the training fragments "
                                         r"holds no labelled ink"):
        require_validation_ink(make_datasets([Fragment(band.path)], make_view("ir"), size=S,
                                             valid_band=(0.5, 1.0))[1], [])
    # a ConfigError: a sweep marks such values' trial failed and goes on (review)
    # a resumed run keeps its data.valid, so it is warned, not stopped (review)
    with caplog.at_level("WARNING"):
        require_validation_ink(make_datasets(frags, make_view("ir"), size=S,
                                             valid_fragments=["2"])[1], ["2"], resumed=True)
    assert "cannot rank checkpoints; a new run with other data.valid fixes it" in caplog.text


def test_no_training_tile_names_real_config_keys(tmp_path):
    frag = Fragment(write_fragment(tmp_path / "1", height=64, width=64, depth=2, seed=1))
    with pytest.raises(InputError, match=r"no 128 px training tile .*lower model\.image_size"):
        make_datasets([frag], make_view("ir"), size=128, valid_band=(0.5, 1.0))
