"""The HTTPS server inside `serve`: TLS with the site's certificate, authentication, limits.

A real `pacs-edge serve` with [http] on a free port; clients are curl, requests
and raw TLS sockets, all verifying the site CA.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import dicomgen
import pytest
import webpeer
from conftest import EdgeServer, run_pacs_edge

from appliance.base.durable import TEMP_SUFFIX

DEADLINE = 60.0


@pytest.fixture
def web_server(tmp_path: Path, free_port: Callable[[], int],
               edge_server_factory: Callable[..., EdgeServer]) -> EdgeServer:
    return edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port()))


def test_https_presents_the_node_certificate_of_the_site_ca(web_server: EdgeServer) -> None:
    context = ssl.create_default_context(cafile=str(webpeer.ca_file(web_server)))
    with socket.create_connection((web_server.host, web_server.http_port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.selected_alpn_protocol() in (None, "http/1.1")


def test_dicomweb_without_credentials_is_401_with_a_basic_challenge(
        web_server: EdgeServer) -> None:
    answer = webpeer.curl(web_server, "/dicom-web/studies")
    assert answer.status == 401
    assert answer.headers["www-authenticate"].startswith("Basic ")


def test_pages_without_a_session_redirect_to_login(web_server: EdgeServer) -> None:
    answer = webpeer.curl(web_server, "/")
    assert answer.status == 303
    assert answer.headers["location"].startswith("/login")


def test_wrong_password_and_malformed_basic_are_401(web_server: EdgeServer) -> None:
    webpeer.add_user(web_server, "rad", "radiologist")
    wrong = webpeer.curl(web_server, "/dicom-web/studies", user="rad", password="nope" * 4)
    assert wrong.status == 401
    garbled = webpeer.curl(web_server, "/dicom-web/studies",
                           headers={"Authorization": "Basic !!!not-base64"})
    assert garbled.status == 401


def test_https_port_in_use_stops_serve_with_a_one_line_error(
        tmp_path: Path, free_port: Callable[[], int]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        home = webpeer.web_home(tmp_path / "web-home", taken.getsockname()[1])
        proc = run_pacs_edge("serve", "--home", str(home), check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot listen for HTTPS" in proc.stderr
    assert "[http] port" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_init_writes_the_http_port(tmp_path: Path) -> None:
    home = webpeer.web_home(tmp_path / "web-home", 9443)
    config = tomllib.loads((home / "pacs-edge.toml").read_text())
    assert config["http"]["port"] == 9443
    assert config["http"]["host"] == "127.0.0.1"


def test_oversized_upload_is_413_before_it_is_read(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port(),
                                                  max_request_mb=1))
    webpeer.add_user(server, "rad", "radiologist")
    body = tmp_path / "big.bin"
    body.write_bytes(b"\0" * (2 << 20))
    answer = webpeer.curl(server, "/dicom-web/studies", user="rad", method="POST",
                          headers={"Content-Type":
                                   'multipart/related; type="application/dicom"; boundary=xx'},
                          data_file=body)
    assert answer.status == 413


def test_serve_stops_cleanly_while_a_tls_client_never_answers_the_close(
        web_server: EdgeServer) -> None:
    """A kept-alive HTTPS connection whose client reads nothing more: the stop closes it,
    aiohttp's cleanup closes it again, and the last abort of what is left must still work.
    On Python 3.11.2 (Debian 12's) asyncio's abort of a TLS transport closed twice raised
    AttributeError, and serve exited 1 on SIGTERM with a traceback."""
    context = ssl.create_default_context(cafile=str(webpeer.ca_file(web_server)))
    with socket.create_connection((web_server.host, web_server.http_port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert tls.recv(64).startswith(b"HTTP/1.1 200")
        assert web_server.stop() == 0, web_server.unclean_stops


def test_plain_http_on_the_https_port_gets_no_answer(web_server: EdgeServer) -> None:
    proc = subprocess.run(["curl", "-sS", "--max-time", "30",
                           f"http://127.0.0.1:{web_server.http_port}/dicom-web/studies"],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert b"200 OK" not in proc.stdout


def test_http_port_zero_turns_the_server_off(edge_server: EdgeServer) -> None:
    assert "https server ready" not in edge_server.log()
    with pytest.raises(RuntimeError):
        _ = edge_server.http_port


def test_stalled_upload_is_answered_408_and_its_spool_removed(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port(),
                                                  idle_timeout=1.0))
    webpeer.add_user(server, "rad", "radiologist")
    with webpeer.tls_socket(server) as tls:
        tls.sendall(webpeer.stow_first_part_head("rad", 1000000) + b"\0" * 4096)
        answer = b""
        deadline = time.monotonic() + DEADLINE
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            tls.settimeout(1.0)
            try:
                chunk = tls.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    _wait_for(lambda: not list((server.home / "store").rglob(f"*{TEMP_SUFFIX}")))


def test_stalled_login_form_is_answered_408(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port(),
                                                  idle_timeout=1.0))
    origin = f"https://localhost:{server.http_port}"
    with webpeer.tls_socket(server) as tls:
        tls.sendall((f"POST /login HTTP/1.1\r\nHost: localhost:{server.http_port}\r\n"
                     f"Origin: {origin}\r\nContent-Type: application/x-www-form-urlencoded"
                     "\r\nContent-Length: 1000\r\n\r\nname=rad").encode())
        tls.settimeout(DEADLINE)
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_client_gone_mid_upload_is_one_log_line_and_its_spool_removed(
        web_server: EdgeServer, tmp_path: Path) -> None:
    webpeer.add_user(web_server, "rad", "radiologist")
    [instance] = dicomgen.make_study(tmp_path / "one", seed=7, series_per_study=1,
                                     instances_per_series=1)
    with webpeer.tls_socket(web_server) as tls:
        tls.sendall(webpeer.stow_first_part_head("rad", 100000000) + instance.path.read_bytes()
                    + b"\0" * (3 << 20))  # past a read chunk
        _wait_for(lambda: bool(list((web_server.home / "store").rglob(f"*{TEMP_SUFFIX}"))))
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    _wait_for(lambda: "http client went away during the request" in web_server.log())
    _wait_for(lambda: not list((web_server.home / "store").rglob(f"*{TEMP_SUFFIX}")))
    assert "Traceback" not in web_server.log()


def test_slow_request_head_is_dropped(tmp_path: Path, free_port: Callable[[], int],
                                      edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port(),
                                                  head_timeout=1.0))
    with webpeer.tls_socket(server) as tls:
        tls.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHost: localhost\r\n")
        deadline = time.monotonic() + DEADLINE
        closed = False
        while time.monotonic() < deadline and not closed:
            tls.sendall(b"X-Slow: 1\r\n")  # a slowloris keeps dribbling header lines
            tls.settimeout(0.5)
            try:
                closed = tls.recv(1024) == b""
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                closed = True
        assert closed, "a client that never finishes its request head stayed connected"
    server.wait_for_log("request head not received in time")


def test_malformed_request_is_400_and_logged_as_one_line_without_its_text(
        web_server: EdgeServer) -> None:
    with webpeer.tls_socket(web_server) as tls:
        tls.sendall(b"GET /dicom-web/studies?PatientName=KANARIE^HELGA HTTP/1.1\r\n"
                    b"Host: localhost\r\nNo colon in this header line\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]  # aiohttp answers in HTTP/1.0
    log = web_server.log()  # aiohttp logs the error before it answers
    assert "KANARIE" not in log and "Traceback" not in log
    assert "http request malformed error=BadHttpMessage status=400" in log


def test_connection_cap_answers_503_until_a_connection_closes(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port(),
                                                  max_connections=2, head_timeout=300.0))
    held = [webpeer.tls_socket(server) for _ in range(2)]
    try:
        _wait_for(lambda: webpeer.curl(server, "/dicom-web/studies").status == 503)
        # Written by the connection guard, not the application: the same security
        # headers as every answer of the application (response_headers.py).
        busy = webpeer.curl(server, "/dicom-web/studies")
        assert busy.status == 503 and busy.headers["x-content-type-options"] == "nosniff"
        assert busy.headers["strict-transport-security"] == "max-age=31536000"
        held.pop().close()
        _wait_for(lambda: webpeer.curl(server, "/dicom-web/studies").status == 401)
    finally:
        for tls in held:
            tls.close()


def test_one_address_gets_connections_per_address_and_the_others_still_get_in(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(
        tmp_path / "web-home", free_port(), max_connections=8, connections_per_address=3,
        head_timeout=300.0))
    held = [webpeer.tls_socket(server) for _ in range(3)]  # idle: nothing sent
    try:
        _wait_for(lambda: webpeer.curl(server, "/dicom-web/studies").status == 503)
        assert webpeer.curl(server, "/dicom-web/studies", source="127.0.0.2").status == 401
        server.wait_for_log("per-address limit reached address=127.0.0.1 limit=3")
        held.pop().close()
        _wait_for(lambda: webpeer.curl(server, "/dicom-web/studies").status == 401)
    finally:
        for tls in held:
            tls.close()


def test_clients_that_never_start_tls_count_against_the_cap_and_hold_no_descriptors(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """The cap was counted behind asyncio's TLS layer, which hands a connection over only
    once its handshake is done: clients that opened TCP and never sent a ClientHello
    were not counted, and 1,100 of them took every file descriptor of serve (its DICOM
    port, spool files and index too). They count from the accept now: past the cap
    they are closed at once (a few are answered 503 over TLS), and others get in."""
    server = edge_server_factory(webpeer.web_home(
        tmp_path / "web-home", free_port(), max_connections=4, connections_per_address=2,
        head_timeout=30.0))
    silent = [socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
              for _ in range(200)]
    try:
        # All but the 2 admitted and the REFUSAL_SLOTS (16) being answered are closed by
        # the server at once, long before head_timeout (30 s) would close them.
        open_ = list(silent)
        deadline = time.monotonic() + 15
        while len(open_) > 2 + 16 and time.monotonic() < deadline:
            readable, _, _ = select.select(open_, [], [], 0.5)
            for sock in readable:
                with contextlib.suppress(OSError):
                    if sock.recv(1) == b"":
                        open_.remove(sock)
        assert len(open_) <= 2 + 16, f"{len(open_)} of 200 silent connections still open"
        assert webpeer.curl(server, "/dicom-web/studies", source="127.0.0.2").status == 401
    finally:
        for sock in silent:
            sock.close()
    server.wait_for_log("per-address limit reached address=127.0.0.1 limit=2")


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.1)
