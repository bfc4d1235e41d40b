"""benchmarks/step_traffic.py: a training step counted on the meta device, CUDA's autocast
emulated, case names parsed back; nothing it patches outlives a count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_step  # noqa: E402
import step_traffic  # noqa: E402


def test_every_case_name_parses_back_to_its_case():
    for case in gpu_step.GPU_CASES + gpu_step.SMOKE_CASES:
        assert gpu_step.case_named(case.name) == case
    assert gpu_step.case_named("vit_b_1024_b12_triton+w16+free") == gpu_step.Case(
        "vit_b", 1024, 12, "triton", window=16, prompts="free")
    for bad in ("vit_b_1024_8_fold", "vit_b_1024_b8_flash", "vit_b_1024_b8_fold+free+center",
                "vit_b_1024_b8_fold+free+w16"):  # the last: flags out of the name's order
        with pytest.raises(ValueError, match="not a case name"):
            gpu_step.case_named(bad)


def test_autocast_emulation_follows_cudas_policy_on_meta():
    tally = step_traffic.Tally(by_node=False)
    x = torch.empty(4, 8, device="meta")
    w = torch.empty(16, 8, device="meta", requires_grad=True)
    with step_traffic.CudaAutocast(tally) as cast:
        y = F.linear(x, w)
        normed = F.layer_norm(y, (16,))
        total = y.sum()
        again = F.linear(x, w)
        with step_traffic._autocast_off(enabled=False):  # the loss's own float32 region
            plain = F.linear(x, w)
    assert (y.dtype, normed.dtype, total.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert again.dtype == torch.bfloat16 and len(cast.weights) == 1  # the weight cast once
    assert plain.dtype == torch.float32


def test_a_tiny_step_is_counted_by_phase_and_nothing_stays_patched():
    import scrollsam.mask_loss as mask_loss
    import scrollsam.model.rel_attention as rel_attention
    import scrollsam.train.step as step

    before = (step.sam_loss, step.corrective_points, mask_loss._float32,
              torch.nn.utils.clip_grad_norm_, rel_attention.available)
    tally = step_traffic.count_step(gpu_step.Case("tiny", 64, 2, "fold"))
    after = (step.sam_loss, step.corrective_points, mask_loss._float32,
             torch.nn.utils.clip_grad_norm_, rel_attention.available)
    assert after == before
    result = step_traffic.summary(tally, tflops=600.0, tbs=2.8)
    for phase in ("encoder", "bwd:encoder", "decoder", "bwd:decoder", "loss", "sampler",
                  "optim"):
        assert result["phases"][phase]["gb"] > 0, phase
    ops = {(o["phase"], o["op"]) for o in result["ops"]}
    # SDPA as one flash operator each way, not the score matrix of its math form
    assert ("encoder", "aten._scaled_dot_product_flash_attention") in ops
    assert ("bwd:encoder", "aten._scaled_dot_product_flash_attention_backward") in ops
    assert not any(op == "aten._softmax" for phase, op in ops if "encoder" in phase)
    total = result["total"]
    assert total["kernels"] == sum(p["kernels"] for p in result["phases"].values())
    adamw = [o for o in result["ops"] if o["op"] == "fused AdamW (modelled)"]
    assert len(adamw) == 1 and adamw[0]["phase"] == "optim"


def test_kernels_bytes_and_flops_follow_the_counting_rules():
    tally = step_traffic.Tally(by_node=False)
    x = torch.empty(1000, device="meta")  # 4000 bytes
    a, b = torch.empty(8, 16, device="meta"), torch.empty(16, 4, device="meta")
    with step_traffic.Counter(tally):
        y = x + 1  # read 4000, write 4000
        x.view(10, 100).t()  # views: no kernel
        y.add_(1)  # in place: read and write y
        torch.zeros(500, device="meta")  # a fill writes only
        torch.empty(500, device="meta")  # an allocation: no kernel
        a @ b  # 2 * 8 * 16 * 4 FLOPs
    rows = {op: row for (_, op), row in tally.ops.items()}
    assert rows["aten.add"] == [1, 8000, 0.0]
    assert rows["aten.add_"] == [1, 8000, 0.0]
    assert rows["aten.zeros"] == [1, 2000, 0.0]
    assert rows["aten.mm"] == [1, 4 * (128 + 64 + 32), 1024.0]
    assert set(rows) == {"aten.add", "aten.add_", "aten.zeros", "aten.mm"}


def test_compiled_cases_are_refused():
    with pytest.raises(ValueError, match="compiled steps"):
        step_traffic.count_step(gpu_step.Case("tiny", 64, 2, "fold", compile=True))


def test_the_triton_path_counts_its_own_operator_on_meta():
    pytest.importorskip("triton")
    tally = step_traffic.count_step(gpu_step.Case("tiny", 64, 2, "triton"))
    ops = {(phase, op) for phase, op in tally.ops}
    assert ("encoder", "scrollsam.rel_attention") in ops
    assert ("bwd:encoder", "scrollsam.rel_attention_backward") in ops


def test_expanded_axes_count_once_copy_targets_are_not_read_and_empty_ops_launch_nothing():
    tally = step_traffic.Tally(by_node=False)
    row = torch.empty(1, 100, device="meta")  # 400 bytes
    dst = torch.empty(10, 100, device="meta")
    with step_traffic.Counter(tally):
        torch.cat([dst, row.expand(10, 100)])  # reads 4000 + 400, writes 8000
        dst.copy_(row.expand(10, 100))  # reads 400, writes 4000
        torch.zeros(0, device="meta")
    rows = {op: row for (_, op), row in tally.ops.items()}
    assert rows == {"aten.cat": [1, 12400, 0.0], "aten.copy_": [1, 4400, 0.0]}


def test_softmax_and_interpolate_follow_cudas_policy_too():
    tally = step_traffic.Tally(by_node=False)
    x = torch.empty(2, 3, 4, 4, device="meta", dtype=torch.bfloat16)
    with step_traffic.CudaAutocast(tally):
        assert F.softmax(x, dim=-1).dtype == torch.float32
        assert F.interpolate(x, scale_factor=2.0, mode="bilinear").dtype == torch.float32


def test_the_bias_and_auto_paths_are_refused():
    with pytest.raises(ValueError, match="math form"):
        step_traffic.count_step(gpu_step.Case("tiny", 64, 2, "bias"))
    with pytest.raises(ValueError, match="resolves by device"):  # meta would take the CPU's
        step_traffic.count_step(gpu_step.Case("tiny", 64, 2, "auto"))
