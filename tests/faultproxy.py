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

import socket

from tcpproxy import TcpProxy


class CorruptingProxy(TcpProxy):
    def __init__(self, upstream_port: int, marker: bytes, replacement: bytes) -> None:
        if len(marker) != len(replacement) or marker == replacement:
            raise ValueError("the replacement must differ from the marker, at equal length")
        self.marker = marker
        self.replacement = replacement
        self.damaged = 0
        super().__init__(upstream_port)

    def to_server(self, source: socket.socket, sink: socket.socket) -> None:
        self.pump(source, sink, self._damage)

    def _damage(self, chunk: bytes) -> bytes:
        if self.marker not in chunk:
            return chunk
        with self._lock:
            self.damaged += chunk.count(self.marker)
        return chunk.replace(self.marker, self.replacement)
