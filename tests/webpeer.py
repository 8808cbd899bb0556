"""Talking to the box's HTTPS server as real clients do: curl, requests and dicomweb-client.

- web_home(path, port): an initialised data home with the HTTPS server on `port`.
- add_user(server, name, role, ...): `pacs-edge users add` with a 0600 password file.
- session(server, user): a requests.Session that verifies the site CA and sends HTTP Basic.
- dicomweb(server, user): a dicomweb_client.DICOMwebClient on that session.
- curl(server, path, ...): curl's raw answer (status line, headers, body) as Curl.
- running_web_server(folder): a module-wide started server with a radiologist `rad`.
- metrics_listener_box(folder): a started server with HTTPS off and its own /metrics port.
- multipart_body(paths) / parts(response): build a STOW-RS body from files as they are
  on disk; split a multipart/related answer into (headers, bytes) parts.
- stow_head(user, length) / stow_first_part_head(user, length): the bytes a client
  sends before a STOW-RS body, or before its first instance's bytes (raw-socket tests).

Every client verifies the server's certificate against the site CA of the data
home (<home>/tls/ca.pem) and calls it by `localhost`, a name the node certificate
carries; nothing is ever sent without TLS.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dcmtk
import requests
from conftest import EdgeServer, init_home
from dicomweb_client.api import DICOMwebClient

HOST = "localhost"
PASSWORD = "correct horse battery staple"


def web_home(path: Path, port: int, *, auth: dict[str, object] | None = None,
             **http: object) -> Path:
    """A data home with HTTPS on `port` (and any other [http] keys given, and `auth`:
    [auth] keys)."""
    home = init_home(path, http_port=port)
    sections = {name: keys for name, keys in (("http", dict(http)), ("auth", auth)) if keys}
    if sections:
        EdgeServer(home).configure(**sections)
    return home


def ca_file(server: EdgeServer) -> Path:
    return server.home / "tls" / "ca.pem"


def base_url(server: EdgeServer) -> str:
    return f"https://{HOST}:{server.http_port}"


def add_user(server: EdgeServer, name: str, role: str, *, referring: str = "",
             password: str = PASSWORD) -> None:
    secret = server.home.parent / f"{name}.password"
    secret.write_text(password + "\n", encoding="utf-8")
    os.chmod(secret, 0o600)
    args = ["users", "add", name, "--role", role, "--password-file", str(secret)]
    if referring:
        args += ["--referring", referring]
    server.cli(*args)


def session(server: EdgeServer, user: str | None, *, password: str = PASSWORD
            ) -> requests.Session:
    http = requests.Session()
    # Not the environment's CA bundle or proxies (REQUESTS_CA_BUNDLE would override verify).
    http.trust_env = False
    http.verify = str(ca_file(server))
    if user is not None:
        http.auth = (user, password)
    return http


def dicomweb(server: EdgeServer, user: str, *, password: str = PASSWORD) -> DICOMwebClient:
    return DICOMwebClient(f"{base_url(server)}/dicom-web",
                          session=session(server, user, password=password))


@dataclass
class Curl:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def curl(server: EdgeServer, path: str, *, user: str | None = None,
         password: str = PASSWORD, method: str = "GET", headers: dict[str, str] | None = None,
         data_file: Path | None = None, timeout: float = 120.0, as_is: bool = False,
         source: str | None = None) -> Curl:
    """One request with curl (its own HTTP stack), verifying the site CA; `as_is` sends
    the path without squashing `..` segments (curl's --path-as-is); `source`: the local
    address to connect from (another loopback address is another client)."""
    args = ["curl", "-sS", "--http1.1", "-D", "-", "--cacert", str(ca_file(server)),
            "-X", method, "--max-time", str(timeout), *(["--path-as-is"] if as_is else []),
            *(["--interface", source] if source else [])]
    if user is not None:
        args += ["-u", f"{user}:{password}"]
    for key, value in (headers or {}).items():
        args += ["-H", f"{key}: {value}"]
    if data_file is not None:
        args += ["--data-binary", f"@{data_file}"]
    proc = subprocess.run([*args, base_url(server) + path], capture_output=True,
                          timeout=timeout + 10, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"curl failed ({proc.returncode}): {proc.stderr.decode()}")
    return parse_response(proc.stdout)


def parse_response(raw: bytes) -> Curl:
    """Split curl -D - output (possibly after a 100 Continue) into status, headers, body."""
    while True:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 100:
            break
        raw = rest
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Curl(status, headers, rest)


def tls_socket(server: EdgeServer) -> ssl.SSLSocket:
    """A raw TLS connection to the HTTPS port (handshake done, nothing sent)."""
    context = ssl.create_default_context(cafile=str(ca_file(server)))
    raw = socket.create_connection((server.host, server.http_port), timeout=60)
    return context.wrap_socket(raw, server_hostname=HOST)


@contextlib.contextmanager
def running_web_server(folder: Path, *, auth: dict[str, object] | None = None,
                       **http: object) -> Iterator[EdgeServer]:
    """A started server with HTTPS and a radiologist `rad`; stopped (cleanly) at exit."""
    server = EdgeServer(web_home(folder / "web-home", dcmtk.free_port(), auth=auth, **http))
    server.start()
    try:
        add_user(server, "rad", "radiologist")
        yield server
    finally:
        server.stop()
    assert not server.unclean_stops, server.unclean_stops


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={}'


@contextlib.contextmanager
def metrics_listener_box(folder: Path, *, port: int = 0) -> Iterator[str]:
    """A started box with the web server off and /metrics on a plain listener of its
    own ([metrics] port, a free one by default); yields the listener's base URL, stops
    the box at exit."""
    port = port or dcmtk.free_port()
    server = EdgeServer(init_home(folder / "home"))
    server.configure(metrics={"port": port})
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def multipart_body(paths: Iterable[Path], *, part_type: str = "application/dicom"
                   ) -> tuple[bytes, str]:
    """(body, Content-Type) of a STOW-RS request carrying the files byte for byte."""
    boundary = secrets.token_hex(12)
    body = bytearray()
    for path in paths:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        body += path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), STOW_TYPE.format(boundary)


def stow_head(user: str, content_length: int, content_type: str) -> bytes:
    """A STOW-RS request head (HTTP Basic as `user`, PASSWORD): what a client sends
    before the body."""
    credentials = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    return ("POST /dicom-web/studies HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Basic {credentials}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def stow_first_part_head(user: str, content_length: int) -> bytes:
    """The request head and the head of the first part of a STOW-RS body announcing
    `content_length` bytes: what a client sends before an instance's bytes."""
    return (stow_head(user, content_length, STOW_TYPE.format("b0undary"))
            + b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n")


def parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: ({header: value}, payload bytes).

    Split by hand on the boundary (RFC 2046 5.1.1): the email package would
    reinterpret line endings inside binary payloads."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params["boundary"].strip('"').encode()
    delimiter = b"\r\n--" + boundary
    assert body.startswith(b"--" + boundary), body[:80]
    found = []
    for segment in (b"\r\n" + body).split(delimiter)[1:]:
        if segment.startswith(b"--"):
            break
        head, _, payload = segment[2:].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        found.append((headers, payload))
    return found


def audit_lines(server: EdgeServer, *needles: str) -> list[str]:
    """Lines of the audit log holding every needle (records are written within
    [audit] flush_seconds, so callers poll)."""
    path = server.home / "audit" / "audit.log"
    text = path.read_text() if path.exists() else ""
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def audit_line(server: EdgeServer, *needles: str, timeout: float = 30.0) -> str:
    """The first audit line holding every needle, polled for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = audit_lines(server, *needles)
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no audit record with {needles}"
        time.sleep(0.1)
