"""The data order: which training samples each process takes at each step.

Samples are numbered globally: sample n is item n of the training :class:`TileDataset` (a pure
function of (seed, epoch, n)) and its prompts come from seed n (:func:`.prompt_sets.tile_seeds`).
With W processes (torchrun's world) of B tiles (``train.batch_size``, per process) and A
micro-batches per step (``train.accumulate``), micro-batch m of step s covers the global
samples [(s * A + m) * W * B, + W * B), and rank r takes the B of them from r * B on. So

* step s covers samples [s * G, (s + 1) * G), G = W * B * A (the global batch), whatever the
  split: 2 processes of batch B see exactly the samples 1 process of batch 2B sees, in the
  same order, and no sample is drawn twice in a step;
* a run resumes at step s on any W, B, A with the same G (``--resume`` checks it);
* alone (W = 1) the order is what it always was: samples s * B * A on.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from scrollsam.config import Config
from scrollsam.train.distributed import World


def global_batch(cfg: Config, world_size: int) -> int:
    """Tiles per optimizer step over all processes: processes x batch_size x accumulate."""
    return world_size * cfg.train.batch_size * cfg.train.accumulate


def samples(step: int, micro: int, *, cfg: Config, world: World) -> range:
    """The global indices of the ``cfg.train.batch_size`` samples this process takes in
    micro-batch ``micro`` of ``step``: the loader's tiles and the prompts' seeds both come
    from here."""
    size = cfg.train.batch_size
    first = ((step * cfg.train.accumulate + micro) * world.size + world.rank) * size
    return range(first, first + size)


class RankSamples(Sampler[int]):
    """The sample indices this process takes from step ``start`` to ``cfg.train.steps``, in
    order (a DataLoader's ``sampler`` with ``batch_size=cfg.train.batch_size``)."""

    def __init__(self, start: int, *, cfg: Config, world: World) -> None:
        self.start, self.cfg, self.world = start, cfg, world

    def __len__(self) -> int:
        t = self.cfg.train
        return max(0, t.steps - self.start) * t.accumulate * t.batch_size

    def __iter__(self) -> Iterator[int]:
        t = self.cfg.train
        for step in range(self.start, t.steps):
            for micro in range(t.accumulate):
                yield from samples(step, micro, cfg=self.cfg, world=self.world)
