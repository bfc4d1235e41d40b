"""Sharded prediction on 2 CPU processes (gloo): the OME-Zarr and PNG outputs of 2 ranks equal one
process's bit for bit, through the real `torchrun ... -m scrollsam predict` and through
torch.multiprocessing; a rank that fails ends every rank with one clear error, no hang."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ddp_helpers import free_port
from infer_helpers import band_data, make_run, sharded_worker, zarr_files

from scrollsam.cli import main
from scrollsam.infer.pipeline import predict_to_folder

SRC = Path(__file__).resolve().parents[1] / "src"
BANDS = ["--chunk", "32", "--band-rows", "64"]  # 150 rows: 3 bands, rank 0 gets 2, rank 1 one


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = band_data(tmp_path_factory.mktemp("sharded"))
    # a run whose threshold adapts to the fragment: rank 0 rewrites the OME-Zarr mask
    make_run(root / "adaptive", "data.input=ir", best=0.5, reference=0.3)
    return root


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_WAIT_POLICY": "PASSIVE",
            "OMP_NUM_THREADS": "1"}  # torchrun's default for its ranks, said explicitly


@contextlib.contextmanager
def one_thread():
    """One CPU thread here, as each rank has (torchrun's OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_torchrun_two_ranks_write_the_ome_zarr_of_one_process_bit_for_bit(data, tmp_path,
                                                                           capsys):
    # --run-dir, not --run: torchrun's own parser takes --run for an abbreviation of its
    # --run-path and stops with "ambiguous option"
    args = ["--run-dir", str(data / "adaptive"), "--fragment", str(data / "frag"), "--device",
            "cpu", "--format", "zarr", *BANDS]
    with one_thread():  # as torchrun's ranks: float sums depend on the thread count
        assert main(["predict", *args, "--out", str(tmp_path / "one"),
                     "--submission", str(tmp_path / "one.csv")]) == 0
    capsys.readouterr()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "scrollsam", "predict", *args, "--out", str(tmp_path / "two"),
         "--submission", str(tmp_path / "two.csv")],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("frag: ") == 1  # rank 0 reports, once
    one, two = tmp_path / "one", tmp_path / "two"
    for a, b in zip(zarr_files(one), zarr_files(two), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    for name in ("prob_preview.png", "mask_preview.png", "metrics.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
    import json

    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and [r["bands"] for r in summary["ranks"]] == [2, 1]
    assert summary["threshold_rule"] == "adapted" and summary["threshold"] != 0.5
    again = subprocess.run(  # resumed with nothing left: the job's bands, not rank 0's 2 of 2
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "scrollsam", "predict", *args, "--out", str(tmp_path / "two")],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(3 of 3 bands already done)" in again.stdout, again.stdout


def test_png_mode_on_two_ranks_equals_one_process_and_a_failing_rank_ends_both(data, tmp_path,
                                                                              monkeypatch):
    common = dict(run=data / "run", fragments=[data / "frag"], device="cpu", chunk=32,
                  band_rows=64, fmt="png")
    with one_thread():
        predict_to_folder(out=tmp_path / "one", **common)
    jobs = [("png", {**common, "out": tmp_path / "two"}, None),
            ("fail", {**common, "out": tmp_path / "fail", "fmt": "zarr"}, 1)]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by the spawned ranks' torch
    mp.spawn(sharded_worker, args=(2, free_port(), jobs, tmp_path), nprocs=2, join=True)
    assert (tmp_path / "png-0.txt").read_text() == "ok" == (tmp_path / "png-1.txt").read_text()
    for name in ("prob.png", "mask.png", "overlay.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not (tmp_path / "two" / ".predict-prob.npy").exists()  # the scratch map is gone
    assert (tmp_path / "fail-1.txt").read_text() == "InputError: boom on purpose"
    assert (tmp_path / "fail-0.txt").read_text() == ("RankError: rank 1 of 2 failed: "
                                                     "InputError: boom on purpose")
    assert not (tmp_path / "fail" / "metrics.json").exists()


def test_a_mistake_under_torchrun_is_printed_once(data, tmp_path):
    """Before: each process printed it (``--tile 4``, a missing checkpoint: every check ran
    before the processes met)."""
    from ddp_helpers import cli_worker, run_ranks

    common = ["predict", "--run-dir", str(data / "run"), "--fragment", str(data / "frag"),
              "--device", "cpu", "--out", str(tmp_path / "out")]
    for extra, said in ((["--tile", "4"], "error: --tile: expected an integer >= 16"),
                        (["--checkpoint", str(tmp_path / "nope.pt")],
                         "error: checkpoint not found")):
        out = run_ranks(cli_worker, 2, [*common, *extra])
        printed = "".join(o["result"][1] for o in out)
        assert [o["result"][0] for o in out] == [2, 2], out
        assert printed.count(said) == 1 and printed.count("error:") == 1, printed
    assert not (tmp_path / "out").exists()


def test_a_rank_killed_outright_ends_the_others_with_one_line(data, tmp_path):
    """Before: rank 0 ended with gloo's traceback ("Connection closed by peer ...") when rank 1
    was SIGKILLed mid-prediction. Now PeerLost: one line saying how to go on, exit code 1."""
    from ddp_helpers import run_ranks_one_killed
    from infer_helpers import killed_in_predict_worker

    kwargs = dict(run=data / "run", fragments=[data / "frag"], out=tmp_path / "out",
                  device="cpu", fmt="zarr", chunk=32, band_rows=64)
    codes, rank0 = run_ranks_one_killed(killed_in_predict_worker, 2, kwargs)
    assert codes[1] == -9 and rank0["error"] == "PeerLost", rank0
    assert rank0["message"].startswith("another process of this torchrun run stopped (")
    assert rank0["message"].endswith("run the same command again (an OME-Zarr prediction "
                                      "continues from its finished bands)")
