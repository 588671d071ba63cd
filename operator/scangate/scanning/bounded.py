"""Work run with a bounded number of pieces in flight (requests to one registry, writes
to the API server), its memory that of the slots, not of the work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable

Work = Callable[[], Awaitable[None]]


async def each(slots: asyncio.Semaphore, work: Iterable[Work] | AsyncIterable[Work]) -> None:
    """Run each piece of work with at most `slots` at once, starting one only when a
    slot is free (memory stays that of the slots, not of the work); the first error
    is raised once the others in flight are done."""
    running: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []

    async def one(piece: Work) -> None:
        try:
            await piece()
        finally:
            slots.release()

    def done(task: asyncio.Task[None]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception():
            failed.append(task.exception())  # type: ignore[arg-type]

    async def pieces() -> AsyncIterator[Work]:
        if isinstance(work, AsyncIterable):
            async for piece in work:
                yield piece
        else:
            for piece in work:
                yield piece

    try:
        async for piece in pieces():
            await slots.acquire()
            if failed:
                slots.release()
                break
            task = asyncio.create_task(one(piece))
            running.add(task)
            task.add_done_callback(done)
        await asyncio.gather(*running, return_exceptions=True)
    finally:
        for task in running:
            task.cancel()
    if failed:
        raise failed[0]
