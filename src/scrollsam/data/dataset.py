"""Torch datasets of fragment tiles: CPU tensors only, deterministic given a seed.

Each item is a dict::

    image     float32 [C, S, S]   the view's normalised input (see :mod:`.views`)
    label     float32 [1, S, S]   1 = ink, 0 = not ink
    valid     float32 [1, S, S]   1 inside mask.png (0 outside it and outside the image)
    has_ink   bool                any ink inside valid (the step picks prompt kinds on the host
                                  from it, with the truth already on a GPU)
    fragment  str                 fragment id
    y0, x0    int                 top-left corner of the tile in the fragment (image pixels)

Training items draw a tile (ink / background balanced), the view's random depth choices and the
augmentations from a generator seeded by ``(seed, epoch, index)``, so DataLoader workers give the
same batches whatever their number. Validation items are the tiles in order with the view's
deterministic input and no augmentation. Only the training loop moves tensors to a device (so
``pin_memory=True`` works).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from scrollsam.data.augment import Augment, augment_sample
from scrollsam.data.fragment import Fragment
from scrollsam.data.tiles import BalancedTiles, Tile, make_tiles, split_regions
from scrollsam.data.views import View
from scrollsam.errors import ConfigError, FragmentError, InputError

log = logging.getLogger(__name__)

DEFAULT_AUGMENT = Augment()


def ink_flags(label: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Whether each tile has ink inside its valid mask: label / valid [..., 1, S, S] -> bool
    [...] (a tile's item: a 0-d flag; a batch [B, 1, S, S]: (B,))."""
    return ((label > 0.5) & (valid > 0.5)).flatten(-3).any(-1)


class TileDataset(Dataset):
    """Tiles of fragments seen through a view.

    ``train=True``: ``length`` items (default: number of tiles), item i = a balanced random tile
    (``ink_share`` of draws are tiles with ink fraction >= ``min_ink``), the view's training
    input, then ``augment`` (None = none). Call :meth:`set_epoch` to draw new samples per epoch.
    ``train=False``: item i = ``tiles[i]``, the view's deterministic input, never augmented.
    """

    def __init__(
        self,
        fragments: Sequence[Fragment],
        tiles: Sequence[Tile],
        view: View,
        *,
        train: bool = True,
        augment: Augment | None = DEFAULT_AUGMENT,
        seed: int = 0,
        length: int | None = None,
        ink_share: float = 0.5,
        min_ink: float = 0.01,
    ) -> None:
        self.fragments = {f.id: f for f in fragments}
        self.tiles = list(tiles)
        self.view = view
        self.train = train
        self.augment = augment if train else None
        self.seed = seed
        self.epoch = 0
        used = {t.fragment for t in self.tiles}
        for fid in sorted(used):
            if fid not in self.fragments:
                raise InputError(f"tiles: tile of fragment {fid!r}, which was not passed")
            frag = self.fragments[fid]
            if frag.labels() is None:
                raise FragmentError(
                    f"fragment {fid} has no ink labels, which training and validation need "
                    f"({frag.path})"
                )
            view.prepare(frag)  # fails early; statistics computed once, shared with workers
        self._sampler = BalancedTiles(self.tiles, ink_share=ink_share, min_ink=min_ink) if (
            train and self.tiles) else None
        self.length = len(self.tiles) if length is None else int(length)
        if length is not None and length < 0:
            raise InputError(f"length: expected a non-negative integer, got {length}")
        if self.length and not self.tiles:
            raise InputError("tiles: no tiles to draw from")

    def set_epoch(self, epoch: int) -> None:
        """Training draws depend on (seed, epoch, index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            tile = self.tiles[int(self._sampler.draw(1, rng=rng)[0])]
        else:
            rng = None
            tile = self.tiles[index]
        frag = self.fragments[tile.fragment]
        s, y0, x0 = tile.size, tile.y0, tile.x0
        if rng is not None:
            image = self.view.train_window(frag, y0, x0, s, rng=rng)  # [C, S, S]
        else:
            image = self.view.eval_window(frag, y0, x0, s)  # [C, S, S]
        label = frag.labels_window(y0, y0 + s, x0, x0 + s)[None].astype(np.float32)  # [1, S, S]
        valid = frag.mask_window(y0, y0 + s, x0, x0 + s)[None].astype(np.float32)  # [1, S, S]
        if rng is not None and self.augment is not None:
            image, label, valid = augment_sample(image, label, valid, rng=rng, augment=self.augment)
        label_t = torch.from_numpy(np.ascontiguousarray(label))
        valid_t = torch.from_numpy(np.ascontiguousarray(valid))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": label_t,
            "valid": valid_t,
            "has_ink": bool(ink_flags(label_t, valid_t)),
            "fragment": tile.fragment,
            "y0": int(y0),
            "x0": int(x0),
        }


def make_datasets(
    fragments: Sequence[Fragment],
    view: View,
    *,
    size: int,
    stride: int | None = None,
    min_valid: float = 0.5,
    valid_fragments: Sequence[str] = (),
    valid_band: tuple[float, float] | None = None,
    band_axis: str = "y",
    samples_per_epoch: int | None = None,
    ink_share: float = 0.5,
    augment: Augment | None = DEFAULT_AUGMENT,
    seed: int = 0,
) -> tuple[TileDataset, TileDataset]:
    """(train, validation) datasets over ``fragments`` with a spatial split; InputError when
    either side gets no tile (validation would silently be off).

    Validation holds the fragments named in ``valid_fragments`` and, of the others, the band
    ``valid_band`` (fractions along ``band_axis``); with neither given the band defaults to
    (0.8, 1.0), the last fifth of every fragment. Training tiles use ``stride`` (default
    size // 2) and ``min_valid``; validation tiles are laid edge to edge (stride = size) and
    kept whenever they hold a mask pixel, so validation covers all of the held-out mask.
    """
    if valid_band is None and not valid_fragments:
        valid_band = (0.8, 1.0)
    if valid_band is not None and not valid_fragments and valid_band[0] >= valid_band[1]:
        raise InputError(f"data.valid_band: expected a share > 0 of each training fragment to "
                         f"hold out when data.valid names no fragment, got the band "
                         f"{valid_band}")
    train_regions, valid_regions = split_regions(
        fragments, valid_fragments=valid_fragments, valid_band=valid_band, axis=band_axis
    )
    train_tiles = make_tiles(fragments, train_regions, size=size, stride=stride,
                             min_valid=min_valid)
    valid_tiles = make_tiles(fragments, valid_regions, size=size, stride=size, min_valid=0.0)
    if not train_tiles:
        raise InputError(
            f"no {size} px training tile has {min_valid:.0%} of its pixels inside a mask "
            f"(fragments {', '.join(r.fragment for r in train_regions) or 'none'}); lower "
            f"model.image_size or check their mask.png (data.train)"
        )
    _check_validation(fragments, valid_fragments, valid_band, valid_tiles)
    log.info("%d training tiles, %d validation tiles", len(train_tiles), len(valid_tiles))
    from scrollsam.data.band_views import aligned_band

    for frag in fragments:  # which slices each fragment gives, where the band moves
        if (band := aligned_band(view, frag)) is not None:
            log.info("%s: %s", frag.id, band)
    train = TileDataset(fragments, train_tiles, view, train=True, augment=augment, seed=seed,
                        length=samples_per_epoch, ink_share=ink_share)
    valid = TileDataset(fragments, valid_tiles, view, train=False, seed=seed)
    return train, valid


def _check_validation(
    fragments: Sequence[Fragment], valid_fragments: Sequence[str],
    valid_band: tuple[float, float] | None, tiles: Sequence[Tile],
) -> None:
    """InputError naming the validation fragment (and its mask.png) or the band that yields no
    tile: validation must never turn itself off."""
    have = {t.fragment for t in tiles}
    by_id = {f.id: f for f in fragments}
    for fid in valid_fragments:
        if fid not in have:
            raise InputError(f"validation fragment {fid} has no pixel inside its mask, so it "
                             f"cannot be validated on; fix the mask or drop it from data.valid "
                             f"({by_id[fid].mask_path})")
    if not tiles:
        share = f" (the last {valid_band[1] - valid_band[0]:.0%})" if valid_band else ""
        raise InputError(f"the held-out band of the training fragments{share} has no pixel "
                         f"inside their masks; raise data.valid_band or name validation "
                         f"fragments in data.valid")


def require_validation_ink(valid: TileDataset, valid_fragments: Sequence[str], *,
                           resumed: bool = False) -> None:
    """ConfigError when no validation tile holds labelled ink: training ranks checkpoints by
    their validation F0.5, which is 1 for a model that predicts no ink at all there. A resumed
    run (which keeps its data.valid) gets a warning instead: it was started before this check."""
    if any(t.ink > 0 for t in valid.tiles):
        return
    held = (f"the validation fragments {', '.join(valid_fragments)} hold" if valid_fragments
            else "the held-out band of the training fragments holds")
    if resumed:
        log.warning("%s no labelled ink inside the masks: valid F0.5 is 1 for predicting no ink "
                    "and cannot rank checkpoints; a new run with other data.valid fixes it",
                    held)
        return
    raise ConfigError(f"{held} no labelled ink inside the masks, so F0.5 cannot rank "
                      f"checkpoints; name fragments with ink in data.valid (or move "
                      f"data.valid_band)")
