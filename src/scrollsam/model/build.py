"""Build SAM variants and load official or scrollsam checkpoints into them.

A variant is a handful of encoder numbers; one private builder assembles the official
``segment_anything`` parts (image encoder, prompt encoder, mask decoder) at any resolution and
channel count and hands them to ``Sam``, so parameter names stay the official ones and official
files (``sam_vit_b_01ec64.pth`` ...) load unchanged. ``tiny`` is one more entry: a small encoder
for tests and CPU demos with the same 256-channel embedding and the full official decoder.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from scrollsam.errors import CheckpointError, InputError
from scrollsam.model.adapt import PATCH_WEIGHT, adapt_state_dict
from scrollsam.model.attention import fuse_attention
from scrollsam.model.lora import add_lora, check_lora_rank, is_lora_parameter, lora_rank_of
from scrollsam.model.patch_embed import fuse_patch_embed
from scrollsam.model.sam_file import check_finite, load_sam_state_dict
from scrollsam.model.segmenter import SamSegmenter

log = logging.getLogger(__name__)

PROMPT_DIM = 256  # embedding channels of every variant: the decoder contract
PATCH = 16  # ViT patch size: S / 16 embedding tokens per side


@dataclass(frozen=True)
class EncoderSpec:
    """The numbers that distinguish one SAM image encoder from another."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14


VARIANTS: dict[str, EncoderSpec] = {
    "vit_b": EncoderSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": EncoderSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": EncoderSpec(1280, 32, 16, (7, 15, 23, 31)),
    # Not an official model: for tests and CPU demos. Window 8 tiles a 256 px input (16 x 16
    # tokens) into exactly four windows.
    "tiny": EncoderSpec(96, 4, 3, (1, 3), window_size=8),
}


# Encoder attention: "fused" = scrollsam.model.attention.FusedAttention (same parameters and
# values, one fused kernel); "official" = segment_anything's own.
ATTENTION = ("fused", "official")


def fuse_encoder(encoder: ImageEncoderViT, *, mode: str = "auto") -> None:
    """An official ``ImageEncoderViT`` made the one ``attention="fused"`` builds, in place:
    :class:`~scrollsam.model.attention.FusedAttention` of ``mode`` in every block, and the
    patch convolution as one matrix product (:mod:`scrollsam.model.patch_embed`)."""
    fuse_attention(encoder, mode=mode)
    fuse_patch_embed(encoder)


def _build_sam(spec: EncoderSpec, *, image_size: int, in_chans: int,
               attention: str = "fused") -> Sam:
    grid = image_size // PATCH
    encoder = ImageEncoderViT(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.num_heads,
        patch_size=PATCH,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        out_chans=PROMPT_DIM,
        in_chans=in_chans,
    )
    if attention == "fused":
        fuse_encoder(encoder)
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048,
                                      num_heads=8),
        transformer_dim=PROMPT_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    # pixel_mean / pixel_std are unused: scrollsam normalises images before they reach the model.
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder,
               pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0])


def _whole(name: str, value: object) -> int:
    """``value`` as a Python int when it is a whole number (int or numpy integer, not a bool);
    InputError naming ``name`` otherwise."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise InputError(f"{name}: expected an int, got {value!r}")


def build_model(
    type: str,
    *,
    checkpoint: str | Path | None = None,
    image_size: int = 1024,
    in_chans: int = 3,
    window_size: int | None = None,
    attention: str = "fused",
    lora_rank: int = 0,
    lora_alpha: float = 8.0,
) -> SamSegmenter:
    """Build a :class:`SamSegmenter` of variant ``type``: ``vit_b``, ``vit_l``, ``vit_h``, ``tiny``.

    ``image_size`` is the side S of the square model input (a multiple of 16); ``in_chans`` the
    number of input channels C. ``checkpoint`` is an official SAM file or a scrollsam training
    checkpoint; its weights are adapted to S and C (see :mod:`scrollsam.model.adapt`). Without a
    checkpoint the weights are random (official initialisation). ``window_size``: tokens per
    side of the encoder's attention windows (None: the variant's, 14 for the official ones; 16
    or 8 tile the 16 x 16 grid of a 256 px input without padding). ``attention``: ``"fused"``
    (fused, :mod:`scrollsam.model.attention`, and the patch embedding as a matrix product,
    :mod:`scrollsam.model.patch_embed`) or ``"official"`` (segment_anything's own code).
    ``lora_rank`` > 0 puts LoRA adapters on the encoder (:func:`scrollsam.model.lora.add_lora`)
    before the checkpoint loads: a LoRA run's checkpoint of that rank brings its adapters, and
    a scrollsam checkpoint's, made with another ``lora_alpha``, are rescaled to compute what
    they did; another rank is an error that says what to do.
    """
    if type not in VARIANTS:
        raise InputError(f"model type: expected one of {sorted(VARIANTS)}, got {type!r}")
    image_size = _whole("image_size", image_size)  # numpy integers too, never a bool
    if image_size < PATCH or image_size % PATCH:
        raise InputError(f"image_size: expected a positive multiple of {PATCH}, got "
                         f"{image_size}")
    in_chans = _whole("in_chans", in_chans)
    if in_chans < 1:
        raise InputError(f"in_chans: expected a positive int, got {in_chans}")
    if window_size is not None:
        window_size = _whole("window_size", window_size)
        if window_size < 1:
            raise InputError(f"window_size: expected a positive int or None, got "
                             f"{window_size}")
    if attention not in ATTENTION:
        raise InputError(f"attention: expected one of {ATTENTION}, got {attention!r}")
    lora_rank = _whole("lora_rank", lora_rank)
    if lora_rank < 0:
        raise InputError(f"lora_rank: expected 0 (none) or a positive int, got {lora_rank!r}")
    spec = VARIANTS[type] if window_size is None else replace(VARIANTS[type],
                                                              window_size=window_size)
    state = None
    if checkpoint is not None:  # read and check the variant before paying for the build
        state = load_sam_state_dict(checkpoint, lora_alpha=lora_alpha if lora_rank else None)
        check_variant(state, model_type=type, source=str(checkpoint))
        check_lora_rank(state, rank=lora_rank, source=str(checkpoint))
    sam = _build_sam(spec, image_size=image_size, in_chans=in_chans, attention=attention)
    model = SamSegmenter(sam, model_type=type)
    if lora_rank:
        add_lora(model, rank=lora_rank, alpha=lora_alpha)
    if state is not None:
        load_into(sam, state, model_type=type, source=str(checkpoint))
        log.info("loaded %s weights from %s", type, checkpoint)
    return model


def detect_variant(state: dict[str, torch.Tensor]) -> str:
    """Name the variant a SAM state dict belongs to, from its embedding width and depth."""
    embed_dim = state[PATCH_WEIGHT].shape[0]
    depth = 1 + max(
        (int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")),
        default=-1,
    )
    for name, spec in VARIANTS.items():
        if spec.embed_dim == embed_dim and spec.depth == depth:
            return name
    return f"unknown (embed dim {embed_dim}, {depth} blocks)"


def check_variant(state: dict[str, torch.Tensor], *, model_type: str, source: str) -> None:
    """Refuse a state dict of another variant (vit_b weights into a vit_l model)."""
    found = detect_variant(state)
    if found != model_type:
        spec = VARIANTS[model_type]
        raise CheckpointError(
            f"{source} holds {found} weights but the model type is {model_type} "
            f"(embed dim {spec.embed_dim}, {spec.depth} blocks); set model.type={found} "
            f"or use the {model_type} checkpoint"
        )


def load_into(sam: Sam, state: dict[str, torch.Tensor], *, model_type: str, source: str) -> None:
    """Load ``state`` into ``sam`` after adapting resolution and channels; refuse other variants,
    NaN / inf weights and LoRA adapters of another rank (weights without adapters leave the
    model's own, fresh ones in place)."""
    check_variant(state, model_type=model_type, source=source)
    check_finite(state, source=source)
    target = sam.state_dict()
    check_lora_rank(state, rank=lora_rank_of(target), source=source)
    if not lora_rank_of(state):  # official weights into an adapted model: fresh adapters
        state = {**{k: v for k, v in target.items() if is_lora_parameter(k)}, **state}
    state = adapt_state_dict(state, target)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in target.keys() & state.keys() if target[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, model has "
                         f"{tuple(target[k].shape)}")
        raise CheckpointError(f"{source} does not fit a {model_type} model: {'; '.join(parts)}")
    sam.load_state_dict(state)  # callers say what they loaded (predict: once, with the step)
