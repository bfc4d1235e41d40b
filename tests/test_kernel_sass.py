"""The rel_attention kernels compiled for an H100 without one (``benchmarks/kernel_sass.py``).

CI has no GPU, but Triton carries ptxas and cuobjdump: each kernel is compiled here for sm_90
and its machine code read. Beyond "it compiles", the hot loops keep what makes them fast there:
warpgroup tensor-core products and no register spills in bf16, one exp2 per softmax term without a
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
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   MUFU.EX2 R4, R2 ;
        /*0030*/              @!P1 BRA 0x10 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0050*/                   FFMA R5, R5, R6, R7 ;
        /*0060*/                   FSEL R5, R5, RZ, P0 ;
        /*0070*/               @P2 BRA 0x40 ;
        /*0080*/                   BRA 0x80;
"""


def test_hot_loop_is_the_longest_backward_branch():
    loop = kernel_sass.hot_loop(SASS)
    assert loop == {"HGMMA": 1, "FFMA": 1, "FSEL": 1, "BRA": 1}  # 0x40-0x70, not 0x10-0x30
    forward = SASS.replace("@P2 BRA 0x40", "@P2 BRA 0x90")  # a forward branch is no loop
    assert kernel_sass.hot_loop(forward) == {"FADD": 1, "MUFU": 1, "BRA": 1}


def test_the_final_self_branch_is_no_hot_loop():
    assert kernel_sass.hot_loop("        /*0080*/                   BRA 0x80;\n") == {}


@needs_tuned_kernels
@pytest.mark.parametrize("kernel", kernel_sass.KERNELS)
@pytest.mark.parametrize(("grid", "dtype"), [
    pytest.param((64, 64), "bf16", id="global-64-one-row-blocks-bf16"),
    pytest.param((14, 14), "bf16", id="window-14-reshaped-blocks-bf16"),
    pytest.param((14, 14), "fp32", id="window-14-ieee-fp32"),
])
def test_kernels_compile_for_an_h100_and_keep_their_hot_loops_lean(kernel, grid, dtype,
                                                                   monkeypatch, tmp_path):
    """The first tile each autotuner tries (float32: the one tile it runs), vit_b's head dim:
    key blocks of one row (64 x 64 grid) and of several (14 x 14 windows: the reshaped bias and
    bias gradients), bf16 and fp32 products, compiled afresh (no cache)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    config = kernel_sass.tiles(kernel, grid, dtype)[0]  # float32: its one fixed tile
    assert (config.kwargs["BLOCK_N"] == ra._pow2(grid[1], least=1)) == (grid == (64, 64))
    try:
        row = kernel_sass.measure(kernel, grid, dtype, config)
    except RuntimeError as err:
        if "ptxas" in str(err) and "not found" in str(err).lower():
            pytest.skip("no ptxas in this Triton install")
        raise
    loop = row["loop"]
    assert loop["total"] > 0 and loop["MUFU"] > 0  # the loop was found
    assert loop["FSETP"] == 0  # exp2 alone: tl.exp compiled to a denormal check around each
    if dtype == "bf16":  # fp32's "ieee" products are float32 FMAs, and spill (exactness only)
        assert loop["HGMMA"] > 0 and row["stack"] == 0  # warpgroup products, no spills
    if grid == (64, 64):
        assert loop["FSEL"] == 0  # nothing padded: no select per score
