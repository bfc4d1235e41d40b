"""The rel_attention kernels compiled for an H100 without one (``benchmarks/kernel_sass.py``).

CI has no GPU, but Triton carries ptxas and cuobjdump: each kernel is compiled here for sm_90
and its machine code read. Beyond "it compiles", the hot loops keep what makes them fast there:
tensor-core products and no register spills in bf16, one exp2 per softmax term without a
denormal check around it, and no per-score select where the grid has no padding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scrollsam.model import rel_attention as ra

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_sass  # noqa: E402

needs_tuned_kernels = pytest.mark.skipif(
    ra.triton is None or not ra._TUNED,
    reason="no Triton, or kernels defined under its interpreter in this process")

SASS = """
        code for sm_90
                Function : first
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   MUFU.EX2 R4, R2 ;
        /*0030*/              @!P1 BRA 0x10 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0050*/                   FFMA R5, R5, R6, R7 ;
        /*0060*/                   FSEL R5, R5, RZ, P0 ;
        /*0070*/             @!UP0 BRA.U 0x40 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
                Function : second
        /*0000*/                   IMAD R1, R2, R3, R4 ;
        /*0010*/                   BRA.DIV UR4, 0x30 ;
        /*0020*/                   BRA !P0, 0x0 ;
"""


def test_hot_loop_is_the_longest_backward_branch():
    loop = kernel_sass.hot_loop(SASS)
    assert loop == {"HGMMA": 1, "FFMA": 1, "FSEL": 1, "BRA": 1}  # 0x40-0x70, not 0x10-0x30
    forward = SASS.replace("BRA.U 0x40", "BRA.U 0x80")  # a forward branch is no loop
    assert kernel_sass.hot_loop(forward) == {"FADD": 1, "MUFU": 1, "BRA": 1}


def test_each_function_is_read_from_its_own_addresses():
    """The second function's addresses start at 0 again: its loop (0x0-0x20) must not reach
    back into the first function."""
    second = SASS[SASS.index("                Function : second"):]
    assert kernel_sass.hot_loop(second) == {"IMAD": 1, "BRA": 2}
    assert kernel_sass.hot_loop(SASS.replace("BRA.U 0x40", "BRA.U 0x80")) == {
        "FADD": 1, "MUFU": 1, "BRA": 1}  # 3 instructions: longer than second's, not merged


def test_the_final_self_branch_is_no_hot_loop():
    assert kernel_sass.hot_loop("        /*0080*/                   BRA 0x80;\n") == {}


def test_a_branch_it_cannot_read_is_an_error_not_a_lost_loop():
    with pytest.raises(ValueError, match="cannot read the branch target"):
        kernel_sass.hot_loop("        /*0010*/                   BRA `(.L_x_1) ;\n")


def _measure(kernel: str, grid: tuple[int, int], dtype: str, config, head_dim: int = 64) -> dict:
    """kernel_sass.measure, or a skip where this Triton has no ptxas or cuobjdump."""
    try:
        return kernel_sass.measure(kernel, grid, dtype, config, head_dim)
    except FileNotFoundError:
        pytest.skip("no cuobjdump in this Triton install")
    except RuntimeError as err:
        if "ptxas" in str(err) and "not found" in str(err).lower():
            pytest.skip("no ptxas in this Triton install")
        raise


@needs_tuned_kernels
@pytest.mark.parametrize("kernel", kernel_sass.KERNELS)
@pytest.mark.parametrize("grid", [
    pytest.param((64, 64), id="global-64-one-row-blocks"),
    pytest.param((14, 14), id="window-14-reshaped-blocks"),
])
def test_every_tile_compiles_for_an_h100_with_a_lean_hot_loop(kernel, grid, monkeypatch,
                                                               tmp_path):
    """Each tile the autotuner may pick, bf16, vit_b's head dim: key blocks of one row (64 x 64
    grid) and of several (14 x 14 windows: the reshaped bias and bias gradients), compiled
    afresh (no cache)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    configs = kernel_sass.tiles(kernel, grid)
    assert configs
    for config in configs:
        row = _measure(kernel, grid, "bf16", config)
        loop, tile = row["loop"], row["tile"]
        assert loop["total"] > 0 and row["stack"] == 0, tile  # the loop was found; no spills
        assert loop["HGMMA"] + loop["HMMA"] > 0, tile  # tensor-core products (warpgroup
        # or, for 32-row tiles, warp)
        assert loop["FSETP"] == 0, tile  # exp2 alone: tl.exp compiled to a denormal check
        assert row["per_score"]["MUFU"] < 1.1, tile  # one exp2 per score, not two (layout)
        if grid == (64, 64):
            assert loop["FSEL"] == 0, tile  # nothing padded: no select per score


@needs_tuned_kernels
@pytest.mark.parametrize("kernel", kernel_sass.KERNELS)
def test_vit_h_head_dim_compiles_in_two_parts_without_spills(kernel, monkeypatch, tmp_path):
    """vit_h's head dim 80 as 64 + 16 columns (``head_parts``): the first tile each autotuner
    tries on the global grid compiles for an H100 without spilling. Padded to 128 columns,
    the dK / dV kernel's spilled 328 bytes a thread there (kernel_sass.py, Triton 3.9)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    config = kernel_sass.tiles(kernel, (64, 64))[0]
    row = _measure(kernel, (64, 64), "bf16", config, head_dim=80)
    assert row["loop"]["HGMMA"] + row["loop"]["HMMA"] > 0 and row["stack"] == 0, row["tile"]


@needs_tuned_kernels
@pytest.mark.parametrize("kernel", kernel_sass.KERNELS)
def test_float32_tile_compiles_for_an_h100(kernel, monkeypatch, tmp_path):
    """Float32 ("ieee") products, for exactness checks: the one tile they launch compiles."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    [config] = kernel_sass.tiles(kernel, (14, 14), "fp32")
    loop = _measure(kernel, (14, 14), "fp32", config)["loop"]
    assert loop["total"] > 0 and loop["FSETP"] == 0


@pytest.mark.parametrize("args", [["--grids", "6x"], ["--grids", "64x64,0x4"],
                                  ["--kernels", "fwd"]])
def test_bad_arguments_end_in_one_line_and_exit_2(args, capsys):
    with pytest.raises(SystemExit) as stop:
        kernel_sass.main(args)
    assert stop.value.code == 2
    assert ": error: " in capsys.readouterr().err.strip().splitlines()[-1]  # prog: error: ...
