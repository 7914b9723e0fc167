"""The gateway's upstream send: a kept-alive connection the replica closed before answering costs the
request nothing (sent again to the same replica), where a refused connection is the replica's failure."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from support.keepalive import BODY, DroppingServer

from lorafleet.gateway.server import send
from lorafleet.localstack.procs import free_port


def test_a_dropped_kept_alive_connection_is_sent_again_to_the_same_replica():
    server = DroppingServer()

    async def scenario():
        async with aiohttp.ClientSession() as s:
            out = []
            for _ in range(3):
                async with await send(s, "POST", f"http://127.0.0.1:{server.port}/v1/completions", data=b"{}") as r:
                    out.append((r.status, await r.read()))
            return out

    try:
        answers = asyncio.run(scenario())
    finally:
        server.close()
    assert answers == [(200, BODY)] * 3
    assert (server.dropped, server.served) == (2, 3)


def test_a_refused_connection_is_raised_at_once():
    port = free_port()  # nothing listens there

    async def scenario():
        async with aiohttp.ClientSession() as s:
            await send(s, "POST", f"http://127.0.0.1:{port}/v1/completions", data=b"{}")

    with pytest.raises(aiohttp.ClientConnectorError):
        asyncio.run(scenario())
