"""Synthetic fragments in the exact Kaggle layout, so everything runs without the real data.

A synthetic fragment mimics the real ones: an irregular outline (``mask.png``), a papyrus sheet
with horizontal fibres on the upper side and vertical ones below, whose surface drifts a few
slices in depth across the fragment, ink as lines of letter glyphs (``inklabels.png``) that are
clearly dark in the infrared image (``ir.png``) and only a subtle density increase in a few slices
of the x-ray volume around the surface (slices ~25-40 of 65, as in the real data), plus noise.
Slices are uncompressed uint16 TIFFs ``surface_volume/00.tif ..`` (axis order (z, y, x)).

Everything is deterministic for a given seed: all randomness comes from one
``np.random.Generator`` per fragment. The generator's settings (sheet depth, ink depth and
contrast, noise, stroke width, ...) are the defaults of
:class:`~scrollsam.data.synth_settings.SynthSettings`, or drawn per fragment with ``vary`` > 0
(see :mod:`scrollsam.data.synth_settings`); each fragment records its settings in
``synth_settings.json``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import string
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from scrollsam.data.synth_settings import SynthSettings, draw_settings
from scrollsam.errors import InputError
from scrollsam.fs_errors import bounded_name
from scrollsam.io import write_png
from scrollsam.out_path import check_out_folder, missing_folders, remove_made, swap_folder

log = logging.getLogger(__name__)

INK_CONTRAST = SynthSettings.ink_contrast  # peak density increase of ink in the x-ray volume
SETTINGS_FILE = "synth_settings.json"  # the generator settings a fragment was made with
_AIR, _PAPYRUS = 9000.0, 32000.0  # uint16 levels of empty space and papyrus in the volume


def synth_fragments(
    out: str | os.PathLike[str],
    *,
    fragments: int = 3,
    height: int = 1024,
    width: int = 1024,
    depth: int = 65,
    seed: int = 0,
    ink_contrast: float = INK_CONTRAST,
    test_fragments: int = 0,
    overwrite: bool = False,
    vary: int = 0,
    settings: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``OUT/train/1..n/`` (with labels) and ``OUT/test/a, b, ../`` (without labels).

    Test fragments keep ``ir.png`` so the infrared view can predict on them. Fragment ``i`` of a
    seed is the same whatever the number of fragments. ``vary`` and ``settings`` as in
    :func:`write_fragment`. Returns the fragment folders written. Every folder is checked
    before the first is written (:func:`check_target`).
    """
    _check_int("fragments", fragments, 0)
    _check_int("test_fragments", test_fragments, 0)
    root = Path(out)
    check_out_folder(root, name="out")
    targets = ([root / "train" / str(i + 1) for i in range(fragments)]
               + [root / "test" / _letters(j) for j in range(test_fragments)])
    for target in targets:
        check_target(target, overwrite=overwrite)
    written: list[Path] = []
    try:
        for i in range(fragments):
            written.append(write_fragment(
                targets[i], height=height, width=width, depth=depth,
                seed=(seed, 0, i), ink_contrast=ink_contrast, overwrite=overwrite, vary=vary,
                settings=settings,
            ))
        for j in range(test_fragments):
            written.append(write_fragment(
                targets[fragments + j], height=height, width=width, depth=depth,
                seed=(seed, 1, j), ink_contrast=ink_contrast, labels=False,
                overwrite=overwrite, vary=vary, settings=settings,
            ))
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: say what is there, how to go on
        if written:
            stop.args = (_written_so_far(written, len(targets)),)
        raise
    return written


def _written_so_far(written: Sequence[Path], total: int) -> str:
    """``2 of 4 fragments written (sy/train/1, sy/train/2); run again with --overwrite to start
    over``: what an interrupted synth leaves (complete fragments only) and how to go on."""
    names = [str(p) for p in written]
    listed = ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}"
    return (f"{len(written)} of {total} fragments written ({listed}); run again with "
            f"--overwrite to start over")


def write_fragment(
    path: str | os.PathLike[str],
    *,
    height: int,
    width: int,
    depth: int = 65,
    seed: int | Sequence[int] = 0,
    ink_contrast: float = INK_CONTRAST,
    labels: bool = True,
    ir: bool = True,
    overwrite: bool = False,
    vary: int = 0,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write one synthetic fragment folder (Kaggle layout) and return its path.

    ``seed`` is anything ``np.random.default_rng`` takes. ``ink_contrast`` is the peak density
    increase of ink in the volume as a fraction of the papyrus density (0 = invisible in the
    x-ray, about 0.1 = subtle, 0.5 = obvious); the infrared ink is always clearly dark.
    ``vary`` (0, 1, 2) draws the generator settings from ranges of that level
    (:data:`~scrollsam.data.synth_settings.VARY_RANGES`; the slice count too at level 2, which
    then replaces ``depth``); ``settings`` fixes named settings
    (``{"ink_offset": 3.0}``) and overrides ``depth`` and ``ink_contrast``. The
    folder is written under a temporary name and renamed, so a killed run leaves no half
    fragment; an existing folder is an error unless ``overwrite``.
    """
    _check_int("height", height, 16)
    _check_int("width", width, 16)
    _check_int("depth", depth, 1)
    if not 0.0 <= ink_contrast <= 1.0:
        raise InputError(f"ink_contrast: expected a number in [0, 1], got {ink_contrast}")
    path = Path(path)
    check_target(path, overwrite=overwrite)
    rng = np.random.default_rng(seed)
    base = SynthSettings(ink_contrast=float(ink_contrast), depth=int(depth))
    chosen = draw_settings(vary, rng, base=base, fixed=settings)
    tmp = path.parent / bounded_name(path.name, f".tmp-{os.getpid()}")  # fits 255 bytes
    if tmp.exists():
        shutil.rmtree(tmp)
    made = missing_folders(tmp.parent)
    (tmp / "surface_volume").mkdir(parents=True)
    try:
        _write_contents(tmp, rng, height, width, chosen, labels=labels, ir=ir)
        (tmp / SETTINGS_FILE).write_text(json.dumps(asdict(chosen), indent=2) + "\n")
        _move_into_place(tmp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)  # the folders made for it, if nothing else went into them
        raise
    log.debug("wrote synthetic fragment %s (%dx%dx%d)", path, height, width, depth)
    return path


def check_target(path: Path, *, overwrite: bool) -> None:
    """InputError when the fragment folder ``path`` cannot be written: an existing one without
    ``overwrite``; a file, a link in its place (with ``overwrite``: it would be replaced), a
    link to nowhere or a link loop on the way, or a file above it
    (:func:`~scrollsam.out_path.check_out_folder`)."""
    check_out_folder(path, name="out", replaced=overwrite)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise InputError(f"out: fragment folder already exists; --overwrite replaces it ({path})")
    if overwrite and path.is_dir() and not path.is_symlink():
        strays = _not_written_by_synth(path)
        if strays:
            raise InputError(
                f"out: not a fragment that synth wrote ({strays}); --overwrite replaces only "
                f"synthetic fragments and empty folders ({path})")


_WRITTEN_FILES = frozenset({"mask.png", "inklabels.png", "ir.png", SETTINGS_FILE})


def _not_written_by_synth(folder: Path) -> str:
    """Why ``folder`` is not one synth wrote (empty when it is one, or empty): a real fragment
    has the same layout but no ``synth_settings.json``; anything synth does not write (a file
    of the user's, a link, a folder under a file's name) is named."""
    entries = sorted(folder.iterdir())
    if not entries:
        return ""
    for entry in entries:
        if entry.is_symlink() or not (
                (entry.name in _WRITTEN_FILES and entry.is_file())
                or (entry.name == "surface_volume" and entry.is_dir())):
            return f"it holds {entry.name}"
    if not (folder / SETTINGS_FILE).is_file():
        return (f"it has no {SETTINGS_FILE}: a real fragment, or one synth wrote before it "
                f"recorded its settings; remove that one by hand")
    volume = folder / "surface_volume"
    for entry in sorted(volume.iterdir()) if volume.is_dir() else []:
        if entry.is_symlink() or not (entry.suffix == ".tif" and entry.stem.isdigit()
                                      and entry.is_file()):
            return f"it holds surface_volume/{entry.name}"
    return ""


def _move_into_place(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Rename the finished fragment ``tmp`` to ``path``. Without ``overwrite`` a folder that
    appeared there meanwhile (another synth into the same OUT) is never replaced: the same
    error as the check before the work. With it, the old folder is moved aside, the new one
    renamed in and the old one removed; a failed rename puts the old one back."""
    check_target(path, overwrite=overwrite)  # it may have changed while this one was written
    if not overwrite or not path.exists():
        try:
            tmp.rename(path)  # replaces only an empty folder made meanwhile: nothing is lost
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            check_target(path, overwrite=False)  # raises: it exists now
            raise
        return
    old = swap_folder(tmp, path, path.parent / bounded_name(path.name, f".old-{os.getpid()}"))
    if old is not None:
        shutil.rmtree(old)


def _write_contents(
    folder: Path, rng: np.random.Generator, height: int, width: int, settings: SynthSettings,
    *, labels: bool, ir: bool,
) -> None:
    mask = _outline(rng, height, width)  # bool [H, W]
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    ink = _glyphs(rng, height, width, letter_scale=settings.letter,
                  stroke_scale=settings.stroke) & inner  # bool [H, W]
    recto = _fibres(rng, height, width, along="x")  # float32 [H, W], unit std
    verso = _fibres(rng, height, width, along="y")
    _write_volume(folder / "surface_volume", rng, mask, ink, recto, verso, settings)
    write_png(folder / "mask.png", mask.astype(np.uint8) * 255)
    if labels:
        write_png(folder / "inklabels.png", ink.astype(np.uint8) * 255)
    if ir:
        write_png(folder / "ir.png", _infrared(rng, mask, ink, recto))


def _write_volume(
    folder: Path, rng: np.random.Generator, mask: np.ndarray, ink: np.ndarray,
    recto: np.ndarray, verso: np.ndarray, settings: SynthSettings,
) -> None:
    """Write ``settings.depth`` uint16 slices: a papyrus sheet around a drifting surface, ink on
    it (its depth, spread and strength, the noise and the fibres from ``settings``)."""
    h, w = mask.shape
    st, depth = settings, settings.depth
    scale = depth / 65.0  # the real volumes have 65 slices; keep proportions for other depths
    drift = np.tanh(_smooth(rng, h, w, max(h, w) / 2) / 1.5)  # [H, W] in (-1, 1)
    surface = (depth - 1) / 2 + scale * (st.surface + st.drift * drift)  # [H, W] sheet centre z
    half = st.sheet * scale  # half thickness of the papyrus sheet, in slices
    soft = max(0.5, 1.2 * scale)  # how sharply density falls off at the sheet faces
    ink_sigma = max(0.6, st.ink_sigma * scale)  # depth spread of the ink signal
    ink_z = np.float32(st.ink_offset * scale)  # ink depth relative to the sheet centre
    outline = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.5)
    ink_soft = cv2.GaussianBlur(ink.astype(np.float32), (0, 0), 1.0)
    span = np.float32(_PAPYRUS - _AIR)
    shading = (1.0 + 0.05 * _smooth(rng, h, w, max(h, w) / 4)).astype(np.float32)
    if st.ink_variation > 0:  # stronger and fainter strokes across the fragment
        strength = np.exp(st.ink_variation * np.tanh(_smooth(rng, h, w, max(h, w) / 5)))
        ink_soft = (ink_soft * strength).astype(np.float32)  # [H, W]
    digits = max(2, len(str(depth - 1)))
    for z in range(depth):
        dz = (z - surface).astype(np.float32)  # [H, W] signed distance to the surface, slices
        sheet = _sigmoid((dz + half) / soft) * _sigmoid((half - dz) / soft) * outline
        upper = _sigmoid(-dz / 2.0)  # recto fibres above the surface, verso fibres below
        texture = 1.0 + st.fibre * (upper * recto + (1.0 - upper) * verso)
        signal = st.ink_contrast * ink_soft * np.exp(-0.5 * ((dz - ink_z) / ink_sigma) ** 2)
        vol = _AIR + span * (sheet * texture * shading + signal)
        vol += rng.standard_normal((h, w), dtype=np.float32) * np.float32(st.noise * span)
        tifffile.imwrite(folder / f"{z:0{digits}d}.tif", np.clip(vol, 0, 65535).astype(np.uint16))


def _infrared(
    rng: np.random.Generator, mask: np.ndarray, ink: np.ndarray, recto: np.ndarray
) -> np.ndarray:
    """uint8 [H, W] infrared photo: light fibrous papyrus, dark ink, dark background."""
    h, w = mask.shape
    papyrus = 150.0 + 18.0 * recto + 20.0 * _smooth(rng, h, w, max(h, w) / 3)
    ink_soft = cv2.GaussianBlur(ink.astype(np.float32), (0, 0), 1.2)
    img = papyrus * (1.0 - 0.65 * ink_soft)
    outline = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)
    img = 12.0 + (img - 12.0) * outline + rng.normal(0.0, 4.0, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _outline(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """bool [H, W]: one irregular blob with ragged edges and no holes, ~50-65 % of the area."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ry, rx = h * rng.uniform(0.40, 0.46), w * rng.uniform(0.40, 0.46)
    r = np.sqrt(((yy - h / 2) / ry) ** 2 + ((xx - w / 2) / rx) ** 2)
    field = 1.0 - r + 0.12 * _smooth(rng, h, w, min(h, w) / 5)
    field += 0.03 * _smooth(rng, h, w, max(4.0, min(h, w) / 40))
    blob = (field > 0).astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(blob, connectivity=4)
    if n > 1:
        blob = (comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    outside = np.zeros((h + 4, w + 4), np.uint8)
    padded = np.pad(blob, 1)
    cv2.floodFill(padded, outside, (0, 0), 1)  # fills the background; holes stay 0
    holes = padded[1:-1, 1:-1] == 0
    return (blob > 0) | holes


def _glyphs(rng: np.random.Generator, h: int, w: int, *, letter_scale: float = 1.0,
            stroke_scale: float = 1.0) -> np.ndarray:
    """bool [H, W]: lines of random capital-letter words, slightly rotated, some worn away;
    letters ``letter_scale`` times the default height, strokes ``stroke_scale`` times as wide."""
    canvas = np.zeros((h, w), np.uint8)
    letter = float(np.clip(min(h, w) / 18, 8, 120)) * letter_scale  # glyph height in pixels
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, base_h), _ = cv2.getTextSize("A", font, 1.0, 1)
    scale = letter / base_h
    thick = max(1, round(letter * stroke_scale / 7))
    pitch = 1.9 * letter
    y = 0.08 * h + letter
    while y < 0.95 * h:
        x = 0.06 * w + rng.uniform(0, letter)
        while x < 0.94 * w:
            word = "".join(rng.choice(list(string.ascii_uppercase), rng.integers(2, 8)))
            cv2.putText(canvas, word, (int(x), int(y + rng.normal(0, letter / 10))), font, scale,
                        255, thick, cv2.LINE_AA)
            (tw, _), _ = cv2.getTextSize(word, font, scale, thick)
            x += tw + letter * rng.uniform(0.6, 1.4)
        y += pitch * rng.uniform(0.95, 1.1)
    angle = rng.uniform(-4, 4)
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    canvas = cv2.warpAffine(canvas, rot, (w, h), flags=cv2.INTER_LINEAR)
    worn = _smooth(rng, h, w, max(8.0, min(h, w) / 8)) > -1.2  # ~10 % of the text faded away
    return (canvas > 127) & worn


def _fibres(rng: np.random.Generator, h: int, w: int, *, along: str) -> np.ndarray:
    """float32 [H, W], unit std: streaks running along x (recto) or y (verso)."""
    fine, long = max(1.5, min(h, w) / 300), max(8.0, min(h, w) / 6)
    sy, sx = (fine, long) if along == "x" else (long, fine)
    small = rng.standard_normal((max(2, int(h / sy)), max(2, int(w / sx))), dtype=np.float32)
    streaks = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return ((streaks - streaks.mean()) / (streaks.std() + 1e-6)).astype(np.float32)


def _smooth(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """float32 [H, W] smooth noise with features about ``scale`` pixels wide, unit std."""
    small = rng.standard_normal(
        (max(2, round(h / scale)) + 2, max(2, round(w / scale)) + 2), dtype=np.float32
    )
    field = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _letters(j: int) -> str:
    """Test fragment names a, b, .., z, aa, ab, .. (Kaggle names its test fragments a, b)."""
    name = ""
    j += 1
    while j:
        j, r = divmod(j - 1, 26)
        name = string.ascii_lowercase[r] + name
    return name


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
