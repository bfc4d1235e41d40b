"""The benchmark harness's pure helpers (no benchmark runs here: `make bench` runs them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run  # noqa: E402
from fake_clock import FakeClock  # noqa: E402


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", fake)
    return fake


def test_compare_alternates_warms_up_and_reports_median_ratio(clock):
    calls = []
    slow_times = iter([9.0, 3.0, 100.0, 3.0, 5.0])  # warm-up 9 (ignored), then 3, 100, 3, 5

    def baseline():
        calls.append("b")
        clock.now += next(slow_times)

    def ours():
        calls.append("o")
        clock.now += 1.0

    result = common.compare(baseline, ours, repeats=4, warmup=1)
    assert calls == ["b", "o", "b", "o", "o", "b", "b", "o", "o", "b"]  # order flips each round
    assert result["baseline_times_s"] == [3.0, 100.0, 3.0, 5.0]
    assert result["baseline_s"] == 4.0  # median, not mean: the 100 s outlier does not count
    assert result["ours_s"] == 1.0
    assert result["ratio"] == 4.0
    assert result["repeats"] == 4


def test_merge_keeps_entries_a_subset_run_did_not_measure(tmp_path):
    out = tmp_path / "results.json"
    m1 = {**common.machine_info(), "device": "cuda-box"}
    common.merge_results(out, m1, {"a": {"ratio": 2.0}, "b": {"ratio": 3.0}})
    m2 = common.machine_info()
    doc = common.merge_results(out, m2, {"b": {"ratio": 5.0}})
    assert json.loads(out.read_text()) == doc
    assert doc["machine"] == m2
    assert doc["results"]["a"]["ratio"] == 2.0
    assert doc["results"]["a"]["measured_on"]["device"] == "cuda-box"  # kept, still traceable
    assert doc["results"]["b"]["ratio"] == 5.0
    assert doc["results"]["b"]["measured_on"]["device"] == m2["device"]


def test_table_rows_for_comparisons_skips_and_errors():
    bench = common.Benchmark("x", lambda quick: {}, 2.0, "about")
    row = common.table_row(bench, {"ratio": 5.0, "baseline_s": 2.5, "ours_s": 0.5,
                                   "passed": True, "settings": {"B": 4, "P": 16}})
    assert row == ["x", "2.50 s", "500.0 ms", "5.00x", ">= 2", "pass", "B=4 P=16"]
    assert common.table_row(bench, {"skipped": "needs CUDA"})[5:] == ["skipped", "needs CUDA"]
    assert common.table_row(bench, {"error": "boom"})[5] == "ERROR"
    table = common.format_table([row])
    assert table.splitlines()[0].startswith("| benchmark")
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned


def test_every_entry_file_registers_and_gpu_entries_skip_without_cuda(monkeypatch):
    entries = run.load_entries()
    for name in ("decode_batched_vs_loop", "decode_batched_vs_loop_1024",
                 "encoder_256_vs_upsampled_1024", "tile_read_vs_full_slice"):
        assert entries[name].goal is not None
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    gpu = [b for b in entries.values() if b.name.startswith("gpu_")]
    assert gpu and all(run.run_one(b, quick=True)["skipped"] for b in gpu)


def test_gpu_bench_shares_of_peak_count_the_path_and_the_official_work():
    import bench_gpu

    def case(path, window=None, compile=False):
        return {"model": "vit_b", "size": 256, "batch": 32, "path": path, "window": window,
                "compile": compile}

    def timed(c, images_per_s, flops=None):
        r = {"case": c, "images_per_s": images_per_s, "step_s": 32 / images_per_s}
        return {**r, "flops_per_image": flops} if flops else r

    results = {
        "off": timed(case("official"), 100.0, 2e11),
        "fold": timed(case("fold"), 200.0, 2.5e11),
        "fold_c": timed(case("fold", compile=True), 400.0),
        "w16": timed(case("fold", 16), 300.0, 1e11),
        "oom": {"case": case("bias"), "error": "out of memory"},
    }
    bench_gpu.add_mfu(results, peak_flops=1e15)
    assert results["off"]["mfu"] == pytest.approx(0.02)
    assert results["fold"]["mfu"] == pytest.approx(0.05)  # its own, wider-head FLOPs
    assert results["fold"]["mfu_official"] == pytest.approx(0.04)  # the official work
    assert results["fold_c"]["mfu"] == pytest.approx(0.1)  # counted on its eager twin
    assert results["w16"]["mfu"] == pytest.approx(0.03)
    assert results["w16"]["mfu_official"] == pytest.approx(0.06)
    assert "mfu" not in results["oom"]
    table = bench_gpu.format_rows(results)
    oom_row = next(line for line in table.splitlines() if "out of memory" in line)
    assert "%" not in oom_row  # no share of peak for a case that did not run


def test_gpu_bench_runs_end_to_end_on_a_cpu_in_smoke_mode(tmp_path):
    """The script a lent GPU runs must not break where CI cannot see it: its smoke mode runs
    the same code (exactness check, a real training step per case, a profile, the JSON)."""
    import json

    import bench_gpu

    out = tmp_path / "gpu.json"
    code = bench_gpu.main(["--smoke", "--out", str(out), "--steps", "1", "--warmup", "1",
                           "--cases", "tiny_128_b2_fold+xray,tiny_128_b2_fold,"
                           "tiny_128_b2_fold+center", "--profile", "tiny_128_b2_fold+center"])
    assert code == 0
    doc = json.loads(out.read_text())
    runs = doc["results"]
    # in the order named, not the list's (where +xray is last): the budget cuts from the end
    assert list(runs) == ["tiny_128_b2_fold+xray", "tiny_128_b2_fold", "tiny_128_b2_fold+center"]
    assert all(r["images_per_s"] > 0 and r["flops_per_image"] > 0 for r in runs.values())
    # 26 slices through the depth encoder and the full-resolution head: more work per image
    assert runs["tiny_128_b2_fold+xray"]["flops_per_image"] > runs["tiny_128_b2_fold"][
        "flops_per_image"]
    assert doc["exactness"]["fold_fp32"] < 1e-4 and doc["exactness"]["fold_fp32_grads"] < 1e-4
    assert "aten::" in (tmp_path / "profile_tiny_128_b2_fold-center.txt").read_text()


def test_gpu_sync_count_counts_what_sync_debug_mode_reports(monkeypatch):
    """``count_syncs`` runs only on CUDA; here ``set_sync_debug_mode`` is faked around a step
    that warns as the debug mode would, for its loss read and for a stray wait."""
    import warnings

    import torch
    from gpu_step import count_syncs

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step() -> float:
        if modes[-1] == "warn":
            for _ in range(2):  # a stray wait, and the loss read
                warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
            warnings.warn("something else", stacklevel=2)
        return 1.0

    assert count_syncs(step) == 2
    assert modes == ["warn", "default"]


def test_attention_block_table_shows_both_timings_and_errors():
    """``--attention``'s table runs only on a GPU: its formatting is checked here."""
    from gpu_attention import format_blocks

    table = format_blocks({"1024_global": {
        "fold": {"ms": 8.61, "peak_mb": 10.0, "forward_ms": 2.5},
        "triton": {"error": "OutOfResources: shared memory"}}})
    assert "8.61/  2.50" in table and "err" in table
    assert "1024_global/triton: OutOfResources" in table
    ran = format_blocks({"1024_global": {
        "fold": {"ms": 8.6, "peak_mb": 10.0, "forward_ms": 2.4, "rel_diff": 0.0101},
        "triton": {"ms": 4.3, "peak_mb": 8.0, "forward_ms": 1.6, "rel_diff": 0.0123}}})
    assert " 2.00x/ 1.50x" in ran.splitlines()[1]  # fold's time over triton's
    assert "1024_global: fold 1.0e-02, triton 1.2e-02" in ran  # the value check


@pytest.mark.parametrize("available", [True, False])
def test_gpu_compile_cases_decode_static_sets_only_with_a_compiled_decoder(available,
                                                                          monkeypatch):
    """As the training loop: static prompt sets (every set in every round) only where the
    decoder did compile; where compile cannot run they would be extra work for nothing."""
    import torch
    from gpu_step import Case, make_step
    from torch import _dynamo as dynamo

    from scrollsam.model import compile as compile_mod
    from scrollsam.train import step as step_mod

    if not available:  # inductor on a CPU without a C++ compiler: one warning, eager
        monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
        monkeypatch.delenv("CXX", raising=False)
    seen = []

    def forward(*args, static: bool = False, **kwargs):
        seen.append(static)
        raise StopIteration  # the decision is all this test needs

    monkeypatch.setattr(step_mod, "prompted_forward", forward)
    dynamo.reset()
    try:
        step, _ = make_step(Case("tiny", 64, 1, "fold", compile=True), torch.device("cpu"),
                            compile_backend="aot_eager" if available else "inductor")
        with pytest.raises(StopIteration):
            step()
    finally:
        dynamo.reset()
    assert seen == [available]


@pytest.mark.parametrize("mode", ["fold", "bias", "explicit"])
def test_gpu_windowed_block_shapes_time_the_official_function(mode):
    """The ``--attention`` table's windowed-grid rows: FusedBlock's regions against the official
    padded windows, same values (on a CPU: these build and agree before a GPU times them)."""
    import torch
    from gpu_attention import BLOCK_SHAPES, _block

    assert ("256_windowed_grid", 16, 32, 14) in BLOCK_SHAPES
    cpu = torch.device("cpu")
    x = torch.randn(2, 16, 16, 768, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _block(16, "official", cpu, window=14)(x)  # (2, 16, 16, 768)
        got = _block(16, mode, cpu, window=14)(x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_gpu_profile_summary_counts_busy_time_gaps_and_classes_once():
    """The profile's summary from device kernels (start, end in us, name): overlapping kernels
    count their union as busy time, the gaps between them are named by their neighbours, and
    each kernel falls in one class."""
    from gpu_profile import kernel_class, summarise

    kernels = [(0.0, 1000.0, "nvjet_sm90_tst_192x192"),  # 1 ms product
               (500.0, 1500.0, "triton_poi_fused_add_0"),  # overlaps it by 0.5 ms
               (3500.0, 4500.0, "backward_kv"),  # after a 2 ms gap
               (4500.0, 5000.0, "void at::native::upsample_bilinear2d_out_frame<float>")]
    report = summarise(kernels, wall_s=0.01, steps=1)
    assert "device busy 3.0 ms (30%)" in report  # 0 - 1.5 ms and 3.5 - 5 ms, of 10 ms
    assert "kernel time 3.5 ms in 4 kernels" in report
    assert "2.00  triton_poi_fused_add_0 -> backward_kv" in report  # the one gap over 20 us
    assert kernel_class("backward_kv") == "rel_attention triton (scrollsam)"
    assert kernel_class("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == \
        "matrix products"
    assert kernel_class("triton_red_fused_native_layer_norm_3") == \
        kernel_class("triton_red_fused_convolution_backward_sum_2") == "compiled fused (inductor)"
    assert kernel_class("void gemmSN_TN_kernel<float, 128, 16>") == "matrix products"
    assert kernel_class("void implicit_convolve_sgemm<__nv_bfloat16, 1024, 5>") == \
        "convolutions (cuDNN)"  # a convolution, though its name holds "gemm"
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == \
        kernel_class("void cudnn::fusion::compute_dot_do_o<true>") == \
        "SDPA (cuDNN, flash, efficient)"
    assert kernel_class("upsample_bilinear2d_backward_out_frame") == "upsample"
    assert kernel_class("something_else") == "other"
    assert "0.00 " not in report.split("longest idle gaps")[1].split("kernels by")[0]


def test_gpu_profile_leaves_user_annotations_out_of_the_kernels():
    """An optimizer's step shows as a device range of a user annotation beside its kernels:
    counting it as a kernel would count the optimizer twice."""
    from types import SimpleNamespace

    from gpu_profile import _kernels
    from torch.autograd import DeviceType

    def event(name: str, start: float, end: float, **extra: object) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA,
                               time_range=SimpleNamespace(start=start, end=end), **extra)

    events = [event("Optimizer.step#AdamW.step", 0.0, 10.0, is_user_annotation=True),
              event("multi_tensor_apply_kernel", 1.0, 4.0),
              SimpleNamespace(name="aten::add", device_type=DeviceType.CPU,
                              time_range=SimpleNamespace(start=0.0, end=1.0))]
    assert _kernels(SimpleNamespace(events=lambda: events)) == [
        (1.0, 4.0, "multi_tensor_apply_kernel")]


def test_gpu_bench_rejects_a_profile_of_a_case_not_run_before_any_work(tmp_path):
    """A mistyped --profile name would cost the GPU time spent before it is read: it ends the
    run at once (argparse's exit 2), nothing measured or written."""
    import bench_gpu

    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as stop:
        bench_gpu.main(["--smoke", "--out", str(out), "--cases", "tiny_128_b2_fold",
                        "--profile", "tiny_128_b2_bias"])
    assert stop.value.code == 2 and not out.exists()
