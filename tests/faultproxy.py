"""TCP proxies that make the network path to a server flaky, on purpose.

CorruptingProxy damages bytes on their way to the server. In the
client-to-server direction it replaces each occurrence of `marker` that lies
inside one received chunk with `replacement` (same length, so Content-Length
stays right): the request arrives well formed, with a damaged body. Test data
repeats the marker often, so some occurrence always falls inside a chunk.
Server-to-client bytes pass unchanged. `damaged` counts the replacements made.

FailingRequests reads the HTTP requests on their way to an Azure endpoint
(Azurite) and asks `fault(request)` what to do with each: None forwards it,
BUSY answers 503 ServerBusy in the server's place (Azure's throttling),
THROTTLED the same with `Retry-After: RETRY_AFTER` (a busy service, or a gateway
in front of it, naming the wait), RESET
resets the client's connection without an answer, LOST forwards the request
on a connection of its own, waits for the server's answer and then resets
the client's connection (the request took effect, its answer was lost).
`seen` holds every request with the fault it got. Requests must carry a
Content-Length (the Azure SDK's do); HTTP/1.1 keep-alive is fine, since the
SDK waits for each answer before it sends the next request on a connection.

CutDownloads passes requests through and cuts the server's answer short: on
each of its first `cuts` connections whose answer runs past `after` bytes (a
blob's body; the other answers are short), it sends the first `after` bytes and
closes the connection in the middle of the body, as a dropped link does.

All listen on 127.0.0.1 and a free port. Stop with close() (or `with`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import Callable
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

from tcpproxy import HOST, TcpProxy

BUSY, THROTTLED, RESET, LOST = "busy", "throttled", "reset", "lost"
RETRY_AFTER = 7  # seconds, in THROTTLED's answer
_BUSY_BODY = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
              b"<Message>The server is busy (injected by the test).</Message></Error>")
_BUSY = (b"HTTP/1.1 503 The server is busy.\r\nContent-Type: application/xml\r\n"
         b"x-ms-error-code: ServerBusy\r\n%sContent-Length: %d\r\n\r\n%s")
_BUSY_ANSWER = _BUSY % (b"", len(_BUSY_BODY), _BUSY_BODY)
_THROTTLED_ANSWER = _BUSY % (b"Retry-After: %d\r\n" % RETRY_AFTER, len(_BUSY_BODY), _BUSY_BODY)


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


@dataclasses.dataclass(frozen=True)
class Request:
    """One HTTP request to the blob service, as the proxy read it."""

    method: str
    blob: str  # the path after /account/container/ ("" for container or account requests)
    comp: str  # the `comp` query parameter: "block" for Put Block, "blocklist" for the commit
    block_id: str  # Put Block's block id, decoded ("" for other requests)
    number: int  # 1-based, among the requests with the same `comp`
    body: bytes
    raw: bytes


class FailingRequests(TcpProxy):
    def __init__(self, upstream_port: int, fault: Callable[[Request], str | None]) -> None:
        self.fault = fault
        self.seen: list[tuple[Request, str | None]] = []
        self._order = threading.Lock()
        super().__init__(upstream_port)

    def requests(self, comp: str) -> list[tuple[Request, str | None]]:
        """The requests seen with that `comp`, each with its fault (None: passed)."""
        with self._lock:
            return [(r, f) for r, f in self.seen if r.comp == comp]

    def to_server(self, source: socket.socket, sink: socket.socket) -> None:
        reader = source.makefile("rb")
        try:
            while (read := _read_request(reader)) is not None:
                # One request at a time across connections: numbers in order of arrival.
                with self._order:
                    with self._lock:
                        number = 1 + sum(1 for r, _ in self.seen if r.comp == read.comp)
                    request = dataclasses.replace(read, number=number)
                    fault = self.fault(request)
                    with self._lock:
                        self.seen.append((request, fault))
                if fault is None:
                    sink.sendall(request.raw)
                elif fault == BUSY:
                    source.sendall(_BUSY_ANSWER)
                elif fault == THROTTLED:
                    source.sendall(_THROTTLED_ANSWER)
                elif fault in (RESET, LOST):
                    if fault == LOST:
                        self._answered_elsewhere(request)
                    reader.close()  # the socket's file descriptor closes with its last user
                    source.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
                    source.close()
                    return
                else:
                    raise ValueError(f"unknown fault {fault!r}")
        except OSError:
            pass
        finally:
            reader.close()
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _answered_elsewhere(self, request: Request) -> None:
        """Send `request` to the server on a connection of its own and read its answer."""
        with socket.create_connection((HOST, self.upstream_port), timeout=30) as side, \
                side.makefile("rb") as answer:
            side.sendall(request.raw)
            head = _read_head(answer)
            if head is None:
                raise ConnectionError("the server closed without answering")
            answer.read(_content_length(head))


class CutDownloads(TcpProxy):
    def __init__(self, upstream_port: int, *, cuts: int, after: int = 200_000) -> None:
        self.cuts = cuts
        self.after = after
        super().__init__(upstream_port)

    def to_client(self, source: socket.socket, sink: socket.socket) -> None:
        sent = 0
        try:
            while chunk := source.recv(1 << 16):
                if sent + len(chunk) > self.after:
                    with self._lock:
                        cut, self.cuts = self.cuts > 0, max(0, self.cuts - 1)
                    if cut:
                        sink.sendall(chunk[:self.after - sent])
                        # shutdown, not close: it also wakes the thread reading the client.
                        for sock in (sink, source):
                            sock.shutdown(socket.SHUT_RDWR)
                        return
                sink.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


def _read_request(reader: BinaryIO) -> Request | None:
    """The next request on a connection (`number` still 0); None when the client closed."""
    head = _read_head(reader)
    if head is None:
        return None
    method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    body = reader.read(_content_length(head))
    parts = urlsplit(target)
    query = parse_qs(parts.query)
    segments = unquote(parts.path).split("/", 3)  # "", account, container, blob
    encoded = query.get("blockid", [""])[0]
    return Request(method=method, blob=segments[3] if len(segments) > 3 else "",
                   comp=query.get("comp", [""])[0],
                   block_id=base64.b64decode(encoded).decode() if encoded else "",
                   number=0, body=body, raw=head + body)


def _read_head(reader: BinaryIO) -> bytes | None:
    """A request's or answer's start line and headers, up to the blank line; None at EOF."""
    head = b""
    while (line := reader.readline()) not in (b"\r\n", b"\n"):
        if not line:
            if head:
                raise ConnectionError("the peer closed in the middle of a message")
            return None
        head += line
    return head + line


def _content_length(head: bytes) -> int:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding":
            raise ValueError("FailingRequests reads only messages with a Content-Length")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return length
