"""The Triton relative-position attention kernel (``scrollsam.model.rel_attention``) on a CPU.

Triton kernels run on a CPU only under its interpreter, which is chosen when a kernel is
defined (``TRITON_INTERPRET=1`` before the import). So the checks run in one child process
with it set (this file as a script) and report each result as a line of JSON; the tests here
read those results. The interpreter's bf16 products are wrong (a plain bf16 ``tl.dot`` is off by
1e10 there), so low precision is checked in fp16, which takes the same code path; bf16 on a GPU
is checked by ``benchmarks/bench_gpu.py``'s exactness section.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import Tensor

from scrollsam.model import rel_attention as ra

needs_triton = pytest.mark.skipif(ra.triton is None, reason="this torch build has no Triton")


def _reference(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor,
               grid: tuple[int, int], scale: float) -> Tensor:
    """The official computation: [B, nh, NQ, N] scores plus the bias, softmax, product with v."""
    b, heads, nq, _ = q.shape
    h, w = grid
    s = scale * q @ k.transpose(-1, -2)  # (B, nh, NQ, N)
    s = (s.view(b, heads, nq, h, w) + rel_h[..., :, None] + rel_w[..., None, :]).view(
        b, heads, nq, h * w)
    return s.softmax(-1) @ v  # (B, nh, NQ, hd)


def _inputs(grid: tuple[int, int], hd: int, dtype: torch.dtype, seed: int = 0,
            queries: int | None = None) -> tuple[list[Tensor], Tensor]:
    """q, k, v as the encoder has them (strided views of one qkv tensor), the first ``queries``
    tokens asking (None: all), and the bias tables."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    b, heads, n = 2, 3, h * w
    nq = queries or n
    qkv = torch.randn(b, n, 3, heads, hd, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
    rel_h = torch.randn(b, heads, nq, h, generator=gen).to(dtype)
    rel_w = torch.randn(b, heads, nq, w, generator=gen).to(dtype)
    return [q[:, :, :nq], k, v, rel_h, rel_w], torch.randn(b, heads, nq, hd, generator=gen)


def _relative(got: Tensor, want: Tensor) -> float:
    """Largest absolute difference over the largest absolute reference value."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


def _kernel_vs_official(grid: tuple[int, int], hd: int, queries: int | None = None) -> float:
    """Largest relative error of the output and the five gradients against float64."""
    from scrollsam.model.rel_attention import rel_attention

    xs, grad = _inputs(grid, hd, torch.float32, queries=queries)
    assert not xs[0].is_contiguous()  # the kernel reads the strided views in place
    xs = [x.requires_grad_() for x in xs]
    out = rel_attention(*xs, grid=grid, scale=hd ** -0.5)
    out.backward(grad)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = _reference(*ref_in, grid, hd ** -0.5)
    ref.backward(grad.double())
    grads = [_relative(x.grad, r.grad) for x, r in zip(xs, ref_in, strict=True)]
    return max([_relative(out, ref), *grads])


def _other_tiles(grid: tuple[int, int], hd: int, block_m: int, block_n: int,
                 queries: int | None = None) -> float:
    """:func:`_kernel_vs_official` with the tiles a GPU's autotuner may pick instead."""
    from scrollsam.model import rel_attention as ra

    untuned = ra._untuned
    ra._untuned = lambda w: (block_m, block_n, 4, 3)
    try:
        return _kernel_vs_official(grid, hd, queries)
    finally:
        ra._untuned = untuned


def _fp16_vs_fp32(grid: tuple[int, int], hd: int) -> float:
    """Largest relative difference of the fp16 kernel's output and gradients from fp32's."""
    from scrollsam.model.rel_attention import rel_attention

    runs = []
    for dtype in (torch.float16, torch.float32):
        xs, grad = _inputs(grid, hd, dtype)
        xs = [x.requires_grad_() for x in xs]
        out = rel_attention(*xs, grid=grid, scale=hd ** -0.5)
        out.backward(grad.to(dtype))
        runs.append([out] + [x.grad for x in xs])
    return max(_relative(a, b) for a, b in zip(*runs, strict=True))


def _encoder_vs_official(variant: str, size: int) -> dict[str, float]:
    """FusedAttention(mode="triton") in a whole encoder: output and parameter-gradient errors."""
    from test_attention import VIT_B_SHAPED, _official_encoder

    from scrollsam.model.attention import fuse_attention
    from scrollsam.model.build import VARIANTS

    official = _official_encoder({"tiny": VARIANTS["tiny"], "vit_b": VIT_B_SHAPED}[variant], size)
    fused = copy.deepcopy(official)
    fuse_attention(fused, mode="triton")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=gen)
    ref, got = official(x), fused(x)
    weight = torch.randn(ref.shape, generator=gen)
    (ref * weight).sum().backward()
    (got * weight).sum().backward()
    grads = dict(fused.named_parameters())
    return {"out": _relative(got, ref),
            "grads": max(_relative(grads[n].grad, p.grad) for n, p in official.named_parameters())}


def _fp16_encoder() -> dict[str, float]:
    """A tiny encoder under fp16 autocast (the path bf16 takes on a GPU; the interpreter's bf16
    products are wrong): mode "triton" against mode "fold", each against official fp32."""
    from test_attention import _official_encoder

    from scrollsam.model.attention import fuse_attention
    from scrollsam.model.build import VARIANTS

    official = _official_encoder(VARIANTS["tiny"], 128)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ref = official(x).detach()
    errors = {}
    for mode in ("fold", "triton"):
        enc = copy.deepcopy(official)
        fuse_attention(enc, mode=mode)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            errors[mode] = float((enc(x).float() - ref).norm() / ref.norm())
    return errors


def _compiles_whole() -> float:
    """torch.compile (fullgraph, aot_eager: the op's fake and autograd registrations) gives the
    eager values and gradients, with no graph break."""
    from scrollsam.model.rel_attention import rel_attention

    def f(q, k, v, rel_h, rel_w):
        return rel_attention(q * 1.5, k, v, rel_h, rel_w, grid=(5, 7), scale=0.25).sin()

    runs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        xs, grad = _inputs((5, 7), 16, torch.float32)
        xs = [x.requires_grad_() for x in xs]
        out = fn(*xs)
        out.backward(grad)
        runs.append([out] + [x.grad for x in xs])
    return max(_relative(a, b) for a, b in zip(*runs, strict=True))


def _encoder_compiled() -> float:
    """A whole encoder in mode "triton" compiled as ``train.compile`` does it (static shapes;
    aot_eager here): its output and parameter gradients equal the eager encoder's. 80 px: a 5 x 5
    grid in windows of 8, so the padded-window path (zero-token fill, real queries) compiles."""
    from test_attention import _official_encoder

    from scrollsam.model.attention import fuse_attention
    from scrollsam.model.build import VARIANTS

    eager = _official_encoder(VARIANTS["tiny"], 80)
    fuse_attention(eager, mode="triton")
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    outs = [enc(x) for enc in (eager, compiled)]
    for out in outs:
        out.square().mean().backward()
    grads = [dict(enc.named_parameters()) for enc in (eager, compiled)]
    return max([_relative(outs[1], outs[0])]
               + [_relative(grads[1][n].grad, p.grad) for n, p in grads[0].items()])


def _training_step() -> dict[str, float]:
    """One real training step of the tiny model, whole model trainable, SAM prompts and losses:
    the loss and every gradient in mode "triton" against mode "explicit" (CPU's training mode)."""
    from scrollsam import build_model
    from scrollsam.config import LossConfig, PromptConfig
    from scrollsam.model.attention import fuse_attention
    from scrollsam.train.step import prompted_forward

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 128, generator=gen)
    label = (torch.rand(2, 1, 128, 128, generator=gen) > 0.7).float()
    runs = []
    for mode in ("explicit", "triton"):
        torch.manual_seed(0)
        model = build_model("tiny", image_size=128).train()
        fuse_attention(model.sam.image_encoder, mode=mode)
        out = prompted_forward(model, model.encode(images), label, torch.ones_like(label),
                               prompt_cfg=PromptConfig(), loss_cfg=LossConfig(),
                               gen=torch.Generator().manual_seed(1))
        out.parts["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        runs.append((out.parts["loss"].detach(), grads))
    (loss, grads), (ref_loss, ref_grads) = runs[1], runs[0]
    assert grads.shape == ref_grads.shape and grads.numel() > 10**6  # the encoder's too
    return {"loss": _relative(loss, ref_loss),  # gradients: error norm over the whole norm
            "grads": float((grads - ref_grads).norm() / ref_grads.norm())}


def _counted_flops() -> list[int]:
    """FlopCounterMode's count of one forward and backward, 20 queries of 35 keys: (counted,
    SDPA's 7 products)."""
    from torch.utils.flop_counter import FlopCounterMode

    from scrollsam.model.rel_attention import rel_attention

    xs, grad = _inputs((5, 7), 16, torch.float32, queries=20)
    xs = [x.requires_grad_() for x in xs]
    counter = FlopCounterMode(display=False)
    with counter:
        rel_attention(*xs, grid=(5, 7), scale=0.25).backward(grad)
    b, heads, nq, hd = xs[0].shape  # 20 queries of 35 keys
    return [counter.get_total_flops(), 7 * 2 * b * heads * nq * 35 * hd]


CHECKS = {
    "kernel_4x4_hd16": lambda: _kernel_vs_official((4, 4), 16),  # the grid in one tile
    "kernel_5x7_hd24": lambda: _kernel_vs_official((5, 7), 24),  # H != W; 4 rows a key block
    "kernel_9x9_hd64": lambda: _kernel_vs_official((9, 9), 64),  # rows padded 9 -> 16
    "kernel_14x14_hd20": lambda: _kernel_vs_official((14, 14), 20),  # a 14 x 14 window
    "kernel_3x40_hd16": lambda: _kernel_vs_official((3, 40), 16),  # key blocks of one row
    "kernel_2x64_hd16": lambda: _kernel_vs_official((2, 64), 16),  # rows of 64, no padding
    "kernel_5x7_hd24_20_queries": lambda: _kernel_vs_official((5, 7), 24, 20),  # NQ < N
    "kernel_14x14_hd20_112_queries": lambda: _kernel_vs_official((14, 14), 20, 112),  # 8 rows
    "kernel_9x9_hd16_1_query": lambda: _kernel_vs_official((9, 9), 16, 1),
    "kernel_14x14_hd64_70_queries_tiles_32x128": lambda: _other_tiles((14, 14), 64, 32, 128,
                                                                      70),  # 3 query blocks
    "kernel_14x14_hd20_tiles_32x64": lambda: _other_tiles((14, 14), 20, 32, 64),  # 4 rows
    "kernel_9x9_hd16_tiles_128x128": lambda: _other_tiles((9, 9), 16, 128, 128),  # 1 block
    "kernel_3x40_hd16_tiles_16x128": lambda: _other_tiles((3, 40), 16, 16, 128),  # 2 rows
    "kernel_14x14_hd64_tiles_128x64": lambda: _other_tiles((14, 14), 64, 128, 64),  # 4 rows
    "kernel_14x14_hd64_tiles_32x128": lambda: _other_tiles((14, 14), 64, 32, 128),  # 8 rows
    # head dims in two parts (rel_attention.head_parts): 80 = 64 + 16 (vit_h), 48 = 32 + 16
    "kernel_9x9_hd80": lambda: _kernel_vs_official((9, 9), 80),
    "kernel_14x14_hd48_112_queries": lambda: _kernel_vs_official((14, 14), 48, 112),
    "kernel_5x7_hd80_tiles_16x32": lambda: _other_tiles((5, 7), 80, 16, 32),
    "fp16_9x9_hd64": lambda: _fp16_vs_fp32((9, 9), 64),
    "fp16_9x9_hd80": lambda: _fp16_vs_fp32((9, 9), 80),
    "fp16_encoder": _fp16_encoder,
    "encoder_tiny_128": lambda: _encoder_vs_official("tiny", 128),
    "encoder_vit_b_shaped_96": lambda: _encoder_vs_official("vit_b", 96),  # 12 heads, window 14
    "encoder_tiny_240": lambda: _encoder_vs_official("tiny", 240),  # 15 x 15: four regions
    "compile": _compiles_whole,
    "compiled_encoder": _encoder_compiled,
    "flops": _counted_flops,
    "training_step": _training_step,
}


@pytest.fixture(scope="module")
def results() -> dict[str, object]:
    """Every check's result, from two children at once (the interpreter is slow and single-
    threaded: two cores halve the wait): the kernel checks in one, the rest in the other."""
    if ra.triton is None:
        pytest.skip("this torch build has no Triton")
    paths = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths),
           "OMP_NUM_THREADS": "1"}
    found: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        logs = [(Path(folder) / f"{part}.out", Path(folder) / f"{part}.err")
                for part in ("kernel", "other")]
        children = []
        for (out, err), part in zip(logs, ("kernel", "other"), strict=True):
            with out.open("w") as stdout, err.open("w") as stderr:
                children.append(subprocess.Popen([sys.executable, __file__, part], env=env,
                                                 stdout=stdout, stderr=stderr))
        for child, (out, err) in zip(children, logs, strict=True):
            assert child.wait(timeout=600) == 0, err.read_text()[-3000:]
            found.update({k: v for line in out.read_text().splitlines()
                          if line.startswith("{") for k, v in json.loads(line).items()})
    assert set(found) == set(CHECKS)
    return found


@pytest.mark.parametrize("name", [n for n in CHECKS if n.startswith("kernel")])
def test_kernel_equals_the_official_attention_values_and_gradients(results, name):
    assert results[name] < 2e-5, results[name]


@pytest.mark.parametrize("name", ["fp16_9x9_hd64", "fp16_9x9_hd80"])
def test_fp16_kernel_is_close_to_fp32(results, name):
    assert results[name] < 3e-3, results[name]


@pytest.mark.parametrize(("hd", "parts"), [(16, (16, 0)), (20, (32, 0)), (24, (32, 0)),
                                           (48, (32, 16)), (64, (64, 0)), (72, (64, 16)),
                                           (80, (64, 16)), (96, (64, 32)), (128, (128, 0))])
def test_head_dims_walk_in_the_fewest_padded_columns(hd, parts):
    assert ra.head_parts(hd) == parts


def test_fp16_autocast_encoder_is_as_close_to_official_as_fold(results):
    errors = results["fp16_encoder"]  # fp16's own error is about 1e-3 of the output
    assert errors["triton"] < 3e-3 and errors["triton"] < 1.5 * errors["fold"], errors


@pytest.mark.parametrize("name", [n for n in CHECKS if n.startswith("encoder")])
def test_triton_mode_encoder_equals_official(results, name):
    assert results[name]["out"] < 1e-4 and results[name]["grads"] < 1e-3, results[name]


def test_compiled_call_matches_eager_without_graph_break(results):
    assert results["compile"] < 1e-6, results["compile"]


def test_compiled_encoder_matches_eager(results):
    assert results["compiled_encoder"] < 1e-5, results["compiled_encoder"]


def test_training_step_in_triton_mode_equals_explicit(results):
    assert results["training_step"]["loss"] < 1e-5, results["training_step"]
    assert results["training_step"]["grads"] < 1e-4, results["training_step"]


def test_flop_counter_counts_the_kernel_as_sdpa(results):
    counted, expected = results["flops"]
    assert counted == expected


def test_without_a_gpu_or_interpreter_the_error_says_what_to_use(monkeypatch):
    monkeypatch.setattr(ra, "_INTERPRET", False)  # as on a CPU without TRITON_INTERPRET
    xs, _ = _inputs((4, 4), 16, torch.float32)
    if ra.triton is not None:
        with pytest.raises(ValueError, match="needs Triton and a CUDA device .q is on cpu.*'fold'"):
            ra.rel_attention(*xs, grid=(4, 4), scale=0.25)
    monkeypatch.setattr(ra, "triton", None)  # a CPU-only torch build (macOS, Windows)
    with pytest.raises(ValueError, match="this torch build has no Triton.*'fold'"):
        ra.rel_attention(*xs, grid=(4, 4), scale=0.25)


def test_inputs_that_do_not_fit_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(ra, "available", lambda device: True)  # on to the input checks
    xs, _ = _inputs((4, 4), 16, torch.float32)
    with pytest.raises(ValueError, match=r"k, v: expected \(2, 3, 20, 16\).*4 x 5 keys"):
        ra.rel_attention(*xs, grid=(4, 5), scale=0.25)
    with pytest.raises(ValueError, match="rel_h / rel_w"):
        ra.rel_attention(*xs[:3], xs[4], xs[3][..., :3], grid=(4, 4), scale=0.25)
    with pytest.raises(ValueError, match=r"q: expected \[B, heads, N, head dim\]"):
        ra.rel_attention(xs[0][0], *xs[1:], grid=(4, 4), scale=0.25)
    with pytest.raises(ValueError, match="different devices"):
        ra.rel_attention(*xs[:4], xs[4].to("meta"), grid=(4, 4), scale=0.25)


if __name__ == "__main__":  # a child: the kernel checks, or the others; one JSON line each
    assert os.environ.get("TRITON_INTERPRET") == "1"
    kernels = sys.argv[1] == "kernel"
    for check_name, check in CHECKS.items():
        if check_name.startswith("kernel") == kernels:
            print(json.dumps({check_name: check()}), flush=True)
