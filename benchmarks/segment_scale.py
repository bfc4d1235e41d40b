"""Segment-scale prediction: memory per torchrun rank against one process, and a 20000 x 30000 px
synthetic segment predicted to OME-Zarr with the tiny model on the CPU.

Not part of ``make bench`` (the big run takes minutes); run it alone, never beside the tests::

    .venv/bin/python benchmarks/segment_scale.py                 # medium + big, ~10 min on 2 cores
    .venv/bin/python benchmarks/segment_scale.py --only medium   # 1 process vs 2 ranks, ~1 min

Fragments are written once into ``benchmarks/_work/segment_scale/`` (git-ignored) and reused:
three uint8 slices (the ``slices/triplet`` view of a 3-slice volume) as uncompressed TIFFs whose
pages outside the fragment mask are never written, so the files are sparse: the big segment's
volume is 1.8 GB in size but takes about its mask's share of that on disk. The mask is a slanted
band covering ``--mask-share`` of the segment (windows without a mask pixel are skipped, as for a
real segment's outline). The model is the ``tiny`` variant at 256 px with random weights (speed
does not depend on them), tiles 256 at stride 128, batch 8, fp32.

Each measurement runs the real command (``python -m scrollsam predict`` or ``python -m
torch.distributed.run --standalone --nproc-per-node 2 -m scrollsam predict``) in a subprocess
while this script samples ``RssAnon`` (resident memory not backed by files: the memory-mapped
slices do not count) of every process of the command every 50 ms; ``peak_anon_mb`` is the peak of
each process over the whole command (start-up, mask decoding, prediction, pyramid, previews).
Speed comes from the command's ``summary.json`` (prediction time of each rank) and from the wall
clock. Results: ``benchmarks/results_segment_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work" / "segment_scale"
RESULTS = ROOT / "benchmarks" / "results_segment_scale.json"
IMAGE_SIZE = 256
DEPTH = 3


def write_segment(path: Path, *, height: int, width: int, mask_share: float,
                  seed: int = 0) -> Path:
    """A Kaggle-layout fragment: mask.png (a slanted band of ``mask_share`` of the area) and
    3 sparse uncompressed uint8 slices holding a texture inside the mask only."""
    import cv2
    import tifffile

    if (path / "mask.png").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "surface_volume").mkdir(parents=True)
    xs = np.arange(width)
    centre = height / 2 + (xs - width / 2) * (0.3 * height / width)  # (W,) slanted band
    half = mask_share * height / 2
    rng = np.random.default_rng(seed)
    patch = rng.integers(40, 216, (DEPTH, 1024, 1024), dtype=np.uint8)  # texture tiles
    slices = [tifffile.memmap(tmp / "surface_volume" / f"{z:02d}.tif", shape=(height, width),
                              dtype=np.uint8) for z in range(DEPTH)]
    mask = np.zeros((height, width), np.uint8)
    for y0 in range(0, height, 1024):
        y1 = min(y0 + 1024, height)
        ys = np.arange(y0, y1)[:, None]
        inside = np.abs(ys - centre[None, :]) < half  # (b, W)
        cols = np.flatnonzero(inside.any(axis=0))
        if cols.size == 0:
            continue
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
        mask[y0:y1] = inside * np.uint8(255)
        for z, vol in enumerate(slices):
            tex = np.tile(patch[z], (2, (x1 - x0) // 1024 + 2))[:y1 - y0, :x1 - x0]
            shift = (y0 // 1024 * 7 + z) % 1024  # vary the texture from row block to row block
            tex = np.roll(tex, shift, axis=1)
            vol[y0:y1, x0:x1] = tex * inside[:, x0:x1]  # only the mask's columns: sparse file
    for vol in slices:
        vol.flush()
    del slices
    if not cv2.imwrite(str(tmp / "mask.png"), mask):
        raise OSError(f"cannot write {tmp / 'mask.png'}")
    tmp.rename(path)
    return path


def write_run(path: Path) -> Path:
    """A run folder (config.yaml + best.pt) of the tiny model on the 3-slice triplet view."""
    import torch

    from scrollsam import build_model
    from scrollsam.config import config_to_dict, load_config, save_config
    from scrollsam.train.checkpoint import TrainState, save_checkpoint

    if (path / "best.pt").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, ["model.type=tiny", f"model.image_size={IMAGE_SIZE}",
                             "train.batch_size=8", "train.amp=false", "data.input=slices",
                             "data.strategy=triplet", f"data.view={{depth: {DEPTH}}}"])
    save_config(cfg, path / "config.yaml")
    torch.manual_seed(0)
    model = build_model("tiny", image_size=IMAGE_SIZE, in_chans=3)
    save_checkpoint(path / "best.pt", model=model, optimizer=None,
                    state=TrainState(step=1, best_threshold=0.5), config=config_to_dict(cfg))
    return path


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _anon_mb(pid: int) -> tuple[str, float] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return cmd, int(fields.get("RssAnon", "0 kB").split()[0]) / 1024


def run_command(args: list[str], *, env: dict[str, str]) -> dict[str, Any]:
    """Run ``args``; peak RssAnon (MB) of each scrollsam process of it, wall seconds, output."""
    peaks: dict[int, float] = {}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for pid in _descendants(proc.pid):
                got = _anon_mb(pid)
                if got is not None and " predict " in got[0] and "torch.distributed" not in got[0]:
                    peaks[pid] = max(peaks.get(pid, 0.0), got[1])

    t0 = time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"wall_s": wall, "peak_anon_mb": sorted(peaks.values(), reverse=True),
            "output": output.strip().splitlines()[-3:]}


def predict(run: Path, frag: Path, out: Path, *, ranks: int, extra: list[str],
            threads: int | None = None) -> dict[str, Any]:
    """One `scrollsam predict --format zarr` (under torchrun with ``ranks`` > 1, which gives
    each rank OMP_NUM_THREADS=1 unless set) and its summary.json; ``threads`` sets
    OMP_NUM_THREADS (None: torch's default, every core, for one process)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = ["-m", "scrollsam", "predict", "--run-dir", str(run), "--fragment", str(frag),
           "--out", str(out), "--device", "cpu", "--format", "zarr", *extra]
    if ranks > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               *cmd]
    measured = run_command([sys.executable, *cmd], env=env)
    summary = json.loads((out / "summary.json").read_text())
    measured["ranks"] = [{k: r[k] for k in ("megapixels", "mask_megapixels", "tiles", "seconds",
                                            "megapixels_per_s", "peak_rss_anon_mb", "bands")}
                         for r in summary["ranks"]]
    measured["bytes_on_disk"] = int(subprocess.run(["du", "-sb", str(out / "prob.ome.zarr")],
                                                   capture_output=True, text=True,
                                                   check=True).stdout.split()[0])
    return measured


def same_output(a: Path, b: Path) -> bool:
    import zarr

    za, zb = (zarr.open_group(p / "prob.ome.zarr", mode="r") for p in (a, b))
    levels = len(za.attrs["multiscales"][0]["datasets"])
    keys = [str(i) for i in range(levels)] + [f"labels/ink/{i}" for i in range(levels)]
    return all(np.array_equal(za[k][:], zb[k][:]) for k in keys)


def medium(run: Path, side: int) -> dict[str, Any]:
    """1 process (all cores, then 1 thread) against 2 torchrun ranks of 1 thread each. Values
    are bit-identical for equal threads per process (thread counts change float sums)."""
    frag = write_segment(WORK / f"medium_{side}", height=side, width=side, mask_share=0.6)
    one_all = predict(run, frag, WORK / "out_medium_1_all", ranks=1, extra=[])
    one = predict(run, frag, WORK / "out_medium_1", ranks=1, extra=[], threads=1)
    two = predict(run, frag, WORK / "out_medium_2", ranks=2, extra=[])
    peak_one = one["peak_anon_mb"][0]
    return {"fragment": f"{side} x {side}", "one_process_all_threads": one_all,
            "one_process_1_thread": one, "two_ranks_1_thread": two,
            "rank_peak_over_single_1_thread": [p / peak_one for p in two["peak_anon_mb"]],
            "rank_peak_over_single_all_threads": [p / one_all["peak_anon_mb"][0]
                                                  for p in two["peak_anon_mb"]],
            "wall_speedup_2_ranks_vs_1_thread": one["wall_s"] / two["wall_s"],
            "bit_identical_2_ranks_vs_1_thread": same_output(WORK / "out_medium_1",
                                                             WORK / "out_medium_2"),
            "bit_identical_2_ranks_vs_all_threads": same_output(WORK / "out_medium_1_all",
                                                                WORK / "out_medium_2")}


def big(run: Path, height: int, width: int, mask_share: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    frag = write_segment(WORK / f"big_{height}x{width}", height=height, width=width,
                         mask_share=mask_share)
    made = time.perf_counter() - t0
    disk = int(subprocess.run(["du", "-sb", "--apparent-size", str(frag)], capture_output=True,
                              text=True, check=True).stdout.split()[0])
    used = int(subprocess.run(["du", "-sB1", str(frag)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    res = predict(run, frag, WORK / "out_big", ranks=1, extra=[])
    r = res["ranks"][0]
    return {"fragment": f"{height} x {width} x {DEPTH}", "mask_share": mask_share,
            "write_s": made, "volume_apparent_bytes": disk, "volume_disk_bytes": used,
            "predict": res, "mpx_per_s_whole_area": r["megapixels"] / r["seconds"],
            "mpx_per_s_mask_area": r["mask_megapixels"] / r["seconds"],
            "mpx_per_s_wall_whole_area": r["megapixels"] / res["wall_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("medium", "big"))
    p.add_argument("--medium-side", type=int, default=4096)
    p.add_argument("--height", type=int, default=20000)
    p.add_argument("--width", type=int, default=30000)
    p.add_argument("--mask-share", type=float, default=0.35)
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    run = write_run(WORK / "run")
    results: dict[str, Any] = {}
    if RESULTS.is_file():
        results = json.loads(RESULTS.read_text()).get("results", {})
    load = {"load_average_before": os.getloadavg()}
    if args.only in (None, "medium"):
        results["medium_1_vs_2_ranks"] = {**medium(run, args.medium_side), **load,
                                          "load_average_after": os.getloadavg()}
        print(json.dumps(results["medium_1_vs_2_ranks"], indent=1))
    if args.only in (None, "big"):
        load = {"load_average_before": os.getloadavg()}
        results["big_segment"] = {**big(run, args.height, args.width, args.mask_share), **load,
                                  "load_average_after": os.getloadavg()}
        print(json.dumps(results["big_segment"], indent=1))
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    RESULTS.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
