"""Tiny run folders and synthetic fragments for the inference tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

from scrollsam import build_model
from scrollsam.config import config_to_dict, load_config, save_config
from scrollsam.data.views import view_from_config
from scrollsam.train.checkpoint import TrainState, save_checkpoint


def make_run(path: Path, *overrides: str, best: float | None = 0.4, last: float | None = None,
             image_size: int = 64, seed: int = 0, reference: float | None = None) -> Path:
    """A run folder as `scrollsam train` writes it: config.yaml plus best.pt (threshold
    ``best``) and / or last.pt (threshold ``last``), tiny model with random weights;
    ``reference``: the validation's expected threshold (None: a checkpoint from before it)."""
    path.mkdir(parents=True)
    cfg = load_config(None, ["model.type=tiny", f"model.image_size={image_size}",
                             "train.batch_size=16", *overrides])
    save_config(cfg, path / "config.yaml")
    channels = view_from_config(cfg.data, cache_dir=None).channels
    import torch

    torch.manual_seed(seed)
    model = build_model("tiny", image_size=image_size, in_chans=channels)
    for name, threshold in (("best.pt", best), ("last.pt", last)):
        if threshold is not None:
            save_checkpoint(path / name, model=model, optimizer=None,
                            state=TrainState(step=7, best_threshold=threshold,
                                             best_expected_threshold=reference),
                            config=config_to_dict(cfg))
    return path


def band_data(root: Path) -> Path:
    """``root`` with the band tests' fragment (``frag``: 150 x 120 px, 8 slices) and a tiny ir
    run (``run``, threshold 0.5)."""
    from scrollsam.data.synthetic import write_fragment

    write_fragment(root / "frag", height=150, width=120, depth=8, seed=5)
    make_run(root / "run", "data.input=ir", best=0.5)
    return root


def sharded_worker(rank: int, world: int, port: int, jobs: list, result_dir: Path) -> None:
    """One torchrun-like process (gloo) for torch.multiprocessing.spawn: joins the group, runs
    ``predict_to_folder(**kwargs)`` for each job ``(name, kwargs, failing_rank)`` (on
    ``failing_rank`` the model raises), and writes ``ok`` or the error to ``name-RANK.txt``."""
    import os

    from scrollsam.errors import InputError, ScrollsamError
    from scrollsam.infer.pipeline import predict_to_folder
    from scrollsam.infer.predict import Predictor
    from scrollsam.train.distributed import join_process_group, shutdown_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    join_process_group()
    real = Predictor.predict_rows
    try:
        for name, kwargs, failing in jobs:
            if failing == rank:
                def boom(self, *args, **kw):
                    raise InputError("boom on purpose")
                Predictor.predict_rows = boom
            try:
                predict_to_folder(**kwargs)
                outcome = "ok"
            except ScrollsamError as err:
                outcome = f"{type(err).__name__}: {err}"
            finally:
                Predictor.predict_rows = real
            (result_dir / f"{name}-{rank}.txt").write_text(outcome)
    finally:
        shutdown_distributed()


def zarr_files(out: Path) -> tuple[list, list]:
    """Every level of ``out/prob.ome.zarr``'s probability map and of its mask, as arrays."""
    import zarr

    root = zarr.open_group(out / "prob.ome.zarr", mode="r")
    n = len(root.attrs["multiscales"][0]["datasets"])
    return ([root[str(i)][:] for i in range(n)], [root[f"labels/ink/{i}"][:] for i in range(n)])


def killed_in_predict_worker(rank: int, kwargs: dict) -> None:
    """``predict_to_folder(**kwargs)`` under torchrun's environment (ddp_helpers' spawn); rank 1
    kills itself outright (SIGKILL, as the OOM killer would) when it starts its first band."""
    import os
    import signal

    from scrollsam.infer.pipeline import predict_to_folder
    from scrollsam.infer.predict import Predictor

    if rank == 1:
        def killed(self, *args, **kw):
            os.kill(os.getpid(), signal.SIGKILL)
        Predictor.predict_rows = killed
    predict_to_folder(**kwargs)
