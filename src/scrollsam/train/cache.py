"""Embedding cache: with a frozen image encoder, a tile's embedding never changes.

The encoder is by far the most expensive part of SAM (ratios measured in
``benchmarks/README.md``), so when only the prompt encoder and mask decoder train, embeddings
are computed once per distinct input tile and reused (``benchmarks/bench_train_cache.py``).

Entries are keyed by a hash of the exact input tensor, so the cache is right by construction
whatever produced the tile (view, depth draw, flips and rotations): a different input is a
different key, never a stale hit. Embeddings are stored in fp16 (half the memory; the decoder
sees them cast back to its dtype), in memory (least recently used dropped first) or as files
under the run dir (no new ones once full), up to ``train.cache_gb``.
The cache is refused when the encoder trains (embeddings would go stale) and when random pixel
augmentations are on (no input would ever repeat).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from scrollsam.config import TrainConfig
from scrollsam.io import atomic_path
from scrollsam.torchfile import load_torch, save_torch
from scrollsam.train.distributed import World

log = logging.getLogger(__name__)


def tile_key(image: torch.Tensor) -> str:
    """A content hash of one input tile [C, S, S] (dtype and shape included)."""
    t = image.detach().cpu().contiguous()
    # SHA-256 runs on the SHA extensions of current x86 and ARM CPUs (faster than BLAKE2b,
    # see benchmarks/README.md); hashing the array's buffer in place avoids a copy per tile.
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


class EmbeddingCache:
    """Embeddings [256, S/16, S/16] by tile key; in memory (LRU, byte budget) or on disk."""

    def __init__(self, *, directory: str | Path | None = None, max_bytes: int = 4 * 2**30,
                 share: int = 1, speaks: bool = True) -> None:
        """``share``: the processes writing into one ``directory``; each adds at most 1 /
        ``share`` of the room its files leave under ``max_bytes``. ``speaks``: this process
        says when the cache is full (torchrun's rank 0)."""
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes, self.speaks = max_bytes, speaks
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0  # in memory, or in the folder (what earlier runs of it left counts)
        self._full = False  # a disk cache at its size: new tiles are no longer stored
        self._budget = max_bytes  # what this process may fill: its share of a shared folder
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._bytes = sum(p.stat().st_size for p in self._files())  # earlier runs' too
            self._budget = self._bytes + max(0, max_bytes - self._bytes) // max(share, 1)
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_run(cls, train: TrainConfig, run: Path, *, world: World) -> EmbeddingCache:
        """The cache ``train.cache`` names (``disk``: ``run/embeddings``; else memory), of
        ``train.cache_gb`` at most. The processes of a torchrun job share a disk cache, each
        adding at most its share of the room left; each has its own memory cache."""
        disk = train.cache == "disk"
        return cls(directory=run / "embeddings" if disk else None,
                   max_bytes=int(train.cache_gb * 2**30), share=world.size if disk else 1,
                   speaks=world.main)

    def __len__(self) -> int:
        if self.directory is not None:
            return len(self._files())
        return len(self._memory)

    def _files(self) -> list[Path]:
        """The cache's entries on disk (not the hidden temp files of writes in flight)."""
        assert self.directory is not None
        return [p for p in self.directory.glob("*.pt") if not p.name.startswith(".")]

    def _get(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            emb = self._memory.get(key)
            if emb is not None:
                self._memory.move_to_end(key)
            return emb
        path = self.directory / f"{key}.pt"
        return load_torch(path, what="cached embedding") if path.is_file() else None

    def _put(self, key: str, emb: torch.Tensor) -> None:
        emb = emb.detach().to("cpu", torch.float16).contiguous()
        if self.directory is not None:
            if self._bytes + emb.numel() * emb.element_size() > self._budget:
                if not self._full and self.speaks:
                    log.warning("the embedding cache in %s reached train.cache_gb=%g: tiles "
                                "not in it yet are encoded each time", self.directory,
                                self.max_bytes / 2**30)
                self._full = True
                return
            path = self.directory / f"{key}.pt"
            with atomic_path(path, fsync=False) as tmp:
                save_torch(emb, tmp)
            self._bytes += path.stat().st_size
            return
        self._memory[key] = emb
        self._bytes += emb.numel() * emb.element_size()
        while self._bytes > self.max_bytes and self._memory:
            _, old = self._memory.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def encode(self, images: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor], *,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Embeddings [B, 256, g, g] in float32 on ``device`` (default: the images') for images
        [B, C, S, S]; only unseen tiles are moved to ``device`` and encoded.

        Give the images on the CPU, as the batch comes: they are hashed there, so a batch of
        hits never waits for the device (a device batch would be copied back to be hashed).
        """
        device = images.device if device is None else torch.device(device)
        keys = [tile_key(img) for img in images]
        found = [self._get(k) for k in keys]
        todo = [i for i, e in enumerate(found) if e is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                fresh = encoder(images[todo].to(device, non_blocking=True))  # (n, 256, g, g)
            for i, emb in zip(todo, fresh, strict=True):
                self._put(keys[i], emb)  # a miss waits for the device: stored on the host
                found[i] = emb.detach().to("cpu", torch.float16)
        with torch.autocast("cpu", enabled=False):  # CPU bf16 autocast refuses fp16 in stack
            stacked = torch.stack(found)  # (B, 256, g, g) float16, on the CPU
        return stacked.to(device, torch.float32, non_blocking=True)  # (B, 256, g, g)
