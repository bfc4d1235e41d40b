"""zarr_tasks.settle: after a failed zarr read or write, the tasks left on zarr's event loop
end, and asyncio's "exception was never retrieved" reports go to the debug log, not stderr."""

from __future__ import annotations

import asyncio
import gc
import logging

from zarr.core import sync

from scrollsam import zarr_tasks


def _leave_failed_tasks(n: int) -> list[asyncio.Task[None]]:
    """n tasks on zarr's loop that end with an OSError nobody retrieves (as a gather leaves
    its other tasks when one fails), and one still running."""
    loop = sync._get_loop()

    async def full_disk() -> None:
        raise OSError(28, "No space left on device")

    async def slow() -> None:
        await asyncio.sleep(0.2)

    async def spawn() -> list[asyncio.Task[None]]:
        tasks = [asyncio.ensure_future(full_disk()) for _ in range(n)]
        tasks.append(asyncio.ensure_future(slow()))
        await asyncio.sleep(0.01)
        return tasks

    return asyncio.run_coroutine_threadsafe(spawn(), loop).result(5)


def test_settle_waits_for_running_tasks_and_quiets_unretrieved_errors(caplog):
    loop = sync._get_loop()
    previous = loop.get_exception_handler()
    try:
        gc.collect()  # failed tasks other tests may have left: reported before this test
        tasks = _leave_failed_tasks(3)
        with caplog.at_level(logging.DEBUG):
            zarr_tasks.settle()
            assert tasks[-1].done()  # the running one ended before settle returned
            del tasks
            gc.collect()  # what asyncio reports when the failed tasks are collected
        noisy = [r for r in caplog.records if r.name == "asyncio"]
        assert noisy == []
        quiet = [r for r in caplog.records if r.name == "scrollsam.zarr_tasks"
                 and "No space left on device" in r.getMessage()]  # this test's own tasks
        assert len(quiet) == 3 and all(r.levelno == logging.DEBUG for r in quiet)
    finally:
        loop.set_exception_handler(previous)


def test_other_reports_reach_the_handler_set_before_or_asyncios(caplog):
    loop = sync._get_loop()
    previous = loop.get_exception_handler()
    seen = []
    try:
        for mine in (None, lambda _loop, context: seen.append(context["message"])):
            loop.set_exception_handler(mine)
            zarr_tasks.settle()
            assert loop.get_exception_handler() is not mine  # settle's own is in front
            with caplog.at_level(logging.DEBUG):
                loop.call_exception_handler({"message": "something else went wrong"})
                loop.call_exception_handler({"message": "Task exception was never retrieved"})
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == \
            ["something else went wrong"]  # asyncio's default handler, the first time
        assert seen == ["something else went wrong"]  # the user's own, the second time
    finally:
        loop.set_exception_handler(previous)
