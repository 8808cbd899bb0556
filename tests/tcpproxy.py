"""TcpProxy: the skeleton of the tests' TCP proxies (a flaky network path, a legacy
PACS with a result limit).

It listens on 127.0.0.1 and a free port and forwards every connection to
`upstream_port`, each direction in a thread of its own: `to_server(client,
upstream)` and `to_client(upstream, client)`, both plain `pump()` unless a
subclass changes the bytes. close() (or leaving `with`) closes the listener and
every forwarded socket, and waits for the accepting thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Self

HOST = "127.0.0.1"


class TcpProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._listener = socket.create_server((HOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Linux does not wake a thread blocked in accept() when another thread closes the
        # socket; shutdown() does (without it close() waited out the join's 10 s).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        self._thread.join(10)

    def to_server(self, source: socket.socket, sink: socket.socket) -> None:
        self.pump(source, sink)

    def to_client(self, source: socket.socket, sink: socket.socket) -> None:
        self.pump(source, sink)

    @staticmethod
    def pump(source: socket.socket, sink: socket.socket,
             change: Callable[[bytes], bytes] | None = None) -> None:
        """Copy `source` to `sink` (through `change`) until either side ends; then half-close
        `sink`, as the peer did."""
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(change(chunk) if change is not None else chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection((HOST, self.upstream_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self.to_server, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self.to_client, args=(upstream, client), daemon=True).start()
