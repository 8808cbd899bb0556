"""TlsProxy: TLS in front of a plain TCP server (a legacy PACS that speaks DICOM over TLS).

dcmqrscp has no TLS of its own; an archive that requires TLS is played by it
behind this proxy, which terminates TLS on 127.0.0.1 and a free port (server
certificate and key from `pacs-edge certs issue --server`, client certificates
required and checked against `ca`) and forwards the plain bytes to
`upstream_port`. One asyncio loop in one thread does every connection, so no
TLS object is used from two threads. close() (or leaving `with`) stops the
listener and every connection and joins the thread; each read waits at most
`idle_timeout` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"


class TlsProxy:
    def __init__(self, upstream_port: int, *, cert: Path, key: Path, ca: Path,
                 idle_timeout: float = 30.0) -> None:
        self.upstream_port = upstream_port
        self.idle_timeout = idle_timeout
        self.handshakes = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
        self._context.load_cert_chain(str(cert), str(key))
        self._context.verify_mode = ssl.CERT_REQUIRED
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError("TLS proxy did not start")
        self.port = int(self._server.sockets[0].getsockname()[1])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._serve, HOST, 0, ssl=self._context, ssl_handshake_timeout=10))
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, client_in: asyncio.StreamReader,
                     client_out: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.handshakes += 1
        upstream_out: asyncio.StreamWriter | None = None
        try:
            upstream_in, upstream_out = await asyncio.open_connection(HOST, self.upstream_port)
            await asyncio.gather(self._pump(client_in, upstream_out),
                                 self._pump(upstream_in, client_out))
        except (TimeoutError, OSError):
            pass
        finally:
            for writer in (client_out, upstream_out):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError):
                        await writer.wait_closed()
            self._tasks.discard(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while chunk := await asyncio.wait_for(source.read(1 << 16), self.idle_timeout):
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
