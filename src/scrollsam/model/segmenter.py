"""SamSegmenter: official SAM with an image encoder and a decoder that batch correctly.

Official SAM's ``MaskDecoder.predict_masks`` copies *one* image embedding once per prompt set
(``torch.repeat_interleave(image_embeddings, P, dim=0)``): it assumes a single image. Given B
images and B prompt sets it silently builds B * B pairs, which is the batching bug the seed never
got past (it trained at batch size 1). :meth:`SamSegmenter.decode` runs the same official
sub-modules, but matches every prompt set p to its own image embedding ``image_index[p]``.

Frames and shapes (S = ``image_size``, the model input side):

* images ``[B, C, S, S]`` float, already normalised (about mean 0 and std 1 per channel);
* embeddings ``[B, 256, S/16, S/16]``;
* points ``(coords [P, N, 2], labels [P, N])``: coords are **(x, y) = (column, row) pixels** of
  the S x S input frame; labels 1 = ink, 0 = background, -1 = padding (ignored), 2 / 3 = a
  box's top-left / bottom-right corner (SAM 2's way of writing a box as two points);
* boxes ``[P, 4]`` XYXY pixels; mask prompts ``[P, 1, S/4, S/4]`` logits;
* output logits ``[P, M, S/4, S/4]`` and predicted IoU ``[P, M]``; M = 3 with ``multimask``.

Official SAM appends one padding point (label -1) to every point set when no box is given, so
N points become N + 1 sparse tokens (the seed's puzzling ``[3, 65, 256]`` for 64 points).

Two optional parts around official SAM (built from the config by
:func:`scrollsam.model.assemble.model_from_config`):

* ``depth_encoder`` (:mod:`.depth`): the model input is then a band of Z slices
  ``[B, Z, S, S]``, which it turns into SAM's C channels and full-resolution features;
* ``mask_head`` (:mod:`.heads`): :meth:`refine` turns the S/4 logits of each prompt set into
  full-resolution logits ``[P, M, S, S]``, using per-image pixel features from
  :meth:`encode_with_pixels` (or :meth:`pixel_features`).

Arguments are checked at this boundary (:mod:`.checks`): their form always, their values
(coordinate ranges, label set, image scale) unless ``check_values=False``. Reading values makes
a GPU wait for the host, so the training step, whose prompts scrollsam's samplers make, turns
them off; prompts are embedded without the official prompt encoder's boolean indexing for the
same reason (:func:`.prompt_tokens.embed_point_tokens`).

The module never disables gradients: callers that only predict wrap it in ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import nn

from scrollsam.errors import InputError, describe
from scrollsam.losses import upsample_logits
from scrollsam.model.checks import (
    check_boxes,
    check_embeddings,
    check_images,
    check_mask_inputs,
    check_points,
    resolve_image_index,
)
from scrollsam.model.decoder_ops import (
    blocked_to_image,
    check_plain_layers,
    transformer_tokens,
    upscale_tokens,
)
from scrollsam.model.prompt_tokens import embed_point_tokens

Points = tuple[torch.Tensor, torch.Tensor]

# Image tokens (prompt sets x (S/16)**2) per decoder pass on CPU: see SamSegmenter.decode_chunk.
CPU_DECODE_TOKENS = 8192


class SamSegmenter(nn.Module):
    """Official SAM (``self.sam``) with batch-correct encode / decode; see ``build_model``."""

    def __init__(self, sam: Sam, *, model_type: str, depth_encoder: nn.Module | None = None,
                 mask_head: nn.Module | None = None) -> None:
        super().__init__()
        check_plain_layers(sam.mask_decoder)
        self.sam = sam
        self.model_type = model_type
        self.depth_encoder = depth_encoder
        self.mask_head = mask_head
        self._layers_checked = False  # checked again on the first decode (after adapters)
        # train.compile's backend for the training loss's per-pixel terms (compile_model)
        self.compiled_loss: str | None = None

    # --- geometry ------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """S: the side of the square model input, in pixels."""
        return int(self.sam.image_encoder.img_size)

    @property
    def in_chans(self) -> int:
        """C: input channels the model expects (the depth encoder's band width if it has one,
        else the channels of the patch embedding)."""
        if self.depth_encoder is not None:
            return int(self.depth_encoder.band)
        return int(self.sam.image_encoder.patch_embed.proj.in_channels)

    @property
    def embed_grid(self) -> int:
        """S / 16: embedding tokens per side."""
        return self.image_size // 16

    @property
    def mask_size(self) -> int:
        """S / 4: side of the decoder's low-resolution logits and of mask prompts."""
        return self.image_size // 4

    @property
    def device(self) -> torch.device:
        return self.sam.prompt_encoder.point_embeddings[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (float32; autocast computes in 16 bits): images, embeddings and
        mask prompts are checked against it (:mod:`.checks`)."""
        return self.sam.prompt_encoder.point_embeddings[0].weight.dtype

    # --- encoder -------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
        """Normalised images [B, C, S, S] -> embeddings [B, 256, S/16, S/16]."""
        return self.encode_with_pixels(images, pixels=False, check_values=check_values)[0]

    def encode_with_pixels(
        self, images: torch.Tensor, *, pixels: bool = True, check_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images [B, C, S, S] -> (embeddings [B, 256, S/16, S/16], pixel features
        [B, G, S, S] for :meth:`refine`, None without a mask head or with ``pixels=False``).
        The depth encoder, if any, runs once for both."""
        images = check_images(images, in_chans=self.in_chans, image_size=self.image_size,
                              device=self.device, dtype=self.dtype, values=check_values)
        features = images
        if self.depth_encoder is not None:
            images, features = self.depth_encoder(images)  # (B, 3, S, S), (B, F, S, S)
        emb = self.sam.image_encoder(images)
        if not pixels or self.mask_head is None:
            return emb, None
        return emb, self.mask_head.image_features(features)

    def pixel_features(self, images: torch.Tensor, *, check_values: bool = True
                       ) -> torch.Tensor | None:
        """Pixel features [B, G, S, S] of images [B, C, S, S] for :meth:`refine` (None without
        a mask head), without the image encoder: what a cached-embedding step needs."""
        if self.mask_head is None:
            return None
        images = check_images(images, in_chans=self.in_chans, image_size=self.image_size,
                              device=self.device, dtype=self.dtype, values=check_values)
        features = images if self.depth_encoder is None else self.depth_encoder(images)[1]
        return self.mask_head.image_features(features)

    def refine(self, logits: torch.Tensor, pixels: torch.Tensor | None,
               image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits [P, M, S/4, S/4] -> full-resolution logits [P, M, S, S] with the mask
        head (``pixels`` from :meth:`encode_with_pixels`, ``image_index`` [P] as in
        :meth:`decode`, default set p -> image p); unchanged without a head."""
        if self.mask_head is None:
            return logits
        if pixels is None:
            raise InputError("pixels: the model has a mask head, which needs the pixel "
                             "features of encode_with_pixels(images)")
        if image_index is None:
            image_index = torch.arange(logits.shape[0], device=logits.device)
        return self.mask_head(logits, pixels, image_index)

    # --- prompts -------------------------------------------------------------------------------

    def embed_prompts(
        self,
        points: Points | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        *,
        num_sets: int | None = None,
        check_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings for P prompt sets, as the official prompt encoder gives them.

        Returns sparse ``[P, T, 256]`` (T = N + 1 for points alone: the official padding point;
        N + 2 with a box) and dense ``[P, 256, S/16, S/16]``. With no prompt at all,
        ``num_sets`` gives P and the sparse tokens are empty (T = 0).
        """
        points, boxes, mask_inputs, p = self._check_prompts(points, boxes, mask_inputs,
                                                            values=check_values)
        return self._embed_checked(points, boxes, mask_inputs,
                                   num_sets=int(num_sets or 0) if p is None else p)

    def _check_prompts(
        self, points: Points | None, boxes: torch.Tensor | None, mask_inputs: torch.Tensor | None,
        *, values: bool,
    ) -> tuple[Points | None, torch.Tensor | None, torch.Tensor | None, int | None]:
        """Validated prompts on the model's device, and their P (None without any prompt)."""
        size, dev = self.image_size, self.device
        if points is not None:
            points = check_points(points, image_size=size, device=dev, values=values)
        if boxes is not None:
            boxes = check_boxes(boxes, image_size=size, device=dev, values=values)
        if mask_inputs is not None:
            mask_inputs = check_mask_inputs(mask_inputs, image_size=size, device=dev,
                                            dtype=self.dtype, values=values)
        counts = {name: t.shape[0] for name, t in (
            ("points", points[0] if points is not None else None),
            ("boxes", boxes), ("mask_inputs", mask_inputs)) if t is not None}
        if len(set(counts.values())) > 1:
            raise InputError(f"prompts: expected the same number of prompt sets P in every "
                             f"prompt, got {counts}")
        return points, boxes, mask_inputs, next(iter(counts.values()), None)

    def _embed_checked(
        self, points: Points | None, boxes: torch.Tensor | None, mask_inputs: torch.Tensor | None,
        *, num_sets: int, pad: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`embed_prompts` on prompts :meth:`_check_prompts` has passed: official
        ``PromptEncoder.forward`` step by step, with :func:`embed_point_tokens` for the points;
        with no prompt at all, ``num_sets`` sets of no sparse token and the no-mask embedding.
        ``pad=False``: no padding point is appended (see :meth:`decode`)."""
        pe = self.sam.prompt_encoder
        g = self.embed_grid
        sparse = torch.empty((num_sets, 0, pe.embed_dim), device=self.device)  # (P, 0, 256)
        if points is not None:
            tokens = embed_point_tokens(pe, *points, pad=pad and boxes is None)  # (P, N(+1), 256)
            sparse = torch.cat([sparse, tokens], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, pe._embed_boxes(boxes)], dim=1)  # (P, T + 2, 256)
        if mask_inputs is not None:
            return sparse, pe._embed_masks(mask_inputs)  # (P, 256, g, g)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            num_sets, -1, g, g)  # (P, 256, g, g)
        return sparse, dense

    # --- decoder -------------------------------------------------------------------------------

    def decode(
        self,
        embeddings: torch.Tensor,
        points: Points | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask: bool = False,
        image_index: torch.Tensor | None = None,
        *,
        pad: bool = True,
        all_masks: bool = False,
        present: torch.Tensor | None = None,
        chunk: int | None = None,
        check_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode P prompt sets in one call, each against its own image embedding.

        ``embeddings`` [B, 256, S/16, S/16]; prompts as in the module docstring, any combination,
        every prompt with the same P. ``image_index`` long [P] names the image of each set
        (default: set p -> image p; all sets -> image 0 when B == 1). No prompt at all is the
        prompt-free mode: one mask per image (P = B), as used for whole-fragment inference.
        ``pad=False``: the point sets already hold every sparse token, padding points and box
        corners (labels 2 / 3) included, and nothing is appended; point sets and box sets with
        equal token counts can then share one call. ``present`` bool [P, T] marks which of those
        sparse tokens take part (None: all): an absent token is never attended to, so a set
        whose tokens are all absent decodes exactly as a prompt-free one. ``chunk`` bounds how
        many prompt sets go through the transformer at once; None means :meth:`decode_chunk`.
        ``check_values=False`` checks the prompts' form only (module docstring): no host sync.

        Returns logits [P, M, S/4, S/4] and predicted IoU [P, M], M = 3 if ``multimask`` else 1;
        ``all_masks``: M = 4, the single-mask output first, then the three multimask outputs
        (for callers that choose per set).
        """
        if not self._layers_checked:
            check_plain_layers(self.sam.mask_decoder)
            self._layers_checked = True
        embeddings = check_embeddings(embeddings, grid=self.embed_grid, device=self.device,
                                      dtype=self.dtype)
        num_images = embeddings.shape[0]
        # Prompt-free: one set per image, or one per entry of image_index.
        free_sets = (image_index.shape[0] if isinstance(image_index, torch.Tensor)
                     and image_index.ndim == 1 else num_images)
        points, boxes, mask_inputs, num_sets = self._check_prompts(points, boxes, mask_inputs,
                                                                   values=check_values)
        num_sets = free_sets if num_sets is None else num_sets
        index = resolve_image_index(image_index, num_sets=num_sets, num_images=num_images,
                                    device=self.device, values=check_values)
        if present is not None:
            tokens = 0 if points is None else points[0].shape[1] + (pad and boxes is None)
            tokens += 0 if boxes is None else 2
            if present.dtype != torch.bool or tuple(present.shape) != (num_sets, tokens):
                raise InputError(f"present: expected bool [P, T] = {[num_sets, tokens]} (one "
                                 f"per sparse prompt token), got {describe(present)}")
        step = max(1, int(chunk or self.decode_chunk(num_sets)))
        keep = slice(0, None) if all_masks else slice(1, None) if multimask else slice(0, 1)
        # Token layout throughout (see decoder_ops): row-major image tokens, channels last.
        image = embeddings.flatten(2).transpose(1, 2).contiguous()  # (B, g*g, 256)
        pos = self.sam.prompt_encoder.get_dense_pe()  # (1, 256, g, g)
        pos = pos.flatten(2).transpose(1, 2).contiguous()  # (1, g*g, 256), broadcast over sets
        outs = []
        for i in range(0, max(num_sets, 1), step):
            # Prompts are embedded per chunk: slicing the embedded dense prompts instead would
            # make autograd build a zero gradient of all P sets' dense maps for every chunk.
            part = slice(i, i + step)
            sparse, dense = self._embed_checked(
                None if points is None else (points[0][part], points[1][part]),
                None if boxes is None else boxes[part],
                None if mask_inputs is None else mask_inputs[part],
                num_sets=index[part].shape[0], pad=pad)
            outs.append(self._predict_masks(image, pos, index[part], sparse, dense, keep=keep,
                                            present=None if present is None else present[part]))
        logits = torch.cat([o[0] for o in outs])  # (P, M, S/4, S/4)
        iou = torch.cat([o[1] for o in outs])  # (P, M)
        return logits, iou

    def decode_chunk(self, num_sets: int) -> int:
        """Default ``chunk`` of :meth:`decode`: prompt sets per decoder pass for ``num_sets`` sets.

        On a GPU: all sets at once. On CPU: as many sets as fit in ``CPU_DECODE_TOKENS`` image
        tokens, ``CPU_DECODE_TOKENS // (S/16)**2`` (32 sets at S = 256, 8 at 512, 2 at 1024,
        at least 1). A chunk's largest intermediate, the 32-channel upscaled map, is
        32 x 16 x (S/16)**2 floats per set, so it stays at 16 MB, below glibc's 32 MB ceiling
        for heap allocations: bigger chunks get fresh mmap'd pages every pass and page-fault
        on each. Measurements that chose the budget: ``benchmarks/bench_decode.py`` and
        ``benchmarks/README.md``.
        """
        if self.device.type != "cpu":
            return max(1, num_sets)
        return max(1, CPU_DECODE_TOKENS // self.embed_grid**2)

    def _predict_masks(
        self,
        image: torch.Tensor,
        pos: torch.Tensor,
        index: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        *,
        keep: slice,
        present: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official ``MaskDecoder.predict_masks`` with a gather in place of repeat_interleave,
        in token layout (:mod:`scrollsam.model.decoder_ops`): image tokens [B, g*g, 256],
        their position encoding [1, g*g, 256], index [P], sparse [P, T, 256] and dense
        [P, 256, g, g] prompt embeddings, ``present`` bool [P, T] (see :meth:`decode`).

        Only the mask tokens in ``keep`` go through the final hypernetwork product (official
        SAM computes all 4 masks and drops 1 or 3 of them afterwards: same values, more work).
        """
        dec = self.sam.mask_decoder
        p = index.shape[0]
        g = self.embed_grid
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight])  # (1 + 4, 256)
        out_tokens = out_tokens.unsqueeze(0).expand(p, -1, -1)  # (P, 5, 256)
        tokens = torch.cat((out_tokens, sparse.to(out_tokens.dtype)), dim=1)  # (P, 5 + T, 256)
        keys = image.index_select(0, index) + dense.flatten(2).transpose(1, 2)  # (P, g*g, 256)
        if present is not None:  # the output tokens always take part
            present = torch.cat([present.new_ones(p, out_tokens.shape[1]), present], dim=1)
        hs, src = transformer_tokens(dec.transformer, keys, pos, tokens,
                                     present)  # (P, 5 + T, 256), keys
        iou_token_out = hs[:, 0, :]  # (P, 256)
        mask_tokens_out = hs[:, 1:1 + dec.num_mask_tokens, :]  # (P, 4, 256)
        upscaled = upscale_tokens(dec.output_upscaling, src)  # (P, g*g*16, 32), blocked order
        mlps = list(enumerate(dec.output_hypernetworks_mlps))[keep]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in mlps],
                               dim=1)  # (P, M, 32)
        masks = blocked_to_image(upscaled @ hyper_in.transpose(1, 2), g)  # (P, M, 4g, 4g)
        iou_pred = dec.iou_prediction_head(iou_token_out)[:, keep]  # (P, M)
        return masks, iou_pred

    # --- conveniences --------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, **prompts: object) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode(encode(images), **prompts)``."""
        return self.decode(self.encode(images), **prompts)  # type: ignore[arg-type]

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits [P, M, S/4, S/4] -> [P, M, S, S]
        (:func:`scrollsam.losses.upsample_logits`); full-resolution logits (from
        :meth:`refine`) are returned as they are."""
        return upsample_logits(logits, (self.image_size, self.image_size))
