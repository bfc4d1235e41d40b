"""The training loop on the CPU: run, resume exactly, refuse to overwrite, NaN guard, pictures."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scrollsam import prompts
from scrollsam.cli import main
from scrollsam.config import load_config
from scrollsam.doctor import run_doctor
from scrollsam.errors import ConfigError, FragmentError, RunDirError
from scrollsam.train import loop
from scrollsam.train.loop import TrainingError, train
from scrollsam.train.optim import lr_at, make_optimizer


def _cfg(data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"out={out}", f"data.root={data}", "data.train=[train/1]", "data.valid=[train/2]",
        "model.type=tiny", "model.image_size=64", "train.batch_size=3", "train.steps=4",
        "train.warmup=1", "train.eval_every=2", "train.save_every=2", "train.device=cpu",
        "log.every=1", "log.image_every=2", "prompts.corrective_rounds=1", *extra])


def _scalars(run: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_two_step_run_from_a_config_file(data, tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"out: {tmp_path / 'run'}\ndata:\n  root: {data}\n  train: [train/1]\n"
                   "  valid: [train/2]\nmodel:\n  type: tiny\n  image_size: 64\n"
                   "train:\n  steps: 2\n  batch_size: 3\n  eval_every: 1\n  device: cpu\n")
    code = main(["train", "--config", str(exp), "--no-progress"])
    run = tmp_path / "run"
    assert code == 0
    assert {"config.yaml", "best.pt", "last.pt", "tb"} <= {p.name for p in run.iterdir()}
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["type"] == "tiny"
    assert 0.0 <= ckpt["best_threshold"] <= 1.0
    # the best validation's expected threshold goes with it: prediction adapts from it
    best = torch.load(run / "best.pt", weights_only=True)
    logged = _scalars(run, "valid/expected_threshold")[best["best_step"]]
    assert best["best_expected_threshold"] == pytest.approx(logged, abs=1e-6)
    assert 0.01 <= best["best_expected_threshold"] <= 0.99


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    straight = train(_cfg(data, tmp_path / "a"), progress=False)
    # "killed" after step 2 (its last.pt), then resumed to step 4
    train(_cfg(data, tmp_path / "b", "train.steps=2"), progress=False)
    resumed = train(_cfg(data, tmp_path / "b"), resume=True, progress=False)
    a, b = _scalars(straight, "train/loss"), _scalars(resumed, "train/loss")
    assert set(a) == {1, 2, 3, 4}
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    wa = torch.load(straight / "last.pt", weights_only=True)["model"]
    wb = torch.load(resumed / "last.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)


def test_tensorboard_has_scalars_and_pictures(data, tmp_path):
    run = train(_cfg(data, tmp_path / "run", "train.steps=2"), progress=False)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/focal", "train/dice", "train/iou_mse", "train/lr",
                "train/tiles_per_s", "valid/f0.5", "valid/precision", "valid/recall",
                "valid/threshold"):
        assert tag in tags["scalars"], tag
    (image_tag,) = tags["images"]
    img = acc.Images(image_tag)[0]
    assert img.width == 4 * 64 and img.height == 64  # tile | truth | prediction | points


def test_pictures_can_be_turned_off(data, tmp_path):
    run = train(_cfg(data, tmp_path / "run", "train.steps=1", "log.images=false"),
                progress=False)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert acc.Tags()["images"] == []


def test_existing_run_dir_is_never_overwritten(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("precious")
    with pytest.raises(RunDirError, match="run dir exists.*--resume"):
        train(_cfg(data, run), progress=False)
    assert (run / "notes.txt").read_text() == "precious"
    assert main(["train", "--no-progress", f"out={run}", f"data.root={data}",
                 "data.train=[train/1]", "model.type=tiny", "model.image_size=64"]) == 2
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(_cfg(data, tmp_path / "empty"), resume=True, progress=False)


def test_nan_loss_stops_with_step_stats_and_saved_batch(data, tmp_path, monkeypatch):
    import scrollsam.train.loop as loop

    real = loop.prompted_forward

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.parts["loss"] = out.parts["loss"] * float("nan")
        return out

    monkeypatch.setattr(loop, "prompted_forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 0 .*image mean.*saved"):
        train(_cfg(data, tmp_path / "run"), progress=False)
    saved = torch.load(tmp_path / "run" / "nan_batch_step0.pt", weights_only=True)
    assert saved["image"].shape == (3, 3, 64, 64)


def test_nan_found_later_names_its_own_step_and_saves_its_own_batch(data, tmp_path, monkeypatch):
    # Losses stay on the device between log steps; the guard then finds the first bad one.
    import scrollsam.train.loop as loop

    real, seen = loop.prompted_forward, []

    def poisoned(model, emb, label, valid, **kwargs):
        out = real(model, emb, label, valid, **kwargs)
        seen.append(label.clone())
        if len(seen) == 2:  # step 1; the guard runs after steps 0 and 1 (log, then eval / save)
            out.parts["loss"] = out.parts["loss"] * float("inf")
        return out

    monkeypatch.setattr(loop, "prompted_forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss is inf at step 1 "):
        train(_cfg(data, tmp_path / "run", "log.every=3", "log.images=false"), progress=False)
    assert len(seen) == 2  # stopped before step 2, and before step 1's checkpoint
    assert not (tmp_path / "run" / "last.pt").exists()
    saved = torch.load(tmp_path / "run" / "nan_batch_step1.pt", weights_only=True)
    assert torch.equal(saved["label"], seen[1])  # the batch of step 1, rebuilt exactly


def test_cache_is_used_with_a_frozen_encoder_and_refused_when_it_trains(data, tmp_path,
                                                                         monkeypatch):
    moved: list[frozenset] = []  # what the batches' prefetch would move to a GPU

    class Spy(loop.DevicePrefetch):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            moved.append(self.move)

    monkeypatch.setattr(loop, "DevicePrefetch", Spy)
    with pytest.raises(ConfigError, match="frozen image encoder"):
        train(_cfg(data, tmp_path / "a", "train.cache=memory",
                   "model.trainable=[image_encoder,mask_decoder]"), progress=False)
    run = train(_cfg(data, tmp_path / "b", "train.cache=memory", "data.pixel_augment=false",
                     "model.trainable=[mask_decoder]"), progress=False)
    hits = _scalars(run, "train/cache_hits")
    assert max(hits.values()) > 0  # tiles repeat: embeddings were reused
    # the cache hashes the images on the host: they must not be sent to the device first
    train(_cfg(data, tmp_path / "c", "train.steps=1"), progress=False)
    assert moved == [frozenset({"label", "valid"}), frozenset({"image", "label", "valid"})]


def test_lr_schedule_warms_up_then_decays():
    cfg = load_config(None, ["train.steps=100", "train.warmup=10", "train.lr=1e-3"])
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] >= cfg.train.lr * cfg.train.min_lr_ratio


def test_doctor_is_healthy_on_the_builtin_case(capsys):
    assert run_doctor() == 0
    out = capsys.readouterr().out
    for name in ("input image", "embeddings", "points (x, y)", "sparse prompt emb",
                 "dense prompt emb", "mask logits", "iou predictions", "loss"):
        assert name in out
    assert "[3, 3, 64, 64]" in out  # batch of 3 kept through the stages
    assert "doctor: healthy" in out


@pytest.mark.parametrize("amp", [True, False])
def test_doctor_checks_in_the_precision_training_uses(monkeypatch, capsys, tmp_path, amp):
    # QA: doctor said "precision bf16" and then traced and overfit in float32 only.
    import contextlib

    from scrollsam import doctor
    from scrollsam.precision import autocast_for

    entered = []

    def spy(device, on):
        entered.append(on)
        return autocast_for(device, on)

    monkeypatch.setattr(doctor, "autocast_for", spy)
    cfg = doctor.default_config(tmp_path)
    cfg.train.amp = amp
    assert run_doctor(cfg) == 0
    assert entered and set(entered) == {amp}  # the trace and every overfitting step
    dtype = "bfloat16" if amp and not isinstance(autocast_for(torch.device("cpu"), True),
                                                 contextlib.nullcontext) else "float32"
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("mask logits"))
    assert dtype in line


def test_doctor_runs_a_config_with_the_full_resolution_head(capsys, tmp_path):
    """It failed with 'the model has a mask head, which needs the pixel features'."""
    from scrollsam.doctor import default_config

    cfg = default_config(tmp_path)
    cfg.model.mask_head = "full"
    assert run_doctor(cfg.validate()) == 0
    out = capsys.readouterr().out
    assert "full-res logits" in out and "doctor: healthy" in out


def test_doctor_catches_points_in_row_column_order(monkeypatch, capsys):
    real = prompts.random_points

    def swapped(*args, **kwargs):
        coords, labels = real(*args, **kwargs)
        return coords.flip(-1), labels  # (row, column): the seed's mistake

    monkeypatch.setattr(prompts, "random_points", swapped)
    assert run_doctor() == 1
    out = capsys.readouterr().out
    assert "FAIL  positive points land on ink" in out
    assert "are points (row, column)? SAM wants (x, y) = (column, row)" in out


def test_a_run_that_fails_before_training_leaves_no_run_dir(data, tmp_path):
    # A typo in a fragment path used to leave runs/x/config.yaml behind, so the corrected
    # command was refused with "run dir exists".
    run = tmp_path / "run"
    bad = _cfg(data, run, "data.train=[train/1,train/9]")
    with pytest.raises(FragmentError, match="train/9"):
        train(bad, progress=False)
    assert not run.exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty dir is the user's: it stays, still empty
    with pytest.raises(FragmentError):
        train(_cfg(data, empty, "data.train=[train/9]"), progress=False)
    assert empty.is_dir() and not any(empty.iterdir())
    assert train(_cfg(data, run, "train.steps=1"), progress=False) == run  # the retry works


@pytest.mark.parametrize("where", ["make_optimizer", "prompted_forward"])
def test_any_error_before_the_first_step_leaves_no_run_dir(data, tmp_path, monkeypatch, where):
    # Before: only errors in setup removed the new folder; one raised by the optimizer or in
    # the first step (torch's ValueError for a negative weight decay, a crash in the step)
    # left .lock, config.yaml, stats/ and tb/, and the corrected command met "run dir exists".
    def broken(*args, **kwargs):
        raise RuntimeError("not a ScrollsamError")

    monkeypatch.setattr(loop, where, broken)
    run, empty = tmp_path / "run", tmp_path / "empty"
    with pytest.raises(RuntimeError, match="not a ScrollsamError"):
        train(_cfg(data, run), progress=False)
    assert not run.exists()
    empty.mkdir()  # an existing empty dir is the user's: it stays, still empty
    with pytest.raises(RuntimeError):
        train(_cfg(data, empty), progress=False)
    assert empty.is_dir() and not any(empty.iterdir())
    monkeypatch.undo()
    assert train(_cfg(data, run, "train.steps=1"), progress=False) == run  # the retry works


def test_a_failed_run_that_cannot_be_removed_keeps_its_own_error_and_says_so(data, tmp_path,
                                                                            monkeypatch, caplog):
    # QA: with the open-file limit reached the removal failed silently (a retry then met "run
    # dir exists"); an OSError while emptying a given folder replaced the run's own error.
    import scrollsam.train.rundir as rundir

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir.shutil, "rmtree", refused)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING), pytest.raises(FragmentError, match="train/9"):
        train(_cfg(data, run, "data.train=[train/9]"), progress=False)
    assert (f"could not remove what the failed run wrote (Permission denied); remove it "
            f"before running the command again ({run})") in caplog.text


def test_an_error_after_the_first_step_or_on_resume_keeps_the_run_dir(data, tmp_path,
                                                                      monkeypatch):
    real, calls = loop.prompted_forward, []

    def broken_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("step 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "prompted_forward", broken_in_step_2)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="step 2"):
        train(_cfg(data, run, "train.save_every=1"), progress=False)
    assert (run / "last.pt").is_file() and (run / "config.yaml").is_file()

    def broken(*args, **kwargs):
        raise RuntimeError("first step of the resume")

    monkeypatch.setattr(loop, "prompted_forward", broken)
    with pytest.raises(RuntimeError, match="first step of the resume"):
        train(_cfg(data, run), resume=True, progress=False)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 1  # the user's, kept


def test_optimizer_is_fused_where_every_parameter_allows():
    plain = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(plain, lr=1e-3, weight_decay=0.0).defaults["fused"] is True
    mixed = plain + [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    assert not make_optimizer(mixed, lr=1e-3, weight_decay=0.0).defaults["fused"]


def test_last_pt_predicts_at_its_own_validations_threshold(data, tmp_path, monkeypatch):
    """Before: last.pt carried the best step's threshold only, so `predict --checkpoint last`
    cut last.pt's probabilities at a threshold validated for other weights (QA: 0.49, where
    last.pt's own validation found 0.17)."""
    from scrollsam.infer.predict import Predictor

    scripted = [(0.8, 0.49, 0.45), (0.5, 0.17, 0.2), (0.1, 0.3, 0.35)]  # (F0.5, thr., expected)
    real = loop.validate

    def scores(s):
        f, t, e = scripted.pop(0)
        return {**real(s), "f0.5": f, "threshold": t, "expected_threshold": e}

    monkeypatch.setattr(loop, "validate", scores)
    run = train(_cfg(data, tmp_path / "run"), progress=False)  # validates at steps 2 and 4
    last = torch.load(run / "last.pt", weights_only=True)
    assert (last["best_step"], last["best_threshold"]) == (2, 0.49)
    assert (last["threshold"], last["expected_threshold"], last["threshold_step"]) == (0.17, 0.2,
                                                                                      4)
    for checkpoint, threshold, reference in (("last", 0.17, 0.2), ("best", 0.49, 0.45)):
        rule = Predictor.from_run(run, checkpoint=checkpoint, device="cpu").rule
        assert (rule.value, rule.reference) == (threshold, reference), checkpoint
    train(_cfg(data, tmp_path / "run", "train.steps=5"), resume=True, progress=False)
    last = torch.load(run / "last.pt", weights_only=True)
    assert (last["threshold"], last["threshold_step"], last["best_step"]) == (0.3, 5, 2)


def test_losses_waiting_for_the_nan_guard_hold_no_autograd_graph(data, tmp_path, monkeypatch):
    # QA: with a large log.every each step's loss waited for the NaN guard with its whole
    # autograd graph (activations included): RSS grew ~2 MB a step at 64 px until a log step.
    seen: list[bool] = []
    real = loop._check_losses

    def check(s, losses):
        seen.extend(v.grad_fn is not None or v.requires_grad
                    for *_, parts in losses for v in parts.values())
        real(s, losses)

    monkeypatch.setattr(loop, "_check_losses", check)
    train(_cfg(data, tmp_path / "run", "log.every=1000", "train.eval_every=1000",
               "train.save_every=1000", "log.image_every=1000"), progress=False)
    assert len(seen) > 4 and not any(seen)  # 4 steps' parts, checked at the end
