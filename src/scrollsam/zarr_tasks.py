"""A quiet end for zarr's background I/O tasks after one of them failed.

zarr (v3) runs every read and write of chunks and metadata as concurrent tasks on its own event
loop, in a thread (``zarr.core.sync``), and gathers them: when one task fails (a corrupt chunk,
a full disk), its error comes back to the caller at once, while the other tasks are left
running or end with errors nobody retrieves. After scrollsam's one error line, asyncio then
printed "Task was destroyed but it is pending!", or "Task exception was never retrieved" with
a traceback, whenever those tasks were garbage-collected. :func:`settle` lets them end and sends
asyncio's "never retrieved" reports to the debug log: the error that matters is the one the
caller already has.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["settle"]


def settle(timeout: float = 10.0) -> None:
    """Let the tasks still running on zarr's event loop end (every task on that loop: zarr's
    own I/O; ones still running after ``timeout`` are cancelled), and log (debug) instead of
    print asyncio's reports of errors no one retrieved, from then on (a handler set before is
    kept for every other report). Call it after a zarr read or write failed;
    does nothing when zarr was never imported or its loop never started. Best effort: zarr's
    loop is a private detail, so anything unexpected here is ignored."""
    if "zarr" not in sys.modules:
        return

    async def wait_others() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), timeout)

    try:
        from zarr.core import sync

        loop = sync.loop[0] if sync.loop else None
        if loop is None or loop.is_closed():
            return
        previous = loop.get_exception_handler()
        if not isinstance(previous, _QuietUnretrieved):
            loop.set_exception_handler(_QuietUnretrieved(previous))
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(wait_others(), loop).result(timeout + 1)
    except Exception:  # noqa: BLE001 - the caller's own error is what gets reported
        log.debug("could not settle zarr's pending tasks", exc_info=True)


class _QuietUnretrieved:
    """asyncio exception handler: "... exception was never retrieved" goes to the debug log,
    anything else to the handler that was there before (asyncio's default if none)."""

    def __init__(self, previous: Callable[..., object] | None) -> None:
        self.previous = previous

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "never retrieved" in str(context.get("message", "")):
            log.debug("zarr task: %s: %r", context.get("message"), context.get("exception"))
        elif self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)
