"""The HTTPS server: aiohttp on the serving process's own loop, behind a connection guard.

aiohttp serves the application (app.py); this module owns the socket and the
bounds a hostile or broken client must not be able to push past:

- TLS with the node certificate the site CA issued (`pacs-edge init`), TLS 1.2+
  with the BCP 195 AEAD suites, as on the DICOM TLS port; a client that does not
  finish its handshake within ``[http] head_timeout`` is dropped;
- at most ``[http] max_connections`` open connections, counted from the TCP
  accept (the guard starts TLS itself once it admitted the connection: behind
  asyncio's own TLS layer it saw a connection only after its handshake, so
  clients that never sent a ClientHello were not counted, and a flood of them
  took every file descriptor of the process), and at most
  ``[http] connections_per_address`` of them from one address: the next one is
  answered ``503`` with ``Connection: close`` at once (over TLS, REFUSAL_SLOTS such
  answers at a time; a connection beyond is closed unanswered), so a flood cannot exhaust
  file descriptors or memory, and one client holding idle kept-alive
  connections cannot shut every other one out; the addresses `priority` names
  (on the metrics listener, the `[metrics] allow` scrapers) have PRIORITY_SLOTS
  more, so that connections held by others cannot keep the fleet's monitoring
  out (it would page that the box is down);
- a request's line and headers must arrive within ``[http] head_timeout`` of
  the connection, or of the request's first byte on a kept-alive connection
  (a slowloris client dribbling header bytes is closed); header lines are
  bounded by aiohttp (8190 bytes each);
- a kept-alive connection idle for ``[http] idle_timeout`` is closed (aiohttp's
  keep-alive timer), and request bodies are bounded and timed by the routes
  that read them (dicomweb_stow.py) against ``[http] max_request_mb``;
- a request aiohttp cannot parse (bad method, header, URL or chunk) is answered
  400 by aiohttp and logged as one line naming the error class (`_ServerLog`):
  aiohttp would log it at ERROR with a traceback and the offending request text,
  which may hold patient data from a query string, and any client could flood
  the log with them; a client that goes away mid-request is one line too
  (`client_gone`). Exceptions from the application keep their traceback.

The guard is a thin asyncio protocol in front of aiohttp's own: it counts
connections and runs the head timer; the `head_timer` middleware tells it when a
request head was parsed (`request_started`) and when the answer is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from appliance.base.config import HttpConfig
from appliance.base.errors import PacsEdgeError
from appliance.base.reloadable_tls import ReloadableContext
from appliance.http.response_headers import HSTS

log = logging.getLogger(__name__)

BCP195_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
STOP_GRACE_SECONDS = 10.0
_CANCEL_WAIT_SECONDS = 1.0  # aiohttp's own wait for handlers left after the grace, then cancel
# Refused TLS connections answered 503 at once (the rest are closed unanswered).
REFUSAL_SLOTS = 16
_REFUSAL_LINGER_SECONDS = 0.25
# Written by the guard itself, before aiohttp: the headers response_headers.py gives
# every answer of the application are spelled out here.
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
         b"X-Content-Type-Options: nosniff\r\n"
         b"Strict-Transport-Security: " + HSTS.encode("ascii") + b"\r\n"
         b"Connection: close\r\n\r\n")
_GUARD_KEY: web.AppKey[HttpServer] = web.AppKey("pacs_edge_http_server")
PRIORITY_SLOTS = 2  # connections beyond max_connections kept for the `priority` addresses


def tls_context(*, cert: Path, key: Path) -> ReloadableContext:
    """The HTTPS server context: the node certificate, TLS 1.2+, AEAD suites only."""
    context = ReloadableContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise PacsEdgeError(
            f"the HTTPS server cannot load the node certificate or key ({type(exc).__name__})",
            hint="run `pacs-edge init` (creates them) or `pacs-edge certs renew`; or set"
                 " [http] port = 0 to turn the web server off") from exc
    return context


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's request-handler logger: a client's malformed request becomes a one-line
    event without its text; everything else goes to aiohttp.server unchanged. A body
    that does not decode (a Content-Encoding it does not hold) reaches the logger as
    the RequestPayloadError around the parser's error, when aiohttp drains what the
    handler left unread after its 400."""

    def _malformed(self, exc_info: object) -> bool:
        if isinstance(exc_info, web.RequestPayloadError):
            exc_info = exc_info.__cause__
        if not isinstance(exc_info, HttpProcessingError):
            return False
        log.info("http request malformed error=%s status=%d", type(exc_info).__name__,
                 exc_info.code)
        return True

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        if not self._malformed(exc_info):
            super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        if not self._malformed(kwargs.get("exc_info")):
            super().debug(msg, *args, **kwargs)


class _Guard(asyncio.Protocol):
    """One connection: counted against the cap, head-timed, then handed to aiohttp."""

    def __init__(self, server: HttpServer, inner: RequestHandler) -> None:
        self.server = server
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.admitted = False
        self.connected = False  # aiohttp's handler has the (TLS) transport
        self.in_request = False
        self._timer: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Task[None] | None = None
        # What the client sent between the handshake's end and the hand-over (start_tls
        # reads on before the awaiting task resumes), passed on at the hand-over.
        self._early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else ""
        config = self.server.config
        slots = config.max_connections + (
            PRIORITY_SLOTS if self.server.priority(self.address) else 0)
        if len(self.server.guards) >= slots:
            log.warning("http connection refused: connection limit reached limit=%d",
                        config.max_connections)
            self._refuse(transport)
            return
        if sum(g.address == self.address for g in self.server.guards.values()
               ) >= config.connections_per_address:
            log.warning("http connection refused: per-address limit reached address=%s"
                        " limit=%d", self.address, config.connections_per_address)
            self._refuse(transport)
            return
        self.admitted = True
        self.server.guards[transport] = self
        self._arm()  # the head timer runs through the TLS handshake too
        if self.server.ssl_context is None:
            self._hand_over(transport)
        else:
            self._handshake = asyncio.get_running_loop().create_task(self._start_tls(transport))

    async def _tls(self, raw: asyncio.Transport) -> asyncio.Transport | None:
        """The TLS handshake on `raw` (within head_timeout); None when it failed, timed
        out or the connection went as it ended (start_tls closed the socket)."""
        assert self.server.ssl_context is not None
        try:
            return await asyncio.get_running_loop().start_tls(
                raw, self, self.server.ssl_context, server_side=True,
                ssl_handshake_timeout=self.server.config.head_timeout)
        except Exception:
            return None

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        """The TLS handshake on an admitted connection, then aiohttp's handler on it."""
        tls = await self._tls(raw)
        if tls is None:
            self._forget(raw)
            return
        self.server.guards.pop(raw, None)
        self.server.guards[tls] = self
        self._hand_over(tls)

    def _refuse(self, raw: asyncio.Transport) -> None:
        """Answer 503 and close. On TLS the answer needs a handshake, which holds the
        socket until it ends: only REFUSAL_SLOTS refusals at once get one, the others
        are closed at once (a flood is what fills those slots)."""
        if self.server.ssl_context is None:
            raw.write(_BUSY)
            raw.close()
        elif self.server.refusing < REFUSAL_SLOTS:
            self.server.refusing += 1
            self._handshake = asyncio.get_running_loop().create_task(self._answer_busy(raw))
        else:
            raw.close()

    async def _answer_busy(self, raw: asyncio.Transport) -> None:
        try:
            tls = await self._tls(raw)
            if tls is not None:
                tls.write(_BUSY)
                # The request the client sends once the handshake is done must be read
                # before the close: a socket closed with unread bytes is reset, and the
                # reset can overtake the answer at the client ("empty reply").
                await asyncio.sleep(_REFUSAL_LINGER_SECONDS)
                tls.close()
        finally:
            self.server.refusing -= 1

    def _hand_over(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.connected = True
        self.inner.connection_made(transport)
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.data_received(early)

    def _forget(self, transport: asyncio.Transport) -> None:
        self._disarm()
        self.server.guards.pop(transport, None)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if not self.connected:
            if self.admitted:  # one read of the TLS layer at most: bounded by its buffer
                self._early += data
            return
        if self.server.stopping and not self.in_request and self.transport is not None:
            self.transport.close()  # a new request on a kept-alive connection: not now
            return
        if not self.in_request and self._timer is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.connected else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self.admitted:
            return
        self.server.guards.pop(self.transport, None)  # type: ignore[arg-type]
        if self.connected:
            self.connected = False
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def request_started(self) -> None:
        self.in_request = True
        self._disarm()

    def request_finished(self) -> None:
        self.in_request = False

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.config.head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_late(self) -> None:
        self._timer = None
        if not self.in_request and self.transport is not None:
            log.info("http connection closed: request head not received in time"
                     " timeout=%.1f", self.server.config.head_timeout)
            _abort(self.transport)


def _abort(transport: asyncio.BaseTransport) -> None:
    """Close a connection at once, also a TLS one that was closed twice already (the stop
    closes idle connections, then aiohttp's cleanup closes them again): the asyncio of
    Python 3.11.2, Debian 12's, raises AttributeError there, its protocol detached; from
    3.11.3 on that abort does nothing, as it should."""
    with contextlib.suppress(AttributeError):
        transport.abort()


@web.middleware
async def head_timer(request: web.Request, handler: Any) -> web.StreamResponse:
    """Tell the connection's guard that a request head arrived (its timer stops) and
    when the answer is done: the first middleware of every application served here."""
    guard = guard_of(request)
    if guard is not None:
        guard.request_started()
    try:
        return await handler(request)  # type: ignore[no-any-return]
    finally:
        if guard is not None:
            guard.request_finished()


@web.middleware
async def client_gone(request: web.Request, handler: Any) -> web.StreamResponse:
    """A client that closes its connection mid-request (an upload cancelled, a tab
    closed) is an event, not an error: one line instead of aiohttp's traceback. The
    answer it gets is never sent; it counts as the client's 4xx, not a 5xx."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except ConnectionResetError:
        if request.transport is not None and not request.transport.is_closing():
            raise
        log.info("http client went away during the request")
        return web.Response(status=400, text="the connection was closed\n")


def guard_of(request: web.BaseRequest) -> _Guard | None:
    """The connection guard of a request (None for a request not served by HttpServer)."""
    transport = request.transport
    server = request.app.get(_GUARD_KEY) if isinstance(request, web.Request) else None
    return server.guards.get(transport) if server and transport else None


class HttpServer:
    """Start and stop the HTTPS listener for one application (plain HTTP without a
    context: the metrics listener of a box whose web server is off)."""

    def __init__(self, config: HttpConfig, app: web.Application, *,
                 ssl_context: ssl.SSLContext | None, setting: str = "[http] port",
                 priority: Callable[[str], bool] = lambda _address: False) -> None:
        self.config = config
        self.app = app
        self.ssl_context = ssl_context
        self.setting = setting  # the port's config key, for the error when it is taken
        self.priority = priority
        self.guards: dict[asyncio.Transport, _Guard] = {}
        self.refusing = 0  # refused TLS connections being answered 503 (_Guard._refuse)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.stopping = False
        app[_GUARD_KEY] = self

    async def start(self) -> int:
        """Listen; returns the bound port."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     logger=_ServerLog(logging.getLogger("aiohttp.server")),
                                     keepalive_timeout=self.config.idle_timeout,
                                     shutdown_timeout=_CANCEL_WAIT_SECONDS)
        await self._runner.setup()
        handler_factory: Any = self._runner.server
        assert handler_factory is not None
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(  # TLS: the guard starts it (_Guard)
                lambda: _Guard(self, handler_factory()), self.config.host, self.config.port,
                reuse_address=True, backlog=128)
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None  # `stop` has nothing left to clean up
            raise PacsEdgeError(
                f"cannot listen for HTTP{'S' if self.ssl_context else ''} on"
                f" {self.config.host}:{self.config.port}:"
                f" {exc.strerror or exc}",
                hint=f"choose another {self.setting}, or set it to 0 to turn this listener off"
            ) from exc
        port = int(self._server.sockets[0].getsockname()[1])
        log.info("http%s server ready host=%s port=%d", "s" if self.ssl_context else "",
                 self.config.host, port)
        return port

    async def stop(self) -> None:
        """Stop accepting, let running requests finish for a grace period, close the rest.

        The requests are waited for here, before aiohttp's own shutdown: that marks
        every connection closing at once, and a closing connection drops the bytes it
        receives, so an upload still arriving (STOW-RS) stalled for the whole grace
        and was then cancelled."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for guard in list(self.guards.values()):
            if not guard.in_request and guard.transport is not None:
                guard.transport.close()  # idle kept-alive connections
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while any(g.in_request for g in self.guards.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._runner is not None:
            # Closes what is left and cancels the handlers still running.
            await self._runner.cleanup()
        for transport in list(self.guards):
            _abort(transport)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None
        self._runner = None
