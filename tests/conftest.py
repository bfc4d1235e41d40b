"""Test-session setup that must happen before torch is imported by any test module."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make torch many times slower when pytest shares the CPU with
# anything else (see scrollsam/__init__.py); test modules import torch before scrollsam.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "0")  # tests run processes side by side: no spinning


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small synthetic fragments, ``train/1`` and ``train/2`` (160 x 160 x 8), for runs."""
    from scrollsam.data.synthetic import write_fragment

    root = tmp_path_factory.mktemp("data")
    for i in (1, 2):
        write_fragment(root / "train" / str(i), height=160, width=160, depth=8, seed=i)
    return root


@pytest.fixture
def tiny_run_config(data, tmp_path):
    """``make(*overrides)`` -> the config of a short CPU run of the whole tiny model (64 px) on
    ``data``'s train/1, validated on train/2, into ``tmp_path / "run"``."""
    from scrollsam.config import load_config

    def make(*overrides: str):
        return load_config(None, [
            f"out={tmp_path / 'run'}", f"data.root={data}", "data.train=[train/1]",
            "data.valid=[train/2]", "model.type=tiny", "model.image_size=64",
            "model.trainable=[image_encoder,prompt_encoder,mask_decoder]", "train.device=cpu",
            "prompts.corrective_rounds=1", *overrides])

    return make
