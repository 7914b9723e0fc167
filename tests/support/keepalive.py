"""An HTTP server that answers the first request of each connection with keep-alive and closes the
connection, unanswered, when a second request comes on it: what a client's connection pool meets when
the server drops an idle kept-alive connection just as the pool reuses it (uvicorn's keep-alive
timeout against aiohttp's pool), every time instead of by chance."""

from __future__ import annotations

import socket
import threading

BODY = b'{"ok": true}'


class DroppingServer:
    def __init__(self) -> None:
        self.served = 0   # requests answered
        self.dropped = 0  # requests whose connection was closed unanswered
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            first = True
            while True:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                with self._lock:
                    if not first:
                        self.dropped += 1
                        return
                    self.served += 1
                first = False
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(BODY), BODY))
