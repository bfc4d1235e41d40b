"""Flash attention with SAM's decomposed relative-position bias added inside the kernel (Triton).

The SAM encoder's attention scores are ``scale * q . k + rel_h[q, key row] + rel_w[q, key col]``
over an H x W token grid (N = H * W tokens, row-major). SDPA has no such bias: ``"fold"`` in
:mod:`scrollsam.model.attention` widens the head dim from hd to hd + H + W to carry it
(64 -> 192 in vit_b's global blocks at 1024 px), which measured 2.8x the attention time of no
bias at all on an H100 (8.6 against 3.1 ms, forward + backward, batch 4). Here the bias never
leaves the kernel.

Key tiles follow the grid's rows. Keys are walked in a padded grid of H rows of WP = W rounded
up to a power of two (14 x 14 windows: 14 x 16, 2 of every 16 positions masked; 64 x 64 and
16 x 16 grids: no padding), and a block of keys is RB = BLOCK_N / WP whole rows. Queries are
walked in order, and there may be fewer of them than keys (NQ <= N: the real tokens of a
padded window, :class:`scrollsam.model.attention.FusedBlock`): each carries its own bias rows.
So a score tile's bias is ``rel_h[q, rows of the block]`` [BLOCK_M, RB] broadcast over the
columns plus ``rel_w[q, :]`` [BLOCK_M, WP] broadcast over the rows, the latter the same for
every key block (loaded once per query block):

* forward (one program per block of queries): scores plus bias, then FlashAttention-2's online
  softmax; each query row's log-sum-exp is kept for backward;
* backward: one pass per block of queries for dQ, the bias gradients and each query's
  rowsum(dO * O) (FlashAttention-2's delta, there read with dO and O at no extra pass), then one
  per block of keys for dK and dV: ``d rel_w[q, c]`` sums the score gradient dS over the rows
  of every key block (a register accumulator), ``d rel_h[q, r]`` sums it over the columns of
  row r, which only one key block holds (stored straight away). Exact float32 sums, no
  atomics (FlexAttention reaches the bias tables' gradients through atomics: on the H100 an
  earlier FlexAttention version of this path was slower than fold, issue 13's note).

Inputs and outputs: q [B, nh, NQ, hd], k, v [B, nh, N, hd] (any strides with a unit last
stride: the encoder's views of its qkv projection need no copy, but for the queries of a
padded window's real tokens, which are a copy), rel_h [B, nh, NQ, H], rel_w
[B, nh, NQ, W] (the ``einsum`` of q with the block's relative-position tables, as in the
official code; autograd carries their gradient on to q and the tables) -> [B, nh, NQ, hd] in
q's dtype. Scores, softmax and accumulators are float32; the products take the inputs' dtype
(bf16 under autocast, with fp32 accumulation) and, for float32 inputs, full-precision ("ieee")
products.

The op runs where Triton does: CUDA tensors, or any tensors under ``TRITON_INTERPRET=1`` (how
``tests/test_rel_attention.py`` checks values and gradients on a CPU). It is a
``torch.library`` custom op, so ``torch.compile`` treats it as one opaque node.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

Kernel = Any  # a triton.jit kernel, or one wrapped in triton.autotune
Config = Any  # triton.Config

try:
    import triton
except ImportError:  # CPU-only torch builds (macOS, Windows) ship without Triton
    triton = None


def _interpreting() -> bool:
    """Whether Triton defines interpreted kernels now (``TRITON_INTERPRET``, read as Triton
    reads it). It decides when the kernels are defined, at this module's import, so the module
    reads it then, once, for both :func:`available` and the tuning."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # how older Triton reads it


_INTERPRET = _interpreting()


def available(device: torch.device) -> bool:
    """Whether :func:`rel_attention` runs on ``device``: Triton is installed and the device is
    CUDA, or Triton's interpreter was on when this module was imported (``TRITON_INTERPRET=1``,
    any device)."""
    if triton is None:
        return False
    return device.type == "cuda" or _INTERPRET


def _pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= max(n, least) (tensor-core products want sides >= 16)."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def _untuned(pitch: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) where nothing is timed (Triton's interpreter, float32
    products): key blocks of whole padded rows of ``pitch`` (WP) positions, at least 32 keys."""
    return 64, max(32, pitch), 4, 3


# On a GPU each kernel picks its tiles by timing these once per grid, head dim and dtype (each
# compiles in a second or two, at the first call); the interpreter takes _untuned's one choice,
# and so do float32 products: "ieee" products are float32 FMA loops, most tiles of which spill
# registers (benchmarks/kernel_sass.py), there for exactness checks, not worth the compiles.
# (BLOCK_M, BLOCK_N, warps, stages): BLOCK_M queries by BLOCK_N keys a score tile. The forward
# and dQ walk key blocks for a block of queries, dK / dV query blocks for a block of keys.
# Compiled for sm_90 (bf16, head dim 64, vit_b's grids; benchmarks/kernel_sass.py) none spills
# and each thread computes its scores' softmax once: 64-row tiles on 8 warps compile to 2 exp2
# per score and twice the instructions per score of 64 x 64 on 4 warps (static counts).
_TUNED = triton is not None and not _INTERPRET
_FORWARD_TILES = ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3))
_BACKWARD_KV_TILES = ((64, 64, 4, 2), (128, 64, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2),
                      (64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3))
_BACKWARD_Q_TILES = ((128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2),
                     (32, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3))
# The 3-stage tiles came after a profile (benchmarks/README.md) where the backward took over
# four times the forward's time on 2-stage 64 x 64 tiles; an H200's tuner then took 3 stages.


def _keep_whole_rows(configs: list[Config], named_args: dict[str, object],
                     **kwargs: object) -> list[Config]:
    """Autotuner pruning: only tiles whose key blocks are whole padded rows."""
    pitch = kwargs.get("WP", named_args.get("WP"))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] % pitch == 0]
    return kept or [triton.Config({"BLOCK_M": 32, "BLOCK_N": pitch}, num_warps=4, num_stages=1)]


def _tuned(kernel: Kernel, tiles: tuple[tuple[int, int, int, int], ...]) -> Kernel:
    """``kernel`` autotuned over (BLOCK_M, BLOCK_N, warps, stages) ``tiles`` on a GPU; as it is
    under the interpreter. The query count NQ is a compile-time number (a 64 x 64 grid's loads
    need no masks) and a tuning key: a padded grid's edge and corner windows have fewer
    queries, and backward reaches the corner first, so one shared choice would be timed on the
    smallest launch. At 1024 px that is three window shapes (196, 112 and 64 queries) besides
    the global grid, each tuned once per process."""
    if not _TUNED:
        return kernel
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for m, n, w, st in tiles]
    return triton.autotune(configs, key=["N", "NQ", "D", "WP"],
                           prune_configs_by={"early_config_prune": _keep_whole_rows})(kernel)


def _launch(kernel: Kernel, blocks_along: str, z: int, *args: object,
            **settings: object) -> None:
    """Run ``kernel`` on one program per (image and head of the z = B * nh, block along
    ``blocks_along``: of the NQ queries for BLOCK_M, of the padded key grid's H * WP positions
    for BLOCK_N), in a 1-D grid (CUDA caps a grid's second axis at 65535: B * 25 windows *
    heads passes that from batch 219 with vit_b); autotuned tiles on a GPU, :func:`_untuned`'s
    for float32 products and under the interpreter. Fused multiply-adds are asked for, not left
    to Triton's default (which Triton 3.10 turns off): the softmax terms are one FMA and one
    exp2 each."""
    positions = settings["NQ"] if blocks_along == "BLOCK_M" else settings["H"] * settings["WP"]
    settings = {**settings, "enable_fp_fusion": True}
    if _TUNED and settings["PRECISION"] != "ieee":
        kernel[lambda meta: (z * triton.cdiv(positions, meta[blocks_along]),)](*args, **settings)
        return
    block_m, block_n, warps, stages = _untuned(settings["WP"])
    side = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    jit = kernel.fn if _TUNED else kernel  # the kernel the autotuner wraps
    jit[(z * triton.cdiv(positions, side[blocks_along]),)](*args, **settings, **side,
                                                           num_warps=warps, num_stages=stages)


if triton is not None:
    from scrollsam.model import rel_attention_kernels as _kernels

    _forward = _tuned(_kernels.forward, _FORWARD_TILES)
    _backward_kv = _tuned(_kernels.backward_kv, _BACKWARD_KV_TILES)
    _backward_q = _tuned(_kernels.backward_q, _BACKWARD_Q_TILES)


def tuned_tiles() -> dict[str, dict[str, str]]:
    """The tiles each kernel's autotuner chose so far on this GPU: kernel -> {tuning key (key
    and query counts, head dim, row pitch, dtypes): its config}; empty without tuning. For
    benchmark records, so that a run shows which tiles its timings used (float32 products are
    not tuned: they run :func:`_untuned`'s tile)."""
    if not _TUNED:
        return {}
    kernels = {"forward": _forward, "backward_kv": _backward_kv, "backward_q": _backward_q}
    return {name: {str(key): str(config) for key, config in kernel.cache.items()}
            for name, kernel in kernels.items()}


def _device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _unit_last_stride(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors, copied only where their last stride is not 1 (the kernels' one need)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _strides(*tensors: Tensor) -> list[int]:
    """(batch, head, token) strides of each [B, nh, N, hd] tensor, in order."""
    return [s for t in tensors for s in t.stride()[:3]]


def head_parts(hd: int) -> tuple[int, int]:
    """The head dim as the kernels walk it: (BLOCK_D, BLOCK_D2), two powers of two >= 16 (the
    second 0: one part) that cover ``hd`` with the fewest padded columns. vit_h's 80 is 64 + 16,
    not 128 (37.5% of each product zeros); vit_b's 64 is one part."""
    whole = _pow2(hd)
    if whole == hd or whole <= 16:
        return whole, 0
    first = whole // 2  # the largest power of two below hd
    second = _pow2(hd - first)
    return (first, second) if first + second < whole else (whole, 0)


def _settings(q: Tensor, h: int, w: int) -> dict[str, object]:
    """The kernels' compile-time settings but the tiles, for q [B, nh, NQ, hd] and keys on an
    h x w grid."""
    block_d, block_d2 = head_parts(q.shape[-1])
    return dict(N=h * w, NQ=q.shape[2], H=h, W=w, WP=_pow2(w, least=1), D=q.shape[-1],
                BLOCK_D=block_d, BLOCK_D2=block_d2,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _check(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, h: int,
           w: int) -> None:
    """Shapes and layouts the kernels assume; a ValueError names the first mismatch."""
    if q.dim() != 4:
        raise ValueError(f"rel_attention: q: expected [B, heads, N, head dim], got shape "
                         f"{tuple(q.shape)}")
    devices = {t.device for t in (q, k, v, rel_h, rel_w)}
    if len(devices) > 1:
        raise ValueError(f"rel_attention: q, k, v, rel_h, rel_w are on different devices: "
                         f"{sorted(map(str, devices))}")
    b, heads, nq, hd = q.shape
    if k.shape != (b, heads, h * w, hd) or v.shape != k.shape:
        raise ValueError(f"rel_attention: k, v: expected {(b, heads, h * w, hd)} (q's batch, "
                         f"heads and head dim, {h} x {w} keys), got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if rel_h.shape != (b, heads, nq, h) or rel_w.shape != (b, heads, nq, w):
        raise ValueError(f"rel_attention: rel_h / rel_w: expected {(b, heads, nq, h)} / "
                         f"{(b, heads, nq, w)}, got {tuple(rel_h.shape)} / {tuple(rel_w.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"rel_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


@torch.library.custom_op("scrollsam::rel_attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, h: int, w: int,
               scale: float) -> tuple[Tensor, Tensor]:
    """Forward: (output [B, nh, NQ, hd], row log-sum-exp float32 [B, nh, NQ])."""
    q, k, v = _unit_last_stride(q, k, v)
    b, heads, nq, hd = q.shape
    out = torch.empty(b, heads, nq, hd, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, heads, nq, dtype=torch.float32, device=q.device)
    cfg = _settings(q, h, w)
    with _device_of(q):
        _launch(_forward, "BLOCK_M", b * heads, q, k, v, rel_h.contiguous(),
                rel_w.contiguous(), out, lse, *_strides(q, k, v), heads, scale, **cfg)
    return out, lse


@_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, h: int, w: int,
      scale: float) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("scrollsam::rel_attention_backward", mutates_args=())
def _attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor,
                        rel_w: Tensor, out: Tensor, lse: Tensor, h: int, w: int,
                        scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: dq [B, nh, NQ, hd], dk, dv [B, nh, N, hd], d rel_h [B, nh, NQ, H], d rel_w
    [B, nh, NQ, W]."""
    q, k, v = _unit_last_stride(q, k, v)
    rel_h, rel_w, grad = rel_h.contiguous(), rel_w.contiguous(), grad.contiguous()
    out, lse = out.contiguous(), lse.contiguous()
    delta = torch.empty_like(lse)  # (B, nh, NQ): rowsum(dO * O), written by backward_q
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format)
                  for t in (q, k, v))  # the kernels write them contiguous
    drh, drw = torch.empty_like(rel_h), torch.empty_like(rel_w)
    cfg = _settings(q, h, w)
    z, heads = q.shape[0] * q.shape[1], q.shape[1]
    common = (*_strides(q, k, v), heads, scale)
    with _device_of(q):
        _launch(_backward_q, "BLOCK_M", z, q, k, v, rel_h, rel_w, grad, out, lse, delta, dq,
                drh, drw, *common, **cfg)
        _launch(_backward_kv, "BLOCK_N", z, q, k, v, rel_h, rel_w, grad, lse, delta, dk, dv,
                *common, **cfg)
    return dq, dk, dv, drh, drw


@_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, out: Tensor,
      lse: Tensor, h: int, w: int, scale: float
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            rel_h.new_empty(rel_h.shape), rel_w.new_empty(rel_w.shape))


def _setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    q, k, v, rel_h, rel_w, h, w, scale = inputs
    ctx.save_for_backward(q, k, v, rel_h, rel_w, *output)
    ctx.grid, ctx.scale = (h, w), scale


def _grads(ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _lse_grad: Tensor | None
           ) -> tuple[Tensor | None, ...]:
    q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
    grads = _attention_backward(grad, q, k, v, rel_h, rel_w, out, lse, *ctx.grid, ctx.scale)
    return (*grads, None, None, None)


_attention.register_autograd(_grads, setup_context=_setup)


def _products(q_shape: torch.Size, k_shape: torch.Size, count: int) -> int:
    """FLOPs of ``count`` [NQ, N] x [N, hd] products per (image, head) for q [B, nh, NQ, hd],
    k [B, nh, N, hd]."""
    b, heads, nq, hd = q_shape
    return count * 2 * b * heads * nq * k_shape[2] * hd


@register_flop_formula(torch.ops.scrollsam.rel_attention)
def _forward_flops(q_shape: torch.Size, k_shape: torch.Size, *args: object,
                   **kwargs: object) -> int:
    """As SDPA's forward is counted: the scores and their product with v (the bias adds none)."""
    return _products(q_shape, k_shape, 2)


@register_flop_formula(torch.ops.scrollsam.rel_attention_backward)
def _backward_flops(grad_shape: torch.Size, q_shape: torch.Size, k_shape: torch.Size,
                    *args: object, **kwargs: object) -> int:
    """As SDPA's backward is counted: scores recomputed, dP, dV, dQ, dK."""
    return _products(q_shape, k_shape, 5)


def rel_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, *,
                  grid: tuple[int, int], scale: float) -> Tensor:
    """softmax(scale * q k^T + rel_h[:, :, :, key row] + rel_w[:, :, :, key col]) v.

    q [B, nh, NQ, hd], k, v [B, nh, N, hd] (one dtype; N = H * W of ``grid``, keys row-major;
    any number of queries, each with its own bias rows), rel_h [B, nh, NQ, H], rel_w
    [B, nh, NQ, W] -> [B, nh, NQ, hd]. Differentiable in all five. Needs :func:`available` for
    the tensors' device."""
    if not available(q.device):
        lacks = "this torch build has no Triton" if triton is None else f"q is on {q.device}"
        raise ValueError(f"rel_attention needs Triton and a CUDA device ({lacks}); "
                         f"use the attention modes 'fold', 'bias' or 'explicit' elsewhere")
    h, w = int(grid[0]), int(grid[1])
    _check(q, k, v, rel_h, rel_w, h, w)
    return _attention(q, k, v, rel_h, rel_w, h, w, float(scale))[0]


__all__ = ["available", "rel_attention", "tuned_tiles"]
