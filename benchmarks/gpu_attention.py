"""The encoder's attention on a GPU: each mode's exactness and its own speed, block by block.

Used by ``bench_gpu.py`` (``--attention``). Two parts:

- :func:`check_paths`: how far each fused mode's encoder output and parameter gradients are
  from the official encoder's (fp32, and bf16 next to bf16's own error), on the device;
- :func:`time_blocks`: one vit_b attention block (dim 768, 12 heads, official parameters),
  forward + backward under bf16 autocast, for each mode at the token grids the encoder uses:
  14 x 14 windows and the global grid, at 256 and 1024 px, with as many windows / images as a
  training batch has. ``plain`` is SDPA with no bias at all: the floor a bias can approach;
  ``MODE/KERNEL``: SDPA held to one kernel (cudnn, efficient, flash); ``triton``: the bias inside
  scrollsam's own flash kernel (:mod:`scrollsam.model.rel_attention`), no SDPA.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scrollsam import build_model
from scrollsam.model import rel_attention
from scrollsam.model.attention import FusedAttention, FusedBlock
from scrollsam.model.build import fuse_encoder

FUSED_MODES = ("fold", "bias", "triton", "explicit")  # explicit last: not timed by default
# (name, token grid side, grids in a batch, window: 0 for attention over the whole grid):
# vit_b training batches of 4 at 1024 px (64 x 64 tokens; 25 windows of 14 x 14 each, padded
# to 70 x 70) and 32 at 256 px (16 x 16 tokens, one 16 x 16 window or the global grid). The
# "windowed" shapes time a windowed block's attention over the whole grid as the encoder runs
# it: official, padded windows; fused, :class:`FusedBlock`'s regions of real queries.
BLOCK_SHAPES = (
    ("1024_global", 64, 4, 0),
    ("1024_window14", 14, 4 * 25, 0),
    ("1024_windowed_grid", 64, 4, 14),
    ("256_global", 16, 32, 0),  # also the 16 x 16 windows of window_size 16
    ("256_windowed_grid", 16, 32, 14),
)


def check_paths(device: torch.device, *, model: str = "vit_b", size: int = 256,
                modes: tuple[str, ...] = FUSED_MODES) -> dict[str, Any]:
    """Relative difference of each fused mode's encoder output (and parameter gradients, fp32)
    from the official encoder's fp32 output, on ``device``: ``MODE_fp32``, ``MODE_fp32_grads``,
    and ``MODE_bf16`` under bf16 autocast next to ``official_bf16`` (bf16's own error). Random
    weights with non-zero relative-position tables. A wrong kernel shows here before any timing
    counts; a mode that fails records its error and the others still run."""
    torch.manual_seed(0)
    with device:
        official = build_model(model, image_size=size, attention="official").sam.image_encoder
    with torch.no_grad():
        for name, p in official.named_parameters():
            if "rel_pos" in name:
                p.normal_(std=0.5)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {}
    ref = official(x)  # (B, 256, g, g)
    ref.square().mean().backward()
    ref_grads = {n: p.grad for n, p in official.named_parameters()}
    ref = ref.detach()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out["official_bf16"] = float((official(x).float() - ref).norm() / ref.norm())
    for mode in modes:
        if mode == "triton" and not rel_attention.available(device):
            out["triton_skipped"] = "no Triton kernel on this device"
            continue
        try:
            enc = copy.deepcopy(official)
            enc.zero_grad(set_to_none=True)
            fuse_encoder(enc, mode=mode)  # the encoder training builds (build_model)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                out[f"{mode}_bf16"] = float((enc(x).float() - ref).norm() / ref.norm())
            got = enc(x)
            out[f"{mode}_fp32"] = float((got.detach() - ref).norm() / ref.norm())
            got.square().mean().backward()
            diff = torch.cat([(p.grad - ref_grads[n]).flatten()
                              for n, p in enc.named_parameters()])
            whole = torch.cat([g.flatten() for g in ref_grads.values()])
            out[f"{mode}_fp32_grads"] = float(diff.norm() / whole.norm())
        except Exception as err:  # noqa: BLE001 - recorded, the other modes still run
            out[f"{mode}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return out


class _Windowed(torch.nn.Module):
    """A windowed block's attention over a whole [B, H, W, dim] grid: the official padded
    windows, or :class:`FusedBlock`'s (``fused``)."""

    def __init__(self, block: torch.nn.Module, fused: bool) -> None:
        super().__init__()
        self.block, self.fused = block, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition

        if self.fused:
            return self.block._windowed(x)
        ws = self.block.window_size
        windows, padded = window_partition(x, ws)
        return window_unpartition(self.block.attn(windows), ws, padded, x.shape[1:3])


def _block(grid: int, mode: str, device: torch.device, window: int = 0) -> torch.nn.Module:
    """One vit_b attention block over a ``grid`` x ``grid`` token grid in ``mode`` (or the
    official module for ``official``, or ``plain``: SDPA with no relative-position bias); with
    ``window``, a windowed block's attention over the grid (:class:`_Windowed`)."""
    from segment_anything.modeling.image_encoder import Block

    torch.manual_seed(0)
    side = window or grid
    with device:
        official = Block(768, num_heads=12, use_rel_pos=mode != "plain", window_size=window,
                         input_size=(side, side))
        attn = official.attn
        if attn.use_rel_pos:
            with torch.no_grad():
                attn.rel_pos_h.normal_(std=0.1)
                attn.rel_pos_w.normal_(std=0.1)
    if mode == "official":
        return _Windowed(official, fused=False) if window else attn
    base, _, backend = mode.partition("/")
    fused_mode = "fold" if base == "plain" else base
    if window:
        block: torch.nn.Module = _Windowed(FusedBlock(official, grid=grid, mode=fused_mode),
                                           fused=True)
    else:
        block = FusedAttention(attn, grid=(grid, grid), mode=fused_mode)
    if not backend:
        return block
    kernel = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "flash": SDPBackend.FLASH_ATTENTION}[backend]

    class Only(torch.nn.Module):  # the block with SDPA held to one kernel
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([kernel]):
                return self.block(x)

    return Only()


def _median_ms(fn: Callable[[], None], device: torch.device, repeats: int,
               warmup: int) -> float:
    """Median CUDA-event time of ``fn()`` in ms over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_blocks(device: torch.device, *, repeats: int = 10, warmup: int = 3,
                modes: tuple[str, ...] = ("official", "plain", *FUSED_MODES[:-1]),
                ) -> dict[str, dict[str, Any]]:
    """Median ms of forward + backward of one attention block per mode and shape (bf16
    autocast, input gradient and parameter gradients) with its peak memory, and of the forward
    alone under no_grad (``forward_ms``: inference); ``rel_diff``: the bf16 forward's relative
    difference from the official block's in float32 (the same weights; not for ``plain``, which
    has no bias); errors recorded."""
    results: dict[str, dict[str, Any]] = {}
    for name, grid, count, window in BLOCK_SHAPES:
        row: dict[str, Any] = {}
        x = torch.randn(count, grid, grid, 768, device=device, requires_grad=True)
        with torch.no_grad():  # each mode's value check, at the shapes it is timed at
            ref = _block(grid, "official", device, window)(x.detach()).float()
        for mode in modes:
            try:
                block = _block(grid, mode, device, window)

                def step(block: torch.nn.Module = block, x: torch.Tensor = x) -> None:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        y = block(x)  # (count, grid, grid, 768)
                    y.float().square().mean().backward()

                def forward(block: torch.nn.Module = block, x: torch.Tensor = x) -> None:
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                        block(x)  # inference: what predict runs

                torch.cuda.reset_peak_memory_stats(device)
                ms = _median_ms(step, device, repeats, warmup)
                peak_mb = torch.cuda.max_memory_allocated(device) / 2**20  # training's
                row[mode] = {"ms": ms, "peak_mb": peak_mb,
                             "forward_ms": _median_ms(forward, device, repeats, warmup)}
                if mode.partition("/")[0] != "plain":
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                        y = block(x.detach()).float()
                    row[mode]["rel_diff"] = float((y - ref).norm() / ref.norm())
            except Exception as err:  # noqa: BLE001 - recorded, the next mode runs
                row[mode] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
            finally:
                x.grad = None
                torch.cuda.empty_cache()
        results[name] = row
        del ref
    return results


def format_blocks(results: dict[str, dict[str, Any]]) -> str:
    """A table: one row per shape, ms per mode (fwd + bwd / fwd alone), and where both ran,
    fold's time over triton's (> 1: the Triton kernel is faster; ``auto`` takes it from
    :data:`~scrollsam.model.attention.TRITON_FROM_KEYS` keys)."""
    modes = list(next(iter(results.values())).keys()) if results else []
    lines = [f"{'block ms: fwd+bwd / fwd':28s} " + " ".join(f"{m:>13s}" for m in modes)
             + f" {'fold/triton':>13s}"]
    for name, row in results.items():
        cells = [f"{row[m]['ms']:6.2f}/{row[m]['forward_ms']:6.2f}" if "ms" in row[m]
                 else f"{'err':>13s}" for m in modes]
        fold, triton = row.get("fold", {}), row.get("triton", {})
        if "ms" in fold and "ms" in triton:
            cells.append(f"{fold['ms'] / triton['ms']:5.2f}x/"
                         f"{fold['forward_ms'] / triton['forward_ms']:5.2f}x")
        lines.append(f"{name:28s} " + " ".join(cells))
    checks = [f"  {n}: " + ", ".join(f"{m} {r['rel_diff']:.1e}" for m, r in row.items()
                                    if "rel_diff" in r)
              for n, row in results.items() if any("rel_diff" in r for r in row.values())]
    errors = [f"  {n}/{m}: {r['error']}" for n, row in results.items() for m, r in row.items()
              if "error" in r]
    head = ["bf16 forward against the official block in float32, relative:"] if checks else []
    return "\n".join(lines + head + checks + errors)


__all__ = ["BLOCK_SHAPES", "check_paths", "format_blocks", "time_blocks"]
