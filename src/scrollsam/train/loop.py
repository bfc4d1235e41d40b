"""The training loop, top to bottom: ``scrollsam train`` and :func:`train`.

Per step: learning rate from the schedule (a pure function of the step), ``accumulate`` micro
batches of B tiles (embeddings from the cache when the encoder is frozen), the prompted forward
pass of :mod:`.step` under autocast (:mod:`scrollsam.precision`), a NaN/inf guard, gradient
clipping, the optimizer step; then logging, validation (prompt-free F0.5 and its best threshold,
keeping ``best.pt``), and ``last.pt``. Data order is a pure function of (seed, step), so a resumed
run continues exactly where the killed one stopped. The run dir is locked and prepared by
:mod:`.rundir`; Ctrl-C and SIGTERM end the run after the current step with ``last.pt`` written
(:mod:`.stop`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from scrollsam.config import Config, config_to_dict, save_config
from scrollsam.data.augment import Augment
from scrollsam.data.dataset import TileDataset, make_datasets
from scrollsam.data.fragment import Fragment
from scrollsam.data.views import View, view_from_config
from scrollsam.device import resolve_device
from scrollsam.errors import ConfigError, ScrollsamError
from scrollsam.io import atomic_path
from scrollsam.losses import scalar_parts
from scrollsam.metrics import ProbabilityHistogram, search_threshold
from scrollsam.model.assemble import model_from_config, uses_embedding_cache
from scrollsam.model.compile import compile_encoder
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.model.trainable import count_parameters, format_counts
from scrollsam.precision import autocast_for, precision_name
from scrollsam.torchfile import save_torch
from scrollsam.train.cache import EmbeddingCache
from scrollsam.train.checkpoint import (
    TrainState,
    save_checkpoint,
    train_state_of,
)
from scrollsam.train.progress import Progress
from scrollsam.train.rundir import RunDir, open_run, stored_config
from scrollsam.train.step import prompted_forward
from scrollsam.train.stop import StopSignals, TrainingStopped, ignore_stop_signals
from scrollsam.train.tb import TensorBoard, tile_panel

log = logging.getLogger(__name__)


class TrainingError(ScrollsamError):
    """Training cannot go on: NaN loss, CUDA out of memory. The message says what to do."""


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine decay to lr * min_lr_ratio."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Setup:
    """Everything the loop builds from a config before the first step."""

    cfg: Config
    run: Path
    device: torch.device
    view: View
    train_set: TileDataset
    valid_set: TileDataset
    model: SamSegmenter
    cache: EmbeddingCache | None


def open_fragments(cfg: Config) -> tuple[list[Fragment], list[str]]:
    """All train and valid fragments (validated), and the ids of the valid ones."""
    root = Path(cfg.data.root)
    if not cfg.data.train:
        raise ConfigError("data.train: expected at least one fragment folder, got none")
    frags = [Fragment(root / p) for p in [*cfg.data.train, *cfg.data.valid]]
    ids = [f.id for f in frags]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"data.train / data.valid: fragment folder names must differ, got {ids}")
    return frags, ids[len(cfg.data.train):]


def setup(cfg: Config, run: Path, *, weights: dict | None = None) -> Setup:
    """Fragments, view, datasets, model and cache for ``cfg`` (nothing trained yet); the
    model's weights come from the checkpoint ``weights`` when resuming."""
    device = resolve_device(cfg.train.device, setting="train.device")
    fragments, valid_ids = open_fragments(cfg)
    view = view_from_config(cfg.data, cache_dir=run)
    size = cfg.model.image_size
    augment = None
    if cfg.data.augment or cfg.data.pixel_augment:
        augment = Augment(flips=cfg.data.augment, rot90=cfg.data.augment,
                          pixel=cfg.data.pixel_augment)
    per_step = cfg.train.batch_size * cfg.train.accumulate
    train_set, valid_set = make_datasets(
        fragments, view, size=size, stride=cfg.data.stride or None,
        valid_fragments=valid_ids,
        valid_band=None if valid_ids else (1.0 - cfg.data.valid_band, 1.0),
        samples_per_epoch=cfg.train.steps * per_step, ink_share=cfg.data.ink_share,
        augment=augment, seed=cfg.train.seed)
    model = model_from_config(cfg.model, in_chans=view.channels, weights=weights,
                              source=f"{run} (its newest checkpoint)").to(device)
    log.info("trainable parameters:\n%s", format_counts(count_parameters(model)))
    log.info("precision %s on %s", precision_name(device, cfg.train.amp), device)
    if cfg.train.compile:
        compile_encoder(model, device=device)
    cache = None
    if uses_embedding_cache(cfg):
        cache = EmbeddingCache(directory=run / "embeddings" if cfg.train.cache == "disk" else None)
        log.info("embedding cache on (%s)", "disk" if cache.directory else "memory")
    return Setup(cfg, run, device, view, train_set, valid_set, model, cache)


def _batches(s: Setup, start_step: int) -> Iterator[dict]:
    """Training batches from sample ``start_step * B * accumulate`` on: order fixed by the seed."""
    per_step = s.cfg.train.batch_size * s.cfg.train.accumulate
    first = start_step * per_step
    loader = DataLoader(s.train_set, batch_size=s.cfg.train.batch_size,
                        sampler=range(first, len(s.train_set)), drop_last=True,
                        num_workers=s.cfg.data.workers, pin_memory=s.device.type == "cuda",
                        persistent_workers=s.cfg.data.workers > 0,
                        worker_init_fn=ignore_stop_signals)
    yield from loader


def _autocast(s: Setup) -> contextlib.AbstractContextManager:
    return autocast_for(s.device, s.cfg.train.amp)


def _encode(s: Setup, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings [B, 256, g, g] on the device of CPU images [B, C, S, S], from the cache
    (which hashes them on the CPU, before any copy) or the encoder, and the pixel features
    [B, G, S, S] of a full-resolution mask head (None without one). No value check: the views
    normalise, and a check would make the device wait."""
    if s.cache is None:
        return s.model.encode_with_pixels(images.to(s.device, non_blocking=True),
                                          check_values=False)
    emb = s.cache.encode(images, partial(s.model.encode, check_values=False), device=s.device)
    if s.model.mask_head is None:  # nothing else to compute: no copy of the images either
        return emb, None
    return emb, s.model.pixel_features(images.to(s.device, non_blocking=True),
                                       check_values=False)


@torch.no_grad()
def validate(s: Setup) -> dict[str, float]:
    """Prompt-free prediction over the validation tiles: F0.5 etc. at the best threshold."""
    if len(s.valid_set) == 0:
        return {}
    s.model.eval()
    hists: dict[str, ProbabilityHistogram] = {}
    loader = DataLoader(s.valid_set, batch_size=s.cfg.train.batch_size, shuffle=False,
                        num_workers=s.cfg.data.workers, worker_init_fn=ignore_stop_signals)
    for batch in loader:
        with _autocast(s):
            emb, pixels = _encode(s, batch["image"])
            logits = s.model.refine(s.model.decode(emb)[0], pixels)  # (B, 1, S/4 or S, ..)
        prob = torch.sigmoid(s.model.upscale(logits.float())).cpu()  # (B, 1, S, S)
        for i, fid in enumerate(batch["fragment"]):
            hists.setdefault(fid, ProbabilityHistogram()).add(
                prob[i, 0].numpy(), batch["label"][i, 0].numpy() > 0.5,
                batch["valid"][i, 0].numpy() > 0.5)
    found = search_threshold(list(hists.values()))
    scores = found.counts.scores()
    s.model.train()
    return {**scores, "threshold": float(found.threshold)}


def _batch_at(s: Setup, step: int, micro: int) -> dict:
    """The training batch of micro-batch ``micro`` of ``step``, rebuilt from the dataset (the
    data order is a pure function of the step, see :func:`_batches`)."""
    size = s.cfg.train.batch_size
    first = (step * s.cfg.train.accumulate + micro) * size
    return default_collate([s.train_set[i] for i in range(first, first + size)])


def _nan_guard(s: Setup, losses: list[tuple[int, int, dict[str, torch.Tensor]]]) -> None:
    """Stop at the first non-finite loss among ``losses`` ((step, micro-batch, loss parts) since
    the last call) with its step, parts and batch statistics, the batch saved for replay.

    One host sync for them all: the loop calls this on steps that read device values anyway
    (logging, pictures, validation, checkpoints), always before a checkpoint is written, so
    NaN weights are never saved. Steps after the bad one ran on NaN weights, harmlessly.
    """
    if not losses:
        return
    finite = torch.stack([torch.isfinite(parts["loss"].detach()) for *_, parts in losses])
    if bool(finite.all()):
        return
    step, micro, parts = losses[int((~finite).nonzero()[0, 0])]
    loss = parts["loss"]
    batch = _batch_at(s, step, micro)
    path = s.run / f"nan_batch_step{step}.pt"
    with atomic_path(path) as tmp:  # a full disk is one line, as for checkpoints
        save_torch({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, tmp)
    img = batch["image"].float()
    stats = (f"image mean {img.mean():.3g} std {img.std():.3g} min {img.min():.3g} max "
             f"{img.max():.3g}; ink share {batch['label'].float().mean():.3g}")
    bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items() if v.dim() == 0)
    raise TrainingError(f"loss is {float(loss.detach())} at step {step} ({bad}; batch: "
                        f"{stats}); the batch is saved for replay ({path}); try a lower train.lr")


def _pictures(s: Setup, tb: TensorBoard, batch: dict, example: dict | None, step: int) -> None:
    if example is None:
        return
    i = int(example["tile"])
    prob = torch.sigmoid(s.model.upscale(example["logits"][None].float()))[0].cpu()
    panel = tile_panel(batch["image"][i], batch["label"][i], prob, valid=batch["valid"][i],
                       coords=example["coords"], point_labels=example["labels"])
    tb.picture("train/tile_truth_prediction_points", [panel], step)


def make_optimizer(params: list[torch.nn.Parameter], *, lr: float,
                   weight_decay: float) -> torch.optim.AdamW:
    """AdamW, with the fused kernel where every parameter allows it (float32 on CPU or CUDA;
    several times faster per step, ``benchmarks/README.md``)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def train(cfg: Config, *, resume: bool = False, progress: bool = True,
          given: Collection[str] | None = None,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train from ``cfg`` into the run dir ``cfg.out``; returns it. See the module docstring.

    resume: continue the run in ``cfg.out`` (see :mod:`.rundir`; ``given`` = the dotted keys set
    on the command line, None = those that differ from the defaults). SIGINT / SIGTERM stop
    after the current step with ``last.pt`` written and raise TrainingStopped (:mod:`.stop`).
    on_eval: called as ``on_eval(step, scores)`` after each validation that scored tiles (after
    ``best.pt`` is saved); an exception it raises (a sweep pruning the run) ends training and
    propagates, with TensorBoard closed.
    """
    with StopSignals() as stop, open_run(cfg, resume=resume, given=given) as rd:
        _train(rd, stop, progress=progress, on_eval=on_eval)
    return rd.path


def _train(rd: RunDir, stop: StopSignals, *, progress: bool,
           on_eval: Callable[[int, dict[str, float]], None] | None) -> None:
    """The loop of :func:`train` in the open, locked run dir ``rd``."""
    cfg, ckpt, run = rd.cfg, rd.checkpoint, rd.path
    torch.manual_seed(cfg.train.seed)  # random initial weights where no checkpoint gives them
    gen = torch.Generator().manual_seed(cfg.train.seed)  # prompts, on the CPU
    try:  # bad fragments, views or checkpoints fail here, before the run dir holds anything
        s = setup(cfg, run, weights=ckpt)
    except BaseException:
        rd.undo_new()
        raise
    stored = stored_config(cfg)
    save_config(stored, run / "config.yaml")
    params = [p for p in s.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    state = TrainState()
    if ckpt is not None:  # the model has the checkpoint's weights (setup)
        optimizer.load_state_dict(ckpt["optimizer"])
        state = train_state_of(ckpt)
        gen.set_state(ckpt["rng"]["prompts"])
        log.info("resuming %s at step %d", run, state.step)
    tb = TensorBoard(run, enabled=True)
    config_dict = config_to_dict(stored)

    def save(name: str) -> None:
        save_checkpoint(run / name, model=s.model, optimizer=optimizer, state=state,
                        config=config_dict, rng={"prompts": gen.get_state()})

    s.model.train()
    batches = _batches(s, state.step)
    bar = Progress(total=cfg.train.steps, initial=state.step, enabled=progress).start()
    tiles_seen, t0 = 0, time.perf_counter()
    unchecked: list[tuple[int, int, dict[str, torch.Tensor]]] = []  # losses _nan_guard has not seen
    try:
        while state.step < cfg.train.steps:
            if stop.requested is not None:  # Ctrl-C / SIGTERM: keep every finished step
                _nan_guard(s, unchecked)  # never save NaN weights
                save("last.pt")
                raise TrainingStopped(stop.requested, step=state.step, run=run)
            step = state.step
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logged: dict[str, torch.Tensor] = {}  # tensors until a log step: no host sync
            for micro in range(cfg.train.accumulate):
                batch = next(batches)  # CPU tensors: the step moves what the device needs
                with _autocast(s):
                    emb, pixels = _encode(s, batch["image"])
                    out = prompted_forward(s.model, emb, batch["label"], batch["valid"],
                                           prompt_cfg=cfg.prompts, loss_cfg=cfg.loss, gen=gen,
                                           features=pixels)
                unchecked.append((step, micro, out.parts))  # for _nan_guard
                (out.parts["loss"] / cfg.train.accumulate).backward()
                for k, v in out.parts.items():
                    logged[k] = logged.get(k, 0) + v.detach() / cfg.train.accumulate
                tiles_seen += batch["image"].shape[0]
            if cfg.train.clip > 0:
                logged["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.train.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            elapsed = time.perf_counter() - t0
            rate = tiles_seen / max(elapsed, 1e-9)
            done = state.step == cfg.train.steps
            log_due = state.step % cfg.log.every == 0 or state.step == 1 or done
            picture_due = cfg.log.images and (state.step % cfg.log.image_every == 0
                                              or state.step == 1)
            eval_due = state.step % cfg.train.eval_every == 0 or done
            save_due = state.step % cfg.train.save_every == 0 or done
            if log_due or picture_due or eval_due or save_due:
                _nan_guard(s, unchecked)
                unchecked.clear()
            # the step's losses as numbers only on log steps: a host sync
            scalars = scalar_parts(logged) if log_due else None
            bar.step(state.step, loss=None if scalars is None else scalars["loss"],
                     tiles_per_s=rate)
            if scalars is not None:
                tb.scalars(scalars, state.step, prefix="train/")
                tb.scalars({"lr": lr, "tiles_per_s": rate,
                            "prompts_per_s": rate * cfg.prompts.sets_per_tile}, state.step,
                           prefix="train/")
                if s.cache is not None:
                    tb.scalars({"cache_hits": s.cache.hits, "cache_misses": s.cache.misses},
                               state.step, prefix="train/")
            if picture_due:
                _pictures(s, tb, batch, out.example, state.step)
            if eval_due:
                scores = validate(s)
                if scores:
                    tb.scalars(scores, state.step, prefix="valid/")
                    log.info("step %d: valid F0.5 %.4f (precision %.4f, recall %.4f) at "
                             "threshold %.2f", state.step, scores["f0.5"], scores["precision"],
                             scores["recall"], scores["threshold"])
                    if scores["f0.5"] > state.best_f05:
                        state.best_f05, state.best_step = scores["f0.5"], state.step
                        state.best_threshold = scores["threshold"]
                        save("best.pt")
                    if on_eval is not None:
                        on_eval(state.step, scores)
            if save_due:
                save("last.pt")
            tb.flush()
    except torch.cuda.OutOfMemoryError as err:
        raise TrainingError(
            "CUDA out of memory: lower train.batch_size (and raise train.accumulate to keep "
            "the effective batch), lower model.image_size (256 is about 16x cheaper than "
            "1024), or freeze the encoder (model.trainable=[prompt_encoder,mask_decoder]) so "
            "embeddings are cached") from err
    finally:
        bar.close()
        tb.close()
    if not (run / "best.pt").exists():
        save("best.pt")  # no validation tiles: the last weights are the best we know
    log.info("run finished: %s (best valid F0.5 %.4f at step %d)", run, state.best_f05,
             state.best_step)
