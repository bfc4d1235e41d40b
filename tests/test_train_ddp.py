"""Training under torchrun: 2 processes (gloo, CPU) against 1 with the same global batch, rank 0
alone writing, sharded validation, a failing rank, a stop signal, resume on another process
count, the frozen-encoder / LoRA settings, and the real `torch.distributed.run` command line.

Each test starts its processes with ``torch.multiprocessing`` (tests/ddp_helpers.py); they take
~10-20 s on two cores, mostly importing torch in each process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_helpers import (
    cli_worker,
    free_port,
    killed_at_eval_worker,
    run_ranks,
    run_ranks_one_killed,
    settings_worker,
    threads_after_failure_worker,
    train_worker,
    validate_worker,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scrollsam import build_model
from scrollsam.config import load_config
from scrollsam.errors import ConfigError
from scrollsam.train.distributed import World
from scrollsam.train.loop import setup, train, validate
from scrollsam.train.order import RankSamples
from scrollsam.train.prompt_sets import tile_seeds
from scrollsam.train.step import prompted_forward


def _args(data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return [f"out={out}", f"data.root={data}", "data.train=[train/1]", "data.valid=[train/2]",
            "model.type=tiny", "model.image_size=64", f"train.batch_size={batch}",
            "train.steps=3", "train.warmup=1", "train.eval_every=3", "train.save_every=3",
            "train.device=cpu", "train.amp=false", "log.every=1", "log.images=false",
            "prompts.corrective_rounds=1", *extra]


def _losses(run: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / name, weights_only=True)["model"]


def _ok(results: list[dict]) -> list:
    for rank, r in enumerate(results):
        assert "result" in r, f"rank {rank}: {r}"
    return [r["result"] for r in results]


@pytest.mark.parametrize("size,batch,accumulate", [(2, 2, 1), (4, 1, 1), (2, 1, 2)])
def test_each_step_is_split_across_ranks_without_repeats(size, batch, accumulate):
    # a global batch of 4 per step, however it is split: step s takes samples 4s .. 4s + 3
    cfg = load_config(None, [f"train.batch_size={batch}", f"train.accumulate={accumulate}",
                             "train.steps=3"])
    alone = list(RankSamples(1, cfg=load_config(None, ["train.batch_size=4", "train.steps=3"]),
                             world=World()))
    per_rank = [list(RankSamples(1, cfg=cfg, world=World(r, size))) for r in range(size)]
    assert alone == list(range(4, 12))
    for step in range(2):  # each rank's share of a step, in rank order, is the step's samples
        share = len(per_rank[0]) // 2
        got = [i for r in per_rank for i in r[step * share:(step + 1) * share]]
        assert sorted(got) == alone[step * 4:(step + 1) * 4]
    first = list(RankSamples(1, cfg=cfg, world=World(0, size)))[:batch]
    assert first == list(range(4, 4 + batch))  # rank 0 takes the first tiles of a step


def test_prompts_of_a_tile_do_not_depend_on_its_batch():
    # Before: one generator drew every tile's prompts in turn, so splitting a batch over two
    # processes changed them. Now each set draws from its tile's seed: two halves give the
    # loss of the whole batch.
    torch.manual_seed(0)
    model = build_model("tiny", image_size=64)
    cfg = load_config(None, ["model.type=tiny", "model.image_size=64"])  # mixed, 2 rounds
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(4, 256, 4, 4, generator=g)
    label = torch.zeros(4, 1, 64, 64)
    label[0, :, 5:30, 10:20] = label[1, :, 40:60, 3:50] = label[3, :, 20:30, 20:30] = 1
    valid = torch.ones_like(label)
    seeds = tile_seeds(0, range(8, 12))

    def loss(rows: slice) -> float:
        out = prompted_forward(model, emb[rows], label[rows], valid[rows], seeds=seeds[rows],
                               prompt_cfg=cfg.prompts, loss_cfg=cfg.loss)
        return float(out.parts["loss"].detach())

    whole, halves = loss(slice(0, 4)), (loss(slice(0, 2)) + loss(slice(2, 4))) / 2
    assert halves == pytest.approx(whole, rel=1e-5)
    assert loss(slice(0, 4)) == whole  # a pure function of the seeds
    other = tile_seeds(0, range(12, 16))
    assert float(prompted_forward(model, emb, label, valid, seeds=other, prompt_cfg=cfg.prompts,
                                  loss_cfg=cfg.loss).parts["loss"].detach()) != whole


def test_two_processes_train_like_one_with_the_same_global_batch(data, tmp_path):
    # 1 process x batch 4 against 2 processes x batch 2: the same samples and prompts per step,
    # gradients averaged by DDP. fp32 (train.amp off); the rest is float summation order,
    # which Adam's normalisation turns into parameter differences of about lr per step for
    # parameters whose gradient is ~0: at lr 1e-5 they stay below 1e-6 (at the demo's 1e-3,
    # about 5e-5 after 3 steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes runs
    try:
        one = train(load_config(None, _args(data, tmp_path / "one", 4, "train.lr=1e-5")),
                    progress=False)
    finally:
        torch.set_num_threads(threads)  # later tests compare runs with the default count
    two = tmp_path / "two"
    results = _ok(run_ranks(train_worker, 2, _args(data, two, 2, "train.lr=1e-5")))
    assert results[1]["writes"] == []  # rank 1 wrote nothing into the run dir
    a, b = _losses(one), _losses(two)
    assert set(a) == set(b) == {1, 2, 3}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys()  # the unwrapped model: official key names
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    ca, cb = (torch.load(r / "last.pt", weights_only=True) for r in (one, two))
    assert (ca["world_size"], cb["world_size"]) == (1, 2)
    assert cb["best_threshold"] == ca["best_threshold"]
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}


def test_sharded_validation_agrees_with_one_process(data, tmp_path):
    args = _args(data, tmp_path / "v", 2)
    torch.manual_seed(0)
    s = setup(load_config(None, args), tmp_path / "v")
    alone = validate(s)
    shared, tiles = zip(*_ok(run_ranks(validate_worker, 2, args)), strict=True)
    assert sorted(tiles[0] + tiles[1]) == list(range(len(s.valid_set)))  # each scored once
    assert len(tiles[0]) > 1 and len(tiles[1]) > 1
    assert shared[0] == shared[1]  # every rank the same threshold and scores
    assert shared[0]["threshold"] == alone["threshold"]
    for k, v in alone.items():
        assert shared[0][k] == pytest.approx(v, abs=1e-6), k


def test_a_failing_rank_ends_every_rank_with_its_message(data, tmp_path):
    run = tmp_path / "run"
    results = run_ranks(train_worker, 2, _args(data, run, 2, "train.steps=4"), False, 2,
                        timeout=120)
    for r in results:
        assert r.get("error") == "TrainingError", r
        assert r["message"] == "rank 1: RuntimeError: boom in step 2"
    # the CLI prints the line where it happened only (rank 0 echoes it); before, each rank did
    assert [r["echo"] for r in results] == [True, False]
    assert not (run / "last.pt").exists()  # it failed before step 3's save


def test_a_failed_run_leaves_no_process_group_threads_behind(data, tmp_path):
    # Before: on the error path the exception's frames kept DDP, whose reducer holds the
    # process group, alive past destroy_process_group; gloo's worker threads lived on into
    # interpreter exit, where one releasing its last collective's tensor (which needs the GIL)
    # aborted the process ("terminate called without an active exception") about 1 run in 4.
    results = _ok(run_ranks(threads_after_failure_worker, 2,
                            _args(data, tmp_path / "run", 2, "train.steps=4"), 2, timeout=120))
    for r in results:
        assert r["error"] == "TrainingError"
        assert r["after"] == r["before"], r  # gloo's threads joined: the group is gone


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(data, tmp_path):
    run = tmp_path / "run"
    results = run_ranks(train_worker, 2, _args(data, run, 2, "train.steps=4"), False, None, 1)
    assert [(r.get("error"), r.get("step")) for r in results] == [("TrainingStopped", 2)] * 2
    assert [r["main"] for r in results] == [True, False]  # the CLI's line: rank 0 only
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2


def test_resume_on_another_process_count_with_the_same_global_batch(data, tmp_path):
    straight = train(load_config(None, _args(data, tmp_path / "a", 4, "train.steps=4")),
                     progress=False)
    run = tmp_path / "b"
    _ok(run_ranks(train_worker, 2, _args(data, run, 2, "train.steps=2")))  # 2 x 2, to step 2
    with pytest.raises(ConfigError, match=r"global batch of 4 tiles \(2 processes x "
                                          r"train.batch_size 2 x train.accumulate 1\).*"
                                          r"pass train.batch_size=4"):
        train(load_config(None, _args(data, run, 2, "train.steps=4")), resume=True,
              progress=False, given=["out", "train.steps"])
    resumed = train(load_config(None, _args(data, run, 4, "train.steps=4")), resume=True,
                    progress=False, given=["out", "train.steps", "train.batch_size"])  # 1 x 4
    a, b = _losses(straight), _losses(resumed)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    wa, wb = _weights(straight), _weights(resumed)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)


def test_frozen_encoder_cache_and_lora_train_under_ddp(data, tmp_path):
    # Prompt kinds vary per step, so some decoder-side parameters are unused in some steps:
    # without find_unused_parameters DDP would stop with "Expected to have finished reduction".
    runs = [_args(data, tmp_path / "cache", 2, "train.steps=4", "train.cache=memory",
                  "data.pixel_augment=false", "model.trainable=[mask_decoder]",
                  "prompts.first=box"),
            _args(data, tmp_path / "lora", 2, "train.steps=4", "model.lora_rank=2",
                  "data.pixel_augment=false", "train.accumulate=2")]
    _ok(run_ranks(settings_worker, 2, runs))
    for args in runs:
        ckpt = torch.load(Path(args[0].removeprefix("out=")) / "last.pt", weights_only=True)
        assert ckpt["step"] == 4
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    acc = EventAccumulator(str(tmp_path / "cache" / "tb"), size_guidance={"scalars": 0}).Reload()
    assert max(e.value for e in acc.Scalars("train/cache_hits")) > 0  # rank 0 reused embeddings


def test_torchrun_command_line_trains_two_processes(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "-m", "scrollsam", "train", "--no-progress",
           *_args(data, run, 2, "train.steps=2", "train.eval_every=2", "train.save_every=2")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run: ") == 1  # rank 0 alone reports
    assert {"config.yaml", "last.pt", "best.pt", "tb"} <= {p.name for p in run.iterdir()}
    assert torch.load(run / "last.pt", weights_only=True)["world_size"] == 2


@pytest.mark.parametrize("overrides", [[], ["data.input=slices", "data.strategy=range",
                                            "model.depth_encoder=true", "model.mask_head=full"]],
                         ids=["sam", "depth+head"])
def test_only_size_one_dims_of_a_gradient_differ_in_strides_from_its_parameter(overrides):
    """What lets wrap_for_ranks silence DDP's "Grad strides do not match bucket view strides":
    a gradient whose strides differ from its parameter's (SAM's 1 x 1 neck convolution, when
    autograd hands its gradient over as it is) differs only on size-1 dimensions, the same
    memory order; any other would be a real copy per step and must show. Both ways a gradient
    can arrive: the encoder's output alone, and a whole prompted step."""
    from scrollsam.model.assemble import model_from_config

    cfg = load_config(None, ["model.type=tiny", "model.image_size=64",
                             "model.trainable=[image_encoder,prompt_encoder,mask_decoder]",
                             *overrides])
    chans = 26 if cfg.model.depth_encoder else 3
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, chans, 64, 64, generator=gen)
    label = (torch.rand(2, 1, 64, 64, generator=gen) > 0.6).float()
    differ: dict[str, list] = {}
    for whole_step in (False, True):
        model = model_from_config(cfg.model, in_chans=chans).train()
        emb, pixels = model.encode_with_pixels(images)
        if whole_step:
            loss = prompted_forward(model, emb, label, torch.ones_like(label),
                                    prompt_cfg=cfg.prompts, loss_cfg=cfg.loss, gen=gen,
                                    features=pixels).parts["loss"]
        else:
            loss = emb.square().mean()
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None and p.grad.stride() != p.stride():
                differ[name] = [(a, b) for a, b, n in
                                zip(p.grad.stride(), p.stride(), p.shape, strict=True)
                                if n > 1 and a != b]
    assert "sam.image_encoder.neck.0.weight" in differ  # the case the filter is for
    assert all(not real for real in differ.values()), differ


def test_a_rank_killed_outright_ends_the_others_with_one_line_and_the_run_resumes(data, tmp_path):
    """Before: rank 0 printed gloo's traceback ("Connection closed by peer ... GLHF!") when rank
    1 was SIGKILLed. Now a PeerLost: one line saying how to continue, exit code 1."""
    from scrollsam.errors import PeerLost
    from scrollsam.train.distributed import peer_lost, resume_hint

    run = tmp_path / "run"
    codes, rank0 = run_ranks_one_killed(killed_at_eval_worker, 2, _args(
        data, run, 2, "train.steps=6", "train.eval_every=2", "train.save_every=2"))
    assert codes[1] == -9 and rank0["error"] == "PeerLost", rank0
    assert rank0["message"].startswith("another process of this torchrun run stopped (")
    assert rank0["message"].endswith(f"continue with `scrollsam train out={run} --resume`")
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2  # whole, resumable
    gloo = RuntimeError("[/x/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:43952. This is typically caused by a remote worker crashing.")
    lost = peer_lost(gloo, resume_hint(tmp_path / "gone"))
    assert isinstance(lost, PeerLost) and lost.exit_code == 1
    assert "(Connection closed by peer [127.0.0.1]:43952)" in str(lost)
    assert str(lost).endswith("the run had not started: start it again")
    reset = RuntimeError("[/x/pair.cc:545] Read error [127.0.0.1]:5: Connection reset by peer. "
                         "This is typically caused by a remote worker hanging or bugs in the "
                         "application. Check the logs of the remote worker before reporting")
    assert "(Read error [127.0.0.1]:5: Connection reset by peer); torchrun's" in str(
        peer_lost(reset, resume_hint(run)))  # the other way gloo says it, depending on timing
    assert peer_lost(RuntimeError("CUDA out of memory"), "") is None
    assert peer_lost(ValueError("Connection closed by peer"), "") is None


def test_a_bad_override_under_torchrun_is_printed_once(data, tmp_path):
    """Before: each process printed "error: unknown config key ..." (errors found before the
    processes met in training's first agreement)."""
    argv = ["train", "--no-progress", *_args(data, tmp_path / "run", 2), "train.stpes=3"]
    out = run_ranks(cli_worker, 2, argv)
    codes = [o["result"][0] for o in out]
    printed = "".join(o["result"][1] for o in out)
    assert codes == [2, 2], out
    assert printed.count("error: unknown config key train.stpes") == 1, printed
    assert not (tmp_path / "run").exists()
