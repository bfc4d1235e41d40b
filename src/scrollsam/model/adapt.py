"""Adapt pretrained SAM weights to another input resolution or channel count.

Official SAM weights are trained at 1024 x 1024 px with 3 (RGB) channels. Scroll tiles are small
(256 or 512 px) and x-ray inputs can stack many slices as channels, so a state dict is reshaped
to the model being loaded into, never the other way round:

* Resolution (``image_size`` S, any multiple of 16): the absolute position embedding
  ``image_encoder.pos_embed`` [1, 64, 64, D] is resized bicubically to [1, S/16, S/16, D]; the
  relative position tables of the *global* attention blocks (``rel_pos_h`` / ``rel_pos_w``,
  [2 * 64 - 1, head_dim]) are resized linearly to [2 * S/16 - 1, head_dim] (the same
  interpolation official SAM applies on the fly when sizes differ). Windowed blocks keep their
  [2 * 14 - 1, head_dim] tables at any resolution (a window is 14 x 14 tokens), unless the
  model's window size differs (``model.window_size`` 16 or 8 at 256 px): then their tables are
  resized the same way to [2 * window - 1, head_dim]. Resizing happens once, here, at load
  time; the encoder's forward never interpolates.
* Channels (``in_chans`` C != 3): the patch embedding ``[D, 3, 16, 16]`` is replaced by the mean
  of its RGB filters replicated C times and scaled by 3 / C, so C identical channels produce
  exactly the activations the original filters give for the same grey image in R, G and B.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from scrollsam.errors import CheckpointError

log = logging.getLogger(__name__)

POS_EMBED = "image_encoder.pos_embed"
PATCH_WEIGHT = "image_encoder.patch_embed.proj.weight"


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize an absolute position embedding [1, H, W, D] to [1, grid, grid, D] (bicubic)."""
    if pos_embed.shape[1] == grid and pos_embed.shape[2] == grid:
        return pos_embed
    x = pos_embed.permute(0, 3, 1, 2).float()  # (1, D, H, W)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos_embed.dtype)  # (1, grid, grid, D)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a relative position table [L, head_dim] to [length, head_dim] (linear)."""
    if table.shape[0] == length:
        return table
    x = table.float().t().unsqueeze(0)  # (1, head_dim, L)
    x = F.interpolate(x, size=length, mode="linear", align_corners=False)
    return x.squeeze(0).t().to(table.dtype)  # (length, head_dim)


def inflate_patch_embed(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Patch-embedding weight [D, 3, p, p] -> [D, in_chans, p, p]: mean RGB filter x 3 / C."""
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise CheckpointError(
            f"cannot adapt a patch embedding with {weight.shape[1]} input channels to "
            f"{in_chans}: only 3-channel (RGB) weights are inflated ({PATCH_WEIGHT})"
        )
    mean = weight.mean(dim=1, keepdim=True)  # (D, 1, p, p)
    return mean.repeat(1, in_chans, 1, 1) * (3.0 / in_chans)  # (D, C, p, p)


def adapt_state_dict(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return ``state`` reshaped to the shapes of ``target`` (a model's own state dict).

    Only the three kinds of tensors described in the module docstring are adapted; any other
    shape difference means the checkpoint belongs to another architecture and is left for the
    caller to report.
    """
    out = dict(state)
    if POS_EMBED in out and POS_EMBED in target:
        grid = target[POS_EMBED].shape[1]
        if out[POS_EMBED].shape != target[POS_EMBED].shape:
            log.info("resizing %s %s -> %s", POS_EMBED, tuple(out[POS_EMBED].shape),
                     tuple(target[POS_EMBED].shape))
            out[POS_EMBED] = resize_pos_embed(out[POS_EMBED], grid)
    for key, want in target.items():
        if key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) and key in out:
            if out[key].shape != want.shape and out[key].shape[1:] == want.shape[1:]:
                out[key] = resize_rel_pos(out[key], want.shape[0])
    if PATCH_WEIGHT in out and PATCH_WEIGHT in target:
        want_c = target[PATCH_WEIGHT].shape[1]
        if out[PATCH_WEIGHT].shape[1] != want_c:
            log.info("inflating patch embedding from %d to %d channels",
                     out[PATCH_WEIGHT].shape[1], want_c)
            out[PATCH_WEIGHT] = inflate_patch_embed(out[PATCH_WEIGHT], want_c)
    return out
