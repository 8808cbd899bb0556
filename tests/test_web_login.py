"""The login page, logout and launch links over real HTTPS against a running `serve`.

Clients are requests (verifying the site CA) and curl; users and links are made
with the real CLI. Nothing here waits on time: lock-out is reached by counting
failures, and audit records are polled for with a deadline.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import dcmtk
import pytest
import requests
import webpeer
from conftest import EdgeServer

STUDY = "1.2.826.0.1.3680043.8.498.7"
PASSWORD = webpeer.PASSWORD
DEADLINE = 60.0


def _login_home(folder: Path, port: int) -> Path:
    home = webpeer.web_home(folder / "web-home", port)
    EdgeServer(home).configure(auth={"max_failed_logins": 3})
    return home


def _add_users(server: EdgeServer) -> EdgeServer:
    webpeer.add_user(server, "rad1", "radiologist")
    webpeer.add_user(server, "ref1", "referring", referring="DOE^JOHN")
    return server


@pytest.fixture
def web_server(tmp_path: Path, free_port: Callable[[], int],
               edge_server_factory: Callable[..., EdgeServer]) -> EdgeServer:
    return _add_users(edge_server_factory(_login_home(tmp_path, free_port())))


@pytest.fixture(scope="module")
def refusing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    """One server for the tests whose requests change nothing on it: refusals, and
    logins that succeed (no failure count, no lockout)."""
    server = EdgeServer(_login_home(tmp_path_factory.mktemp("login"), dcmtk.free_port()))
    server.start()
    try:
        yield _add_users(server)
    finally:
        server.stop()
    assert not server.unclean_stops, server.unclean_stops


def client(server: EdgeServer) -> requests.Session:
    """requests verifying the site CA. trust_env off: requests lets $REQUESTS_CA_BUNDLE
    override Session.verify (psf/requests#3829), which would drop the site CA."""
    http = webpeer.session(server, None)
    http.trust_env = False
    return http


def browser(server: EdgeServer) -> requests.Session:
    """A session that behaves like a browser on the box's own pages (Origin header)."""
    http = client(server)
    http.headers["Origin"] = webpeer.base_url(server)
    return http


def post_login(http: requests.Session, server: EdgeServer, name: str, password: str,
               next_path: str = "/") -> requests.Response:
    return http.post(f"{webpeer.base_url(server)}/login", allow_redirects=False, timeout=60,
                     data={"name": name, "password": password, "next": next_path})


def set_cookie(response: requests.Response) -> str:
    return response.headers.get("Set-Cookie", "")


def audit_text(server: EdgeServer, needle: str) -> str:
    path = server.home / "audit" / "audit.log"
    deadline = time.monotonic() + DEADLINE
    while True:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def wait_for_records(server: EdgeServer, needle: str, count: int) -> list[str]:
    """The audit records holding `needle`, once there are `count` (they are flushed in
    the background); fails if more appear or too few by the deadline."""
    deadline = time.monotonic() + DEADLINE
    while True:
        records = [line for line in audit_text(server, "").splitlines() if needle in line]
        if len(records) >= count or time.monotonic() > deadline:
            assert len(records) == count, records
            return records
        time.sleep(0.1)


def login_token(server: EdgeServer, name: str) -> str:
    http = browser(server)
    assert post_login(http, server, name, PASSWORD).status_code == 303
    return http.cookies["__Host-pacs_edge_session"]


def is_login_redirect(response: requests.Response) -> bool:
    return response.status_code == 303 and response.headers["Location"].startswith("/login")


def test_login_form_is_plain_html_that_is_never_cached_or_framed(web_server: EdgeServer) -> None:
    answer = webpeer.curl(web_server, "/login")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/html")
    assert b'method="post"' in answer.body and b"<script" not in answer.body
    assert answer.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]


def test_login_sets_a_secure_httponly_strict_session_cookie(web_server: EdgeServer) -> None:
    http = browser(web_server)
    answer = post_login(http, web_server, "rad1", PASSWORD, next_path="/dicom-web/studies")
    assert answer.status_code == 303 and answer.headers["Location"] == "/dicom-web/studies"
    cookie = set_cookie(answer)
    assert cookie.startswith("__Host-pacs_edge_session=")
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert {"secure", "httponly", "samesite", "path", "max-age"} <= set(flags)
    assert flags["samesite"].lower() == "samesite=strict" and flags["path"] == "Path=/"
    token = http.cookies["__Host-pacs_edge_session"]
    assert len(token) >= 43 and PASSWORD not in cookie
    # The session opens pages the middleware would otherwise send to /login...
    assert not is_login_redirect(http.get(f"{webpeer.base_url(web_server)}/",
                                          allow_redirects=False, timeout=60))
    # ...until logout ends it, on the server and not only in this client.
    out = http.post(f"{webpeer.base_url(web_server)}/logout", allow_redirects=False, timeout=60)
    assert out.status_code == 303 and out.headers["Location"] == "/login"
    replay = client(web_server)
    replay.cookies.set("__Host-pacs_edge_session", token)
    assert is_login_redirect(replay.get(f"{webpeer.base_url(web_server)}/",
                                        allow_redirects=False, timeout=60))
    audit = audit_text(web_server, "Logout")
    assert "User Authentication" in audit and "Logout" in audit and PASSWORD not in audit


def test_wrong_password_and_unknown_user_get_the_same_401_page(web_server: EdgeServer) -> None:
    http = browser(web_server)
    wrong = post_login(http, web_server, "rad1", "not the password")
    unknown = post_login(http, web_server, "nobody", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.text == unknown.text and "Wrong user name or password." in wrong.text
    assert "__Host-pacs_edge_session" not in set_cookie(wrong) + set_cookie(unknown)
    audit = audit_text(web_server, "nobody")
    assert audit.count("unknown user or wrong password") >= 2
    log = web_server.log()
    assert "not the password" not in log and "rad1" not in log and "nobody" not in log


def test_lockout_over_https_refuses_the_right_password_until_unlocked(
        web_server: EdgeServer) -> None:
    http = browser(web_server)
    for _ in range(3):
        assert post_login(http, web_server, "rad1", "not the password").status_code == 401
    locked = post_login(http, web_server, "rad1", PASSWORD)
    assert locked.status_code == 401 and "locked" in locked.text
    assert "__Host-pacs_edge_session" not in set_cookie(locked)
    # HTTP Basic on DICOMweb is the same account: locked there too.
    assert webpeer.curl(web_server, "/dicom-web/studies", user="rad1").status == 401
    assert "too many failed logins" in audit_text(web_server, "too many failed logins")
    web_server.cli("users", "unlock", "rad1")
    assert post_login(http, web_server, "rad1", PASSWORD).status_code == 303


def test_lockout_does_not_tell_an_account_from_an_unknown_name(
        web_server: EdgeServer) -> None:
    # Before, only accounts locked: after max_failed_logins wrong tries the account's
    # page said "locked" while an unknown name's still said "wrong", so a guesser learnt
    # which names exist from the lock alone.
    http = browser(web_server)
    pages = {name: [post_login(http, web_server, name, "not the password") for _ in range(4)]
             for name in ("rad1", "nobody")}
    account, unknown = pages["rad1"], pages["nobody"]
    assert [r.status_code for r in account] == [r.status_code for r in unknown] == [401] * 4
    assert [r.text for r in account] == [r.text for r in unknown]
    assert "locked" in unknown[-1].text
    # HTTP Basic is refused the same way for both.
    assert webpeer.curl(web_server, "/dicom-web/studies", user="nobody").status == 401


def test_lockout_counts_a_name_in_any_case_alike_for_accounts_and_unknown_names(
        web_server: EdgeServer) -> None:
    # User names are case-insensitive, so an account counts "RAD1", "Rad1" and "rAd1" as
    # three failures of one user. An unknown name was counted per spelling: the same
    # case variants of "nobody" never locked it, and the fourth try said "wrong" where
    # an account's said "locked", telling which names exist.
    http = browser(web_server)
    pages = {name: [post_login(http, web_server, variant, "not the password")
                    for variant in (name.upper(), name.capitalize(), name[0] + name[1:].upper(),
                                    name)]
             for name in ("rad1", "nobody")}
    account, unknown = pages["rad1"], pages["nobody"]
    assert [r.text for r in account] == [r.text for r in unknown]
    assert "locked" in account[-1].text and "locked" in unknown[-1].text


def test_a_burst_of_parallel_guesses_gets_no_more_checks_than_the_lockout_allows(
        web_server: EdgeServer) -> None:
    # Every wrong guess is on the wire before the first password check ends (raw TLS
    # sockets, connected first): each passes the lock check made on arrival, then waits
    # its turn to be hashed. Guesses checked once the user is locked must be refused like
    # any other attempt while locked, the right password included: it is sent once the
    # first guess is answered, so it waits behind the others (sent with them, it may be
    # read and hashed among the first three, and then rightly let in).
    guesses = [f"wrong guess {n}" for n in range(12)] + [PASSWORD]
    origin = webpeer.base_url(web_server)
    sockets = [webpeer.tls_socket(web_server) for _ in guesses]

    def send(tls: ssl.SSLSocket, password: str) -> None:
        body = urlencode({"name": "rad1", "password": password, "next": "/"}).encode()
        tls.sendall(f"POST /login HTTP/1.1\r\nHost: {urlsplit(origin).netloc}\r\n"
                    f"Origin: {origin}\r\n"
                    "Content-Type: application/x-www-form-urlencoded\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    .encode() + body)

    def answer(tls: ssl.SSLSocket) -> bytes:
        return b"".join(iter(lambda: tls.recv(65536), b""))

    try:
        for tls, password in zip(sockets[:-1], guesses[:-1], strict=True):
            send(tls, password)
        first = answer(sockets[0])
        send(sockets[-1], guesses[-1])
        answers = [first, *(answer(tls) for tls in sockets[1:])]
    finally:
        for tls in sockets:
            tls.close()
    wrong = [a for a in answers if b"Wrong user name or password." in a]
    assert len(wrong) <= 3, f"{len(wrong)} guesses were checked against a limit of 3"
    right = webpeer.parse_response(answers[-1])
    assert right.status == 401 and b"locked" in right.body
    assert "__Host-pacs_edge_session" not in right.headers.get("set-cookie", "")


def test_one_address_spraying_a_password_across_names_is_throttled_not_every_name_checked(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    # Before, each name had its own max_failed_logins checks and the address none: a
    # real run from one address tried 200 names and had all 200 passwords checked.
    home = _login_home(tmp_path, free_port())
    EdgeServer(home).configure(auth={"max_failed_logins": 3, "failed_logins_per_address": 4})
    server = _add_users(edge_server_factory(home))
    http = browser(server)
    sprayed = [post_login(http, server, f"user{n}", "Winter2026!Winter") for n in range(12)]
    assert [r.status_code for r in sprayed] == [401] * 4 + [429] * 8
    refused = sprayed[-1]
    assert 0 < int(refused.headers["Retry-After"]) <= 900
    assert "Too many failed logins from this computer" in refused.text
    assert refused.headers["Cache-Control"] == "no-store"
    assert server.log().count("login refused reason=bad_credentials") == 4
    # The address is refused unchecked, the right password and HTTP Basic too...
    assert post_login(http, server, "rad1", PASSWORD).status_code == 429
    basic = webpeer.curl(server, "/dicom-web/studies", user="rad1")
    assert basic.status == 429 and int(basic.headers["retry-after"]) > 0
    # ...while another client's logins go on.
    assert webpeer.curl(server, "/dicom-web/studies", user="rad1", source="127.0.0.2"
                        ).status == 200
    assert server.log().count("login refused reason=bad_credentials") == 4
    audit = audit_text(server, "too many failed logins from this address")
    assert "too many failed logins from this address" in audit
    assert "user11" not in audit  # a throttled refusal names no one: windowed per address


def test_logins_racing_a_password_change_keep_no_session(web_server: EdgeServer) -> None:
    # A client with a leaked password logs in again and again while an admin runs
    # `users passwd`. Four clients keep both hash slots busy, so when the change commits
    # some logins have read the old hash and are being checked: before, they were admitted
    # after the change and their sessions outlived it. Every cookie handed out must be
    # dead once the change is made, and the old password refused from then on.
    base = webpeer.base_url(web_server)
    new_password = "a brand new passphrase 42"
    secret = web_server.home.parent / "rad1.new-password"
    secret.write_text(new_password + "\n", encoding="utf-8")
    os.chmod(secret, 0o600)
    tokens: list[str] = []
    changed = threading.Event()
    deadline = time.monotonic() + 120

    def hammer() -> None:
        http = browser(web_server)
        while not changed.is_set() and time.monotonic() < deadline:
            answer = post_login(http, web_server, "rad1", PASSWORD)
            if answer.status_code == 303:
                tokens.append(answer.cookies["__Host-pacs_edge_session"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        while len(tokens) < 4 and time.monotonic() < deadline:  # the logins are under way
            time.sleep(0.05)
        web_server.cli("users", "passwd", "rad1", "--password-file", str(secret))
    finally:
        changed.set()
        for thread in threads:
            thread.join(60)
    assert len(tokens) >= 4
    cookie = "__Host-pacs_edge_session"
    alive = [token for token in tokens
             if client(web_server).get(f"{base}/dicom-web/studies", timeout=60,
                                       cookies={cookie: token}).status_code != 401]
    assert alive == [], f"{len(alive)} of {len(tokens)} sessions outlived the password change"
    # Logins sent between the change and the threads' stop were wrong: they may have
    # locked the user (3 failures here), which is not what this test is about.
    web_server.cli("users", "unlock", "rad1")
    assert post_login(browser(web_server), web_server, "rad1", PASSWORD).status_code == 401
    assert post_login(browser(web_server), web_server, "rad1", new_password).status_code == 303


@pytest.mark.parametrize("headers", [
    {}, {"Origin": "https://evil.example"}, {"Origin": "null"},
    {"Referer": "https://evil.example/page"}, {"Origin": "http://localhost"},
])
def test_login_post_from_another_origin_is_refused(refusing_server: EdgeServer,
                                                   headers: dict[str, str]) -> None:
    http = client(refusing_server)
    answer = http.post(f"{webpeer.base_url(refusing_server)}/login", headers=headers, timeout=60,
                       data={"name": "rad1", "password": PASSWORD}, allow_redirects=False)
    assert answer.status_code == 403 and "__Host-pacs_edge_session" not in set_cookie(answer)


def test_http_basic_failures_and_logins_are_audited_like_the_form(web_server: EdgeServer) -> None:
    assert webpeer.curl(web_server, "/dicom-web/studies", user="rad1",
                        password="not the password").status == 401
    for _ in range(2):  # the second request is recognised from memory: one Login record
        assert webpeer.curl(web_server, "/dicom-web/studies", user="rad1").status in (200, 204)
    records = wait_for_records(web_server, '"UserName":"HTTP Basic"', 2)
    assert "unknown user or wrong password" in records[0] and "rad1" in records[0]
    assert "not the password" not in audit_text(web_server, "")


def test_login_with_a_same_origin_referer_and_no_origin_is_accepted(
        web_server: EdgeServer) -> None:
    http = client(web_server)
    answer = http.post(f"{webpeer.base_url(web_server)}/login", timeout=60,
                       headers={"Referer": f"{webpeer.base_url(web_server)}/login"},
                       data={"name": "rad1", "password": PASSWORD}, allow_redirects=False)
    assert answer.status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/\\evil",
                                    "javascript:alert(1)"])
def test_login_never_redirects_off_the_box(refusing_server: EdgeServer, target: str) -> None:
    answer = post_login(browser(refusing_server), refusing_server, "rad1", PASSWORD,
                        next_path=target)
    assert answer.status_code == 303 and answer.headers["Location"] == "/"


def test_launch_link_opens_the_viewer_once_with_a_session(web_server: EdgeServer) -> None:
    url = web_server.cli("link", STUDY, "--user", "ref1", "--base-url",
                         webpeer.base_url(web_server)).stdout.strip()
    assert urlsplit(url).path == "/launch"
    http = client(web_server)  # a browser arriving from the EHR: no Origin
    http.cookies.set("__Host-pacs_edge_session", login_token(web_server, "rad1"))
    checked = http.head(url, allow_redirects=False, timeout=60)  # a link checker's HEAD...
    assert "__Host-pacs_edge_session" not in set_cookie(checked)  # ...does not use the link up
    earlier = http.cookies["__Host-pacs_edge_session"]
    first = http.get(url, allow_redirects=False, timeout=60)
    assert first.status_code == 200
    viewer = f"/viewer?StudyInstanceUIDs={STUDY}"
    assert re.search(rf'http-equiv="refresh" content="0;url={re.escape(viewer)}"', first.text)
    cookie = set_cookie(first)
    assert "__Host-pacs_edge_session=" in cookie and "SameSite=Strict" in cookie
    assert first.headers["Referrer-Policy"] == "no-referrer"
    assert not is_login_redirect(http.get(f"{webpeer.base_url(web_server)}{viewer}",
                                          allow_redirects=False, timeout=60))
    replay = client(web_server)  # the session the browser had before the link has ended
    replay.cookies.set("__Host-pacs_edge_session", earlier)
    assert is_login_redirect(replay.get(f"{webpeer.base_url(web_server)}/",
                                        allow_redirects=False, timeout=60))
    again = client(web_server).get(url, allow_redirects=False, timeout=60)
    assert again.status_code == 401 and "already used" in again.text
    assert "__Host-pacs_edge_session" not in set_cookie(again)
    audit = audit_text(web_server, "launch link")
    assert "launch link" in audit and "the launch link was already used" in audit
    assert STUDY not in web_server.log() and "ref1" not in web_server.log()


@pytest.mark.parametrize("token", ["", "v1.e30.AAAA", "garbage", "v1." + "A" * 2000])
def test_bad_launch_links_are_refused_with_401(refusing_server: EdgeServer, token: str) -> None:
    answer = webpeer.curl(refusing_server, f"/launch?t={token}")
    assert answer.status == 401 and b"not valid" in answer.body
    assert "set-cookie" not in answer.headers


def test_session_cookie_of_another_box_is_refused(
        web_server: EdgeServer, tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    other = edge_server_factory(webpeer.web_home(tmp_path / "other-home", free_port()))
    webpeer.add_user(other, "rad1", "radiologist")
    http = browser(other)
    assert post_login(http, other, "rad1", PASSWORD).status_code == 303
    stolen = client(web_server)
    stolen.cookies.set("__Host-pacs_edge_session", http.cookies["__Host-pacs_edge_session"])
    assert is_login_redirect(stolen.get(f"{webpeer.base_url(web_server)}/",
                                        allow_redirects=False, timeout=60))
    answer = stolen.get(f"{webpeer.base_url(web_server)}/dicom-web/studies", timeout=60)
    assert answer.status_code == 401
