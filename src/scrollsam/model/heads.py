"""A full-resolution mask head: SAM's S/4 logits refined at the input resolution.

SAM's decoder predicts at S/4. Thin strokes do not survive that: area-averaging the *true*
labels of synthetic fragments to S/4 and upsampling them back scores only F0.5 0.88. The head
keeps SAM's output and prompt semantics and adds what S/4 cannot hold:

* an image stage, once per image: full-resolution features ``[B, F, S, S]`` (the depth
  encoder's, or the head's own small conv stem over the model input) -> ``[B, G, S, S]``;
* a set stage, once per prompt set and mask: the bilinearly upsampled SAM logits of the set,
  next to the image-stage features of its image (``image_index``), through two small
  convolutions to a correction that is *added* to the upsampled logits.

The last convolution starts at zero, so an untrained head returns exactly the upsampled SAM
logits (the official output). With ``use_sam_logits=False`` the set stage sees zeros in place
of SAM's logits and nothing is added: the head alone, for measuring what SAM contributes.

Shapes: logits ``[P, M, S/4, S/4]`` -> ``[P, M, S, S]``; ``image_index`` long [P].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scrollsam.losses import upsample_logits


class MaskHead(nn.Module):
    """Full-resolution refinement of SAM mask logits; see the module docstring."""

    def __init__(
        self,
        in_features: int,
        *,
        hidden: int = 16,
        stem_from: int | None = None,
        use_sam_logits: bool = True,
    ) -> None:
        """``in_features``: F, channels of the features it is given. ``stem_from``: build a
        small conv stem taking the model input (that many channels) to F features, for models
        without a depth encoder."""
        super().__init__()
        self.use_sam_logits = use_sam_logits
        self.stem = None
        if stem_from is not None:
            self.stem = nn.Sequential(nn.Conv2d(stem_from, in_features, 3, padding=1), nn.GELU())
        g = hidden
        self.image_stage = nn.Sequential(
            nn.Conv2d(in_features, g, 3, padding=1), nn.GELU(),
            nn.Conv2d(g, g, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(g, g, 3, padding=4, dilation=4), nn.GELU(),
        )
        self.set_in = nn.Conv2d(g + 1, g, 1)
        self.set_out = nn.Conv2d(g, 1, 3, padding=1)
        nn.init.zeros_(self.set_out.weight)
        nn.init.zeros_(self.set_out.bias)
        self.act = nn.GELU()

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        """Per-image stage: [B, F, S, S] (or the model input [B, C, S, S] with a stem) ->
        [B, G, S, S], already through the image side of ``set_in`` (see :meth:`forward`)."""
        features = features.contiguous(memory_format=torch.channels_last)  # as DepthEncoder
        if self.stem is not None:
            features = self.stem(features)
        g = self.set_in.out_channels
        return F.conv2d(self.image_stage(features), self.set_in.weight[:, :g],
                        self.set_in.bias)  # (B, G, S, S)

    def forward(self, logits: torch.Tensor, image_features: torch.Tensor,
                image_index: torch.Tensor) -> torch.Tensor:
        """SAM logits [P, M, S/4, S/4], :meth:`image_features` [B, G, S, S], image_index [P]
        -> full-resolution logits [P, M, S, S].

        ``set_in`` is a 1 x 1 convolution of [features of the set's image, upsampled logits]:
        its image part is linear in the features alone, so :meth:`image_features` applies it
        once per image, and each set and mask adds only its logits times their weight column
        (the same sum, without a [P * M, G + 1, S, S] copy and convolution)."""
        p, m = logits.shape[:2]
        size = image_features.shape[-2:]
        if self.use_sam_logits:
            up = upsample_logits(logits, tuple(size))  # (P, M, S, S)
        else:
            up = logits.new_zeros(p, m, *size)
        feats = image_features.index_select(0, image_index)  # (P, G, S, S)
        g = feats.shape[1]
        w_up = self.set_in.weight[:, g:].reshape(1, 1, g, 1, 1).to(feats.dtype)  # (1,1,G,1,1)
        # in the features' dtype: under bf16 autocast the largest tensor of the step stays bf16
        x = torch.addcmul(feats[:, None], up[:, :, None].to(feats.dtype), w_up)  # (P,M,G,S,S)
        delta = self.set_out(self.act(x.reshape(p * m, g, *size)))  # (P*M, 1, S, S)
        return up + delta.reshape(p, m, *size)
