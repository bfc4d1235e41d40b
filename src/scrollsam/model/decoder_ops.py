"""The official mask decoder, recomputed for training speed (same weights, same values).

Official ``MaskDecoder.predict_masks`` moves between two layouts: the transformer works on image
tokens ``[P, g*g, 256]`` (g = S/16), the upscaling on feature maps ``[P, 256, g, g]``. Each move
is a transpose copy, and the two ``ConvTranspose2d(kernel_size=2, stride=2)`` layers, the
``LayerNorm2d`` (seven elementwise ops and their backward) and the final product with the
hypernetwork outputs all run on channel-first maps. On a CPU that costs more than the matrix
products themselves once gradients are needed. Here:

* everything stays in token layout, channels last. A ``ConvTranspose2d`` with kernel 2 and
  stride 2 maps each input pixel to its own 2 x 2 block of output pixels: one matrix product
  ``[..., C_in] @ [C_in, 2 * 2 * C_out]``. ``LayerNorm2d`` over channels is
  :func:`torch.nn.functional.layer_norm` on the last axis. Output pixels stay grouped by the
  embedding token they came from ("blocked layout", ``[P, g*g*16, 32]``) until the hypernetwork
  product has reduced 32 channels to M masks; only the small ``[P, M, S/4, S/4]`` result is
  put in image order. Pixel (row, column) of blocked index (token (i, j), first-level offset
  (a1, b1), second-level offset (a2, b2)) is (4 i + 2 a1 + a2, 4 j + 2 b1 + b2);
* attention is one fused :func:`torch.nn.functional.scaled_dot_product_attention` call after
  the official projections;
* without mask prompts every set of an image starts from the same keys, so the first block
  projects each image once (:func:`first_block_shared`).

Measured (vit_b decoder at 1024 px, 4 tiles x 2 point prompts, forward + backward + AdamW,
2-core CPU): 1.66 s per step with the official decoder code, 1.02 s with this module.
``tests/test_model_decode.py`` checks outputs and every gradient against official SAM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn


def transformer_tokens(
    transformer: TwoWayTransformer,
    keys: torch.Tensor | None,
    key_pe: torch.Tensor,
    tokens: torch.Tensor,
    *,
    shared: SharedKeys | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``TwoWayTransformer.forward`` on image tokens instead of maps.

    keys ``[P, g*g, 256]`` (image embedding plus dense prompt, token order row-major), key_pe
    ``[1 or P, g*g, 256]`` (broadcast over sets, never copied), tokens ``[P, T, 256]``.
    With ``shared`` (dense prompts constant over the image), ``keys`` may be None: the first
    block then projects each image once (:func:`first_block_shared`).
    Returns (queries ``[P, T, 256]``, keys ``[P, g*g, 256]``).
    """
    queries = tokens
    for i, layer in enumerate(transformer.layers):
        if i == 0 and shared is not None:
            queries, keys = first_block_shared(layer, queries, tokens, key_pe, shared)
        else:
            queries, keys = two_way_block(layer, queries, keys, tokens, key_pe)
    attn_out = attention(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe,
                         keys)
    return transformer.norm_final_attn(queries + attn_out), keys


class SharedKeys(NamedTuple):
    """The first block's image side when every set's dense prompt is one vector.

    image ``[B, g*g, 256]`` embedding tokens, index long ``[P]`` (set -> image), offset
    ``[P, 256]``: set p's keys are ``image[index[p]] + offset[p]`` at every token (official SAM
    adds ``no_mask_embed`` everywhere when a set has no mask prompt).
    """

    image: torch.Tensor
    index: torch.Tensor
    offset: torch.Tensor


def attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Official ``Attention.forward`` after its three input projections.

    q ``[P, Nq, D]``, k and v ``[P, Nk, D]`` (D = the internal width, heads x channels per
    head) -> ``[P, Nq, 256]``: per head softmax(q k^T / sqrt(D / heads)) v, then ``out_proj``.
    One fused kernel instead of the official matmul, scale, softmax, matmul and head copies.
    """
    heads = attn.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:  # (P, N, D) -> (P, heads, N, D / heads), a view
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (P, heads, Nq, D / heads)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Official ``Attention.forward(q, k, v)``: ``[P, N, 256]`` inputs -> ``[P, Nq, 256]``."""
    return attend(attn, attn.q_proj(q), attn.k_proj(k), attn.v_proj(v))


def _token_half(layer: TwoWayAttentionBlock, queries: torch.Tensor, query_pe: torch.Tensor,
                cross: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The block's token side: self-attention, ``cross`` (token-to-image attention of the
    position-encoded queries), MLP, each with its residual and norm. queries ``[P, T, 256]``."""
    if layer.skip_first_layer_pe:
        queries = attention(layer.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + attention(layer.self_attn, q, q, queries)
    queries = layer.norm1(queries)
    queries = layer.norm2(queries + cross(queries + query_pe))
    return layer.norm3(queries + layer.mlp(queries))


def two_way_block(
    layer: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``TwoWayAttentionBlock.forward``: queries ``[P, T, 256]``, keys
    ``[P, g*g, 256]``, pe broadcastable to each -> (queries, keys), same shapes."""
    k = keys + key_pe  # (P, g*g, 256)
    t2i = layer.cross_attn_token_to_image
    queries = _token_half(layer, queries, query_pe, lambda q: attention(t2i, q, k, keys))
    q = queries + query_pe
    keys = layer.norm4(keys + attention(layer.cross_attn_image_to_token, k, q, queries))
    return queries, keys


def first_block_shared(
    layer: TwoWayAttentionBlock,
    queries: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    shared: SharedKeys,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`two_way_block` for keys ``image[index] + offset``: the three projections of the
    image tokens (token-to-image keys and values, image-to-token queries) run once per image,
    not once per set, and the offset enters through linearity, ``W (x + o) = W x + W o``.
    With 2 sets per image this saves 3 of the 10 large products of the transformer per set,
    their backward included (and when the image does not need a gradient, their input
    gradients too)."""
    image, index, offset = shared
    with_pe = image + key_pe  # (B, g*g, 256)

    def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # (B, g*g, D) -> (P, ...)
        per_set = F.linear(offset, linear.weight)[:, None, :]  # (P, 1, D)
        return linear(x).index_select(0, index) + per_set

    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    k, v = project(t2i.k_proj, with_pe), project(t2i.v_proj, image)  # (P, g*g, D)
    queries = _token_half(layer, queries, query_pe, lambda q: attend(t2i, t2i.q_proj(q), k, v))
    q = queries + query_pe
    attn_out = attend(i2t, project(i2t.q_proj, with_pe), i2t.k_proj(q), i2t.v_proj(queries))
    keys = image.index_select(0, index) + offset[:, None, :]  # (P, g*g, 256)
    return queries, layer.norm4(keys + attn_out)


def _deconv2x2(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """``ConvTranspose2d(k=2, s=2)`` on channels-last pixels: ``[..., C_in]`` ->
    ``[..., 4, C_out]``, the 4 being the output offsets (a, b) row-major."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)  # (C_in, (a, b, C_out))
    bias = conv.bias.repeat(4) if conv.bias is not None else None  # (4 * C_out,)
    y = F.linear(x, weight.t(), bias)  # (..., 4 * C_out)
    return y.unflatten(-1, (4, c_out))


def upscale_tokens(upscaling: nn.Sequential, src: torch.Tensor) -> torch.Tensor:
    """Official ``output_upscaling`` on transformer tokens ``[P, g*g, 256]`` -> blocked
    features ``[P, g*g*16, 32]`` (see the module docstring for the pixel order)."""
    conv1, norm, act1, conv2, act2 = upscaling
    x = _deconv2x2(conv1, src)  # (P, g*g, 4, 64)
    x = act1(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
    x = act2(_deconv2x2(conv2, x))  # (P, g*g, 4, 4, 32)
    return x.flatten(1, 3)  # (P, g*g*16, 32)


def blocked_to_image(blocked: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-pixel values in blocked order ``[P, g*g*16, M]`` -> ``[P, M, 4g, 4g]`` images."""
    p, _, m = blocked.shape
    x = blocked.reshape(p, grid, grid, 2, 2, 2, 2, m)  # (P, i, j, a1, b1, a2, b2, M)
    x = x.permute(0, 7, 1, 3, 5, 2, 4, 6)  # (P, M, i, a1, a2, j, b1, b2)
    return x.reshape(p, m, 4 * grid, 4 * grid)
