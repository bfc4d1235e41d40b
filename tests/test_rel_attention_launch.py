"""How ``scrollsam.model.rel_attention`` launches its Triton kernels: tiles, grids, options.

No kernel runs here: stand-in kernels record each launch (the kernels' values and gradients are
``tests/test_rel_attention.py``'s, their sm_90 machine code ``tests/test_kernel_sass.py``'s).
"""

from __future__ import annotations

import pytest

from scrollsam.model import rel_attention as ra

needs_triton = pytest.mark.skipif(ra.triton is None, reason="this torch build has no Triton")


def _tuned_kernels() -> list:
    """The three kernels as a GPU runs them (triton.autotune), or a skip."""
    kernels = [ra._forward, ra._backward_kv, ra._backward_q]
    if ra.triton is None or not all(type(k).__name__ == "Autotuner" for k in kernels):
        pytest.skip("no Triton, or kernels defined under the interpreter in this process")
    return kernels


@needs_triton
@pytest.mark.parametrize("width", [4, 7, 14, 16, 40, 64, 96, 200])
def test_gpu_tiles_are_whole_rows_of_the_padded_grid(width):
    """The kernels need each key block to be whole rows of WP = W rounded up to a power of two;
    each kernel's autotuner keeps only such tiles (the interpreter's one choice too)."""
    pitch = ra._pow2(width, least=1)
    for kernel in _tuned_kernels():
        kept = kernel.early_config_prune(kernel.configs, {}, WP=pitch)
        assert kept and all(c.kwargs["BLOCK_N"] % pitch == 0 for c in kept)
    assert ra._untuned(pitch)[1] % pitch == 0


@needs_triton
def test_query_count_is_compiled_in_and_tuned_on():
    """NQ is a compile-time number (unmasked loads on full grids) and a tuning key: backward
    reaches a padded grid's corner windows (fewest queries) first, and a shared choice would be
    timed on that smallest launch."""
    for kernel in _tuned_kernels():
        assert "NQ" in [p.name for p in kernel.fn.params if p.is_constexpr]
        assert kernel.keys == ["N", "NQ", "D", "WP"]


class _Kernel:
    """Stands in for a kernel: records each launch's grid and tile settings."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple[int, ...], dict]] = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid({"BLOCK_M": 64, "BLOCK_N": 32}) if callable(grid)
                                  else grid, kwargs))
        return run


@pytest.mark.parametrize("tuned", [True, False])
def test_launch_grid_is_one_dimensional(tuned, monkeypatch):
    """CUDA caps a grid's second axis at 65535: vit_b's windowed blocks at batch 256 have
    256 * 25 * 12 = 76800 (image, head) pairs, so they go in one axis with the blocks."""
    kernel = _Kernel()
    monkeypatch.setattr(ra, "_TUNED", tuned)
    z, positions = 256 * 25 * 12, 14 * 16
    ra._launch(kernel, "BLOCK_N", z, H=14, WP=16, NQ=196, PRECISION="tf32")
    assert [grid for grid, _ in kernel.launches] == [(z * (positions // 32),)]


def test_float32_products_take_one_fixed_tile_not_the_autotuner(monkeypatch):
    """fp32 ("ieee") kernels mostly spill and only serve exactness checks: on a GPU they skip
    the autotuner's compiles and timings per kernel and grid."""
    tuned, inner = _Kernel(), _Kernel()
    tuned.fn = inner  # as triton.autotune wraps its kernel
    monkeypatch.setattr(ra, "_TUNED", True)
    ra._launch(tuned, "BLOCK_M", 10, H=14, WP=16, NQ=196, PRECISION="ieee")
    ra._launch(tuned, "BLOCK_M", 10, H=14, WP=16, NQ=196, PRECISION="tf32")
    [(_, fixed)] = inner.launches
    block_m, block_n, warps, stages = ra._untuned(16)
    assert (fixed["BLOCK_M"], fixed["BLOCK_N"], fixed["num_warps"], fixed["num_stages"]) == (
        block_m, block_n, warps, stages)
    assert len(tuned.launches) == 1 and "BLOCK_M" not in tuned.launches[0][1]


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_launches_ask_for_fused_multiply_adds(precision, monkeypatch):
    """The softmax terms are one FMA and one exp2 each; Triton 3.10 turns fusion off unless a
    launch asks for it."""
    tuned, inner = _Kernel(), _Kernel()
    tuned.fn = inner
    monkeypatch.setattr(ra, "_TUNED", True)
    ra._launch(tuned, "BLOCK_M", 10, H=14, WP=16, NQ=196, PRECISION=precision)
    [(_, kwargs)] = tuned.launches + inner.launches
    assert kwargs["enable_fp_fusion"] is True


@needs_triton
def test_tuned_tiles_lists_each_kernels_choices():
    kernels = _tuned_kernels()
    key = (4096, 64, 64, "torch.bfloat16")
    config = kernels[0].configs[0]
    kernels[0].cache[key] = config
    try:
        tiles = ra.tuned_tiles()
    finally:
        del kernels[0].cache[key]
    assert set(tiles) == {"forward", "backward_kv", "backward_q"}
    assert tiles["forward"][str(key)] == str(config) and "BLOCK_M" in str(config)
