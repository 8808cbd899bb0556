"""A TCP proxy that damages bytes on their way to the server: a flaky network path.

CorruptingProxy listens on 127.0.0.1 and a free port and forwards every
connection to `upstream`. In the client-to-server direction it replaces each
occurrence of `marker` that lies inside one received chunk with `replacement`
(same length, so Content-Length stays right): the request arrives well formed,
with a damaged body. Test data repeats the marker often, so some occurrence
always falls inside a chunk. Server-to-client bytes pass unchanged.
`damaged` counts the replacements made. Stop with close() (or `with`).
"""

from __future__ import annotations

import contextlib
import socket
import threading

HOST = "127.0.0.1"


class CorruptingProxy:
    def __init__(self, upstream_port: int, marker: bytes, replacement: bytes) -> None:
        if len(marker) != len(replacement) or marker == replacement:
            raise ValueError("the replacement must differ from the marker, at equal length")
        self.upstream_port = upstream_port
        self.marker = marker
        self.replacement = replacement
        self.damaged = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection((HOST, self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, corrupt: bool) -> None:
        try:
            while chunk := source.recv(1 << 16):
                if corrupt and self.marker in chunk:
                    with self._lock:
                        self.damaged += chunk.count(self.marker)
                    chunk = chunk.replace(self.marker, self.replacement)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        self._thread.join(10)

    def __enter__(self) -> CorruptingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
