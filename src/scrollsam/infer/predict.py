"""Predictor: a trained run turned into ink probabilities for windows, arrays and fragments.

The model and the input view are rebuilt from the run folder alone (``config.yaml`` and a
checkpoint), so prediction uses exactly the training normalisation::

    from scrollsam.infer.predict import Predictor
    pred = Predictor.from_run("runs/demo")                # best.pt (else last.pt), auto device
    result = pred.predict_fragment("data/test/a")         # Prediction: prob [H, W], stats
    mask = result.prob >= result.threshold                # the run's, adapted (.threshold)
    probs = pred.predict_windows(images)                  # normalised [B, C, T, T] -> [B, T, T]

The predictor owns ``torch.no_grad``, the device, autocast and the embedding cache (used by the
prompted decoder, :mod:`.points`); the model never disables gradients itself.

Frames: a window is a ``tile x tile`` square of the fragment (T = ``tile``, default the model
input side S). When T != S a window is resized to S for the model and the logits are resized
back to T, so the model always sees its own input size. Probabilities are ``sigmoid(logits)``
upsampled bilinearly to T x T; with test-time augmentation (``tta``) they are the mean over the
8 flips / 90 degree rotations of the window, each mapped back before averaging. Views that give
K inputs per window (strategy ``every``: one per slice) average the K probabilities.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scrollsam.config import config_from_dict
from scrollsam.data.fragment import Fragment
from scrollsam.data.views import View, view_from_config
from scrollsam.device import resolve_device, tune_for_fixed_shapes
from scrollsam.errors import InputError
from scrollsam.infer.meter import Meter
from scrollsam.infer.run_files import check_run_folder, resolve_checkpoint, writable
from scrollsam.infer.sliding_window import sliding_window_array, sliding_window_inference
from scrollsam.infer.threshold import ThresholdRule
from scrollsam.infer.tta import DIHEDRAL, dihedral, undo_dihedral
from scrollsam.losses import upsample_logits
from scrollsam.model.assemble import model_from_config
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.precision import use_bf16
from scrollsam.train.checkpoint import load_checkpoint, thresholds_of

log = logging.getLogger(__name__)

MIN_TILE = 16  # the smallest window side (--tile) in fragment pixels
MAX_TILE = 4096  # the largest --tile (or S, if larger): a window is read whole, C x T x T


@dataclass
class Prediction:
    """Probability map of one fragment: ``prob`` float32 [H, W] in [0, 1], 0 outside the mask.

    ``stats``: megapixels (H * W / 1e6), mask_megapixels, tiles (windows predicted), images
    (model inputs, K and TTA included), seconds, megapixels_per_s (fragment area per second),
    peak_rss_anon_mb (non-file-backed resident memory, sampled per batch), vm_hwm_mb (peak
    resident memory incl. mapped slice pages), peak_cuda_mb (None on CPU).
    """

    fragment: str
    prob: np.ndarray
    threshold: float
    stats: dict[str, Any] = field(default_factory=dict)


# --- predictor -----------------------------------------------------------------------------------


class Predictor:
    """A model on a device plus the view that feeds it; windows in, probabilities out.

    model: a :class:`SamSegmenter` (moved to ``device``, put in eval mode).
    view: turns fragment windows into normalised inputs; needed by :meth:`predict_fragment`.
    tile: window side T in fragment pixels (default S). batch_size: model inputs per call.
    amp: precision, as :func:`scrollsam.precision.use_bf16` takes it: True / ``"auto"`` = bf16
    autocast on CUDA and on CPUs with bf16 units, ``"bf16"`` forced, False / ``"fp32"`` off.
    """

    def __init__(
        self,
        model: SamSegmenter,
        view: View | None = None,
        *,
        threshold: float | ThresholdRule = 0.5,
        device: str | torch.device = "auto",
        tile: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
        tta: bool = False,
        amp: bool | str = True,
    ) -> None:
        self.device = (device if isinstance(device, torch.device)
                       else resolve_device(device, setting="--device"))
        tune_for_fixed_shapes(self.device)  # batches of tiles of one size
        self.model = model.to(self.device).eval()
        self.view = view
        # how each fragment's threshold is chosen (.threshold); a number: that one, fixed
        self.rule = (threshold if isinstance(threshold, ThresholdRule)
                     else ThresholdRule(float(threshold)))
        self.tile = int(model.image_size if tile is None else tile)  # 0 is refused below
        self.stride = int(self.tile // 2 if stride is None else stride)
        top = max(MAX_TILE, model.image_size)
        if not MIN_TILE <= self.tile <= top or not 1 <= self.stride <= self.tile:
            raise InputError(f"tile / stride (--tile / --stride, data.stride): expected {MIN_TILE}"
                             f" <= tile <= {top} and 1 <= stride <= tile, got {self.tile} / "
                             f"{self.stride}")
        if batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size}")
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.amp = use_bf16(self.device, amp)
        self.source: Path | None = None  # the checkpoint file, when built from one
        self.cache_size = 64  # embeddings kept for prompted decoding (see .points)
        self._embeddings: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = (
            OrderedDict())

    @property
    def threshold(self) -> float:
        """The run's (validation) threshold, or the given one: before adapting to a fragment."""
        return self.rule.value

    @classmethod
    def from_run(
        cls,
        run: str | os.PathLike[str] | None,
        *,
        checkpoint: str = "best",
        stats_dir: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> Predictor:
        """Rebuild model and view from a run's checkpoint (``best`` | ``last`` | path); with
        ``run`` None, ``checkpoint`` must be a path (see :meth:`from_checkpoint`).
        Normalisation statistics come from the run's cache (RUN/stats/); a fragment it lacks is
        computed into it, or into ``stats_dir`` when the run folder is read-only; never into a
        fragment folder. ``options``: those of :meth:`from_checkpoint`."""
        if run is None:
            if checkpoint in ("best", "last"):
                raise InputError(f"--checkpoint {checkpoint} names a checkpoint of a run: give "
                                 f"--run RUN, or a checkpoint file as --checkpoint PATH")
            return cls.from_checkpoint(checkpoint, stats_dir=stats_dir, **options)
        run = Path(run)
        check_run_folder(run)
        ckpt_path = resolve_checkpoint(run, checkpoint)
        stats = run if writable(run) or stats_dir is None else Path(stats_dir)
        return cls.from_checkpoint(ckpt_path, stats_dir=stats, **options)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        threshold: float | str | None = None,
        tile: int | None = None,
        stride: int | None = None,
        batch_size: int | None = None,
        tta: bool = False,
        stats_dir: str | os.PathLike[str] | None = None,
        precision: str = "auto",
    ) -> Predictor:
        """Rebuild model and view from one checkpoint file alone: the config stored inside it
        (the run folder beside it is not needed). ``threshold``: None / ``auto`` = the one saved
        with the checkpoint, adapted to each fragment; ``saved`` = that one as it is; a number
        (:meth:`.ThresholdRule.choose`). Statistics are cached in ``stats_dir`` (default: the
        checkpoint's folder when writable, else memory). ``precision``: ``auto`` (the run's
        ``train.amp``), ``bf16`` or ``fp32``."""
        path = Path(path)
        ckpt = load_checkpoint(path)
        cfg = config_from_dict(ckpt["config"], stored=True)
        if stats_dir is None and writable(path.parent):
            stats_dir = path.parent
        view = view_from_config(cfg.data, cache_dir=stats_dir)  # the training normalisation
        model = model_from_config(cfg.model, in_chans=view.channels, weights=ckpt,
                                  source=str(path))
        saved, reference = thresholds_of(ckpt)  # its own validation's (last.pt: not best's)
        rule = ThresholdRule.choose(threshold, saved=saved, reference=reference)
        whose = ("the checkpoint's, adapted to each fragment" if rule.adaptive else
                 "the checkpoint's, as saved" if threshold in (None, "auto", "saved") else
                 "given")
        log.info("loaded %s (step %s, %s %d px, view %s); threshold %.3f (%s)", path,
                 ckpt.get("step"), cfg.model.type, cfg.model.image_size, view.name, rule.value,
                 whose)
        pred = cls(model, view, threshold=rule, device=device,  # None: the run's; 0: refused
                   tile=cfg.model.image_size if tile is None else tile,
                   stride=(cfg.data.stride or None) if stride is None else stride,
                   batch_size=cfg.train.batch_size if batch_size is None else batch_size, tta=tta,
                   amp=cfg.train.amp if precision == "auto" else precision)
        pred.source = path
        return pred

    # --- windows ---------------------------------------------------------------------------

    def _to_device(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images)
        if not x.is_floating_point():
            raise InputError(f"images: expected float normalised inputs, got {x.dtype}")
        return x.to(self.device, torch.float32, non_blocking=True)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt-free logits [N, 1, T, T] for normalised windows [N, C, T, T] on the device."""
        s, t = self.model.image_size, x.shape[-1]
        if t != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                              antialias=t > s)  # (N, C, S, S)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            emb, pixels = self.model.encode_with_pixels(x)
            low = self.model.refine(self.model.decode(emb)[0], pixels)  # (N, 1, S/4 or S, ..)
        return upsample_logits(low.float(), (t, t))  # (N, 1, T, T)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities [N, T, T] of windows [N, C, T, T]; mean over DIHEDRAL with tta."""
        if not self.tta:
            return torch.sigmoid(self._logits(x))[:, 0]
        acc = torch.zeros(x.shape[0], x.shape[-2], x.shape[-1], device=x.device)
        for k, flip in DIHEDRAL:
            p = torch.sigmoid(self._logits(dihedral(x, k, flip)))[:, 0]  # (N, T, T)
            acc += undo_dihedral(p, k, flip)
        return acc / len(DIHEDRAL)

    def predict_windows(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Ink probabilities float32 [B, T, T] (numpy, CPU) of normalised windows [B, C, T, T],
        or [B, K, C, T, T] whose K predictions per window are averaged."""
        x = self._to_device(images)
        if x.ndim not in (4, 5) or x.shape[-1] != x.shape[-2]:
            raise InputError(f"images: expected [B, C, T, T] or [B, K, C, T, T], got "
                             f"{list(x.shape)}")
        b, k = x.shape[0], x.shape[1] if x.ndim == 5 else 1
        if b == 0:  # no window, no probabilities
            return np.zeros((0, *x.shape[-2:]), np.float32)
        flat = x.reshape(b * k, *x.shape[-3:])  # (B * K, C, T, T)
        with torch.no_grad():
            parts = [self._probs(flat[i:i + self.batch_size])
                     for i in range(0, flat.shape[0], self.batch_size)]
            probs = torch.cat(parts).reshape(b, k, *x.shape[-2:]).mean(dim=1)  # (B, T, T)
        return probs.float().cpu().numpy()

    def predict_array(self, image: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
        """Blended probabilities float32 [H, W] over a normalised in-memory image [C, H, W]
        (or [K, C, H, W]); 0 outside ``mask`` (bool [H, W]) when given."""
        return sliding_window_array(image, self.predict_windows, tile=self.tile,
                                    stride=self.stride, batch_size=self._tiles_per_batch(1),
                                    mask=mask)

    # --- prompts (interactive) -------------------------------------------------------------

    def embed(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embeddings [N, 256, S/16, S/16] (on the device) of normalised windows [N, C, T, T],
        resized to S; cached (float32, by window content, least recently used dropped first),
        so clicking again on a tile does not re-encode it."""
        return self._encoded(images)[0]

    def _encoded(self, images: np.ndarray | torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(:meth:`embed`, the mask head's pixel features [N, G, S, S] or None), cached."""
        from scrollsam.train.cache import tile_key

        x = self._to_device(images)
        s = self.model.image_size
        if x.shape[-1] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > s)  # (N, C, S, S)
        keys = [tile_key(img) for img in x]
        todo = [i for i, key in enumerate(keys) if key not in self._embeddings]
        if todo:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                 enabled=self.amp):
                emb, pix = self.model.encode_with_pixels(x[todo])  # (n, 256, g, g), pixels
            for j, i in enumerate(todo):
                self._embeddings[keys[i]] = (emb[j].float(),
                                             None if pix is None else pix[j].float())
        for key in keys:
            self._embeddings.move_to_end(key)
        while len(self._embeddings) > self.cache_size:
            self._embeddings.popitem(last=False)
        found = [self._embeddings[k] for k in keys]
        pixels = None if found[0][1] is None else torch.stack([f[1] for f in found])
        return torch.stack([f[0] for f in found]), pixels  # (N, 256, g, g), (N, G, S, S)

    def predict_points(self, images: np.ndarray | torch.Tensor, coords: np.ndarray,
                       labels: np.ndarray) -> np.ndarray:
        """Probabilities float32 [T, T] of one window given clicks in it.

        images: normalised [C, T, T] or [K, C, T, T] (K predictions averaged); coords float
        [N, 2] as (x, y) pixels of the T x T window; labels int [N], 1 ink, 0 background.
        """
        x = self._to_device(images)
        x = x[None] if x.ndim == 3 else x  # (K, C, T, T)
        t = x.shape[-1]
        coords = np.asarray(coords, np.float32).reshape(-1, 2)
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != coords.shape[0]:
            raise InputError(f"labels: expected [N] = [{coords.shape[0]}] to match coords, got "
                             f"{list(labels.shape)}")
        scale = self.model.image_size / t
        k = x.shape[0]
        pts = torch.as_tensor(coords * scale, device=self.device)  # (N, 2) in the S frame
        pts = pts[None].expand(k, -1, -1).contiguous()  # (K, N, 2)
        lab = torch.as_tensor(labels, dtype=torch.long, device=self.device)[None].expand(k, -1)
        emb, pixels = self._encoded(x)  # (K, 256, g, g), (K, G, S, S) or None
        with torch.no_grad():
            low, _ = self.model.decode(emb, points=(pts, lab.contiguous()))  # (K, 1, S/4, S/4)
            low = self.model.refine(low, pixels)  # (K, 1, S, S) with a mask head
            logits = upsample_logits(low.float(), (t, t))  # (K, 1, T, T)
            prob = torch.sigmoid(logits)[:, 0].mean(dim=0)  # (T, T)
        return prob.cpu().numpy()

    def _tiles_per_batch(self, k: int) -> int:
        """Windows per sliding-window batch: ``batch_size`` model inputs hold B * K windows."""
        return max(1, self.batch_size // k)

    # --- fragments -------------------------------------------------------------------------

    def open(self, fragment: str | os.PathLike[str] | Fragment) -> Fragment:
        """Open (if a path) and check a fragment against the view; computes its statistics."""
        if self.view is None:
            raise InputError("view: this Predictor was built without a view; use "
                             "Predictor.from_run or pass view= to predict fragments")
        frag = fragment if isinstance(fragment, Fragment) else Fragment(fragment)
        self.view.prepare(frag)
        return frag

    def predict_fragment(
        self, fragment: str | os.PathLike[str] | Fragment, *, progress: bool = False
    ) -> Prediction:
        """Whole-fragment probabilities: windows inside mask.png, batched, blended, streamed
        (slices are read window by window; memory is the output map plus a few batches)."""
        frag = self.open(fragment)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        meter = Meter(frag, progress)
        t0 = time.perf_counter()
        prob = self.predict_rows(frag, 0, frag.height, meter=meter)
        stats = meter.finish(time.perf_counter() - t0, self.device)
        return Prediction(frag.id, prob, self.threshold_for(prob, frag), stats)

    def threshold_for(self, prob: np.ndarray, frag: Fragment) -> float:
        """The threshold for a fragment's probabilities [H, W] (:mod:`.threshold`)."""
        return self.rule.for_fragment(prob, frag.mask() > 0)

    def predict_rows(self, frag: Fragment, y0: int, y1: int, *,
                     meter: Meter | None = None) -> np.ndarray:
        """Probabilities float32 [y1 - y0, W] in [0, 1] of the rows [y0, y1) of an opened
        fragment (:meth:`open`), 0 outside its mask: every window of the whole-fragment grid
        that touches the rows is run, in grid order, batched among themselves, so a band's
        values never depend on the other bands or on who runs them."""
        view = self.view
        if view is None:
            raise InputError("view: this Predictor was built without a view; use "
                             "Predictor.from_run or pass view= to predict fragments")
        tile = self.tile
        k = view.infer_windows(frag, 0, 0, MIN_TILE).shape[0]  # inputs per window (K)
        prob = sliding_window_inference(
            lambda a, b: view.infer_windows(frag, a, b, tile), self._count(meter),
            shape=(frag.height, frag.width), tile=tile, stride=self.stride,
            batch_size=self._tiles_per_batch(k), mask=frag.mask(),
            progress=None if meter is None else meter.update, rows=(y0, y1),
        )
        np.clip(prob, 0.0, 1.0, out=prob)
        return prob

    def _count(self, meter: Meter | None) -> Callable[[np.ndarray], np.ndarray]:
        def run(windows: np.ndarray) -> np.ndarray:  # [B, K, C, T, T]
            if meter is not None:
                meter.tiles += windows.shape[0]
                meter.images += (windows.shape[0] * windows.shape[1]
                                 * (len(DIHEDRAL) if self.tta else 1))
            return self.predict_windows(windows)
        return run


def predict_fragment(
    run: str | os.PathLike[str],
    fragment: str | os.PathLike[str] | Fragment,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    tile: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    tta: bool = False,
    progress: bool = False,
    precision: str = "auto",
) -> Prediction:
    """One call for scripts and benchmarks: :meth:`Predictor.from_run` then
    :meth:`Predictor.predict_fragment`. ``Prediction.stats`` holds megapixels_per_s and peak
    memory."""
    pred = Predictor.from_run(run, checkpoint=checkpoint, device=device, tile=tile,
                              stride=stride, batch_size=batch_size, tta=tta,
                              precision=precision)
    return pred.predict_fragment(fragment, progress=progress)
