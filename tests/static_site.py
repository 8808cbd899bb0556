"""A folder served over HTTP (or HTTPS) on 127.0.0.1 and a free port: the other web site
of a browser test (an EHR's page that opens a launch link, another intranet site)."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

REQUEST_TIMEOUT = 30.0  # seconds a connection may sit silent


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def static_site(folder: Path, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """Serve `folder` (over TLS with `tls`) until the block ends; yields the port."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
