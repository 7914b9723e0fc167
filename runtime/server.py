"""Server plumbing: sockets, the public, metrics and admin uvicorn servers in one event loop, the commands'
signal handling, and ``RuntimeServer`` (the runtime on loopback ports in a thread, for tests,
benchmarks and ``lorafleet serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading

from lorafleet.runtime.admission import AdmissionGate
from lorafleet.runtime.app import admin_app, metrics_app, public_app
from lorafleet.runtime.lifecycle import Runtime

log = logging.getLogger("lorafleet.runtime")


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_all(settings) -> tuple[socket.socket, socket.socket, socket.socket]:
    """The public, admin (127.0.0.1) and metrics sockets of ``RuntimeSettings``; OSError names the one
    that cannot be had (a port in use: pass another --port, --admin-port or --metrics-port)."""
    socks: list[socket.socket] = []
    try:
        for host, port, flag in ((settings.host, settings.port, "--port"), ("127.0.0.1", settings.admin_port,
                                                                               "--admin-port"),
                                 (settings.host, settings.metrics_port, "--metrics-port")):
            try:
                socks.append(bind(host, port))
            except OSError as e:
                raise OSError(e.errno, f"{e.strerror} (pass another {flag})") from None
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks[0], socks[1], socks[2]


class _QuietServer:
    """A uvicorn server that leaves signal handling to the public one."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        return Server(config)


def loop_factory():
    """uvloop's event loop where it is installed (the runtime's dependencies have it), else None (asyncio's).
    uvicorn picks uvloop only when it creates the loop itself (``uvicorn.run``); these servers share
    one loop that ``run_loop`` creates, so it has to be asked for here. On a CPU the loop competes with
    the model worker for the interpreter lock, and asyncio's sockets drop the lock on every send and
    receive (a wait of up to one switch interval to get it back); libuv's non-blocking I/O keeps it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_loop(main):
    """Run the coroutine ``main`` to its end on the event loop of ``loop_factory``."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def serving_stack(loop: asyncio.AbstractEventLoop, config) -> tuple[str, str]:
    """(event loop, HTTP parser) a server runs on: ("uvloop" or "asyncio", "httptools" or "h11")."""
    kind = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    parser = "httptools" if "httptools" in config.http_protocol_class.__module__ else "h11"
    return kind, parser


def exit_quietly_after_signals() -> None:
    """uvicorn re-raises the signal that stopped it once shutdown is complete; a no-op handler lets the
    command return 0 after a graceful SIGTERM (what Kubernetes sends) instead of dying by the signal."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


async def serve_async(rt: Runtime, public_sock: socket.socket, admin_sock: socket.socket,
                      metrics_sock: socket.socket, stop: asyncio.Event | None = None, log_level: str = "info",
                      on_started=None, front: bool = False) -> int:
    """Run the public, admin and metrics servers until the public one exits (signal) or ``stop`` is set;
    0, or 1 when the HTTP front process died. With ``front`` the public socket is the front's
    (front.py, a child process) and the public app listens on a private unix socket behind it."""
    import uvicorn

    link = None
    if front:
        from lorafleet.runtime.front_link import FrontProcess

        link = FrontProcess(rt, public_sock, log_level)
        public_sock = link.backend_sock
    try:
        return await _serve(rt, public_sock, admin_sock, metrics_sock, stop, log_level, on_started, link, uvicorn)
    finally:
        if link is not None:
            link.close()


async def _serve(rt, public_sock, admin_sock, metrics_sock, stop, log_level, on_started, link, uvicorn) -> int:
    # Behind the front the public app's connections are the front's pool: kept open as long as it keeps them.
    pub_cfg = uvicorn.Config(AdmissionGate(public_app(rt), rt, behind_front=link is not None), log_level=log_level,
                             timeout_graceful_shutdown=5, timeout_keep_alive=3600 if link is not None else 5)
    if link is not None and stop is None:
        # SIGTERM stops the front first (it drains its clients), then these servers.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    pub = uvicorn.Server(pub_cfg) if stop is None else _QuietServer(pub_cfg)
    others = [(_QuietServer(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)), sock)
              for app, sock in ((admin_app(rt), admin_sock), (metrics_app(rt), metrics_sock))]
    tasks = [asyncio.create_task(srv.serve(sockets=[sock])) for srv, sock in others]
    pub_task = asyncio.create_task(pub.serve(sockets=[public_sock]))
    front_task = asyncio.create_task(link.run()) if link is not None else None
    while not (pub.started and all(srv.started for srv, _ in others) and (link is None or link.started.is_set())):
        if pub_task.done() or any(t.done() for t in tasks) or (front_task is not None and front_task.done()):
            break
        await asyncio.sleep(0.01)
    if pub.started and (link is None or link.started.is_set()):
        stack = serving_stack(asyncio.get_running_loop(), pub_cfg)
        log.info("serving on the %s event loop with the %s HTTP parser%s", *stack,
                 f", behind the HTTP front process {link.pid}" if link is not None else "")
        if on_started is not None:
            on_started(stack)
    code = 0
    # The engine failing for good (its model process died) stops the servers with exit code 1.
    loop = asyncio.get_running_loop()
    fatal = asyncio.Event()

    def on_fatal(_reason: str) -> None:
        try:
            loop.call_soon_threadsafe(fatal.set)
        except RuntimeError:  # the loop is gone: the servers are stopping anyway
            pass

    rt.fatal_hooks.append(on_fatal)
    if rt.fatal is not None:
        fatal.set()
    fatal_task = asyncio.ensure_future(fatal.wait())
    waits = {fatal_task, pub_task}
    if stop is not None:
        waits.add(asyncio.ensure_future(stop.wait()))
    if front_task is not None:
        waits.add(front_task)
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    rt.fatal_hooks.remove(on_fatal)
    if fatal.is_set():
        log.error("%s: the runtime stops with exit code 1 so that its container restarts", rt.fatal)
        code = 1
        if link is not None:
            await link.stop()
    elif front_task is not None and front_task.done() and not link.stopping:
        log.error("the HTTP front process %d exited unexpectedly (code %s): the runtime stops with exit "
                  "code 1 so that its container restarts", link.pid, front_task.result())
        code = 1
    elif link is not None:
        await link.stop()
    if not pub_task.done():
        pub.should_exit = True
    for w in waits:
        if w is not pub_task and w is not front_task and not w.done():
            w.cancel()
    await pub_task
    for srv, _ in others:
        srv.should_exit = True
    await asyncio.gather(*tasks)
    if front_task is not None:
        await link.stop()
        await front_task
    return code


def serve_until_signalled(rt: Runtime, public_sock: socket.socket, admin_sock: socket.socket,
                          metrics_sock: socket.socket, log_level: str = "info", front: bool = False) -> int:
    """The commands' main loop: serve the three APIs until SIGTERM/SIGINT, then close the runtime; 0
    (1: the HTTP front process died)."""
    exit_quietly_after_signals()
    try:
        return run_loop(serve_async(rt, public_sock, admin_sock, metrics_sock, log_level=log_level, front=front))
    finally:
        rt.close()


class RuntimeServer:
    """The runtime on loopback ports in a background thread (tests, benchmarks, ``lorafleet serve``)."""

    def __init__(self, rt: Runtime, host: str = "127.0.0.1", port: int = 0, admin_port: int = 0,
                 metrics_port: int = 0, front: bool = False):
        self.rt = rt
        self.front = front  # the public port served by the HTTP front process (front.py)
        self.exit_code: int | None = None
        self.public_sock = bind(host, port)
        self.admin_sock = bind("127.0.0.1", admin_port)
        self.metrics_sock = bind(host, metrics_port)
        self.url = f"http://{host}:{self.public_sock.getsockname()[1]}"
        self.admin_url = f"http://127.0.0.1:{self.admin_sock.getsockname()[1]}"
        self.metrics_url = f"http://{host}:{self.metrics_sock.getsockname()[1]}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self.stack: tuple[str, str] | None = None  # (event loop, HTTP parser), once started
        self._thread = threading.Thread(target=self._run, name="lorafleet-runtime-server", daemon=True)

    def _run(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.exit_code = await serve_async(self.rt, self.public_sock, self.admin_sock, self.metrics_sock,
                                               self._stop, "warning", self._on_started, self.front)

        run_loop(main())

    def _on_started(self, stack: tuple[str, str]) -> None:
        self.stack = stack
        self._started.set()

    def start(self) -> "RuntimeServer":
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the runtime server did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)
        self.rt.close()
        self.public_sock.close()
        self.admin_sock.close()
        self.metrics_sock.close()

    def __enter__(self) -> "RuntimeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
