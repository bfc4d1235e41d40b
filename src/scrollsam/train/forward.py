"""The training forward pass as one module call, and its DistributedDataParallel wrapping.

DDP all-reduces the gradients of what its own ``forward`` ran, so the loop calls the step
through :class:`LossModule` (encode, or the embedding cache, then
:func:`.step.prompted_forward`), wrapped by :func:`wrap_for_ranks` under torchrun. Only the
trainable parameters take part (DDP skips frozen ones: a frozen, cached encoder costs no
communication); checkpoints save the unwrapped :class:`SamSegmenter`, so their keys do not change.

Unused parameters: which prompt-encoder parts run depends on the prompt kinds a batch happened
to draw (box corner embeddings only with boxes, ``mask_downscaling`` only with mask prompts,
``not_a_point_embed`` only with padding, the IoU head only with an IoU loss). DDP without
``find_unused_parameters`` waits for a gradient of every parameter, and ``static_graph`` needs
the same ones every step, which random prompt kinds do not give. So every trainable parameter
outside the image and depth encoders (which always run when they train) takes part through a
term ``0 * sum(p)`` added to the loss: its gradient is exact zeros where the step did not use
it, the loss value is unchanged, and it costs one sum per parameter of the small decoder side
instead of DDP's per-step search of the autograd graph. Alone nothing is added.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from scrollsam.config import LossConfig, PromptConfig
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.train.cache import EmbeddingCache
from scrollsam.train.distributed import World
from scrollsam.train.step import StepOutput, prompted_forward

ALWAYS_RUN = ("sam.image_encoder.", "depth_encoder.")  # run on every step when they train


def encode_tiles(model: SamSegmenter, cache: EmbeddingCache | None, images: Tensor, *,
                 device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Embeddings [B, 256, g, g] on ``device`` of images [B, C, S, S], from the cache (which
    hashes them on the host: give them there) or the encoder, and the pixel features
    [B, G, S, S] of a full-resolution mask head (None without one). No value check: the views
    normalise, and a check would make the device wait."""
    if cache is None:
        return model.encode_with_pixels(images.to(device, non_blocking=True), check_values=False)
    emb = cache.encode(images, partial(model.encode, check_values=False), device=device)
    if model.mask_head is None:  # nothing else to compute: no copy of the images either
        return emb, None
    return emb, model.pixel_features(images.to(device, non_blocking=True), check_values=False)


def device_keys(cache: EmbeddingCache | None) -> tuple[str, ...]:
    """The batch's tensors to copy to the device ahead of a step (:mod:`.prefetch`): image,
    label and valid, but not the images the cache hashes on the host (:func:`encode_tiles`)."""
    return ("label", "valid") if cache is not None else ("image", "label", "valid")


class LossModule(nn.Module):
    """``forward(images, label, valid, seeds, has_ink=None)`` -> the :class:`StepOutput` of one
    micro-batch: images [B, C, S, S], label / valid [B, 1, S, S] (the loader's batch, on the host or
    prefetched to the device), ``seeds`` the B tiles' prompt seeds, ``has_ink`` their (B,) ink flags
    on the host (:func:`.step.prompted_forward`). ``tied``: parameters added to the loss as ``0 *
    sum(p)`` (see the module docstring); empty alone. ``forward``: the prompted loss
    (:func:`.step.prompted_forward`; tests pass a wrapped one)."""

    def __init__(self, model: SamSegmenter, cache: EmbeddingCache | None, *,
                 prompt_cfg: PromptConfig, loss_cfg: LossConfig, device: torch.device,
                 tied: Sequence[nn.Parameter] = (),
                 forward: Callable[..., StepOutput] = prompted_forward) -> None:
        super().__init__()
        self.model = model
        self.cache = cache
        self.prompt_cfg, self.loss_cfg, self.device = prompt_cfg, loss_cfg, device
        self.tied = list(tied)
        self.prompted_forward = forward

    def forward(self, images: Tensor, label: Tensor, valid: Tensor, seeds: Sequence[int],
                has_ink: Tensor | None = None) -> StepOutput:
        emb, pixels = encode_tiles(self.model, self.cache, images, device=self.device)
        out = self.prompted_forward(self.model, emb, label, valid, prompt_cfg=self.prompt_cfg,
                                    loss_cfg=self.loss_cfg, seeds=seeds, features=pixels,
                                    has_ink=has_ink)
        if self.tied:  # every trainable parameter takes part (gradient 0 where unused)
            zero = torch.stack([p.sum() for p in self.tied]).sum() * 0.0
            out.parts["loss"] = out.parts["loss"] + zero.to(out.parts["loss"].dtype)
        return out


def maybe_unused(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters a step may leave without a gradient: all but the image and
    depth encoders'."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and not name.startswith(ALWAYS_RUN)]


def wrap_for_ranks(model: SamSegmenter, cache: EmbeddingCache | None, *, world: World,
                   prompt_cfg: PromptConfig, loss_cfg: LossConfig, device: torch.device,
                   forward: Callable[..., StepOutput] = prompted_forward) -> nn.Module:
    """The module the loop calls for a micro-batch's loss: :class:`LossModule` alone, wrapped
    in DistributedDataParallel under torchrun (its device this process's, inputs left where
    they are: the step moves what the device needs)."""
    tied = maybe_unused(model) if world.distributed else []
    step = LossModule(model, cache, prompt_cfg=prompt_cfg, loss_cfg=loss_cfg, device=device,
                      tied=tied, forward=forward)
    if not world.distributed:
        return step
    # SAM's neck is a 1 x 1 convolution of the encoder's channels-last output: autograd gives
    # its [256, C, 1, 1] weight a gradient with other strides on the two size-1 dimensions,
    # the same memory order, which DDP reported once per process as "Grad strides do not
    # match bucket view strides" (tests/test_train_ddp.py checks that no other parameter's do)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # device_ids=None: DDP leaves the batch where the loop put it (the cache hashes images on
    # the host; the ink flags stay there). Buffers are constants (pixel mean, positional
    # encoding): synchronised once when wrapping, not broadcast before every step.
    return nn.parallel.DistributedDataParallel(step, device_ids=None, forward_sync_buffers=False,
                                               gradient_as_bucket_view=True)
