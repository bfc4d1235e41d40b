"""Reading and writing torch files: checkpoints, SAM weights, cached embeddings.

Writing goes through a Python file object rather than a path: torch's own path writer turns a
full disk into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, while a
file object raises ``OSError(ENOSPC)``, which :func:`scrollsam.io.atomic_path` turns into one
line naming the file.

Reading always uses ``torch.load(weights_only=True)``: a file cannot run code. Every failure
becomes one :class:`~scrollsam.errors.CheckpointError` line that says what is wrong with the
file (empty, corrupt or truncated, holding objects beyond tensors) and never suggests
``weights_only=False``, which would let the file run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from scrollsam.errors import CheckpointError

__all__ = ["load_torch", "not_a_file", "save_torch"]

TORCH_SUFFIXES = (".pt", ".pth")


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` into ``path`` through a file object, so that a full disk is the
    OSError (errno ENOSPC) the file raised, not torch's RuntimeError wrapped around it. Use
    inside :func:`scrollsam.io.atomic_path` for a file that must stay whole."""
    try:
        with open(path, "wb") as f:
            _write(obj, f)
    except RuntimeError as err:
        cause = _os_error_in(err)
        if cause is None:
            raise
        raise cause from None


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError in ``err``'s chain of causes / contexts, if any."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _write(obj: Any, f: Any) -> None:
    torch.save(obj, f)


def load_torch(path: str | os.PathLike[str], *, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; CheckpointError naming
    ``path`` if it cannot be read. ``what`` names the file in messages ("checkpoint")."""
    path = Path(path)
    if not path.is_file():
        raise not_a_file(path, what)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"cannot read {what}: {_why(err)} ({path})") from None
    if size == 0:
        raise CheckpointError(f"cannot read {what}: the file is empty (0 bytes; a copy or save "
                              f"that was cut short?) ({path})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read {what}: {_why(err)} ({path})") from None
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        text = str(err)
        if "Unsupported global" in text:
            reason = ("it holds Python objects beyond tensors and plain values, and scrollsam "
                      "never loads those (they could run code)")
        else:
            reason = "not a PyTorch file, or a truncated or corrupt one"
        raise CheckpointError(f"cannot read {what}: {reason} ({path})") from None


def not_a_file(path: Path, what: str = "checkpoint") -> CheckpointError:
    """The error for a ``path`` that is no file: ``<what> not found``, or, for a folder, that it
    is one, naming the .pt / .pth file inside it when it holds exactly one."""
    if not path.is_dir():
        return CheckpointError(f"{what} not found ({path})")
    try:
        found = sorted(p.name for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
    except OSError:  # unreadable: say what it is all the same
        found = []
    if len(found) == 1:
        tail = f": did you mean {path / found[0]}?"
    elif found:
        tail = (f": give one of its files ({', '.join(found[:4])}"
                f"{', ...' if len(found) > 4 else ''})")
    else:
        tail = ", and it holds no .pt or .pth file"
    return CheckpointError(f"{what} is a folder, not a file{tail} ({path})")


def _why(err: OSError) -> str:
    return (err.strerror or str(err)).lower()  # "permission denied"
