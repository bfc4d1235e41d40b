"""Embedding cache: with a frozen image encoder, a tile's embedding never changes.

The encoder is by far the most expensive part of SAM (12-14 s per 1024 px image for vit_b on a
2-core CPU, against about 0.11 s per prompt set for a decoder training step, backward
included), so when only the prompt encoder and mask decoder train, embeddings are computed
once per distinct input tile and reused; the decoder then trains on about 9 prompt sets per
second at 1024 px even on a CPU (``benchmarks/bench_train_cache.py``).

Entries are keyed by a hash of the exact input tensor, so the cache is right by construction
whatever produced the tile (view, depth draw, flips and rotations): a different input is a
different key, never a stale hit. Embeddings are stored in fp16 (half the memory; the decoder
sees them cast back to its dtype), in memory up to a byte budget, or as files under the run dir.
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

from scrollsam.errors import ConfigError
from scrollsam.io import atomic_path

log = logging.getLogger(__name__)


def check_cache_allowed(*, encoder_trainable: bool, pixel_augment: bool,
                        lora: bool = False) -> None:
    """Raise ConfigError naming the key when a cache would be wrong or useless."""
    if lora:
        raise ConfigError("train.cache: the embedding cache needs a fixed image encoder, but "
                          "model.lora_rank > 0 adapts it while training (embeddings would go "
                          "stale); set train.cache=off or model.lora_rank=0")
    if encoder_trainable:
        raise ConfigError("train.cache: the embedding cache needs a frozen image encoder, but "
                          "model.trainable includes image_encoder (embeddings would go stale); "
                          "set train.cache=off or drop image_encoder from model.trainable")
    if pixel_augment:
        raise ConfigError("train.cache: pixel augmentations (data.pixel_augment=true) make every "
                          "input unique, so nothing could be reused; set "
                          "data.pixel_augment=false or train.cache=off")


def tile_key(image: torch.Tensor) -> str:
    """A content hash of one input tile [C, S, S] (dtype and shape included)."""
    t = image.detach().to("cpu").contiguous()
    # SHA-256 runs on the SHA extensions of current x86 and ARM CPUs: 8 ms per 1024 px
    # 3-channel float tile against 15.5 ms for BLAKE2b (2-core CPU); hashing the array's
    # buffer in place avoids a 12 MB copy per tile.
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


class EmbeddingCache:
    """Embeddings [256, S/16, S/16] by tile key; in memory (LRU, byte budget) or on disk."""

    def __init__(self, *, directory: str | Path | None = None,
                 max_bytes: int = 4 * 2**30) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        if self.directory is not None:
            return sum(1 for _ in self.directory.glob("*.pt"))
        return len(self._memory)

    def _get(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            emb = self._memory.get(key)
            if emb is not None:
                self._memory.move_to_end(key)
            return emb
        path = self.directory / f"{key}.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None

    def _put(self, key: str, emb: torch.Tensor) -> None:
        emb = emb.detach().to("cpu", torch.float16).contiguous()
        if self.directory is not None:
            with atomic_path(self.directory / f"{key}.pt", fsync=False) as tmp:
                torch.save(emb, tmp)
            return
        self._memory[key] = emb
        self._bytes += emb.numel() * emb.element_size()
        while self._bytes > self.max_bytes and self._memory:
            _, old = self._memory.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def encode(self, images: torch.Tensor,
               encoder: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Embeddings [B, 256, g, g] for images [B, C, S, S]; only unseen tiles are encoded.

        The result is on the images' device in float32.
        """
        keys = [tile_key(img) for img in images]
        found = [self._get(k) for k in keys]
        todo = [i for i, e in enumerate(found) if e is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                fresh = encoder(images[todo])  # (len(todo), 256, g, g)
            for i, emb in zip(todo, fresh, strict=True):
                self._put(keys[i], emb)
                found[i] = emb.detach().to("cpu", torch.float16)
        with torch.autocast("cpu", enabled=False):  # CPU bf16 autocast refuses fp16 in stack
            stacked = torch.stack(found)  # (B, 256, g, g) float16, on the CPU
        return stacked.to(images.device, torch.float32)  # (B, 256, g, g)
