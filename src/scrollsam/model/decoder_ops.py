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
* attention between the few prompt tokens (T = 7 for one point) and the g*g image tokens
  moves the image side's projections onto the token side (:func:`token_to_image`,
  :func:`image_to_token`): about 2.3 times fewer multiply-adds, as only heads x T rows or
  columns are projected instead of 4096 image tokens.

The official ``MaskDecoder`` (``model.sam.mask_decoder``) stays the readable reference:
``tests/test_model_decode.py`` checks outputs and every gradient of this module against it at
S = 1024, 256 and 64, and :func:`check_plain_layers` refuses a decoder whose layers were
wrapped or replaced, which this module would otherwise bypass. Speed: ``benchmarks/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# The tokens' self-attention: any SDPA kernel but cuDNN's. Its shapes change with every step's
# prompt sets ([P, heads, T, c], P and T vary), and cuDNN builds an execution plan per new shape
# on the host (0.7 ms per backward call measured on an H100, torch 2.11: ~17 ms of host time a
# step at 1024 px), which the other kernels do not.
TOKEN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def check_plain_layers(decoder: MaskDecoder) -> None:
    """TypeError naming the first sub-module of ``decoder`` that this module would bypass.

    The functions below re-implement the forwards of the official ``TwoWayTransformer``, its
    blocks and ``Attention`` layers, read the ``weight`` / ``bias`` of their ``nn.Linear``
    projections directly, and unpack ``output_upscaling`` as (ConvTranspose2d k=2 s=2,
    LayerNorm2d, activation, ConvTranspose2d k=2 s=2, activation). A wrapped or replaced layer
    (a LoRA adapter, a quantised Linear, a subclass) would be silently skipped, so every one of
    them must be exactly the official type. The segmenter runs this when it is built and on its
    first decode (after adapters are added), not on every decode (a walk of some 70 modules).
    """
    t = decoder.transformer
    want: list[tuple[str, object, type]] = [("transformer", t, TwoWayTransformer)]
    attns = [("transformer.final_attn_token_to_image", t.final_attn_token_to_image)]
    for i, layer in enumerate(t.layers):
        want.append((f"transformer.layers.{i}", layer, TwoWayAttentionBlock))
        attns += [(f"transformer.layers.{i}.{n}", getattr(layer, n, None)) for n in (
            "self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")]
    for name, attn in attns:
        want.append((name, attn, Attention))
        want += [(f"{name}.{n}", getattr(attn, n, None), nn.Linear)
                 for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    up = decoder.output_upscaling
    if type(up) is not nn.Sequential or len(up) != 5:
        raise TypeError(f"mask_decoder.output_upscaling: decoder_ops expects the official "
                        f"nn.Sequential of 5 modules, got {up!r}")
    want += [("output_upscaling.0", up[0], nn.ConvTranspose2d),
             ("output_upscaling.1", up[1], LayerNorm2d),  # 2 and 4, activations, are called
             ("output_upscaling.3", up[3], nn.ConvTranspose2d)]
    for name, module, kind in want:
        if type(module) is not kind:
            raise TypeError(
                f"mask_decoder.{name}: decoder_ops reads the official {kind.__name__} "
                f"directly and would bypass this {type(module).__name__}; decode with the "
                f"official model.sam.mask_decoder or teach scrollsam.model.decoder_ops the layer")
    for i in (0, 3):
        conv = up[i]
        if (conv.kernel_size, conv.stride, conv.padding, conv.output_padding, conv.dilation,
                conv.groups) != ((2, 2), (2, 2), (0, 0), (0, 0), (1, 1), 1):
            raise TypeError(f"mask_decoder.output_upscaling.{i}: decoder_ops expects "
                            f"ConvTranspose2d(kernel_size=2, stride=2), got {conv!r}")


def transformer_tokens(
    transformer: TwoWayTransformer,
    keys: torch.Tensor,
    key_pe: torch.Tensor,
    tokens: torch.Tensor,
    present: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``TwoWayTransformer.forward`` on image tokens instead of maps.

    keys ``[P, g*g, 256]`` (image embedding plus dense prompt, token order row-major), key_pe
    ``[1 or P, g*g, 256]`` (broadcast over sets, never copied), tokens ``[P, T, 256]``.
    ``present`` bool ``[P, T]`` (None: all): a token marked absent is never attended to, so a
    set decodes exactly as if it did not have it (its own output row is meaningless); sets with
    different numbers of prompt tokens can so share one call.
    Returns (queries ``[P, T, 256]``, keys ``[P, g*g, 256]``).
    """
    queries = tokens
    for layer in transformer.layers:
        queries, keys = two_way_block(layer, queries, keys, tokens, key_pe, present)
    attn_out = token_to_image(transformer.final_attn_token_to_image, queries + tokens,
                              keys + key_pe, keys)
    return transformer.norm_final_attn(queries + attn_out), keys


def two_way_block(
    layer: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    present: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``TwoWayAttentionBlock.forward``: queries ``[P, T, 256]``, keys
    ``[P, g*g, 256]``, pe broadcastable to each, ``present`` as in :func:`transformer_tokens`
    -> (queries, keys), same shapes."""
    if layer.skip_first_layer_pe:
        queries = attention(layer.self_attn, queries, queries, queries, present)
    else:
        q = queries + query_pe
        queries = queries + attention(layer.self_attn, q, q, queries, present)
    queries = layer.norm1(queries)
    k = keys + key_pe  # (P, g*g, 256)
    attn_out = token_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys)
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    attn_out = image_to_token(layer.cross_attn_image_to_token, k, queries + query_pe, queries,
                              present)
    return queries, layer.norm4(keys + attn_out)


def attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              present: torch.Tensor | None = None) -> torch.Tensor:
    """Official ``Attention.forward(q, k, v)``, ``[P, N, 256]`` inputs -> ``[P, Nq, 256]``, with
    one fused attention kernel instead of the official matmul, scale, softmax, matmul and head
    copies. Used for the tokens' self-attention (a few tokens); ``present`` bool ``[P, N]``:
    the keys that may be attended to (None: all)."""
    split = _split_heads(attn.num_heads)
    mask = None if present is None else present[:, None, None, :]  # (P, 1, 1, N)
    with sdpa_kernel(TOKEN_BACKENDS):
        out = F.scaled_dot_product_attention(split(attn.q_proj(q)), split(attn.k_proj(k)),
                                             split(attn.v_proj(v)),
                                             attn_mask=mask)  # (P, heads, Nq, c)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def _split_heads(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """[P, N, D] -> [P, heads, N, D / heads], a view."""
    return lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _head_weights(linear: nn.Linear, heads: int) -> torch.Tensor:
    """A projection's weight [D, 256] as [heads, c, 256] (c = D / heads)."""
    return linear.weight.unflatten(0, (heads, -1))


def token_to_image(attn: Attention, q_in: torch.Tensor, k_in: torch.Tensor,
                   v_in: torch.Tensor) -> torch.Tensor:
    """Official ``Attention.forward`` for T tokens attending to N image tokens, with the image
    side's projections moved onto the token side.

    q_in ``[P, T, 256]``, k_in and v_in ``[P, N, 256]`` -> ``[P, T, 256]``. Per head h, a query
    q scores key x as ``q . (W_k x + b_k) = (W_k^T q) . x + const``; softmax ignores the
    constant. Rows of the attention A sum to 1, so ``A (W_v X + b_v) = W_v (A X) + b_v``.
    Both products then have heads x T (8 x 7) rows instead of N (4096): 2.3 times fewer
    multiply-adds than projecting every image token, backward included.
    """
    heads, c = attn.num_heads, attn.internal_dim // attn.num_heads
    p, t, _ = q_in.shape
    q = attn.q_proj(q_in).unflatten(-1, (heads, c))  # (P, T, heads, c)
    qk = torch.einsum("pthc,hcx->phtx", q, _head_weights(attn.k_proj, heads))  # (P, h, T, 256)
    scores = qk.flatten(1, 2) @ k_in.transpose(1, 2)  # (P, heads * T, N)
    weights = torch.softmax(scores * c**-0.5, dim=-1)
    ax = (weights @ v_in).unflatten(1, (heads, t))  # (P, heads, T, 256)
    out = torch.einsum("phtx,hcx->pthc", ax, _head_weights(attn.v_proj, heads))  # (P, T, h, c)
    return attn.out_proj(out.flatten(2) + attn.v_proj.bias)


def image_to_token(attn: Attention, q_in: torch.Tensor, k_in: torch.Tensor,
                   v_in: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Official ``Attention.forward`` for N image tokens attending to T tokens, with the image
    side's projections (queries in, ``out_proj`` out) moved onto the token side.

    q_in ``[P, N, 256]``, k_in and v_in ``[P, T, 256]`` -> ``[P, N, 256]``. Per head h, image
    token x scores key k as ``(W_q x + b_q) . k = x . (W_q^T k) + b_q . k``, and the output
    ``W_o concat_h(A_h V_h) + b_o = sum_h A_h (V_h W_o,h^T) + b_o``: two products with
    heads x T (56) columns replace the 256 -> 128 -> 256 projections of all N image tokens.
    ``present`` bool ``[P, T]``: the tokens that may be attended to (None: all).
    """
    heads, c = attn.num_heads, attn.internal_dim // attn.num_heads
    p, t = q_in.shape[0], k_in.shape[1]
    k = attn.k_proj(k_in).unflatten(-1, (heads, c))  # (P, T, heads, c)
    v = attn.v_proj(v_in).unflatten(-1, (heads, c))  # (P, T, heads, c)
    # Columns ordered (token, head): the softmax over T then runs on a middle axis, which
    # PyTorch vectorises across the 8 heads (faster on CPU than over a last axis of 7).
    wq = _head_weights(attn.q_proj, heads)  # (heads, c, 256)
    qk = torch.einsum("hcx,pthc->pxth", wq, k).flatten(2)  # (P, 256, T * heads)
    bias = torch.einsum("hc,pthc->pth", attn.q_proj.bias.unflatten(0, (heads, c)), k)
    scores = torch.baddbmm(bias.flatten(1)[:, None, :], q_in, qk)  # (P, N, T * heads)
    scores = scores.unflatten(-1, (t, heads)) * c**-0.5  # (P, N, T, heads)
    if present is not None:
        scores = scores.masked_fill(~present[:, None, :, None], float("-inf"))
    weights = torch.softmax(scores, dim=-2).flatten(2)
    wo = attn.out_proj.weight.unflatten(1, (heads, c))  # (256, heads, c)
    vo = torch.einsum("pthc,xhc->pthx", v, wo).flatten(1, 2)  # (P, T * heads, 256)
    return torch.baddbmm(attn.out_proj.bias.expand(p, 1, -1), weights, vo)  # (P, N, 256)


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
