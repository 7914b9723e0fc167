"""What the public routers share: finishing a
non-streaming answer unless the client has gone away, and a streaming answer that cancels its work
when it ends early (in both cases the engine drops the work: from its queue, or from its row)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable, on_disconnect: Callable[[], None]):
    """Await ``work``; if the client disconnects first, call ``on_disconnect`` (cancel the engine's
    work) and stop waiting. The body is read already, so the next ASGI message is the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    on_disconnect()
    task.cancel()
    raise asyncio.CancelledError("the client disconnected")


class CancelOnClose(StreamingResponse):
    """A streamed answer that calls ``on_close`` whenever the response ends, however far its body got.
    A client that leaves before the first chunk cancels the stream before its generator starts (no
    ``finally`` of the generator runs then), so the cancel cannot live in the generator alone.
    ``on_close`` must be a no-op for an answer that was complete."""

    def __init__(self, content, on_close: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
