"""The runtime's HTTP front: a process of its own on the public port (``--front process``) that takes the
connections, the HTTP parsing and the refusals off the model's interpreter lock.

The runtime (the backend) binds the public socket and starts this module as its child with that socket
and one end of a socketpair (the channel). The front accepts and parses HTTP/1.1 (httptools on uvloop),
answers the requests the scheduler would refuse with the scheduler's own rule (admission_rule.admit,
over the admission state the backend pushes on the channel plus what the front forwarded since), and
forwards everything else to the public app on a private unix socket over a pool of keep-alive
connections, relaying the response's bytes as they come (streams included). It counts its refusals
back on the channel, so the runtime's /metrics shows them as if the runtime had refused them itself, and
the errors it answers on its own (503 while the backend does not answer, 502 when it closed a connection
without an answer), which /metrics shows as lorafleet_runtime_front_errors_total.

Imports neither torch nor the web framework: it starts in a fraction of a second and holds little
memory. Front-to-backend headers (``x-lorafleet-front-*``) are dropped from what clients send."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from email.utils import formatdate

import httptools

from lorafleet.runtime.admission_rule import (GATED, MAX_PEEK_BYTES, AdmissionState, admit, depth_of, items_of,
                                              json_object, refusal_body, waiting_add)
from lorafleet.runtime.engine_api import Overloaded

log = logging.getLogger("lorafleet.runtime.front")

PRIVATE_PREFIX = b"x-lorafleet-front-"  # front -> backend only; a client's are dropped
ARRIVED_HEADER = b"x-lorafleet-front-arrived"  # time.monotonic() when the front began reading the request
SEQ_HEADER = b"x-lorafleet-front-seq"  # the front's number for a request it counts as forwarded
# About this hop, not the request: the front writes its own framing and connection handling.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                        b"transfer-encoding", b"content-length", b"expect"})
KEEP_ALIVE_S = 5.0  # an idle client connection is closed after this (uvicorn's default)
DRAIN_S = 5.0  # after SIGTERM, in-flight requests get this long (uvicorn's timeout_graceful_shutdown)
FLUSH_S = 0.02  # refusal counts go to the backend this often
CHANNEL_LIMIT = 64 << 20  # one channel line (the adapter-name map of thousands of adapters)
HIGH_WATER = 1 << 20  # bytes buffered toward a slow peer before the other side stops reading


class FrontAdmission:
    """The front's copy of the scheduler's admission state: the backend's last snapshot plus the work
    forwarded since that the backend has not acknowledged (so a burst between two snapshots is not
    over-admitted). Until the backend sends a snapshot (model loading; an engine without one) nothing
    is refused here."""

    def __init__(self):
        self.names: dict[str, str] = {}  # a request's ``model`` -> the tenant its work is queued for
        self.task = ""
        self.base: dict | None = None
        self.state: AdmissionState | None = None
        self.pending: dict[int, tuple[str, int]] = {}  # seq -> (tenant, items), forwarded, not acknowledged
        # seq -> (tenant, items, when answered): answered after the last snapshot was taken
        self.done: dict[int, tuple[str, int, float]] = {}
        self.seq = 0
        self.refused: dict[tuple[str, str, str], list] = {}  # (tenant, path, reason) -> [items, [seconds]]
        # (tenant, path, status, code) -> requests the front answered with an error of its own (502, 503)
        self.errors: dict[tuple[str, str, int, str], int] = {}

    def on_message(self, msg: dict) -> None:
        if "names" in msg:
            self.names, self.task = msg["names"], msg.get("task", "")
        if "state" in msg or "acks" in msg:
            for seq in msg.get("acks", ()):
                self.pending.pop(seq, None)
            if msg.get("state") is not None:
                self.base = msg["state"]
            at = msg.get("at", 0.0)
            # Answered before the backend took this snapshot: its work had left the backend's counts.
            self.done = {seq: d for seq, d in self.done.items() if d[2] > at}
            self._rebuild()

    def _rebuild(self) -> None:
        b = self.base
        if b is None:
            self.state = None
            return
        load, waiting, queued = dict(b["load"]), dict(b["waiting"]), b["queued"]
        for tenant, n in self.pending.values():
            load[tenant] = load.get(tenant, 0) + n
            waiting[tenant] = waiting.get(tenant, 0) + n
            queued += n
        for tenant, n, _ in self.done.values():  # answered since: the snapshot may still count it
            left = load.get(tenant, 0) - n
            if left > 0:
                load[tenant] = left
            else:
                load.pop(tenant, None)
        self.state = AdmissionState(b["max_queue"], b["per_tenant"], b["max_delay"], b["closed"], queued, b["rate"],
                                    load, waiting, depth_of(waiting))

    def check(self, path: str, raw: bytes, arrived: float) -> tuple[str, int, Overloaded | None] | None:
        """(tenant, items, the refusal or None) for a gated request whose tenant is known; None: the
        backend decides alone (as the inline gate leaves such a request to the route)."""
        if self.state is None or self.task != GATED[path] or len(raw) > MAX_PEEK_BYTES:
            return None
        body = json_object(raw)
        if body is None:
            return None
        model = body.get("model")
        tenant = self.names.get(model) if isinstance(model, str) else None
        if tenant is None:
            return None
        n = items_of(path, body)
        try:
            admit(self.state, tenant, n, time.monotonic() - arrived)
        except Overloaded as e:
            return tenant, n, e
        return tenant, n, None

    def forwarded(self, tenant: str, n: int) -> int:
        self.seq += 1
        self.pending[self.seq] = (tenant, n)
        s = self.state
        if s is not None:
            s.queued += n
            s.load[tenant] = s.load.get(tenant, 0) + n
            waiting_add(s.waiting, s.depth, tenant, n)
        return self.seq

    def settled(self, seq: int, tenant: str, n: int) -> None:
        """The backend answered ``seq`` (or never will: the client or the backend left). Its work has
        left the backend's counts by now, which a snapshot taken earlier does not show yet."""
        s = self.state
        if s is None:
            return
        if self.pending.pop(seq, None) is not None:  # not in any snapshot yet
            s.queued -= n
            waiting_add(s.waiting, s.depth, tenant, -min(n, s.waiting.get(tenant, 0)))
        self.done[seq] = (tenant, n, time.monotonic())
        left = s.load.get(tenant, 0) - n
        if left > 0:
            s.load[tenant] = left
        else:
            s.load.pop(tenant, None)

    def count_refusal(self, tenant: str, path: str, reason: str, n: int, seconds: float) -> None:
        entry = self.refused.get((tenant, path, reason))
        if entry is None:
            entry = self.refused[(tenant, path, reason)] = [0, []]
        entry[0] += n
        entry[1].append(round(seconds, 6))

    def count_error(self, tenant: str, path: str, status: int, code: str) -> None:
        key = (tenant, path, status, code)
        self.errors[key] = self.errors.get(key, 0) + 1

    def take_errors(self) -> list | None:
        if not self.errors:
            return None
        out = [[t, p, st, c, n] for (t, p, st, c), n in self.errors.items()]
        self.errors = {}
        return out

    def take_refusals(self) -> list | None:
        if not self.refused:
            return None
        out = [[t, p, r, n, secs] for (t, p, r), (n, secs) in self.refused.items()]
        self.refused = {}
        return out


class _Date:
    """The ``date`` header, formatted once a second."""

    def __init__(self):
        self.at, self.value = 0, b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.at:
            self.at, self.value = now, formatdate(now, usegmt=True).encode()
        return self.value


class Request:
    __slots__ = ("method", "url", "headers", "body", "size", "arrived", "keep_alive", "chunked", "length",
                 "complete", "streaming", "seq", "head_only", "tenant", "items")

    def __init__(self, arrived: float):
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.arrived = arrived
        self.keep_alive = True
        self.chunked = False
        self.length: int | None = None
        self.complete = False
        self.streaming = False  # the body goes to the backend as it arrives (over MAX_PEEK_BYTES)
        self.seq: int | None = None  # counted as forwarded work of ``tenant`` (``items``) by FrontAdmission
        self.tenant = ""
        self.items = 0
        self.method = b""
        self.head_only = False

    def path(self) -> str:
        return self.url.split(b"?", 1)[0].decode("latin-1")

    def backend_head(self, framing: bytes) -> bytes:
        """The request line and headers toward the backend: the client's end-to-end headers, the
        front's framing and private headers (never a client's ``x-lorafleet-front-*``)."""
        parts = [self.method, b" ", self.url, b" HTTP/1.1\r\n"]
        for k, v in self.headers:
            if k in HOP_BY_HOP or k.startswith(PRIVATE_PREFIX):
                continue
            parts += (k, b": ", v, b"\r\n")
        parts += (framing, ARRIVED_HEADER, b": ", repr(self.arrived).encode(), b"\r\n")
        if self.seq is not None:
            parts += (SEQ_HEADER, b": ", str(self.seq).encode(), b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


def error_bytes(status: int, reason: bytes, message: str, type_: str, code: str, date: bytes, close: bool,
                extra: bytes = b"") -> bytes:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}}, separators=(",", ":")).encode()
    return b"".join((b"HTTP/1.1 %d %s\r\ndate: %s\r\ncontent-length: %d\r\ncontent-type: application/json\r\n"
                     % (status, reason, date, len(body)), extra, b"connection: close\r\n" if close else b"", b"\r\n",
                     body))


class Front:
    """One front: its connections, the backend pool, admission and the channel."""

    def __init__(self, backend_path: str):
        self.backend_path = backend_path
        self.idle: list[BackendConn] = []
        self.clients: set[ClientConn] = set()
        self.admission = FrontAdmission()
        self.date = _Date()
        self.draining = False
        self.idle_changed = asyncio.Event()

    async def backend(self) -> "BackendConn":
        while self.idle:
            b = self.idle.pop()
            if b.alive:
                return b
        loop = asyncio.get_running_loop()
        _, b = await loop.create_unix_connection(lambda: BackendConn(self), self.backend_path)
        return b

    def give_back(self, b: "BackendConn", reusable: bool) -> None:
        if reusable and b.alive and not self.draining:
            self.idle.append(b)
        else:
            b.close()

    def gone(self, c: "ClientConn") -> None:
        self.clients.discard(c)
        if self.draining:
            self.idle_changed.set()


class BackendConn(asyncio.Protocol):
    """One keep-alive connection to the backend; relays one response at a time to its client."""

    def __init__(self, front: Front):
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.alive = True
        self.client: ClientConn | None = None
        self.parser = None
        self.head: bytearray | None = None
        self.complete = False
        self.head_only = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.alive = False
        c, self.client = self.client, None
        if c is not None:
            c.backend_lost(self)

    def begin(self, client: "ClientConn", data: bytes, head_only: bool) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.head = bytearray()
        self.complete = False
        self.head_only = head_only
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > HIGH_WATER and self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.resume_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    def data_received(self, data: bytes) -> None:
        c = self.client
        if c is None:  # nothing asked: the backend is closing or confused; never reuse this one
            self.close()
            return
        feed = data
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 1 << 16:
                    self.close()
                return
            feed, head, rest = bytes(self.head), bytes(self.head[:end + 4]), bytes(self.head[end + 4:])
            self.head = None
            c.relay_head(head)
            if self.head_only:
                self.client = None
                self.close()  # a HEAD's answer has no body, which the response parser cannot know
                c.response_done(self, False)
                return
            if rest:
                c.relay(rest)
        else:
            c.relay(data)
        try:
            self.parser.feed_data(feed)
        except httptools.HttpParserError:
            self.client = None
            self.close()
            c.backend_lost(self)
            return
        if self.complete:
            self.client = None
            c.response_done(self, self.parser.should_keep_alive())

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()


class ClientConn(asyncio.Protocol):
    """One client connection: parses its requests and answers them one at a time, in order."""

    def __init__(self, front: Front):
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None  # being parsed
        self.active: Request | None = None  # being answered
        self.waiting: deque[Request] = deque()  # parsed, waiting for the active one (pipelining)
        self.backend_conn: BackendConn | None = None
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.paused_backend = False

    # --- the connection -------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.front.clients.add(self)
        self._idle()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._cancel_timer()
        b, self.backend_conn = self.backend_conn, None
        if b is not None:  # the client left mid-request: the backend sees its connection close and cancels
            b.client = None
            b.close()
        for r in (self.active, self.req, *self.waiting):
            if r is not None:
                self._settle(r)
        self.active, self.req = None, None
        self.waiting.clear()
        self.front.gone(self)

    def pause_writing(self) -> None:
        b = self.backend_conn
        if b is not None and b.transport is not None:
            b.transport.pause_reading()
            self.paused_backend = True

    def resume_writing(self) -> None:
        b = self.backend_conn
        if b is not None and b.transport is not None and self.paused_backend:
            b.transport.resume_reading()
        self.paused_backend = False

    def data_received(self, data: bytes) -> None:
        self._cancel_timer()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"Bad Request", "connection upgrades are not served here", "invalid_request_error",
                       "upgrade_refused")
        except httptools.HttpParserError as e:
            self._fail(400, b"Bad Request", f"invalid HTTP request: {e}", "invalid_request_error", "bad_http")

    def _fail(self, status: int, reason: bytes, message: str, type_: str, code: str) -> None:
        if self.active is None and not self.closed:
            self.transport.write(error_bytes(status, reason, message, type_, code, self.front.date(), True))
        self.transport.close()

    def _idle(self) -> None:
        if self.front.draining:
            self.transport.close()
            return
        self.timer = asyncio.get_running_loop().call_later(KEEP_ALIVE_S, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.timer = None
        if self.active is None and self.req is None and not self.closed:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # --- httptools' callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.req = Request(time.monotonic())

    def on_url(self, url: bytes) -> None:
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        r, p = self.req, self.parser
        r.method = p.get_method()
        r.keep_alive = p.should_keep_alive()
        r.head_only = r.method == b"HEAD"
        for k, v in r.headers:
            if k == b"content-length":
                try:
                    r.length = int(v)
                except ValueError:
                    r.length = None
            elif k == b"transfer-encoding":
                r.chunked = b"chunked" in v.lower()
            elif k == b"expect" and v.lower() == b"100-continue" and self.active is None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if r.length is not None and r.length > MAX_PEEK_BYTES and self.active is None and not self.waiting:
            self._stream(r)

    def on_body(self, body: bytes) -> None:
        r = self.req
        if r.streaming:
            self._stream_body(r, body)
            return
        r.body.append(body)
        r.size += len(body)
        if r.size > MAX_PEEK_BYTES and self.active is None and not self.waiting:
            self._stream(r)

    def on_message_complete(self) -> None:
        r, self.req = self.req, None
        r.complete = True
        if r.streaming:
            self._stream_end(r)
            return
        self.waiting.append(r)
        if self.active is None:
            self._next()

    # --- answering ------------------------------------------------------------------------------
    def _next(self) -> None:
        while self.waiting and self.active is None and not self.closed:
            r = self.waiting.popleft()
            self.active = r
            if self._refused(r):
                self.active = None
                if not r.keep_alive or self.front.draining:
                    self.transport.close()
                    return
                continue
            asyncio.ensure_future(self._forward(r, b"".join(r.body)))
        if self.active is None and self.req is None and not self.closed:
            self._idle()

    def _refused(self, r: Request) -> bool:
        """Answer ``r`` 429 here if the scheduler's rule refuses it (the inline gate's answer)."""
        if r.method != b"POST":
            return False
        path = r.path()
        if path not in GATED:
            return False
        got = self.front.admission.check(path, b"".join(r.body), r.arrived)
        if got is None:
            return False
        tenant, n, e = got
        if e is None:
            r.seq, r.tenant, r.items = self.front.admission.forwarded(tenant, n), tenant, n
            return False
        body = refusal_body(e)
        self.transport.write(b"".join((
            b"HTTP/1.1 429 Too Many Requests\r\ndate: %s\r\ncontent-length: %d\r\ncontent-type: application/json\r\n"
            b"retry-after: %d\r\n" % (self.front.date(), len(body), e.retry_after),
            b"" if r.keep_alive and not self.front.draining else b"connection: close\r\n", b"\r\n", body)))
        self.front.admission.count_refusal(tenant, path, e.code, n, time.monotonic() - r.arrived)
        return True

    async def _backend_for(self, r: Request):
        """A backend connection for ``r``, now this client's; None: none could be had (``r`` was answered
        for it) or the client left while waiting (the connection went back)."""
        try:
            b = await self.front.backend()
        except OSError as e:
            self._backend_unreachable(r, e)
            return None
        if self.closed:
            self.front.give_back(b, True)
            return None
        self.backend_conn = b
        return b

    async def _forward(self, r: Request, body: bytes) -> None:
        if (b := await self._backend_for(r)) is None:
            return
        b.begin(self, r.backend_head(b"content-length: %d\r\n" % len(body)) + body, r.head_only)

    def _stream(self, r: Request) -> None:
        """Forward ``r`` now and its body as it arrives (too large to read before deciding)."""
        r.streaming = True
        self.active = r
        asyncio.ensure_future(self._forward_stream(r))

    async def _forward_stream(self, r: Request) -> None:
        if (b := await self._backend_for(r)) is None:
            return
        framing = b"content-length: %d\r\n" % r.length if r.length is not None and not r.chunked \
            else b"transfer-encoding: chunked\r\n"
        buffered, r.body = b"".join(r.body), []
        b.begin(self, r.backend_head(framing), r.head_only)
        if buffered:
            self._stream_body(r, buffered)
        if r.complete:
            self._stream_end(r)

    def _stream_body(self, r: Request, data: bytes) -> None:
        b = self.backend_conn
        if b is None or b.client is not self:  # still connecting: kept until it is
            r.body.append(data)
            return
        b.write(b"%x\r\n%s\r\n" % (len(data), data) if r.length is None or r.chunked else data)

    def _stream_end(self, r: Request) -> None:
        b = self.backend_conn
        if b is not None and b.client is self and (r.length is None or r.chunked):
            b.write(b"0\r\n\r\n")

    def _backend_unreachable(self, r: Request, e: OSError) -> None:
        log.error("the runtime's backend is unreachable at %s: %s", self.front.backend_path, e)
        self._settle(r)
        self.front.admission.count_error(r.tenant, r.path(), 503, "backend_unavailable")
        if not self.closed:
            self.transport.write(error_bytes(503, b"Service Unavailable", "the runtime's model server is not "
                                             "answering (starting or stopping); retry", "service_unavailable",
                                             "backend_unavailable", self.front.date(), True, b"retry-after: 1\r\n"))
            self.transport.close()

    def _settle(self, r: Request) -> None:
        if r.seq is not None:
            self.front.admission.settled(r.seq, r.tenant, r.items)
            r.seq = None

    # --- from the backend connection ------------------------------------------------------------
    def relay_head(self, head: bytes) -> None:
        r = self.active
        close = r is None or not r.keep_alive or self.front.draining
        if close or b"onnection:" in head:
            lines = [line for line in head[:-4].split(b"\r\n")
                     if line[:11].lower() != b"connection:" and line[:11].lower() != b"keep-alive:"]
            if close:
                lines.append(b"connection: close")
            head = b"\r\n".join(lines) + b"\r\n\r\n"
        self.transport.write(head)

    def relay(self, data: bytes) -> None:
        self.transport.write(data)

    def response_done(self, b: BackendConn, reusable: bool) -> None:
        self.backend_conn = None
        if self.paused_backend and b.transport is not None:
            b.transport.resume_reading()
            self.paused_backend = False
        self.front.give_back(b, reusable)
        r, self.active = self.active, None
        if r is not None:
            self._settle(r)
        if self.closed:
            return
        if r is None or not r.keep_alive or self.front.draining:
            self.transport.close()
            return
        self.transport.resume_reading()
        self._next()

    def backend_lost(self, b: BackendConn) -> None:
        """The backend closed this request's connection before the whole answer came."""
        self.backend_conn = None
        r, self.active = self.active, None
        if r is not None:
            self._settle(r)
        if self.closed:
            return
        if b.head is not None:  # nothing of the answer relayed yet: say why
            if r is not None:
                self.front.admission.count_error(r.tenant, r.path(), 502, "backend_closed")
            self.transport.write(error_bytes(502, b"Bad Gateway", "the runtime's model server closed the connection "
                                             "without an answer", "service_unavailable", "backend_closed",
                                             self.front.date(), True))
        self.transport.close()


# --- the process ---------------------------------------------------------------------------------------
async def _read_channel(front: Front, reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    try:
        while line := await reader.readline():
            front.admission.on_message(json.loads(line))
    except (ConnectionError, ValueError) as e:
        log.error("the channel to the runtime failed: %s", e)
    stop.set()  # the runtime is gone (or closed the channel): stop


async def _flush_counts(front: Front, writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(FLUSH_S)
        _send_counts(front, writer)


def _send_counts(front: Front, writer: asyncio.StreamWriter) -> None:
    msg = {}
    refused, errors = front.admission.take_refusals(), front.admission.take_errors()
    if refused is not None:
        msg["refused"] = refused
    if errors is not None:
        msg["errors"] = errors
    if msg and not writer.is_closing():
        writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")


async def serve(listen_fd: int, channel_fd: int, backend_path: str) -> int:
    loop = asyncio.get_running_loop()
    front = Front(backend_path)
    listen = socket.socket(fileno=listen_fd)
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel_fd), limit=CHANNEL_LIMIT)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the runtime stops this process in its own order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = await loop.create_server(lambda: ClientConn(front), sock=listen, backlog=2048)
    tasks = [asyncio.create_task(_read_channel(front, reader, stop)),
             asyncio.create_task(_flush_counts(front, writer))]
    writer.write(json.dumps({"started": os.getpid()}).encode() + b"\n")
    await stop.wait()
    # Drain: no new connections; idle ones close, in-flight answers finish (each then closes).
    server.close()
    front.draining = True
    for c in list(front.clients):
        if c.active is None and c.req is None and not c.waiting:
            c.transport.close()
    deadline = loop.time() + DRAIN_S
    while front.clients and loop.time() < deadline:
        front.idle_changed.clear()
        try:
            await asyncio.wait_for(front.idle_changed.wait(), deadline - loop.time())
        except asyncio.TimeoutError:
            break
    for c in list(front.clients):
        c.transport.abort()
    for b in front.idle:
        b.close()
    _send_counts(front, writer)
    for t in tasks:
        t.cancel()
    try:
        await writer.drain()
        writer.close()
    except ConnectionError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorafleet.runtime.front", description=__doc__.splitlines()[0])
    p.add_argument("--listen-fd", type=int, required=True, help="the public listening socket (inherited)")
    p.add_argument("--channel-fd", type=int, required=True, help="the runtime's end of the channel (inherited)")
    p.add_argument("--backend", required=True, help="the backend's private unix socket")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(args.listen_fd, args.channel_fd, args.backend))


if __name__ == "__main__":
    sys.exit(main())
