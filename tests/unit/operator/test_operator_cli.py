"""``lorafleet operator``'s flags: one namespace or many, or the whole cluster."""

from __future__ import annotations

import pytest

from lorafleet.operator.cli import parse


def test_namespaces_repeat_and_default_to_the_whole_cluster():
    assert parse([]).namespace == [] and not parse([]).all_namespaces
    args = parse(["-n", "team-a", "--namespace", "team-*", "--verbose", "--liveness", "http://0.0.0.0:8080/healthz"])
    assert args.namespace == ["team-a", "team-*"] and args.verbose
    assert args.liveness == "http://0.0.0.0:8080/healthz"


def test_namespace_and_all_namespaces_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse(["-A", "-n", "x"])
    assert "not allowed with" in capsys.readouterr().err


def _leave_open(name: str):
    """An async generator called ``name`` left open when the loop ends, whose context manager fails the
    close as kopf's ``streaming_block`` does at shutdown ("generator didn't stop after athrow()")."""

    class StreamingBlock:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            raise RuntimeError("generator didn't stop after athrow()")

    def streaming_block():
        return StreamingBlock()

    async def gen():
        async with streaming_block():
            yield 1
            yield 2

    gen.__qualname__ = name

    async def main():
        import asyncio

        from lorafleet.operator.cli import loop_exception_handler

        asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
        g = gen()
        await g.__anext__()  # open, never closed, still referenced: asyncio.run's shutdown closes it
        _OPEN.append(g)
    return main


_OPEN: list = []


def _one_warning_for_the_known_only(caplog, known, other, says: str) -> None:
    """Run the loop ``known`` (a kopf artefact): one warning of the operator's saying ``says``; then
    ``other``: asyncio's own ERROR with its traceback."""
    import asyncio
    import logging

    with caplog.at_level(logging.WARNING):
        asyncio.run(known())
    assert [(r.name, r.levelname) for r in caplog.records] == [("lorafleet.operator", "WARNING")]
    assert says in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        asyncio.run(other())
    assert [(r.name, r.levelname) for r in caplog.records] == [("asyncio", "ERROR")]
    assert caplog.records[0].exc_info is not None  # with its traceback


def test_kopfs_watch_stream_closing_badly_at_shutdown_is_one_warning_and_other_errors_stay(caplog):
    """The operator's log shows no traceback for the known kopf shutdown artefact (a test reading the log
    for tracebacks would take it for a crash), and still shows asyncio's report for any other generator."""
    _one_warning_for_the_known_only(caplog, _leave_open("infinite_watch"), _leave_open("some_other_stream"),
                                    "did not close cleanly at shutdown")


def test_kopfs_resource_scan_losing_its_connection_is_one_warning_and_other_task_errors_stay(caplog):
    """kopf's scan reads /api and /apis side by side and stops at the first failure; the other read's task,
    failing too with the connection closed, is never awaited: one warning line, not asyncio's traceback."""
    import asyncio
    import gc

    import aiohttp

    def orphan(name: str):
        async def read():
            raise aiohttp.ClientConnectionError("Connection closed")

        read.__qualname__ = name

        async def main():
            from lorafleet.operator.cli import loop_exception_handler

            asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
            task = asyncio.ensure_future(read())
            await asyncio.sleep(0.01)  # it fails; nobody retrieves its exception
            del task
            gc.collect()
        return main

    _one_warning_for_the_known_only(caplog, orphan("_read_new_apis"), orphan("some_other_read"),
                                    "lost its connection")
