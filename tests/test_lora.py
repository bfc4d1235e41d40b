"""LoRA adapters on the frozen encoder: exact at the start, only they train, runs keep them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scrollsam import build_model
from scrollsam.config import load_config
from scrollsam.errors import ConfigError, InputError
from scrollsam.infer.predict import Predictor
from scrollsam.model.lora import LoRALinear, add_lora, has_lora, is_lora_parameter
from scrollsam.model.trainable import set_trainable
from scrollsam.train.loop import train

S = 64


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", image_size=S)


def test_a_fresh_adapter_changes_nothing_and_keeps_official_names():
    model = _model()
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.encode(images)
    added = add_lora(model, rank=4, alpha=8.0)
    blocks = model.sam.image_encoder.blocks
    dim = blocks[0].attn.qkv.in_features
    assert added == len(blocks) * 4 * (dim + 3 * dim)
    assert has_lora(model) and isinstance(blocks[0].attn.qkv, LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(images), before, atol=0, rtol=0)
    names = set(model.sam.state_dict())
    assert {"image_encoder.blocks.0.attn.qkv.weight", "image_encoder.blocks.0.attn.qkv.bias",
            "image_encoder.blocks.0.attn.qkv.lora_a",
            "image_encoder.blocks.0.attn.qkv.lora_b"} <= names
    with pytest.raises(InputError, match="already has a LoRA adapter"):
        add_lora(model, rank=4, alpha=8.0)
    with pytest.raises(InputError, match="rank"):
        add_lora(_model(), rank=0, alpha=8.0)


def test_only_adapters_train_in_the_encoder_and_they_change_its_output():
    model = _model()
    add_lora(model, rank=2, alpha=4.0)
    counts = set_trainable(model, ["mask_decoder"])
    lora = [p for n, p in model.sam.image_encoder.named_parameters() if is_lora_parameter(n)]
    assert counts["image_encoder"].trainable == sum(p.numel() for p in lora) > 0
    images = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.encode(images)
    logits, _ = model.decode(model.encode(images))
    logits.square().mean().backward()
    for name, p in model.sam.image_encoder.named_parameters():
        if is_lora_parameter(name):
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    # B starts at zero: A's first gradient is zero, B's is not
    assert any(bool(p.grad.abs().sum() > 0) for n, p in
               model.sam.image_encoder.named_parameters() if n.endswith("lora_b"))
    with torch.no_grad():
        model.sam.image_encoder.blocks[0].attn.qkv.lora_b.fill_(0.1)
        assert not torch.allclose(model.encode(images), before)


def test_config_checks():
    with pytest.raises(ConfigError, match="model.lora_rank"):
        load_config(None, ["model.lora_rank=-1"])
    with pytest.raises(ConfigError, match="frozen image encoder"):
        load_config(None, ["model.lora_rank=4", "model.trainable=[image_encoder,mask_decoder]"])
    with pytest.raises(ConfigError, match="model.lora_alpha"):
        load_config(None, ["model.lora_rank=4", "model.lora_alpha=0"])


def _cfg(data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"out={out}", f"data.root={data}", "data.train=[train/1]", "data.valid=[train/2]",
        "model.type=tiny", f"model.image_size={S}", "train.batch_size=2", "train.steps=2",
        "train.warmup=1", "train.eval_every=2", "train.save_every=2", "train.device=cpu",
        "log.every=1", "prompts.corrective_rounds=0",
        "data.pixel_augment=false", "model.lora_rank=2", *extra])


def test_a_lora_run_trains_the_adapters_and_predicts_with_them(data, tmp_path):
    run = train(_cfg(data, tmp_path / "run"), progress=False)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    b = ckpt["model"]["image_encoder.blocks.0.attn.qkv.lora_b"]
    assert b.abs().sum() > 0  # trained away from its zero start
    assert not (run / "embeddings").exists()
    predictor = Predictor.from_run(run, checkpoint="last")
    assert has_lora(predictor.model)
    torch.testing.assert_close(
        predictor.model.sam.image_encoder.blocks[0].attn.qkv.lora_b, b, atol=0, rtol=0)


def test_the_cache_is_refused_with_lora(data, tmp_path):
    with pytest.raises(ConfigError, match="lora_rank"):
        train(_cfg(data, tmp_path / "run", "train.cache=memory"), progress=False)


def test_a_lora_checkpoint_into_a_plain_model_says_how_to_load_it(tmp_path):
    from scrollsam.errors import CheckpointError
    from scrollsam.model.build import load_into

    adapted = _model()
    add_lora(adapted, rank=2, alpha=4.0)
    with pytest.raises(CheckpointError, match=r"LoRA adapters \(rank 2\).*model.lora_rank=2"):
        load_into(_model().sam, adapted.sam.state_dict(), model_type="tiny", source="run/last.pt")


def _adapted_checkpoint(path: Path, *, alpha: float) -> torch.nn.Module:
    """A LoRA-adapted model (rank 2, adapters away from their zero start), saved into ``path``
    as a training run saves it (SAM's weights under "model", the run's config beside them)."""
    adapted = _model()
    add_lora(adapted, rank=2, alpha=alpha)
    with torch.no_grad():
        for name, p in adapted.sam.image_encoder.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    torch.save({"model": adapted.sam.state_dict(),
                "config": {"model": {"lora_rank": 2, "lora_alpha": alpha}}}, path)
    return adapted


def test_a_lora_runs_checkpoint_starts_a_new_run_with_its_adapters(data, tmp_path):
    # QA: model.checkpoint=<a LoRA run's best.pt> with the same model.lora_rank was refused
    # ("holds LoRA adapters (rank 4) that the model lacks"), whatever the rank.
    from scrollsam.model.assemble import model_from_config

    path = tmp_path / "best.pt"
    adapted = _adapted_checkpoint(path, alpha=4.0)
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapted.encode(images)
        for alpha in (4.0, 8.0):  # another alpha: the adapters are rescaled to compute the same
            model = build_model("tiny", checkpoint=path, image_size=S, lora_rank=2,
                                lora_alpha=alpha)
            assert has_lora(model)
            torch.testing.assert_close(model.encode(images), want)
    cfg = _cfg(data, tmp_path / "run", f"model.checkpoint={path}", "model.trainable=[mask_decoder]")
    model = model_from_config(cfg.model, in_chans=3)  # what train builds
    with torch.no_grad():
        torch.testing.assert_close(model.encode(images), want)
    assert all(p.requires_grad == is_lora_parameter(n)
               for n, p in model.sam.image_encoder.named_parameters())
    run = train(cfg, progress=False)
    assert (run / "last.pt").is_file()


def test_a_lora_checkpoint_of_another_rank_says_what_to_do_and_merge_lora_does_it(tmp_path):
    from scrollsam.errors import CheckpointError
    from scrollsam.model.lora import merge_lora

    path = tmp_path / "best.pt"
    adapted = _adapted_checkpoint(path, alpha=4.0)
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters \(rank 2\) but the "
                       r"model's are rank 3 \(model.lora_rank\): set model.lora_rank=2 .*"
                       r"merge_lora .*with new rank-3 ones \(.*best.pt\)$"):
        build_model("tiny", checkpoint=path, image_size=S, lora_rank=3)
    with pytest.raises(CheckpointError, match=r"that the model lacks: set model.lora_rank=2 .*"
                       r"merge_lora .*without adapters"):
        build_model("tiny", checkpoint=path, image_size=S)
    merged = tmp_path / "merged.pth"
    torch.save(merge_lora(adapted.sam.state_dict(), alpha=4.0), merged)
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapted.encode(images)
        for rank in (0, 3):  # no adapters, or fresh ones of another rank on top
            model = build_model("tiny", checkpoint=merged, image_size=S, lora_rank=rank)
            assert has_lora(model) == bool(rank)
            torch.testing.assert_close(model.encode(images), want, atol=1e-5, rtol=1e-4)
