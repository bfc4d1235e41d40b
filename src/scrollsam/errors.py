"""Error types that end a command with one clear line (`error: ...`, exit code 2).

Every problem the user can fix (bad input files, bad config, wrong checkpoint, a tensor of the
wrong shape at a public boundary) raises a subclass of :class:`ScrollsamError`. The CLI prints
its message and exits 2; with ``--debug`` it shows the traceback instead. Anything else is a bug
in scrollsam and keeps its traceback.
"""

from __future__ import annotations


class ScrollsamError(Exception):
    """Base class of every error the user can act on. The message names what and where."""


class InputError(ScrollsamError, ValueError):
    """A value at a public boundary has the wrong shape, dtype, range or coordinate frame.

    Messages follow ``<argument>: expected <form>, got <what>``.
    """


class FragmentError(ScrollsamError):
    """A fragment folder is missing files, has corrupt files or inconsistent sizes."""


class ConfigError(ScrollsamError):
    """An unknown config key or a value of the wrong type / outside its allowed set."""


class CheckpointError(ScrollsamError):
    """A checkpoint file is missing, unreadable, or made for another model variant."""


class RunDirError(ScrollsamError):
    """A run directory would be overwritten, or a resume finds nothing to resume."""


class WriteError(ScrollsamError, OSError):
    """The file system refused a write (full disk, read-only, no permission). The message says
    why and names the file and its folder; what was there before is left intact."""


class PeerLost(ScrollsamError):
    """Another process of a torchrun run stopped (killed, crashed, its machine lost), so a
    collective this one waited in failed. Not the user's input: the CLI exits 1, not 2."""

    exit_code = 1


def describe(value: object) -> str:
    """A value as error messages show it: ``torch.float32 [3, 2] on cpu`` for a tensor (or an
    array), else its type name. Duck-typed, so this module does not import torch."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return type(value).__name__
    device = getattr(value, "device", None)
    return f"{dtype} {list(shape)}" + (f" on {device}" if device is not None else "")
