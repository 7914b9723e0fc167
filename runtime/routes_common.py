"""What the public routers share: tagging a request with its tenant (for metrics) and finishing a
non-streaming answer unless the client has gone away (then its work is cancelled)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from fastapi import Request


def tag(request: Request, entry) -> None:
    request.scope["lorafleet_tenant"] = entry.tenant if entry else "_base"


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
