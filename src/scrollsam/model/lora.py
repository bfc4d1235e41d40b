"""LoRA: adapt the frozen image encoder with low-rank updates (Hu et al. 2021).

Training the whole vit_b encoder means gradients and AdamW state for its 86 M weights and no
embedding cache. LoRA keeps the official weights frozen and learns, in every attention block of
the encoder, a rank-r update of the fused query/key/value projection::

    qkv(x) = W x + b + (alpha / r) * B (A x)        A: [r, C] (random), B: [3C, r] (zeros)

B starts at zero, so a freshly adapted model computes exactly what the official one does; a
rank-4 adapter adds 4 * (C + 3C) = 12 288 parameters per vit_b block (147 456 in all).

The adapted layer keeps the official parameter names (``...attn.qkv.weight`` / ``.bias``) and adds
``...attn.qkv.lora_a`` / ``.lora_b``, so checkpoints stay readable by official-name tools and a
LoRA run's checkpoint loads into a model adapted the same way (the run's ``model.lora_rank``).
For another rank, or none, :func:`merge_lora` folds the adapters into the official weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from scrollsam.errors import CheckpointError, InputError

LORA_SUFFIXES = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (its own weight and bias, shared) plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the official parameter
        self.bias = base.bias  # (out,) or None
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]``."""
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(
            F.linear(x, self.lora_a), self.lora_b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.lora_a.shape[0]}, scale={self.scale:g}")


def add_lora(model: nn.Module, *, rank: int, alpha: float) -> int:
    """Put a rank-``rank`` adapter on the qkv projection of every image-encoder block of
    ``model.sam`` (in place; new parameters on the weights' device). Returns the number of
    adapter parameters added. Adapting twice is an error."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"lora rank: expected a positive int, got {rank!r}")
    if not alpha > 0:
        raise InputError(f"lora alpha: expected a positive number, got {alpha!r}")
    added = 0
    for i, block in enumerate(model.sam.image_encoder.blocks):
        if isinstance(block.attn.qkv, LoRALinear):
            raise InputError(f"image_encoder.blocks.{i}.attn.qkv already has a LoRA adapter")
        block.attn.qkv = LoRALinear(block.attn.qkv, rank=rank, alpha=alpha)
        added += block.attn.qkv.lora_a.numel() + block.attn.qkv.lora_b.numel()
    return added


def is_lora_parameter(name: str) -> bool:
    """True for the adapter parameters added by :func:`add_lora` (by state-dict name)."""
    return name.rsplit(".", 1)[-1] in LORA_SUFFIXES


def has_lora(model: nn.Module) -> bool:
    """Whether ``model.sam``'s image encoder carries LoRA adapters."""
    return any(isinstance(m, LoRALinear) for m in model.sam.image_encoder.modules())


def lora_rank_of(state: Mapping[str, torch.Tensor]) -> int:
    """The rank of the adapters in a state dict (the rows of its first ``lora_a``), 0 without."""
    first = next((t for k, t in state.items() if k.endswith(".lora_a")), None)
    return 0 if first is None else int(first.shape[0])


def check_lora_rank(state: Mapping[str, torch.Tensor], *, rank: int, source: str) -> None:
    """CheckpointError, saying what to do, when ``state`` holds adapters of a rank other than
    the model's ``rank`` (0: the model has none). Weights without adapters fit any rank: the
    model keeps its fresh adapters, which change nothing until trained."""
    found = lora_rank_of(state)
    if not found or found == rank:
        return
    what = ("that the model lacks" if not rank else
            f"but the model's are rank {rank} (model.lora_rank)")
    raise CheckpointError(
        f"the checkpoint holds LoRA adapters (rank {found}) {what}: set "
        f"model.lora_rank={found} (build_model(..., lora_rank={found})) to start from them, or "
        f"fold them into the encoder's weights first with scrollsam.model.lora.merge_lora "
        f"('LoRA checkpoints' in the README) to go on "
        f"{'without adapters' if not rank else f'with new rank-{rank} ones'} ({source})")


def merge_lora(state: Mapping[str, torch.Tensor], *, alpha: float) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every adapter folded into its layer's weight,
    ``W + (alpha / r) * B A``, and the ``lora_a`` / ``lora_b`` tensors left out: official SAM
    weights that compute what the adapted encoder did (``alpha``: the run's
    ``model.lora_alpha``). A state dict without adapters comes back unchanged."""
    out = {k: v for k, v in state.items() if not is_lora_parameter(k)}
    for key, a in state.items():
        if not key.endswith(".lora_a"):
            continue
        layer = key[: -len("lora_a")]  # "image_encoder.blocks.0.attn.qkv."
        b, weight = state[layer + "lora_b"], state[layer + "weight"]
        update = (alpha / a.shape[0]) * (b.float() @ a.float())  # (out, r) @ (r, in)
        out[layer + "weight"] = (weight.float() + update).to(weight.dtype)  # (out, in)
    return out
