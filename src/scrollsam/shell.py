"""Commands printed for the user to paste into a shell, quoted so that a path with spaces or
other special characters stays one word (``tensorboard --logdir 'runs/my rün/tb'``)."""

from __future__ import annotations

import os
import shlex


def shell_word(value: str | os.PathLike[str]) -> str:
    """``value`` as one shell word: unchanged when it needs no quoting (``runs/demo``), else in
    single quotes (``'runs/my rün'``). In a ``key=value`` word quote the value alone:
    ``f"out={shell_word(run)}"`` gives ``out='runs/my rün'``."""
    return shlex.quote(os.fspath(value))


def shell_command(*words: str | os.PathLike[str]) -> str:
    """The words joined into one command line, each quoted as needed (:func:`shell_word`):
    ``shell_command("tensorboard", "--logdir", run / "tb")``."""
    return " ".join(shell_word(w) for w in words)
