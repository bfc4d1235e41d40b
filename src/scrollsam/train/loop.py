"""The training loop, top to bottom: ``scrollsam train`` and :func:`train`.

Per step: learning rate from the schedule (a pure function of the step), ``accumulate`` micro
batches of B tiles (on a GPU copied there a step ahead, :mod:`.prefetch`; embeddings from the
cache when the encoder is frozen), the prompted forward pass of :mod:`.step` under autocast
(:mod:`scrollsam.precision`), a NaN/inf guard, gradient clipping, the optimizer step; then
logging, validation (prompt-free F0.5 and its best threshold, keeping ``best.pt``), and
``last.pt``. Data order and prompts are pure functions of (seed, sample index) (:mod:`.order`),
so a resumed run continues exactly where the killed one stopped. The run dir is locked and
prepared by :mod:`.rundir`; Ctrl-C and SIGTERM end the run after the current step with
``last.pt`` written (:mod:`.stop`).

Under torchrun (``torchrun --nproc-per-node N -m scrollsam train ...``) every process runs this
loop on its share of each global batch, DDP averages the gradients (:mod:`.forward`), rank 0
alone writes (run dir, config, checkpoints, TensorBoard), validation is shared out
(:mod:`.validate`), and errors and stops are agreed at fixed points (:mod:`.ranks`), so the
processes end together with one message.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from scrollsam.config import Config, config_to_dict, save_config
from scrollsam.data.augment import Augment
from scrollsam.data.dataset import TileDataset, make_datasets, require_validation_ink
from scrollsam.data.fragment import Fragment, check_distinct_ids
from scrollsam.data.views import View, view_from_config
from scrollsam.device import resolve_device
from scrollsam.errors import ConfigError
from scrollsam.losses import scalar_parts
from scrollsam.model.assemble import model_from_config, uses_embedding_cache
from scrollsam.model.compile import compile_model
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.model.trainable import count_parameters, format_counts
from scrollsam.precision import autocast_for, precision_name, use_bf16
from scrollsam.train import validate as validation
from scrollsam.train.cache import EmbeddingCache
from scrollsam.train.checkpoint import TrainState, save_checkpoint, train_state_of
from scrollsam.train.distributed import (
    World,
    join_process_group,
    peer_lost,
    process_device,
    release_frames,
    resume_hint,
    shutdown_distributed,
    world_from_env,
)
from scrollsam.train.forward import device_keys, wrap_for_ranks
from scrollsam.train.guard import Losses, nan_guard, out_of_memory
from scrollsam.train.optim import lr_at, make_optimizer
from scrollsam.train.order import RankSamples, global_batch, samples
from scrollsam.train.prefetch import DevicePrefetch
from scrollsam.train.progress import DataWait, Progress, Speed
from scrollsam.train.prompt_sets import tile_seeds
from scrollsam.train.ranks import Ranks, TrainingError
from scrollsam.train.run_log import RunLog
from scrollsam.train.rundir import RunDir, follow_run, open_run, stored_config
from scrollsam.train.step import prompted_forward
from scrollsam.train.stop import StopSignals, TrainingStopped, ignore_stop_signals, stopped_at_once
from scrollsam.train.tb import TensorBoard

__all__ = ["Setup", "TrainingError", "lr_at", "make_optimizer", "setup", "train", "validate"]

log = logging.getLogger(__name__)

DUPLICATE_SIGNAL_S = 5.0  # under torchrun: a Ctrl-C arrives twice (terminal, then torchrun)


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
    ranks: Ranks
    static_prompts: bool = False  # the decoder is compiled: decode static prompt sets


def open_fragments(cfg: Config) -> tuple[list[Fragment], list[str]]:
    """All train and valid fragments (validated), and the ids of the valid ones."""
    root = Path(cfg.data.root)
    if not cfg.data.train:
        raise ConfigError("data.train: expected at least one fragment folder, got none")
    given = [*cfg.data.train, *cfg.data.valid]
    frags = [Fragment(root / p) for p in given]
    check_distinct_ids(frags, [str(p) for p in given], setting="data.train / data.valid",
                       why="a fragment's id names its tiles and statistics")
    return frags, [f.id for f in frags[len(cfg.data.train):]]


def setup(cfg: Config, run: Path, *, weights: dict | None = None,
          ranks: Ranks | None = None) -> Setup:
    """Fragments, view, datasets, model and cache for ``cfg`` (nothing trained yet); the
    model's weights come from the checkpoint ``weights`` when resuming. ``ranks``: this
    process among torchrun's (default: alone); only rank 0 caches statistics in the run dir."""
    ranks = ranks if ranks is not None else Ranks(World())
    world = ranks.world
    device = process_device(resolve_device(cfg.train.device, setting="train.device"), world)
    fragments, valid_ids = open_fragments(cfg)
    view = view_from_config(cfg.data, cache_dir=run if world.main else None)
    size = cfg.model.image_size
    augment = None
    if cfg.data.augment or cfg.data.pixel_augment:
        augment = Augment(flips=cfg.data.augment, rot90=cfg.data.augment,
                          pixel=cfg.data.pixel_augment)
    train_set, valid_set = make_datasets(
        fragments, view, size=size, stride=cfg.data.stride or None,
        valid_fragments=valid_ids,
        valid_band=None if valid_ids else (1.0 - cfg.data.valid_band, 1.0),
        samples_per_epoch=cfg.train.steps * global_batch(cfg, world.size),
        ink_share=cfg.data.ink_share, augment=augment, seed=cfg.train.seed)
    require_validation_ink(valid_set, valid_ids, resumed=weights is not None)
    model = model_from_config(cfg.model, in_chans=view.channels, weights=weights,
                              source=f"{run} (its newest checkpoint)").to(device)
    log.info("trainable parameters:\n%s", format_counts(count_parameters(model)))
    log.info("precision %s on %s", precision_name(device, cfg.train.amp), device)
    if world.distributed:
        log.info("process %d of %d: global batch %d (%d processes x batch %d x accumulate %d)",
                 world.rank, world.size, global_batch(cfg, world.size), world.size,
                 cfg.train.batch_size, cfg.train.accumulate)
    static = bool(cfg.train.compile and compile_model(
        model, device=device, bf16=use_bf16(device, cfg.train.amp)))
    cache = None
    if uses_embedding_cache(cfg):  # disk: one folder for all processes (atomic writes)
        cache = EmbeddingCache.for_run(cfg.train, run, world=world)
        log.info("embedding cache on (%s)", "disk" if cache.directory else "memory")
    return Setup(cfg, run, device, view, train_set, valid_set, model, cache, ranks,
                 static_prompts=static)


def _batches(s: Setup, start_step: int) -> Iterator[dict]:
    """This process's training batches from step ``start_step`` on (:mod:`.order`)."""
    loader = DataLoader(s.train_set, batch_size=s.cfg.train.batch_size,
                        sampler=RankSamples(start_step, cfg=s.cfg, world=s.ranks.world),
                        drop_last=True, num_workers=s.cfg.data.workers,
                        pin_memory=s.device.type == "cuda",
                        persistent_workers=s.cfg.data.workers > 0,
                        worker_init_fn=ignore_stop_signals)
    yield from loader


def _autocast(s: Setup) -> contextlib.AbstractContextManager:
    return autocast_for(s.device, s.cfg.train.amp)


def validate(s: Setup) -> dict[str, float]:
    """Prompt-free prediction over the validation tiles: F0.5 etc. at the best threshold (every
    process calls it; see :mod:`.validate`)."""
    return validation.validate(s.model, s.cache, s.valid_set, ranks=s.ranks,
                               batch_size=s.cfg.train.batch_size, workers=s.cfg.data.workers,
                               device=s.device, autocast=lambda: _autocast(s))


def _check_losses(s: Setup, losses: Losses) -> None:
    """:func:`.guard.nan_guard` on every process, agreed: a NaN on any rank stops them all."""
    def batch_of(step: int, micro: int) -> dict:  # rebuilt: a pure function of the step
        return default_collate([s.train_set[i] for i in samples(step, micro, cfg=s.cfg,
                                                                  world=s.ranks.world)])

    failure = None
    try:
        nan_guard(losses, batch_of=batch_of, run=s.run, world=s.ranks.world)
    except Exception as err:
        failure = err
    s.ranks.agree(failure)
    losses.clear()


def train(cfg: Config, *, resume: bool = False, progress: bool = True,
          given: Collection[str] | None = None,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train from ``cfg`` into the run dir ``cfg.out``; returns it. See the module docstring.

    resume: continue the run in ``cfg.out`` (see :mod:`.rundir`; ``given`` = the dotted keys set
    on the command line, None = those that differ from the defaults). SIGINT / SIGTERM stop
    after the current step with ``last.pt`` written and raise TrainingStopped (:mod:`.stop`).
    on_eval: called as ``on_eval(step, scores)`` after each validation that scored tiles (after
    ``best.pt`` is saved; on every process under torchrun); an exception it raises (a sweep
    pruning the run) ends training and propagates, with TensorBoard closed.
    Under torchrun this joins the process group (and leaves it at the end if it joined).
    """
    world = world_from_env()
    joined = False
    with (StopSignals(same_within=DUPLICATE_SIGNAL_S if world.distributed else 0.0) as stop,
          RunLog(enabled=world.main) as log_file):  # RUN/train.log
        ranks = Ranks(world, stop)
        rd, failure = None, None
        try:  # rank 0 locks and prepares the folder; the others only read it
            opener = open_run if world.main else follow_run
            rd = opener(cfg, resume=resume, given=given, world_size=world.size)
        except Exception as err:
            failure = err
        try:
            if world.distributed and not torch.distributed.is_initialized():
                join_process_group()
                joined = True
            ranks.agree(failure)  # the others go on once rank 0 has prepared the folder
            with log_file.into(rd.path):
                _train(rd, ranks, progress=progress, on_eval=on_eval)
        except BaseException as err:
            if world.distributed:  # DDP in its frames would keep the group (and its threads)
                release_frames(err)
            if rd is not None and not isinstance(err, TrainingStopped):
                undone = rd.undo_new()  # a new run that failed before its first step finished
                if isinstance(err, KeyboardInterrupt) and not err.args:  # a second signal
                    err.args = (stopped_at_once(rd.path, undone=undone, created=rd.created),)
                    err.echo = not world.main  # rank 0 says it, once for the job
            lost = (peer_lost(err, resume_hint(rd.path)) if world.distributed and rd is not None
                    else None)
            if lost is not None:  # gloo's traceback, in each process still running, before
                raise lost from err
            raise
        finally:
            if rd is not None and rd.lock is not None:
                rd.lock.release()  # rank 0's
            if joined:
                shutdown_distributed()
    return rd.path


def _train(rd: RunDir, ranks: Ranks, *, progress: bool,
           on_eval: Callable[[int, dict[str, float]], None] | None) -> None:
    """The loop of :func:`train` in the open run dir ``rd`` (locked by rank 0)."""
    cfg, ckpt, run, world = rd.cfg, rd.checkpoint, rd.path, ranks.world
    torch.manual_seed(cfg.train.seed)  # random initial weights where no checkpoint gives them
    stored = stored_config(cfg)
    failure = None
    try:  # bad fragments, views or checkpoints fail here (a new run dir is removed: train)
        # a new run's config.yaml first: killed from here on (setup caches statistics in the
        # run dir, for seconds to minutes), it resumes from step 0 with --resume; a resumed
        # run's config is written once setup has taken it (below)
        if world.main and rd.new:
            save_config(stored, run / "config.yaml")
        s = setup(cfg, run, weights=ckpt, ranks=ranks)
    except Exception as err:
        failure = err
    ranks.agree(failure)  # (the same error on every process: a bad config fails them all)
    params = [p for p in s.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    state = TrainState()
    if ckpt is not None:  # the model has the checkpoint's weights (setup)
        optimizer.load_state_dict(ckpt["optimizer"])
        state = train_state_of(ckpt)
        log.info("resuming %s at step %d", run, state.step)
    forward = partial(prompted_forward, static=True) if s.static_prompts else prompted_forward
    step_module = wrap_for_ranks(s.model, s.cache, world=world, prompt_cfg=cfg.prompts,
                                 loss_cfg=cfg.loss, device=s.device, forward=forward)
    tb = TensorBoard(run, enabled=world.main, purge_step=None if rd.new else state.step + 1)
    config_dict = config_to_dict(stored)

    def save(name: str) -> None:  # rank 0; the model unwrapped (official key names)
        if world.main:
            save_checkpoint(run / name, model=s.model, optimizer=optimizer, state=state,
                            config=config_dict, world_size=world.size)

    def writes(action: Callable[[], object]) -> None:  # rank 0's writes, failures agreed
        failure = None
        try:
            action()
        except Exception as err:
            failure = err
        ranks.agree(failure)

    if not rd.new:
        writes(lambda: save_config(stored, run / "config.yaml") if world.main else None)
    s.model.train()
    # on a GPU each batch crosses to it while the step before runs
    batches = DataWait(DevicePrefetch(_batches(s, state.step), s.device,
                                      move=device_keys(s.cache)),
                       workers=cfg.data.workers, device=s.device.type)
    bar = Progress(total=cfg.train.steps, initial=state.step,
                   enabled=progress and world.main).start()
    speed = Speed()  # tiles per second of the steps since the last log line
    unchecked: Losses = []  # losses nan_guard has not seen
    try:
        while state.step < cfg.train.steps:
            if ranks.stop_requested is not None:  # Ctrl-C / SIGTERM: keep every finished step
                _check_losses(s, unchecked)  # never save NaN weights
                writes(lambda: save("last.pt"))  # the others wait for it before they exit
                raise TrainingStopped(ranks.stop_requested, step=state.step, run=run,
                                      main=world.main)
            step = state.step
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logged: dict[str, torch.Tensor] = {}  # tensors until a log step: no host sync
            for micro in range(cfg.train.accumulate):
                last = micro == cfg.train.accumulate - 1  # DDP all-reduces on the last only
                no_sync = getattr(step_module, "no_sync", contextlib.nullcontext)
                with contextlib.nullcontext() if last else no_sync():
                    failure = None
                    try:
                        batch = next(batches)  # on the device (CUDA) or the host
                        seeds = tile_seeds(cfg.train.seed, samples(step, micro, cfg=cfg,
                                                                        world=s.ranks.world))
                        with _autocast(s):
                            out = step_module(batch["image"], batch["label"], batch["valid"],
                                              seeds, has_ink=batch["has_ink"])
                    except Exception as err:
                        failure = out_of_memory(err)
                    ranks.agree(failure)  # before backward, which waits for every process
                    unchecked.append((step, micro, {k: v.detach() for k, v in
                                                    out.parts.items()}))  # no graph kept
                    (out.parts["loss"] / cfg.train.accumulate).backward()
                for k, v in out.parts.items():
                    logged[k] = logged.get(k, 0) + v.detach() / cfg.train.accumulate
                speed.add(batch["image"].shape[0] * world.size)
            if cfg.train.clip > 0:
                logged["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.train.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            rd.stepped = True  # from here on a failure keeps the run dir
            done = state.step == cfg.train.steps
            log_due = state.step % cfg.log.every == 0 or state.step == 1 or done
            picture_due = cfg.log.images and (state.step % cfg.log.image_every == 0
                                              or state.step == 1)
            eval_due = state.step % cfg.train.eval_every == 0 or done
            save_due = state.step % cfg.train.save_every == 0 or done
            due = log_due or picture_due or eval_due or save_due
            if due:
                _check_losses(s, unchecked)
            if log_due:  # the share of time spent waiting for batches, a "part" like the losses
                logged["data_wait"] = logged["loss"].new_tensor(batches.share())
                if (hint := batches.hint()) and world.main:
                    log.warning(hint)
            # the step's losses as numbers (averaged over processes) only on log steps: a sync
            scalars = scalar_parts(ranks.mean(logged)) if log_due else None
            rate = speed.rate() if log_due else 0.0  # after that sync: the device's work in it
            scores = validate(s) if eval_due else {}
            better = state.record(scores)  # the latest validation's threshold, and the best's

            failure = None
            try:  # rank 0 writes; a failure there must end every process, not just this one
                bar.step(state.step, loss=None if scalars is None else scalars["loss"],
                         tiles_per_s=rate,
                         data_wait=None if scalars is None else scalars["data_wait"])
                if scalars is not None:
                    tb.scalars(scalars, state.step, prefix="train/")
                    tb.scalars({"lr": lr, "tiles_per_s": rate,
                                "prompts_per_s": rate * cfg.prompts.sets_per_tile}, state.step,
                               prefix="train/")
                    if s.cache is not None:
                        tb.scalars({"cache_hits": s.cache.hits, "cache_misses": s.cache.misses},
                                   state.step, prefix="train/")
                if picture_due and world.main:
                    tb.example(batch, out.example, state.step, upscale=s.model.upscale)
                if scores and world.main:
                    tb.scalars(scores, state.step, prefix="valid/")
                    log.info("step %d: valid F0.5 %.4f (precision %.4f, recall %.4f) at "
                             "threshold %.2f", state.step, scores["f0.5"],
                             scores["precision"], scores["recall"], scores["threshold"])
                if better:
                    save("best.pt")
                if save_due:
                    save("last.pt")
                if due:  # only due steps wrote anything; a flush failure is then agreed on
                    tb.flush()
            except Exception as err:
                failure = err
            if due:  # (other steps only moved the progress bar)
                ranks.agree(failure)
                speed.restart()  # validation, pictures and checkpoints are not training speed
            elif failure is not None:
                raise failure
            if scores and on_eval is not None:
                on_eval(state.step, scores)
    except torch.cuda.OutOfMemoryError as err:  # in backward or the optimizer step
        raise out_of_memory(err) from err
    finally:
        bar.close()
        tb.close()
    # no validation tiles: the last weights are the best we know
    writes(lambda: None if (run / "best.pt").exists() else save("best.pt"))
    log.info("run finished: %s (best valid F0.5 %.4f at step %d)", run, state.best_f05,
             state.best_step)
