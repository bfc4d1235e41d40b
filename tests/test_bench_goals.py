"""Goals on a benchmark's metrics, the entry selection of run.py, and the GPU goal entries'
measurement (run on a CPU with the tiny model: what a lent GPU runs must not break unseen)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run  # noqa: E402


def _entry(goal: float | None = None, **targets: tuple[str, float]) -> common.Benchmark:
    return common.Benchmark("x", lambda quick: {}, goal, "about", targets=targets)


def test_targets_bound_metrics_and_a_missing_metric_fails():
    entry = _entry(images_per_s=(">=", 60.0), peak_gb=("<=", 8.0))
    assert entry.passed({"metrics": {"images_per_s": 60.0, "peak_gb": 8.0}}) is True
    assert entry.passed({"metrics": {"images_per_s": 59.9, "peak_gb": 5.0}}) is False
    assert entry.passed({"metrics": {"images_per_s": 70.0, "peak_gb": 8.1}}) is False
    assert entry.passed({"metrics": {"images_per_s": 70.0}}) is False  # peak_gb not measured
    assert entry.goal_text() == "images_per_s >= 60, peak_gb <= 8"


def test_a_ratio_goal_and_targets_must_both_hold():
    entry = _entry(2.0, images_per_s=(">=", 1.0))
    assert entry.passed({"ratio": 2.5, "metrics": {"images_per_s": 3.0}}) is True
    assert entry.passed({"ratio": 1.5, "metrics": {"images_per_s": 3.0}}) is False
    assert entry.goal_text() == ">= 2, images_per_s >= 1"
    assert _entry().passed({"ratio": 0.1}) is None and _entry().goal_text() == "-"
    row = common.table_row(entry, {"metrics": {"images_per_s": 3.0}, "passed": False})
    assert row[4:6] == [">= 2, images_per_s >= 1", "FAIL"]


def test_run_one_records_targets_and_whether_they_held():
    entry = common.Benchmark("_t", lambda quick: {"metrics": {"peak_gb": 9.0}}, None, "about",
                             targets={"peak_gb": ("<=", 8.0)})
    result = run.run_one(entry, quick=True)
    assert result["targets"] == {"peak_gb": "<= 8"} and result["passed"] is False


def test_register_refuses_a_target_that_is_not_a_bound():
    with pytest.raises(ValueError, match="'>=' or '<='"):
        common.register("_bad", goal=None, about="a", targets={"x": ("==", 1.0)})


def test_only_takes_names_and_patterns_in_order_and_names_what_matched_nothing():
    entries = {n: _entry() for n in ("gpu_a", "gpu_b", "cpu_c")}
    assert run.select(entries, "cpu_c,gpu_*") == (["cpu_c", "gpu_a", "gpu_b"], [])
    assert run.select(entries, "gpu_b, gpu_*,nope*") == (["gpu_b", "gpu_a"], ["nope*"])


def test_card_peaks_tell_the_h100_parts_apart():
    from bench_gpu import card_peak_tflops

    assert card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert card_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert card_peak_tflops("NVIDIA H200") == 989.0
    assert card_peak_tflops("Tesla V100-SXM2-16GB") is None  # unknown: no share is guessed


def test_the_harness_uses_the_checkout_where_scrollsam_is_not_installed():
    """A lent GPU machine has torch but no network, so scrollsam is not installed there:
    importing the harness puts the checkout's src/ on the path (else every entry file fails)."""
    code = ("import sys; sys.modules['scrollsam'] = None; "  # as if not installed
            f"sys.path.insert(0, {str(BENCH)!r}); import common; print(sys.path[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert Path(out) == BENCH.parent / "src"


def test_goal_entry_times_both_cases_per_image_and_shares_the_official_work():
    """The measurement behind the gpu_train_* entries, on a CPU with the tiny model: per-image
    seconds, the ratio of throughputs, and the share of peak from the official path's FLOPs."""
    import torch
    from bench_gpu_train import train_goal
    from gpu_step import Case

    base, ours = Case("tiny", 128, 2, "official"), Case("tiny", 128, 4, "fold")
    result = train_goal(base, ours, device=torch.device("cpu"), quick=True, peak_tflops=1.0)
    runs = result["cases"]
    assert list(runs) == [base.name, ours.name]
    assert result["baseline_s"] == pytest.approx(runs[base.name]["step_s"] / 2)
    assert result["ours_s"] == pytest.approx(runs[ours.name]["step_s"] / 4)
    assert result["ratio"] == pytest.approx(result["baseline_s"] / result["ours_s"])
    metrics = result["metrics"]
    assert metrics["images_per_s"] == pytest.approx(1 / result["ours_s"])
    official_flops = runs[base.name]["flops_per_image"]
    assert metrics["share_of_peak"] == pytest.approx(
        official_flops * metrics["images_per_s"] / 1e12)
    assert "peak_gb" not in metrics  # no GPU memory on a CPU
    assert result["settings"]["peak_tflops"] == 1.0


def test_validation_entry_times_the_host_and_the_device_histogram():
    import torch
    from bench_gpu_train import validation_host_vs_device

    result = validation_host_vs_device("tiny", 64, 2, device=torch.device("cpu"), quick=True)
    assert result["ratio"] > 0 and result["metrics"]["tiles_per_s_device"] > 0
    assert result["settings"]["tiles"] == 4


def test_goal_entry_judges_its_own_case_when_the_official_one_fails(monkeypatch):
    """An official baseline out of memory must not cost the memory goal, which needs only
    scrollsam's numbers; the table row says why the other goal failed."""
    import bench_gpu_train
    import torch
    from gpu_step import Case

    base, ours = Case("tiny", 128, 2, "official"), Case("tiny", 128, 2, "fold")
    real = bench_gpu_train.run_case

    def run_case(case, *args, **kwargs):
        if case == base:
            return {"case": {}, "error": "out of memory: tried to allocate 9 GiB"}
        return real(case, *args, **kwargs)

    monkeypatch.setattr(bench_gpu_train, "run_case", run_case)
    result = bench_gpu_train.train_goal(base, ours, device=torch.device("cpu"), quick=True,
                                        peak_tflops=1.0)
    assert "out of memory" in result["baseline_error"] and "ratio" not in result
    assert result["metrics"]["images_per_s"] > 0
    assert "share_of_peak" not in result["metrics"]  # no official FLOPs: that goal fails
    entry = _entry(images_per_s=(">=", 0.0), share_of_peak=(">=", 0.0))
    assert entry.passed(result) is False
    row = common.table_row(entry, {**result, "passed": False})
    assert "share_of_peak not measured" in row[6] and "baseline failed: out of memory" in row[6]


def test_the_table_shows_what_the_targets_judged():
    entry = _entry(images_per_s=(">=", 60.0), peak_gb=("<=", 8.0))
    row = common.table_row(entry, {"baseline_s": 0.1, "ours_s": 0.01, "ratio": 10.0,
                                   "metrics": {"images_per_s": 84.5}, "passed": False,
                                   "settings": {"ours": "x"}})
    assert row[6] == "images_per_s=84.5 peak_gb not measured ours=x"


def test_a_run_killed_part_way_keeps_the_entries_it_finished(tmp_path, monkeypatch):
    def killed(quick: bool) -> dict:
        raise KeyboardInterrupt  # what a time limit's signal does to the run, part-way

    entries = {"_done": common.Benchmark("_done", lambda quick: {"ratio": 2.0}, None, "a"),
               "_killed": common.Benchmark("_killed", killed, None, "b")}
    monkeypatch.setattr(run, "load_entries", lambda: entries)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        run.main(["--only", "_done,_killed", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["results"]["_done"]["ratio"] == 2.0 and "_killed" not in doc["results"]
    assert doc["machine"]["entries_run"] == ["_done"]
