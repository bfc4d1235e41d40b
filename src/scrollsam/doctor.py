"""``scrollsam doctor``: trace one batch through every stage, check it, overfit it.

For the person three hours into shape errors: one batch of 3 tiles (an odd size, so batch mix-ups
show) runs on the CPU through view -> encoder -> prompts -> prompt encoder -> decoder -> loss,
and a table gives name, shape, dtype, device and value range at each stage. Then it checks what
went wrong in the seed: images normalised, points in pixels and (x, y) order inside the frame,
positive points on ink and negative points off it, labels in {-1, 0, 1}. Finally it overfits
that one batch with the real training step (:func:`scrollsam.train.step.prompted_forward`, the
loop's optimizer) and fails (exit 1) unless the loss falls by half.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from scrollsam import prompts
from scrollsam.config import Config, load_config
from scrollsam.losses import sam_loss
from scrollsam.model.trainable import set_trainable
from scrollsam.precision import autocast_for
from scrollsam.train.step import loss_kwargs, prompted_forward

BATCH = 3
OVERFIT_STEPS = 40
OVERFIT_LR = 1e-3


@dataclass
class Check:
    """One named check and what it found."""

    name: str
    ok: bool
    detail: str


def _row(name: str, t: torch.Tensor) -> tuple[str, str, str, str, str]:
    t = t.detach()
    lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
    return (name, str(list(t.shape)), str(t.dtype).replace("torch.", ""), str(t.device),
            f"{lo:.3g} .. {hi:.3g}")


def _table(rows: list[tuple[str, ...]]) -> str:
    head = ("name", "shape", "dtype", "device", "range")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def default_config(workdir: Path, overrides: Sequence[str] = ()) -> Config:
    """A small built-in synthetic fragment and the tiny model (no data or weights needed),
    with ``key=value`` ``overrides`` on top."""
    from scrollsam.data.synthetic import write_fragment

    write_fragment(workdir / "data" / "doctor", height=192, width=192, depth=16, seed=0)
    return load_config(None, [f"out={workdir / 'run'}", f"data.root={workdir / 'data'}",
                              "data.train=[doctor]", "model.type=tiny", "model.image_size=64",
                              "data.pixel_augment=false", "train.device=cpu",
                              f"train.batch_size={BATCH}", *overrides])


def point_checks(coords: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
                 size: int) -> list[Check]:
    """The seed's coordinate mistakes: coords [P, N, 2] (x, y), labels [P, N], target [P,1,S,S]."""
    real = labels >= 0
    xy = coords[real]  # (K, 2)
    checks = [Check("point labels in {-1, 0, 1}", bool(((labels >= -1) & (labels <= 1)).all()),
                    f"values {sorted(set(labels.unique().tolist()))}")]
    inside = bool(((xy >= 0) & (xy <= size - 1)).all()) if xy.numel() else True
    checks.append(Check("points are pixels inside the frame", inside and not (
        xy.numel() and float(xy.max()) <= 1.0),
        f"x, y in [{float(xy.min()) if xy.numel() else 0:g}, "
        f"{float(xy.max()) if xy.numel() else 0:g}], frame 0..{size - 1}"))
    if not inside:
        return checks
    p_idx = real.nonzero()[:, 0]
    x, y = xy[:, 0].long(), xy[:, 1].long()
    under = target[p_idx, 0, y, x]  # truth under each point, read as [row = y, column = x]
    lab = labels[real]
    pos_ok = int(((lab == 1) & (under > 0.5)).sum()), int((lab == 1).sum())
    neg_ok = int(((lab == 0) & (under < 0.5)).sum()), int((lab == 0).sum())
    hint = "" if pos_ok[0] == pos_ok[1] and neg_ok[0] == neg_ok[1] else (
        " -- are points (row, column)? SAM wants (x, y) = (column, row)")
    checks.append(Check("positive points land on ink", pos_ok[0] == pos_ok[1],
                        f"{pos_ok[0]} of {pos_ok[1]} on ink{hint}"))
    checks.append(Check("negative points land off ink", neg_ok[0] == neg_ok[1],
                        f"{neg_ok[0]} of {neg_ok[1]} off ink{hint}"))
    return checks


def run_doctor(cfg: Config | None = None, *, overrides: Sequence[str] = (),
               out: Callable[[str], None] = print) -> int:
    """Trace, check and overfit one batch; print a report with ``out``; 0 healthy, 1 not.
    Without ``cfg``: the built-in case, with ``overrides`` on top."""
    from scrollsam.train.loop import setup

    with tempfile.TemporaryDirectory(prefix="scrollsam-doctor-") as tmp:
        tmp_path = Path(tmp)
        if cfg is None:
            cfg = default_config(tmp_path, overrides)
            out("doctor: built-in synthetic fragment, tiny model, CPU"
                + "".join(f"; {o}" for o in overrides))
        cfg.train.device = "cpu"
        cfg.train.batch_size = BATCH
        torch.manual_seed(cfg.train.seed)  # the same verdict every time for the same config
        s = setup(cfg, tmp_path / "run")
        return _diagnose(s, cfg, out)


def _diagnose(s, cfg: Config, out: Callable[[str], None]) -> int:
    gen = torch.Generator().manual_seed(cfg.train.seed)
    items = [s.train_set[i] for i in range(BATCH)]
    images = torch.stack([it["image"] for it in items])  # (3, C, S, S)
    label = torch.stack([it["label"] for it in items])  # (3, 1, S, S)
    valid = torch.stack([it["valid"] for it in items])  # (3, 1, S, S)
    model, size = s.model, s.model.image_size
    coords, labels = prompts.random_points(label, valid, generator=gen, positives=2, negatives=2)
    rows = [_row("input image", images), _row("label (ink)", label), _row("valid (mask)", valid)]
    autocast = partial(autocast_for, s.device, cfg.train.amp)  # training's precision
    with torch.no_grad(), autocast():
        emb, pixels = model.encode_with_pixels(images)  # pixels: a mask head's, else None
        sparse, dense = model.embed_prompts((coords, labels))
        logits, iou = model.decode(emb, points=(coords, labels))
        full = model.refine(logits, pixels)  # the mask head's full resolution, else logits
        loss = sam_loss(full, iou, label, valid, **loss_kwargs(cfg.loss)).parts["loss"]
    rows += [_row("embeddings", emb), _row("points (x, y)", coords),
             _row("point labels", labels), _row("sparse prompt emb", sparse),
             _row("dense prompt emb", dense), _row("mask logits", logits)]
    if pixels is not None:
        rows += [_row("pixel features", pixels), _row("full-res logits", full)]
    rows += [_row("iou predictions", iou), _row("loss", loss)]
    out(_table(rows))
    inside = images.permute(1, 0, 2, 3)[:, valid[:, 0] > 0.5]  # (C, K) pixels inside the mask
    mean, std = float(inside.mean()), float(inside.std())
    checks = [
        Check("images are normalised", abs(mean) < 1.0 and 0.2 < std < 5.0,
              f"mean {mean:.3g}, std {std:.3g} inside the mask (want about 0 and 1)"),
        Check("labels are {0, 1}", bool(((label == 0) | (label == 1)).all()),
              f"values {sorted(set(label.unique().tolist()))[:5]}"),
        Check("batch dimension kept", logits.shape[0] == BATCH and emb.shape[0] == BATCH,
              f"embeddings {list(emb.shape)}, logits {list(logits.shape)}"),
        *point_checks(coords, labels, label, size),
    ]
    losses = _overfit(model, emb, pixels, label, valid, cfg, autocast)
    checks.append(Check("loss falls by half when overfitting one batch",
                        losses[-1] <= 0.5 * losses[0],
                        f"{losses[0]:.4g} -> {losses[-1]:.4g} in {OVERFIT_STEPS} steps"))
    out("")
    for c in checks:
        out(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    healthy = all(c.ok for c in checks)
    out("\ndoctor: healthy" if healthy else "\ndoctor: problems found (see FAIL lines)")
    return 0 if healthy else 1


def _overfit(model, emb: torch.Tensor, pixels: torch.Tensor | None, label: torch.Tensor,
             valid: torch.Tensor, cfg: Config,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> list[float]:
    """Losses of ``OVERFIT_STEPS`` training steps on one batch: the training step's prompted
    forward (the same prompts every step) under training's ``autocast`` and the loop's
    optimizer, training the prompt encoder and decoder on the fixed embeddings."""
    from scrollsam.train.optim import make_optimizer

    set_trainable(model, ["prompt_encoder", "mask_decoder"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=OVERFIT_LR, weight_decay=cfg.train.weight_decay)
    losses = []
    for _ in range(OVERFIT_STEPS):
        gen = torch.Generator().manual_seed(cfg.train.seed)  # the same first prompts each step
        with autocast():
            out = prompted_forward(model, emb, label, valid, prompt_cfg=cfg.prompts,
                                   loss_cfg=cfg.loss, gen=gen, features=pixels)
        opt.zero_grad(set_to_none=True)
        out.parts["loss"].backward()
        opt.step()
        losses.append(float(out.parts["loss"].detach()))
    return losses
