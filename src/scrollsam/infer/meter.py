"""Measuring a whole-fragment prediction: progress in megapixels per second, peak memory.

Memory is read from ``/proc/self/status`` (Linux): ``RssAnon`` is the resident memory that is not
backed by a file, the number that must stay bounded while slices stream in (mapped slice pages
are file-backed and the kernel can drop them at any time); ``VmHWM`` is the peak of all resident
memory, mapped pages included. ``RssAnon`` has no peak counter, so it is sampled after every
batch of windows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from scrollsam.data.fragment import Fragment


def memory_status() -> dict[str, float]:
    """Resident memory of this process in MB from /proc/self/status (Linux; {} elsewhere):
    ``rss_anon_mb`` (non-file-backed, now) and ``vm_hwm_mb`` (peak, mapped pages included)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024  # kB -> MB
    except OSError:
        return {}
    return {"rss_anon_mb": out.get("RssAnon", 0.0), "vm_hwm_mb": out.get("VmHWM", 0.0)}


class Meter:
    """Progress (tqdm on a terminal, megapixels of fragment area per second) and peak memory
    samples."""

    def __init__(self, frag: Fragment, progress: bool, *,
                 bands: list[tuple[int, int]] | None = None) -> None:
        """bands: the row bands [y0, y1) this process predicts (default the whole fragment);
        area and mask pixels count only them."""
        bands = [(0, frag.height)] if bands is None else bands
        mask = frag.mask()
        self.area = sum((y1 - y0) * frag.width for y0, y1 in bands)
        self.mask_pixels = sum(int(np.count_nonzero(mask[y0:y1])) for y0, y1 in bands)
        self.tiles = 0
        self.images = 0  # model inputs: K per window, times 8 with TTA
        self.peak_anon = memory_status().get("rss_anon_mb", 0.0)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.area / 1e6, unit="MP", desc=frag.id,
                            disable=None,  # no bar (no carriage returns) when not a terminal
                            unit_scale=False, dynamic_ncols=True, mininterval=0.5,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total:.2f} MP "
                                       "[{elapsed}<{remaining}, {rate_noinv_fmt}]")

    def update(self, pixels: int) -> None:
        self.peak_anon = max(self.peak_anon, memory_status().get("rss_anon_mb", 0.0))
        if self.bar is not None:
            self.bar.update(pixels / 1e6)

    def finish(self, seconds: float, device: torch.device) -> dict[str, Any]:
        """The run's stats; ``megapixels_per_s`` is None when there was nothing to predict (a
        resumed run whose every band was done), not a speed of 0."""
        if self.bar is not None:
            self.bar.close()
        mem = memory_status()
        cuda = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                else None)
        return {
            "megapixels": self.area / 1e6, "mask_megapixels": self.mask_pixels / 1e6,
            "tiles": self.tiles, "images": self.images, "seconds": seconds,
            "megapixels_per_s": self.area / 1e6 / max(seconds, 1e-9) if self.area else None,
            "peak_rss_anon_mb": max(self.peak_anon, mem.get("rss_anon_mb", 0.0)),
            "vm_hwm_mb": mem.get("vm_hwm_mb"), "peak_cuda_mb": cuda,
        }
