"""The runtime's side of its HTTP front (front.py): starts the front process on the public socket, serves
the public app to it on a private unix socket, pushes it the admission state and the adapter names on
a socketpair (JSON lines), counts the refusals it reports in the runtime's metrics, and stops it first
on shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorafleet.runtime.front import CHANNEL_LIMIT, DRAIN_S

log = logging.getLogger("lorafleet.runtime")

PUSH_S = 0.01  # the admission state goes to the front this often when it changed
KEEP_FRESH_S = 0.5  # and at least this often (its time tells the front which answers it shows)
NAMES_S = 0.5  # the adapter names are rebuilt at least this often (and at once after an adapter event)


class FrontProcess:
    """One front process serving ``public_sock``; ``backend_sock`` is where the public app listens."""

    def __init__(self, rt, public_sock: socket.socket, log_level: str = "info"):
        self.rt = rt
        self.dir = tempfile.mkdtemp(prefix="lorafleet-front-")  # 0700: only this user reaches the socket
        self.path = os.path.join(self.dir, "backend.sock")
        self.backend_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend_sock.bind(self.path)
        self.backend_sock.listen(4096)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.set_inheritable(True)
        public_sock.set_inheritable(True)
        import lorafleet

        # The child imports the same lorafleet as this process, wherever it came from.
        src = str(Path(lorafleet.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", "lorafleet.runtime.front", "--listen-fd", str(public_sock.fileno()),
               "--channel-fd", str(theirs.fileno()), "--backend", self.path, "--log-level", log_level]
        self.proc = subprocess.Popen(cmd, pass_fds=(public_sock.fileno(), theirs.fileno()), env=env)
        theirs.close()
        # Only the front holds the public socket now: when it stops accepting (drain), the port closes.
        public_sock.close()
        self.channel = ours
        self.started = asyncio.Event()
        self.stopping = False
        self.exited: asyncio.Future | None = None
        log.info("HTTP front process %d on the public port; the public app listens on %s", self.proc.pid, self.path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def run(self) -> int:
        """Talk to the front until its channel closes; its exit code."""
        reader, writer = await asyncio.open_unix_connection(sock=self.channel, limit=CHANNEL_LIMIT)
        pusher = asyncio.create_task(self._push(writer))
        try:
            while line := await reader.readline():
                self._on_message(json.loads(line))
        except (ConnectionError, ValueError) as e:
            log.error("the channel to the HTTP front failed: %s", e)
        finally:
            pusher.cancel()
            writer.close()
        return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)

    def _on_message(self, msg: dict) -> None:
        if "started" in msg:
            self.started.set()
        m = self.rt.metrics
        for tenant, path, reason, n, seconds in msg.get("refused", ()):
            m.shed(tenant, reason, n)
            for s in seconds:
                m.refused_at_admission(tenant, path, reason, s)
        for tenant, path, status, code, n in msg.get("errors", ()):
            m.front_error(tenant, path, status, code, n)

    async def _push(self, writer: asyncio.StreamWriter) -> None:
        rt = self.rt
        last_state, names_at, names_seen, last_names, pushed_at = None, 0.0, -1, None, 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PUSH_S)
            engine = rt.engine
            if engine is None or not rt.loaded.is_set():
                continue
            msg: dict = {}
            if rt.names_changed != names_seen or loop.time() - names_at > NAMES_S:
                names_seen, names_at = rt.names_changed, loop.time()
                names = rt.tenant_map()
                if names != last_names:
                    last_names = names
                    msg["names"], msg["task"] = names, rt.task
            at = time.monotonic()
            state = engine.admission_snapshot()
            acks, rt.front_acks = rt.front_acks, []
            if state != last_state or acks or at - pushed_at > KEEP_FRESH_S:
                last_state, pushed_at = state, at
                msg["state"], msg["acks"], msg["at"] = state, acks, at
            if msg:
                writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
                await writer.drain()

    async def stop(self) -> None:
        """SIGTERM the front (it stops accepting, lets in-flight answers finish) and wait for it."""
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), DRAIN_S + 5)
        except asyncio.TimeoutError:
            log.error("the HTTP front process %d did not stop within %.0f s; killing it", self.proc.pid, DRAIN_S + 5)
            self.proc.kill()
            await loop.run_in_executor(None, self.proc.wait)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.backend_sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
