"""Config merging and errors, atomic self-describing checkpoints, the embedding cache, pictures."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import yaml

from scrollsam import build_model
from scrollsam.config import Config, config_to_dict, load_config, save_config
from scrollsam.errors import CheckpointError, ConfigError
from scrollsam.model.build import load_sam_state_dict
from scrollsam.train.cache import EmbeddingCache, tile_key
from scrollsam.train.checkpoint import (
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from scrollsam.train.distributed import World
from scrollsam.train.tb import tile_panel

# --- config -------------------------------------------------------------------------------------


def test_defaults_then_yaml_then_overrides(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("train:\n  lr: 3e-4\n  steps: 50\nmodel:\n  type: tiny\n")
    cfg = load_config(exp, ["train.steps=7", "data.train=[train/1,train/2]", "log.images=false",
                            "model.checkpoint=null"])
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string: fixed
    assert cfg.train.steps == 7  # the override wins over the file
    assert cfg.model.type == "tiny"  # the file wins over the default
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default
    assert cfg.data.train == ["train/1", "train/2"]
    assert cfg.log.images is False and cfg.model.checkpoint is None


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.type=tiny", "data.valid=[3]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["valid"] == ["3"]


@pytest.mark.parametrize("override, match", [
    ("train.lrr=1", r"unknown config key train\.lrr \(did you mean train\.lr\?\)"),
    ("optim.lr=1", r"unknown config key optim \(in optim\.lr\)$"),  # before: "optim" alone
    ("trian.steps=1", r"unknown config key trian \(in trian\.steps; did you mean train\?\)$"),
    ("train.steps=many", r"train\.steps: expected an integer, got 'many'"),
    ("train.steps=0", r"train\.steps: expected a positive integer, got 0"),
    ("data.input=xray", r"data\.input: expected one of ir, slices, got 'xray'"),
    ("log.images=maybe", r"log\.images: expected true or false"),
    ("model.image_size=250", r"model\.image_size: expected a multiple of 16"),
    ("model.trainable=[decoder]", r"model\.trainable: expected a non-empty subset"),
    ("prompts.prompt_free_share=1.5", r"prompts\.prompt_free_share: expected a share"),
    ("train.steps", r"expected key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("train:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key train\.stepz"):
        load_config(exp)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


# --- checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", image_size=64)


def test_checkpoint_is_self_describing_and_weights_only(tiny, tmp_path):
    opt = torch.optim.AdamW(tiny.sam.mask_decoder.parameters(), lr=1e-3)
    tiny.decode(tiny.encode(torch.randn(1, 3, 64, 64)))[0].sum().backward()
    opt.step()
    cfg = config_to_dict(load_config(None, ["model.type=tiny"]))
    path = save_checkpoint(tmp_path / "last.pt", model=tiny, optimizer=opt,
                           state=TrainState(step=12, best_f05=0.7, best_threshold=0.35),
                           config=cfg)
    raw = torch.load(path, weights_only=True)  # no code can run
    assert raw["step"] == 12 and raw["config"] == cfg and raw["best_threshold"] == 0.35
    assert raw["optimizer"]["state"]  # AdamW moments are kept for resume
    ckpt = load_checkpoint(path)
    assert ckpt["model_type"] == "tiny"
    # build_model reads the same file like an official one
    again = build_model("tiny", checkpoint=path, image_size=64)
    for k, v in tiny.sam.state_dict().items():
        assert torch.equal(again.sam.state_dict()[k], v)
    assert set(load_sam_state_dict(path)) == set(tiny.sam.state_dict())


def test_interrupted_checkpoint_write_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_checkpoint(target, model=tiny, optimizer=None, state=TrainState(step=1), config={})
    before = target.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")  # checkpoints are written through a file object
        f.flush()
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, model=tiny, optimizer=None, state=TrainState(step=2), config={})
    assert target.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_load_checkpoint_refuses_official_files(tiny, tmp_path):
    torch.save(tiny.sam.state_dict(), tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="not a scrollsam training checkpoint"):
        load_checkpoint(tmp_path / "sam.pth")


# --- embedding cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [False, True])
def test_cache_encodes_each_distinct_tile_once(tiny, tmp_path, directory):
    cache = EmbeddingCache(directory=tmp_path / "emb" if directory else None)
    calls = []

    def encoder(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return tiny.encode(x)

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 64, 64, generator=g).unbind(0)
    first = cache.encode(torch.stack([a, b]), encoder)
    second = cache.encode(torch.stack([b, a, b]), encoder)
    assert calls == [2]  # the second call was all hits
    assert (cache.hits, cache.misses) == (3, 2)
    torch.testing.assert_close(second[1], first[0])
    with torch.no_grad():
        exact = tiny.encode(a[None])[0]
    torch.testing.assert_close(first[0], exact, atol=2e-2, rtol=2e-3)  # fp16 storage
    assert len(cache) == 2
    flipped = cache.encode(a.flip(-1)[None], encoder)  # an augmented tile is a new key
    assert calls == [2, 1] and flipped.shape == (1, 256, 4, 4)


def test_cache_memory_budget_evicts_oldest(tiny):
    one = 256 * 4 * 4 * 2  # fp16 bytes of one 64 px embedding
    cache = EmbeddingCache(max_bytes=2 * one)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        cache.encode(torch.randn(1, 3, 64, 64, generator=g), tiny.encode)
    assert len(cache) == 2


def test_a_disk_cache_stops_growing_at_its_size_and_counts_what_earlier_runs_left(tiny,
                                                                                 tmp_path,
                                                                                 caplog):
    # QA: train.cache=disk grew without bound (one file per distinct tile x flip x depth draw).
    g = torch.Generator().manual_seed(2)
    tiles = [torch.randn(1, 3, 64, 64, generator=g) for _ in range(4)]
    first = EmbeddingCache(directory=tmp_path / "emb")
    first.encode(tiles[0], tiny.encode)
    one = next((tmp_path / "emb").glob("*.pt")).stat().st_size  # one entry's file
    train = load_config(None, ["train.cache=disk", f"train.cache_gb={2.5 * one / 2**30}"]).train
    cache = EmbeddingCache.for_run(train, tmp_path, world=World())  # the first's counts
    with caplog.at_level(logging.WARNING):
        for tile in tiles:
            cache.encode(tile, tiny.encode)
    assert len(cache) == 2  # the first run's and one more: a third would pass 2.5 entries
    assert caplog.text.count("reached train.cache_gb") == 1
    assert cache.encode(tiles[3], tiny.encode).shape == (1, 256, 4, 4)  # still encodes
    (tmp_path / "emb" / ".0123.tmp-00ff00ff.pt").write_bytes(b"x" * one)  # a write in flight
    assert len(cache) == 2


def test_torchrun_processes_sharing_a_disk_cache_each_add_their_share(tiny, tmp_path, caplog):
    # Reviewer: each process counted only its own writes, so N of them filled N budgets.
    g = torch.Generator().manual_seed(3)
    probe = EmbeddingCache(directory=tmp_path / "probe")
    probe.encode(torch.randn(1, 3, 64, 64, generator=g), tiny.encode)
    one = next((tmp_path / "probe").glob("*.pt")).stat().st_size
    train = load_config(None, ["train.cache=disk", f"train.cache_gb={4.5 * one / 2**30}"]).train
    caches = [EmbeddingCache.for_run(train, tmp_path, world=World(rank=r, size=2))
              for r in range(2)]
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            for cache in caches:
                cache.encode(torch.randn(1, 3, 64, 64, generator=g), tiny.encode)
    assert len(caches[0]) == 4  # two each: the 4.5 entries' room, never more
    assert caplog.text.count("reached train.cache_gb") == 1  # rank 0 says it


def test_cache_refused_when_encoder_trains_or_pixels_augment():
    from scrollsam.config import load_config
    from scrollsam.model.assemble import uses_embedding_cache

    def cfg(*over):
        return load_config(None, ["train.cache=memory", "data.pixel_augment=false", *over])

    with pytest.raises(ConfigError, match="includes image_encoder"):
        uses_embedding_cache(cfg("model.trainable=[image_encoder,mask_decoder]"))
    with pytest.raises(ConfigError, match="data.pixel_augment"):
        uses_embedding_cache(cfg("data.pixel_augment=true"))
    with pytest.raises(ConfigError, match="model.depth_encoder"):
        uses_embedding_cache(cfg("model.depth_encoder=true", "data.input=slices",
                                 "data.strategy=range"))
    assert uses_embedding_cache(cfg())
    # auto: on exactly when it is right
    assert uses_embedding_cache(cfg("train.cache=auto"))
    assert not uses_embedding_cache(cfg("train.cache=auto", "model.lora_rank=4"))
    assert not uses_embedding_cache(cfg("train.cache=auto", "model.depth_encoder=true",
                                        "data.input=slices", "data.strategy=range"))
    assert not uses_embedding_cache(cfg("train.cache=off"))


def test_tile_key_depends_on_content_only():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 2, 2)
    assert tile_key(x) == tile_key(x.clone())
    assert tile_key(x) != tile_key(x.flip(-1))
    assert tile_key(x) != tile_key(x.double())


# --- pictures -----------------------------------------------------------------------------------


def test_tile_panel_draws_green_positive_and_red_negative_points():
    s = 64
    image = torch.zeros(3, s, s)
    label = torch.zeros(1, s, s)
    label[0, 10:20, 40:50] = 1
    coords = torch.tensor([[45.0, 15.0], [5.0, 50.0], [30.0, 30.0]])  # (x, y)
    labels = torch.tensor([1, 0, -1])
    panel = tile_panel(image, label, label, coords=coords, point_labels=labels)
    assert panel.shape == (s, 4 * s, 3) and panel.dtype == np.uint8
    pts = panel[:, 3 * s:]
    assert tuple(pts[15, 45]) == (40, 220, 40)  # green at row y=15, column x=45
    assert tuple(pts[50, 5]) == (230, 40, 40)  # red at row 50, column 5
    assert tuple(pts[30, 30]) == tuple(panel[30, 30])  # padding is not drawn
    assert panel[15, s + 45].tolist() == [255, 255, 255]  # truth panel shows the ink


def test_tile_panel_draws_a_box_prompt_from_its_corner_points():
    s = 64
    image, label = torch.zeros(3, s, s), torch.zeros(1, s, s)
    coords = torch.tensor([[10.0, 20.0], [40.0, 50.0], [30.0, 30.0]])  # (x, y): box, then a point
    labels = torch.tensor([2, 3, 1])  # top-left, bottom-right corner, an ink point
    pts = tile_panel(image, label, label, coords=coords, point_labels=labels)[:, 3 * s:]
    yellow = (240, 200, 0)
    assert tuple(pts[20, 25]) == yellow and tuple(pts[35, 40]) == yellow  # top and right edges
    assert tuple(pts[35, 25]) != yellow  # inside: not filled
    assert tuple(pts[30, 30]) == (40, 220, 40)  # the point, green; corners are not dots
    assert tuple(pts[20, 10]) == yellow


def test_no_stray_files_from_atomic_writes(tmp_path):
    save_config(load_config(), tmp_path / "config.yaml")
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_yaml_1_1_words_stay_strings_and_exponents_are_numbers(tmp_path):
    # train.cache=off was read by YAML 1.1 as the boolean False: "expected a string".
    cfg = load_config(None, ["train.cache=off", "train.lr=1e-4", "log.images=false"])
    assert cfg.train.cache == "off" and cfg.train.lr == pytest.approx(1e-4)
    exp = tmp_path / "exp.yaml"
    exp.write_text("train:\n  cache: off\n  lr: 2e-5\nlog:\n  images: true\n")
    cfg = load_config(exp)
    assert cfg.train.cache == "off" and cfg.train.lr == pytest.approx(2e-5)
    with pytest.raises(ConfigError, match="log.images: expected true or false, got 'no'"):
        load_config(None, ["log.images=no"])


def test_first_points_never_fabricate_a_positive():
    from scrollsam.prompts import first_points

    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 3:5, 10:13] = 1.0  # set 0 has ink (rows 3-4, columns 10-12); set 1 has none
    valid = torch.ones_like(target)
    coords, labels = first_points(target, valid, torch.Generator().manual_seed(0))
    assert coords.shape == (2, 1, 2) and labels.tolist() == [[1], [0]]
    (x0, y0), (x1, y1) = coords[:, 0].long().tolist()
    assert target[0, 0, y0, x0] == 1 and target[1, 0, y1, x1] == 0  # (x, y) = (column, row)


def test_a_full_shared_disk_cache_names_the_configured_size(tiny, tmp_path, caplog):
    # Review: the warning printed this process's share of the room (2 of 4.5 entries under two
    # processes) as train.cache_gb.
    g = torch.Generator().manual_seed(4)
    probe = EmbeddingCache(directory=tmp_path / "probe")
    probe.encode(torch.randn(1, 3, 64, 64, generator=g), tiny.encode)
    one = next((tmp_path / "probe").glob("*.pt")).stat().st_size
    size_gb = (9 * one // 2) / 2**30  # 4.5 entries, a whole number of bytes
    train = load_config(None, ["train.cache=disk", f"train.cache_gb={size_gb}"]).train
    cache = EmbeddingCache.for_run(train, tmp_path, world=World(rank=0, size=2))
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            cache.encode(torch.randn(1, 3, 64, 64, generator=g), tiny.encode)
    assert f"reached train.cache_gb={size_gb:g}" in caplog.text
