"""Point prompts as sparse tokens, without the host syncs of the official prompt encoder.

Official ``PromptEncoder._embed_points`` sets the tokens of each label with a boolean-mask
update (``point_embedding[labels == 1] += ...``); on a GPU each of the four waits for the host.
:func:`embed_point_tokens` gathers the label embeddings instead: same values and gradients, no
sync, so the training step can embed its prompts without waiting for the device.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import PromptEncoder


def embed_point_tokens(pe: PromptEncoder, coords: torch.Tensor, labels: torch.Tensor, *,
                       pad: bool) -> torch.Tensor:
    """Official ``PromptEncoder._embed_points`` with a gather on the labels in place of its
    four boolean-mask updates (each a host sync on a GPU): the same values and gradients.

    coords [P, N, 2] (x, y) pixels, labels [P, N] -> tokens [P, N, 256], or [P, N + 1, 256]
    with ``pad`` (the official padding point (0, 0), label -1, added when no box is given).
    Labels 2 and 3 are a box's top-left and bottom-right corners (SAM 2 writes boxes so): they
    get the official ``_embed_boxes`` corner tokens, so a box can travel as two points.
    """
    coords = coords + 0.5  # pixel centres, as official SAM
    if pad:
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)  # (P, N+1, 2)
        labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)  # (P, N+1)
    tokens = pe.pe_layer.forward_with_coords(coords, pe.input_image_size)  # (P, N', 256)
    # Official: padding tokens become not_a_point_embed; labels 0 / 1 (points) and 2 / 3 (box
    # corners) add point_embeddings[label]. The sum is formed in float32 and rounded once to
    # the tokens' dtype (bf16 under autocast), as the official in-place additions do.
    table = torch.stack([e.weight[0] for e in pe.point_embeddings])  # (4, 256)
    out = tokens + table[labels.clamp(0, len(table) - 1)]  # (P, N', 256)
    return torch.where(labels[..., None] == -1, pe.not_a_point_embed.weight, out).to(
        tokens.dtype)
