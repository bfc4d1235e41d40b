"""The presets in configs/ load, default.yaml is the real defaults, demo.yaml is the demo."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scrollsam.config import Config, config_to_dict, load_config
from scrollsam.demo import demo_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads_and_says_what_it_is_for(path):
    if not path.name.endswith("_space.yaml"):  # sweep spaces: tests/test_sweep.py loads them
        load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} should open with a comment on its purpose"


def test_default_yaml_lists_the_real_defaults():
    assert yaml.safe_load((CONFIGS / "default.yaml").read_text()) == config_to_dict(Config())


@pytest.mark.parametrize("name, input", [("demo.yaml", "ir"), ("demo_xray.yaml", "slices")])
def test_demo_yaml_is_what_the_demo_trains(tmp_path, name, input):
    shipped = config_to_dict(load_config(CONFIGS / name))
    used = config_to_dict(demo_config(tmp_path, input))
    for cfg in (shipped, used):
        cfg.pop("out")
        cfg["data"].pop("root")
    assert shipped == used


def test_every_learning_benchmark_entry_is_a_valid_config(tmp_path):
    import sys

    sys.path.insert(0, str(CONFIGS.parent / "benchmarks"))
    import learn

    for name, (_, input, overrides) in learn.SAM_ENTRIES.items():
        cfg = learn._config(tmp_path / name, tmp_path, input, overrides, quick=False)
        assert cfg.train.steps in (300, 700) and cfg.model.type == "tiny", name
    for name, (_, overrides) in learn.CNN_ENTRIES.items():
        learn._config(tmp_path / name, tmp_path, "ir", overrides, quick=False)
    depth = learn._config(tmp_path / "d", tmp_path, "slices", [], quick=False)
    assert depth.model.depth_encoder and depth.model.mask_head == "full"  # the x-ray demo


def test_slice_presets_use_the_xray_volume():
    for name in ("xray_triplet.yaml", "xray_range.yaml", "xray_depth.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.data.input == "slices" and "image_encoder" in cfg.model.trainable
    assert load_config(CONFIGS / "xray_range.yaml").data.strategy == "range"
