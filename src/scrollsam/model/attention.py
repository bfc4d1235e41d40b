"""Fused attention for the SAM image encoder: the official maths without its [N, N] tensors.

Official ``segment_anything`` ``Attention`` builds the full score matrix
``(q * scale) @ k^T`` [B * heads, N, N] (N = H * W tokens of a window or of the whole grid),
adds the decomposed relative-position bias (MViTv2) and softmaxes it, keeping every [N, N]
intermediate for backward. :class:`FusedAttention` computes the same function in one of four
exact forms, two through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA):

* ``"bias"``: the bias ``rel_h[q, key row] + rel_w[q, key col]`` [B, heads, N, N] is passed as
  ``attn_mask``. The score matrix is never stored, but the bias is (one [N, N] per head), and
  only the memory-efficient / math kernels take an additive mask that needs a gradient.
* ``"fold"``: the bias folded into extra query / key dimensions, so no [N, N] tensor exists
  at all and the flash kernel applies::

      q' = [q * scale, rel_h, rel_w]    [.., N, hd + H + W]
      k' = [k, onehot(key row), onehot(key col)]
      q' . k' = scale * q . k + rel_h[q, key row] + rel_w[q, key col]

  The head dim grows from hd to hd + H + W (vit_b: 64 -> 92 in a 14 x 14 window, 192 in the
  64 x 64 global blocks at 1024 px), padded to a multiple of 8 with zeros; flash kernels want
  q, k and v of one head dim, so v is zero-padded too and the output sliced back to hd.

* ``"explicit"``: the official computation (score matrix, bias added, softmax, product with
  v), with the relative-position lookups prepared at build time.
* ``"triton"``: :func:`scrollsam.model.rel_attention.rel_attention`, a FlashAttention-2 kernel
  that adds the bias inside (head dim hd, no [N, N] tensor); CUDA with Triton only.

``"auto"`` picks, on CUDA, ``"triton"`` for 16-bit attention over at least
:data:`TRITON_FROM_KEYS` keys (vit_b's global blocks at 1024 px) and ``"fold"`` (SDPA's cuDNN
kernel, the fastest SDPA form) for the rest. Measured on an H100 (``benchmarks/bench_gpu.py
--attention``, one vit_b block, batch 4, bf16, forward + backward; README, Performance): the
64 x 64 global grid 6.0 ms triton against 8.3 ms fold; 14 x 14 windows 3.9 against 3.9, but
a windowed block's regions as the encoder runs them 15.6 against 11.4, and the 16 x 16 grid
of 256 px 3.9 against 2.7. On a CPU it picks ``"bias"`` for
inference and ``"explicit"`` when gradients flow: measured on the 2-core EPYC (vit_b encoder,
256 px, batch 2, one thread, CPU seconds per image), SDPA saves 7 % of an fp32 inference
(0.77 against 0.83 s) and ties in bf16 (0.32), but its CPU backward (the math fallback when
the mask needs a gradient, the CPU flash kernel's backward when folded) costs 5 % more than
the explicit product in fp32 training and 20 % more in bf16 (0.96 against 0.79 s).

:func:`fuse_attention` swaps each official ``Block`` for a :class:`FusedBlock`: the same
modules, and windowed attention whose ``qkv`` and ``proj`` run over the real tokens only (the
official block pads the grid to whole windows first; padding is ``qkv`` of a zero token).

Parameters keep the official names and shapes (``qkv``, ``proj``, ``rel_pos_h``,
``rel_pos_w``), so official checkpoints load unchanged and LoRA can wrap ``qkv``. The relative
position tables are gathered through index buffers built once for the block's token grid
(``rel_index_h`` [H, H], non-persistent: not in state dicts); a forward on another grid falls
back to the official interpolating lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import nn

from scrollsam.model.rel_attention import available as triton_available
from scrollsam.model.rel_attention import rel_attention

MODES = ("auto", "bias", "fold", "explicit", "triton")
# "auto" on CUDA takes the Triton kernel for 16-bit attention over this many keys and more, at
# the head dims it was timed with (vit_b's and vit_l's 64; vit_h's 80 runs as 64 + 16 columns,
# untimed), on GPUs whose Triton compiles bf16 (compute capability 8.0 and later)
TRITON_FROM_KEYS = 64 * 64
TRITON_HEAD_DIMS = (64,)
TRITON_CAPABILITY = (8, 0)


def relative_index(q_size: int, k_size: int) -> torch.Tensor:
    """Row of the relative-position table for each (query, key) pair -> long [q_size, k_size].

    The official ``get_rel_pos`` index: ``(q - k) + (k_size - 1)`` for equal sizes (the only
    case SAM's encoder uses), with its scaling for unequal ones.
    """
    q = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)  # (q, 1)
    k = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)  # (1, k)
    return ((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()  # (q, k)


def key_onehot(h: int, w: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Each key's grid row and column, one-hot -> bool [H * W, H + W] (keys row-major; columns:
    the H rows, then the W columns): the ``"fold"`` form's extra key dimensions.

    The module keeps it as a buffer for its own grid, so a forward pays one cast instead of
    building it (``F.one_hot`` of row and column indices took about eight small kernels a call,
    and on a CPU read the indices' range back).
    """
    key = torch.arange(h * w, device=device)[:, None]  # (N, 1)
    rows = key // w == torch.arange(h, device=device)  # (N, H)
    cols = key % w == torch.arange(w, device=device)  # (N, W)
    return torch.cat([rows, cols], dim=1)  # (N, H + W)


class FusedAttention(nn.Module):
    """Official SAM encoder attention (same parameters) computed in one fused form.

    ``official``: the ``segment_anything`` ``Attention`` whose parameters are taken over.
    ``grid``: (H, W) token grid this block attends over (the window side for windowed blocks).
    ``mode``: ``"auto"``, ``"bias"``, ``"fold"``, ``"explicit"`` or ``"triton"`` (see the
    module docstring).
    Input and output ``[B, H, W, dim]`` as in the official block.
    """

    def __init__(self, official: Attention, *, grid: tuple[int, int], mode: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"attention mode: expected one of {MODES}, got {mode!r}")
        self.num_heads = official.num_heads
        self.scale = official.scale
        self.qkv = official.qkv
        self.proj = official.proj
        self.use_rel_pos = official.use_rel_pos
        self.mode = mode
        self.grid = (int(grid[0]), int(grid[1]))
        if self.use_rel_pos:
            self.rel_pos_h = official.rel_pos_h  # (2H - 1, hd)
            self.rel_pos_w = official.rel_pos_w  # (2W - 1, hd)
            h, w = self.grid
            dev = official.qkv.weight.device  # the buffers beside the parameters
            self.register_buffer("rel_index_h", relative_index(h, h).to(dev), persistent=False)
            self.register_buffer("rel_index_w", relative_index(w, w).to(dev), persistent=False)
            self.register_buffer("key_onehot", key_onehot(h, w, device=dev), persistent=False)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, grid={self.grid}, mode={self.mode}"

    def resolved_mode(self, device: torch.device, *, grad: bool, dtype: torch.dtype,
                      keys: int, head_dim: int) -> str:
        """``mode`` with ``"auto"`` resolved for attention in ``dtype`` over ``keys`` keys of
        ``head_dim``. On CUDA: triton for bf16 / fp16 over at least :data:`TRITON_FROM_KEYS`
        keys of a head dim in :data:`TRITON_HEAD_DIMS` where Triton runs it
        (:func:`_triton_runs`), fold otherwise; on other devices explicit when ``grad`` (a
        backward will follow), bias otherwise."""
        if self.mode != "auto":
            return self.mode
        if device.type == "cuda":
            wide = (keys >= TRITON_FROM_KEYS and head_dim in TRITON_HEAD_DIMS
                    and dtype in (torch.bfloat16, torch.float16))
            return "triton" if wide and _triton_runs(device) else "fold"
        return "explicit" if grad else "bias"

    def _tables(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Relative-position embeddings Rh [H, H, hd] and Rw [W, W, hd] for an H x W grid."""
        if (h, w) == self.grid:
            return self.rel_pos_h[self.rel_index_h], self.rel_pos_w[self.rel_index_w]
        return get_rel_pos(h, h, self.rel_pos_h), get_rel_pos(w, w, self.rel_pos_w)

    def _onehot(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """:func:`key_onehot` of an H x W grid, bool [H * W, H + W] (the buffer on the block's
        own grid)."""
        return self.key_onehot if (h, w) == self.grid else key_onehot(h, w, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, dim] -> [B, H, W, dim]: attention over the whole H x W grid of each item."""
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor, *, queries: tuple[int, int] | None = None,
               ) -> torch.Tensor:
        """The attention between the ``qkv`` and ``proj`` products: qkv [B, H, W, 3 * dim]
        (q, k, v, each heads x hd, along the last axis) -> [B, Hq, Wq, dim] (heads x hd).

        ``queries`` (Hq, Wq): only each grid's top-left Hq x Wq tokens ask (a window's real
        tokens, :class:`FusedBlock`); all H x W tokens are keys. None: every token, (H, W).
        """
        b, h, w, _ = qkv.shape
        hq, wq = queries or (h, w)
        n, nq, heads = h * w, hq * wq, self.num_heads
        # unbound along qkv's own q / k / v axis, then transposed: backward stacks the three
        # gradients straight into qkv's layout (unbinding a permuted (3, B, nh, N, hd) view
        # stacked them in that order, then copied them back)
        q, k, v = (t.transpose(1, 2) for t in
                   qkv.reshape(b, n, 3, heads, -1).unbind(2))  # (B, nh, N, hd) each
        hd = q.shape[-1]
        if nq != n:
            q = q.reshape(b, heads, h, w, hd)[:, :, :hq, :wq].reshape(b, heads, nq, hd)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, nh, Nq, hd)
        else:
            rh, rw = self._tables(h, w)  # (H, H, hd), (W, W, hd): query rows / cols first
            r_q = q.reshape(b, heads, hq, wq, hd)  # (B, nh, Hq, Wq, hd)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh[:hq].to(q.dtype))  # (.., Hq, Wq, H)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw[:wq].to(q.dtype))  # (.., Hq, Wq, W)
            mode = self.resolved_mode(qkv.device, grad=q.requires_grad, dtype=q.dtype, keys=n,
                                      head_dim=hd)
            if mode == "explicit":
                attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, Nq, N)
                attn = (attn.view(b, heads, hq, wq, h, w) + rel_h[..., :, None]
                        + rel_w[..., None, :]).view(b, heads, nq, n)  # (B, nh, Nq, N)
                out = attn.softmax(dim=-1) @ v  # (B, nh, Nq, hd)
            elif mode == "triton":
                out = rel_attention(q, k, v, rel_h.reshape(b, heads, nq, h),
                                    rel_w.reshape(b, heads, nq, w), grid=(h, w),
                                    scale=self.scale)  # (B, nh, Nq, hd)
            elif mode == "bias":
                bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(
                    b, heads, nq, n)  # (B, nh, Nq, H * W)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                     scale=self.scale)  # (B, nh, Nq, hd)
            else:
                out = _folded(q, k, v, rel_h.reshape(b, heads, nq, h),
                              rel_w.reshape(b, heads, nq, w),
                              onehot=self._onehot(h, w, q.device), scale=self.scale)
        return out.transpose(1, 2).reshape(b, hq, wq, heads * hd)  # (B, Hq, Wq, dim)


@torch._dynamo.assume_constant_result  # traced as its value: compiled code takes no branch
def _triton_runs(device: torch.device) -> bool:
    """Whether the Triton kernel runs on CUDA ``device`` in 16 bits: Triton is there and the GPU
    has compute capability :data:`TRITON_CAPABILITY` or later (older ones have no bf16)."""
    return (triton_available(device)
            and torch.cuda.get_device_capability(device) >= TRITON_CAPABILITY)


def _folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
            rel_w: torch.Tensor, *, onehot: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA with the decomposed bias folded into extra dims; q [B, nh, Nq, hd], k, v
    [B, nh, N, hd] (N = H * W keys), rel_h [B, nh, Nq, H], rel_w [B, nh, Nq, W], onehot the
    keys' :func:`key_onehot` [N, H + W] -> [B, nh, Nq, hd]."""
    b, heads, n, hd = k.shape
    extra = onehot.shape[1]
    pad = -(hd + extra) % 8  # flash kernels want a head dim that is a multiple of 8
    onehot = onehot.to(q.dtype).expand(b, heads, n, extra)  # (B, nh, N, H + W)
    # the padding is one more part of each cat, not a padded copy of it (forward and backward)
    zeros = q.new_zeros(1, 1, 1, pad)
    q2 = torch.cat([q * scale, rel_h, rel_w, zeros.expand(b, heads, q.shape[2], pad)],
                   dim=-1)  # (B, nh, Nq, hd + H + W + pad)
    k2 = torch.cat([k, onehot, zeros.expand(b, heads, n, pad)], dim=-1)  # (B, nh, N, same)
    v2 = F.pad(v, (0, extra + pad))  # (B, nh, N, hd + H + W + pad)
    out = F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)  # (B, nh, Nq, hd + ...)
    return out[..., :hd]  # (B, nh, Nq, hd)


class FusedBlock(Block):
    """An official encoder ``Block`` (same modules, same parameter names) whose attention is a
    :class:`FusedAttention` and whose windowed attention spends no work on padding tokens.

    Officially a windowed block pads the normed grid [B, H, W, dim] with zero tokens to whole
    windows, then runs ``qkv``, attention and ``proj`` for every padded token. A zero token's
    qkv is the same for all of them, ``qkv(0)`` (the bias), and a padded query's output is
    cropped away. So here ``qkv`` and ``proj`` see only the H x W real tokens, the padding keys
    and values are ``qkv(0)`` itself (gradients into the bias included, as officially), and
    only real tokens ask: the grid is cut into up to four regions whose windows have the same
    real part (inner windows, the right and bottom edges, the corner), one attention call each.
    vit_b at 256 px (16 x 16 tokens, 14-wide windows padded to 28 x 28) asks and projects for a
    third of the tokens the official block does; at 1024 px (64 -> 70) for 84 %.
    """

    def __init__(self, official: Block, *, grid: int, mode: str = "auto") -> None:
        nn.Module.__init__(self)  # the official modules are taken over, not rebuilt
        self.window_size = official.window_size
        side = self.window_size or grid
        self.norm1 = official.norm1
        self.attn = FusedAttention(official.attn, grid=(side, side), mode=mode)
        self.norm2 = official.norm2
        self.mlp = official.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, dim] -> [B, H, W, dim], the official block's function."""
        y = self.norm1(x)
        y = self.attn(y) if self.window_size == 0 else self._windowed(y)
        x = x + y
        return x + self.mlp(self.norm2(x))

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        """Windowed attention of the normed grid x [B, H, W, dim] -> [B, H, W, dim]."""
        b, h, w, dim = x.shape
        ws = self.window_size
        pad_h, pad_w = -h % ws, -w % ws
        if not (pad_h or pad_w):  # whole windows: the official order (partition the narrower x)
            windows, _ = window_partition(x, ws)  # (B * h / ws * w / ws, ws, ws, dim)
            return window_unpartition(self.attn(windows), ws, (h, w), (h, w))
        qkv = self.attn.qkv(x)  # (B, H, W, 3 dim): real tokens only
        fill = self.attn.qkv(x.new_zeros(1, dim)).view(1, 1, 1, -1)  # (1, 1, 1, 3 dim)
        # the real tokens are cut into regions by split, and only a region with a partial
        # window is padded, on its own: qkv is copied once forward (the windows), and backward
        # joins its gradient with one cat per split, contiguous for qkv's own backward
        rows, cols = _spans(h, ws), _spans(w, ws)
        bands = _cut(qkv, rows, ws, dim=1)
        out = torch.cat([self._band(band, r, cols, fill) for r, band in
                         zip(rows, bands, strict=True)], dim=1)  # (B, H, W, dim)
        # out is contiguous (concatenated): proj of a strided crop took a slow batched matmul
        # (CPU, bf16)
        return self.attn.proj(out)  # (B, H, W, dim)

    def _band(self, qkv: torch.Tensor, rows: tuple[int, int, int],
              cols: list[tuple[int, int, int]], fill: torch.Tensor) -> torch.Tensor:
        """The regions of one band of window rows: qkv [B, the band's real rows, W, 3 dim],
        ``cols`` the column spans, ``fill`` the padding token's qkv [1, 1, 1, 3 dim] -> [B,
        the band's real rows, W, dim]."""
        parts = _cut(qkv, cols, self.window_size, dim=2)
        return torch.cat([self._region(_padded(part, (rows[1], c[1]), fill), rows, c)
                          for c, part in zip(cols, parts, strict=True)], dim=2)

    def _region(self, qkv: torch.Tensor, rows: tuple[int, int, int],
                cols: tuple[int, int, int]) -> torch.Tensor:
        """Attention in the windows of one region, qkv [B, rows' tokens, cols' tokens, 3 dim]
        (whole windows of the padded grid); ``rows`` / ``cols``: (first token, tokens, real
        tokens per window) -> the region's real tokens [B, rows' windows x real rows, cols'
        windows x real cols, dim]."""
        ws = self.window_size
        (_, rn, rq), (_, cn, cq) = rows, cols
        windows, _ = window_partition(qkv, ws)  # (B nh nw, ws, ws, 3 dim)
        out = self.attn.attend(windows, queries=(rq, cq))  # (B nh nw, rq, cq, dim)
        return _unpartition(out, qkv.shape[0], rn // ws, cn // ws)  # (B, nh rq, nw cq, dim)


def _cut(x: torch.Tensor, spans: list[tuple[int, int, int]], ws: int,
         dim: int) -> tuple[torch.Tensor, ...]:
    """x's real tokens along ``dim`` split into the :func:`_spans` of windows of ``ws`` (each
    span's windows times its real tokens per window); x itself for one span (a one-part
    split's backward is a copy)."""
    if len(spans) == 1:
        return (x,)
    return x.split([n // ws * real for _, n, real in spans], dim=dim)


def _padded(part: torch.Tensor, size: tuple[int, int], fill: torch.Tensor) -> torch.Tensor:
    """A region's real tokens [B, h, w, C] padded with ``fill`` [1, 1, 1, C] at the bottom and
    right to [B, *size, C], where the official block's padding puts it: a region with a partial
    window holds just that one window along the padded axis (:func:`_spans`)."""
    b, h, w, _ = part.shape
    if w < size[1]:
        part = torch.cat([part, fill.expand(b, h, size[1] - w, -1)], dim=2)
    if h < size[0]:
        part = torch.cat([part, fill.expand(b, size[0] - h, size[1], -1)], dim=1)
    return part


def _unpartition(windows: torch.Tensor, b: int, nh: int, nw: int) -> torch.Tensor:
    """Windows' real parts [B * nh * nw, h, w, C] (row-major, as ``window_partition`` cut
    them; h x w need not be square) -> [B, nh * h, nw * w, C] (a contiguous copy)."""
    _, h, w, c = windows.shape
    return windows.reshape(b, nh, nw, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(
        b, nh * h, nw * w, c)


def _spans(n: int, ws: int) -> list[tuple[int, int, int]]:
    """Cut n real tokens in windows of ws (the last padded) into spans of windows with the same
    real part: (first token, tokens, real tokens per window); e.g. 64, 14 -> [(0, 56, 14),
    (56, 14, 8)], 16, 14 -> [(0, 14, 14), (14, 14, 2)], 6, 14 -> [(0, 14, 6)]."""
    whole, last = divmod(n, ws)
    spans = [(0, whole * ws, ws)] if whole else []
    return spans + [(whole * ws, ws, last)] if last else spans


def fuse_attention(encoder: nn.Module, *, mode: str = "auto") -> int:
    """Swap every official ``Block`` of a SAM ``ImageEncoderViT`` for a :class:`FusedBlock`
    (modules and parameters shared, in place; an already fused block gets ``mode``). Returns
    the number swapped."""
    grid = encoder.img_size // encoder.patch_embed.proj.stride[0]  # global blocks' side
    count = 0
    for i, block in enumerate(encoder.blocks):
        if isinstance(block, FusedBlock):
            block.attn.mode = mode
            continue
        encoder.blocks[i] = FusedBlock(block, grid=grid, mode=mode)
        count += 1
    return count
