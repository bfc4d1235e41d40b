"""Where `scrollsam predict` may write: never into, over or beside what a fragment holds.

:func:`check_clear_of_inputs` runs before any work. An output folder (``OUT``, or ``OUT/<id>``
for several fragments: :func:`output_folders`) is refused when it is, or lies inside,

- the folder or volume of a fragment being predicted;
- any other fragment folder, recognised by its volume as
  :class:`~scrollsam.data.fragment.Fragment` recognises it (a slice folder or a Zarr store of
  either layout): ``convert`` keeps folder names, so a copy's ``OUT/<id>`` may be the
  original's folder, whose ``mask.png`` the prediction's would replace;

and when a fragment's input file lies loose in it (where outputs are written) or an input file
or folder lies in its OME-Zarr store or state folder (emptied by ``--restart``). A submission
is refused inside any fragment folder or volume and on an input file. Paths are compared with
links resolved.

The work grows about linearly with the fragments and their files: the inputs' resolved paths
are gathered once into dicts and a set, and each output folder looks up itself and its
ancestors there (and asks each ancestor once, a few ``stat`` calls, whether it holds a volume).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from scrollsam.data.fragment import Fragment
from scrollsam.data.fragment_hosts import VolumeHosts
from scrollsam.errors import InputError
from scrollsam.infer.band_state import STATE_NAME
from scrollsam.infer.zarr_out import ZARR_NAME
from scrollsam.io import within

_RANKS = {"folder": 1, "volume": 2}  # which of one fragment's places an error names first


def output_folders(frags: Sequence[Fragment], out: Path) -> list[Path]:
    """Where each fragment's outputs go: ``out`` for one fragment, ``out/<id>`` for several."""
    return [out] if len(frags) == 1 else [out / f.id for f in frags]


def check_writable(path: Path, *, flag: str) -> None:
    """InputError, before any work, when ``path`` (a folder or file to be made) cannot be
    written: its nearest existing folder (itself, where it is one) refuses writes (a read-only
    file system, no permission, an immutable folder). Otherwise the refusal came after the
    whole prediction."""
    folder = path if path.is_dir() else path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag}: cannot write into {folder} (a read-only file system or no "
                         f"permission) ({path})")


def check_clear_of_inputs(frags: Sequence[Fragment], out: Path, submission: Path | None) -> None:
    """InputError, before any work, when an output would land in or on what a fragment holds
    (see the module's docstring). ``out`` and ``submission`` as the user gave them."""
    inputs = _Inputs(frags)
    hosts = VolumeHosts()
    for index, (frag, dest) in enumerate(zip(frags, output_folders(frags, out), strict=True)):
        real = dest.resolve()
        hit = inputs.place_of(real)
        if hit is not None:
            i, what, folder = hit
            whose = _whose(frags, i, index)
            if what == "folder" and folder == real:
                raise InputError(f"--out: must differ from the fragment folder: fragment "
                                 f"{frag.id}'s outputs would be written into {whose} folder "
                                 f"({dest})")
            raise InputError(f"--out: must lie outside the fragment folders: fragment "
                             f"{frag.id}'s outputs would be written inside {whose} {what} "
                             f"({dest})")
        clash = inputs.clash(real)
        if clash is not None:
            i, path = clash
            raise InputError(f"--out: must not hold the fragments' own files: fragment "
                             f"{frag.id}'s outputs would be written beside "
                             f"{_whose(frags, i, index)} {_name(frags[i], path)} ({path})")
        host = hosts.host(real)
        if host is not None:
            folder, volume = host
            where = "into" if folder == real else "inside"
            raise InputError(f"--out: must lie outside every fragment folder, predicted or not: "
                             f"fragment {frag.id}'s outputs would be written {where} fragment "
                             f"folder {folder}, which holds {volume} ({dest})")
    if submission is not None:
        _check_submission_place(frags, submission, inputs, hosts)


def _check_submission_place(frags: Sequence[Fragment], submission: Path, inputs: _Inputs,
                            hosts: VolumeHosts) -> None:
    """InputError when the submission file would lie inside a fragment folder or volume, or
    replace an input file."""
    real = submission.resolve()
    hit = inputs.place_of(real)
    if hit is not None:
        i, what, _ = hit
        raise InputError(f"--submission: must lie outside the fragment folders: it would be "
                         f"written inside fragment {frags[i].id}'s {what} ({submission})")
    if real in inputs.files:
        g = frags[inputs.files[real]]
        raise InputError(f"--submission: would overwrite fragment {g.id}'s {_name(g, real)} "
                         f"({submission})")
    host = hosts.host(real.parent)
    if host is not None:
        folder, volume = host
        raise InputError(f"--submission: must lie outside every fragment folder, predicted or "
                         f"not: it would be written inside fragment folder {folder}, which "
                         f"holds {volume} ({submission})")


class _Inputs:
    """The fragments' resolved folders, volumes and files, indexed for lookups.

    places: folder or volume -> [(fragment index, "folder" | "volume")]; files: input file ->
    index of the first fragment that reads it; by_parent: folder -> the input files loose in
    it; reach: every input path and every folder above one.
    """

    def __init__(self, frags: Sequence[Fragment]) -> None:
        resolve = _Resolver()
        self.places: dict[Path, list[tuple[int, str]]] = {}
        self.files: dict[Path, int] = {}
        self.by_parent: dict[Path, list[Path]] = {}
        self.owned: list[list[Path]] = []  # per fragment: folder, volume, files (messages)
        for i, g in enumerate(frags):
            folders = [resolve.folder(g.path), resolve.folder(g.volume_path)]
            for what, folder in zip(_RANKS, folders, strict=True):
                self.places.setdefault(folder, []).append((i, what))
            files = [resolve.file(p) for p in (*g.slice_paths, g.mask_path, g.labels_path,
                                               g.ir_path) if p is not None]
            for p in files:
                self.files.setdefault(p, i)
                self.by_parent.setdefault(p.parent, []).append(p)
            self.owned.append([*files, *folders])
        self.reach = _with_ancestors(p for paths in self.owned for p in paths)

    def place_of(self, real: Path) -> tuple[int, str, Path] | None:
        """(fragment index, "folder" | "volume", that folder) of the input folder or volume
        that is ``real`` or holds it: the first fragment's, its folder before its volume."""
        hits = [(i, 0 if what == "folder" and folder == real else _RANKS[what], what, folder)
                for folder in (real, *real.parents) for i, what in self.places.get(folder, ())]
        if not hits:
            return None
        i, _, what, folder = min(hits)
        return i, what, folder

    def clash(self, real: Path) -> tuple[int, Path] | None:
        """(fragment index, path) of an input file loose in output folder ``real``, or of an
        input file or folder inside its OME-Zarr store or state folder; None when clear."""
        stores = [s for s in (real / ZARR_NAME, real / STATE_NAME) if s in self.reach]
        found = [(self.files[p], 0, p) for p in self.by_parent.get(real, ())[:1]]
        if stores:  # rare: find which input lies there (a scan, for the message only)
            found += [(i, 1, p) for i, paths in enumerate(self.owned) for p in paths
                      if any(within(p, s) for s in stores)][:1]
        if not found:
            return None
        i, _, path = min(found)
        return i, path


class _Resolver:
    """``Path.resolve`` with each folder resolved once: a file that is not itself a link is
    its resolved folder plus its name (one ``lstat`` instead of one per path component)."""

    def __init__(self) -> None:
        self._folders: dict[Path, Path] = {}

    def folder(self, path: Path) -> Path:
        """``path`` resolved."""
        if path not in self._folders:
            self._folders[path] = path.resolve()
        return self._folders[path]

    def file(self, path: Path) -> Path:
        """``path``, a file in a folder, resolved."""
        return path.resolve() if path.is_symlink() else self.folder(path.parent) / path.name


def _with_ancestors(paths: Iterable[Path]) -> set[Path]:
    """``paths`` and every folder above one (each chain walked only until it meets one seen)."""
    seen: set[Path] = set()
    for path in paths:
        while path not in seen:
            seen.add(path)
            path = path.parent
    return seen


def _whose(frags: Sequence[Fragment], i: int, index: int) -> str:
    """How an error about fragment ``index``'s outputs names fragment ``i``."""
    return "its own" if i == index else f"fragment {frags[i].id}'s"


def _name(frag: Fragment, real: Path) -> str:
    """How a resolved file or folder of ``frag`` is named inside the fragment folder."""
    for p in (*frag.slice_paths, frag.mask_path, frag.labels_path, frag.ir_path,
              frag.volume_path, frag.path):
        if p is not None and p.resolve() == real:
            return "fragment folder" if p == frag.path else str(p.relative_to(frag.path))
    return real.name
