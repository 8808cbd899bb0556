"""A seeded fuzz of the HTTPS server of a real `pacs-edge serve`.

Each step writes one hand-made request over a raw TLS connection, in pieces: a
random method, a path under the DICOMweb, login, launch, ops and viewer routes
(good, unknown and malformed UIDs, frame lists, tags, traversal), a query string
(bad dates, huge limits and offsets, unknown and repeated keys, percent-encoding
junk), headers (Accept, multipart Content-Type with bad boundaries, Content-Length
that lies, chunked bodies, huge and malformed headers, credentials good, bad and
garbled) and a body (valid and truncated multipart, garbage DICOM parts, forms,
noise). What the server promises (appliance/http/https_server.py, docs/web.md):

- every request is answered 1xx-4xx, or the connection is closed (a head or body
  that never comes: within head_timeout / idle_timeout); a 5xx is a defect, except
  /readyz's 503 (by design: not ready);
- after every step /healthz answers 200 within a few seconds, no exception escaped
  into the serve log, and the server's RSS stays under a cap;
- every instance a valid STOW-RS stored (200) comes back by WADO-RS byte for byte.

PACS_EDGE_FUZZ_SEED and PACS_EDGE_FUZZ_STEPS choose the inputs (tests/fuzzing.py).
"""

from __future__ import annotations

import base64
import random
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import dicomgen
import fuzzing
import pytest
import webpeer
from conftest import EdgeServer

STEPS = fuzzing.steps(300)
IDLE = 2.0  # [http] idle_timeout and head_timeout
MAX_REQUEST_MB = 2
ANSWER_DEADLINE = 15.0
HEALTH_SECONDS = 5.0
RSS_GROWTH_KB = 128 * 1024
ANY_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_STATUS = re.compile(rb"HTTP/\d\.\d (\d{3}) ")  # aiohttp answers in the version asked

METHODS = ["GET"] * 8 + ["POST"] * 4 + ["HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE",
                                        "get", "BREW", "G\x00T", "X" * 300, "CONNECT"]
DICOMWEB = ["/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances",
            "/dicom-web/studies/{st}", "/dicom-web/studies/{st}/series",
            "/dicom-web/studies/{st}/instances", "/dicom-web/studies/{st}/metadata",
            "/dicom-web/studies/{st}/series/{se}", "/dicom-web/studies/{st}/series/{se}/instances",
            "/dicom-web/studies/{st}/series/{se}/metadata",
            "/dicom-web/studies/{st}/series/{se}/instances/{sop}",
            "/dicom-web/studies/{st}/series/{se}/instances/{sop}/metadata",
            "/dicom-web/studies/{st}/series/{se}/instances/{sop}/frames/{frames}",
            "/dicom-web/studies/{st}/series/{se}/instances/{sop}/bulkdata/{tag}",
            "/dicom-web/studies/{st}/series/{se}/instances/{sop}/rendered",
            "/dicom-web", "/dicom-web/", "/dicom-web/studies/{st}/series/{se}/{junk}"]
OTHERS = ["/login", "/logout", "/launch", "/healthz", "/readyz", "/metrics", "/status", "/",
          "/app-config.js", "/viewer", "/index.html", "/assets/../../pacs-edge.toml",
          "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/{junk}", "/login/{junk}"]
BAD_UIDS = ["", "abc", "1..2", "1.2." + "9" * 70, "%2e%2e", "..", "1.2.3%00", "1.2.3;x", "%ZZ",
            "%EF%BC%91.2", "0" * 65, "1.2.3/../4", "*", "1,2", "1.2.3%2F4", "-1"]
FRAMES = ["1", "1,2", "0", "-1", "99999999999999", "1,,2", "a", "", "1" * 100,
          ",".join(["1"] * 600), "1%2C2", " 1"]
TAGS = ["7FE00010", "7fe00010", "00100010", "zzzz", "", "FFFFFFFF", "7FE0001", "0" * 100]
JUNK = ["%", "%zz", "%C3%28", "%00", "%FF", "+", "&&", "=", "\\", "a" * 3000, "%2F", ";", "'",
        "<script>", "%0d%0aX-Injected:%201", "\u00e9"]
QUERY_VALUES = {
    "limit": ["0", "1", "999999999", "9999999999999999999999", "-1", "1e3", "", "abc", "%31"],
    "offset": ["0", "5", "999999999", "9999999999999999999999", "-5", "", "0x10"],
    "includefield": ["all", "00100010", "PatientName,XYZ", ",,,", "7FE00010", "00080005",
                     "ReferencedSeriesSequence", "ALL", "%00"],
    "StudyDate": ["20240101", "2024-01-01", "20240101-", "-20240101", "-", "2024133",
                  "abc-def", "20240101-20230101", "99999999", "2024010", "20240101\\20240102"],
    "StudyTime": ["25-", "120000.123456-", "1", "::"],
    "PatientName": ["*", "?", "DOE*", "\\", "%00", "=", "DOE^JANE", "*" * 200, "\u00e9*"],
    "PatientID": ["PAT1", "*", "", "\\\\", "x" * 500],
    "00100020": ["PAT1", "*"],
    "StudyInstanceUID": ["1.2.3", "1.2.3,1.2.4", "abc", ",", "1.2.3\\x", "*"],
    "ModalitiesInStudy": ["CT", "CT\\MR", "*", "C?"],
    "fuzzymatching": ["true", "false", "TRUE", "maybe"],
    "ReferencedSeriesSequence": [""], "ScheduledProcedureStepSequence.Modality": ["CT"],
    "bogus": ["1"], "PixelData": ["x"], "00420011": ["x"], "FFFFFFFF": ["1"], "0010": ["1"],
    "AccessionNumber": ["*" * 100, "A?"], "NumberOfStudyRelatedInstances": ["1", "x"],
    "PatientBirthDate": ["19700101-19600101", "1970"], "Rows": ["x", "70000", "-1"],
    "PatientWeight": ["abc", "1e999"], "InstanceNumber": ["1.5", "99999999999999999999"],
    "SeriesNumber": ["x", "2"], "NumberOfSeriesRelatedInstances": ["-", "1-2"],
    "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.2"],
    "next": ["/", "//evil.example", "https://evil.example", "/\\evil", "/viewer?x=1"],
    "StudyInstanceUIDs": ["1.2.3"], "t": ["", "v1.e30.AAAA", "garbage", "v1." + "A" * 2000],
}
ACCEPTS = ["application/dicom+json", "*/*", ANY_DICOM,
           'multipart/related; type="application/dicom"',
           'multipart/related; type="application/octet-stream"; transfer-syntax=*',
           'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
           "application/json", "text/html;q=abc", ";;;", "multipart/related", "image/jpeg",
           "application/dicom+json; q=0, */*; q=0", "x" * 5000, "", "*/*;q=0.5, application/*"]
BOUNDARY = "f0zzb0undary"
CONTENT_TYPES = [f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                 f'multipart/related; type=application/dicom; boundary="{BOUNDARY}"',
                 'multipart/related; type="application/dicom"',
                 'multipart/related; type="application/dicom"; boundary=',
                 'multipart/related; type="application/dicom"; boundary="' + "b" * 300 + '"',
                 'multipart/related; type="application/dicom"; boundary=other',
                 f"multipart/form-data; boundary={BOUNDARY}",
                 "application/x-www-form-urlencoded", "application/dicom", "text/plain",
                 "multipart/related; boundary", ";", "",
                 f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}']


@dataclass
class Web:
    server: EdgeServer
    rng: random.Random
    cookie: str
    study: list[dicomgen.GeneratedInstance]
    garbage: Path
    link_token: str  # of a valid launch link (one use)
    stored: dict[str, dicomgen.GeneratedInstance] = field(default_factory=dict)
    peak_rss_kb: int = 0


@pytest.fixture
def web(tmp_path: Path, small_study: list[dicomgen.GeneratedInstance]) -> Iterator[Web]:
    # The fuzzer's wrong passwords all come from 127.0.0.1: with the per-address login
    # throttle on, its own valid HTTP Basic requests (the stows, the final reads) would
    # be refused 429 once enough of them failed (tests/test_web_login.py covers it).
    with webpeer.running_web_server(tmp_path, idle_timeout=IDLE, head_timeout=IDLE,
                                    max_request_mb=MAX_REQUEST_MB, metadata_cache_mb=8,
                                    auth={"failed_logins_per_address": 0}) as server:
        webpeer.add_user(server, "ref", "referring", referring="WELBY^MARCUS")
        webpeer.add_user(server, "victim", "radiologist")
        base = webpeer.base_url(server)
        login = webpeer.session(server, None).post(
            f"{base}/login", data={"name": "rad", "password": webpeer.PASSWORD},
            headers={"Origin": base}, allow_redirects=False, timeout=60)
        assert login.status_code == 303, login.text
        link = server.cli("link", small_study[0].study_uid, "--user", "ref", "--base-url",
                          base).stdout.strip()
        yield Web(server, random.Random(fuzzing.SEED), login.cookies["__Host-pacs_edge_session"],
                  small_study, dicomgen.make_garbage_payload(tmp_path),
                  parse_qs(urlsplit(link).query)["t"][0])


# --- requests ---------------------------------------------------------------------

def _uid(web: Web, rng: random.Random, index: int) -> str:
    """A UID for path position `index` (0 study, 1 series, 2 instance): mostly real ones."""
    instance = rng.choice(web.study)
    real = [instance.study_uid, str(instance.header.SeriesInstanceUID),
            instance.sop_instance_uid][index]
    return rng.choice([real, real, real, f"1.2.826.0.1.3680043.8.498.{rng.randrange(10**9)}",
                       rng.choice(BAD_UIDS)])


def _path(web: Web, rng: random.Random) -> str:
    template = rng.choice(DICOMWEB if rng.random() < 0.75 else OTHERS)
    path = template.format(st=_uid(web, rng, 0), se=_uid(web, rng, 1), sop=_uid(web, rng, 2),
                           frames=rng.choice(FRAMES), tag=rng.choice(TAGS),
                           junk=rng.choice(JUNK + BAD_UIDS))
    if rng.random() < 0.6:
        pairs = []
        for _ in range(rng.randint(1, 5)):
            key = rng.choice(list(QUERY_VALUES))
            value = rng.choice([*QUERY_VALUES[key], web.link_token] if key == "t"
                               else QUERY_VALUES[key])
            if rng.random() < 0.15:
                value += rng.choice(JUNK)
            pairs.append(f"{key}={value}" if rng.random() < 0.9 else rng.choice([key, value]))
        path += "?" + "&".join(pairs)
    return path


def _multipart(web: Web, rng: random.Random, *, valid: bool) -> bytes:
    body = bytearray()
    for _ in range(rng.randint(1, 3)):
        source = rng.choice(web.study) if valid or rng.random() < 0.5 else None
        payload = source.path.read_bytes() if source else web.garbage.read_bytes()
        if not valid:
            kind = rng.randrange(5)
            if kind == 0:
                payload = payload[:rng.randrange(len(payload))]
            elif kind == 1:
                flipped = bytearray(payload)
                for _ in range(rng.randint(1, 20)):
                    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
                payload = bytes(flipped)
            elif kind == 2:
                payload = rng.randbytes(rng.randint(0, 5000))
        part_type = "application/dicom" if valid else rng.choice(
            ["application/dicom", "text/plain", "", "multipart/related; boundary=x",
             "application/dicom; transfer-syntax=1.2.3"])
        headers = f"Content-Type: {part_type}\r\n" if part_type else ""
        body += f"--{BOUNDARY}\r\n{headers}\r\n".encode() + payload + b"\r\n"
    if valid or rng.random() < 0.6:
        body += f"--{BOUNDARY}--\r\n".encode()
    return bytes(body)


def _body(web: Web, rng: random.Random, method: str, path: str) -> bytes:
    if path.startswith("/dicom-web/studies") and method == "POST":
        if rng.random() < 0.05:
            return b"\0" * ((MAX_REQUEST_MB << 20) + rng.randint(1, 4096))
        return _multipart(web, rng, valid=False)
    if path.startswith(("/login", "/logout")) and method == "POST":
        return rng.choice([
            f"name=rad&password={webpeer.PASSWORD}&next=/".encode(),
            b"name=victim&password=wrong&next=" + rng.choice(JUNK).encode(),
            b"name=" + b"x" * 5000 + b"&password=" + b"y" * 5000,
            b"%%%&&&===", b'{"name": "rad"}', rng.randbytes(rng.randint(0, 3000)),
            b"name=%C3%28&password=%FF"])
    return rng.randbytes(rng.randint(1, 200)) if rng.random() < 0.1 else b""


def _credentials(web: Web, rng: random.Random) -> list[str]:
    kind = rng.randrange(9)
    basic = {3: f"rad:{webpeer.PASSWORD}", 4: "victim:wrong password", 5: ":",
             6: "ref:" + webpeer.PASSWORD}
    if kind in basic:
        return ["Authorization: Basic " + base64.b64encode(basic[kind].encode()).decode()]
    return {0: [], 1: [f"Cookie: __Host-pacs_edge_session={web.cookie}"],
            2: [f"Cookie: __Host-pacs_edge_session={web.cookie}"],
            7: [rng.choice(["Authorization: Basic !!!", "Authorization: Bearer abc",
                            "Authorization: Basic " + base64.b64encode(b"\xff:\xfe").decode(),
                            "Authorization: Basic", "Authorization: " + "B" * 7000])],
            8: [rng.choice(["Cookie: __Host-pacs_edge_session=",
                            "Cookie: __Host-pacs_edge_session=v1.junk",
                            "Cookie: ;;;", "Cookie: __Host-pacs_edge_session=" + "A" * 4000,
                            'Cookie: __Host-pacs_edge_session="\\x00"'])]}[kind]


def _request(web: Web, rng: random.Random) -> tuple[bytes, str, bool]:
    """(request bytes, path, whether it holds back part of what it announces)."""
    method = rng.choice(METHODS)
    path = _path(web, rng)
    if path.startswith("/dicom-web/studies") and rng.random() < 0.4:
        method = "POST"
    body = _body(web, rng, method, path)
    headers = [rng.choice(["Host: localhost", "Host: localhost", "Host: localhost", "",
                           "Host: evil.example", "Host: localhost:99999", "Host: [::1",
                           "Host: " + "x" * 300])]
    headers += _credentials(web, rng)
    if rng.random() < 0.6:
        headers.append("Accept: " + rng.choice(ACCEPTS))
    if method == "POST" or rng.random() < 0.1:
        headers.append("Content-Type: " + rng.choice(CONTENT_TYPES))
    if rng.random() < 0.3:
        base = webpeer.base_url(web.server)
        headers.append("Origin: " + rng.choice([base, "null", "https://evil.example", base + "x"]))
    for _ in range(rng.choice([0, 0, 0, 1, 2, 150])):
        headers.append(rng.choice([
            "X-Junk: \x01\x02", "NoColonHere", "Space : before", " folded continuation",
            "X-Big: " + "v" * rng.choice([100, 8000, 9000]), "X-\u00e9: latin",
            "Expect: 100-continue", "Range: bytes=0-1", "If-None-Match: *",
            "Accept-Encoding: gzip, br", "Transfer-Encoding: gzip", "Connection: keep-alive",
            "Content-Length: 5", "X-Forwarded-For: 1.2.3.4"]))
    withheld = False
    mode = rng.choices(["exact", "none", "short", "long", "junk", "chunked", "bad-chunked"],
                       weights=[70, 6, 6, 3, 5, 6, 4])[0]
    if mode == "exact" and (body or method in ("POST", "PUT", "PATCH")):
        headers.append(f"Content-Length: {len(body)}")
    elif mode == "short":
        headers.append(f"Content-Length: {max(0, len(body) - rng.randint(1, 50))}")
    elif mode == "long":
        headers.append(f"Content-Length: {len(body) + rng.randint(1, 10000)}")
        withheld = True
    elif mode == "junk":
        headers.append(rng.choice(["Content-Length: abc", "Content-Length: -1",
                                   "Content-Length: 1e3", "Content-Length: 1, 2",
                                   f"Content-Length: {len(body)}\r\nContent-Length: 1"]))
    elif mode in ("chunked", "bad-chunked"):
        headers.append("Transfer-Encoding: chunked")
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                          for c in (body[i:i + 1000] for i in range(0, len(body), 1000)))
        body = chunks + b"0\r\n\r\n" if mode == "chunked" else rng.choice(
            [chunks, b"zz\r\n" + body, b"fffffffffff\r\n" + body[:10], chunks[:-3]])
        withheld = mode == "bad-chunked"
    headers.append("Connection: close")
    rng.shuffle(headers)
    version = rng.choice(["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "HTTP/1.1x",
                                              ""])
    head = f"{method} {path} {version}\r\n" + "".join(f"{h}\r\n" for h in headers if h) + "\r\n"
    data = head.encode("utf-8", "surrogateescape") + body
    if rng.random() < 0.01:  # a head that never ends: closed after head_timeout
        return data[:rng.randrange(len(head))], path, True
    return data, path, withheld


# --- exchanges --------------------------------------------------------------------

def _complete(answer: bytes) -> bool:
    """Whether `answer` holds a whole response (after any 100 Continue); one without a
    length ends when the server closes. HEAD answers are read until the close too."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    if head.split(b" ", 2)[1:2] == [b"100"]:
        return _complete(body)
    length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
    if length is not None:
        return len(body) >= int(length.group(1))
    return re.search(rb"(?im)^transfer-encoding:.*chunked", head) is not None and (
        body.endswith(b"0\r\n\r\n"))


def _exchange(web: Web, rng: random.Random, data: bytes, *, head: bool = False
              ) -> tuple[bytes, bool]:
    """Write `data` in pieces over a fresh TLS connection and read until a whole answer
    came or the server closed: (what it answered, whether it answered or closed). The
    rest of a body the server did not read is drained by aiohttp for a bounded time
    (lingering), so the connection is not waited for once the answer is whole."""
    answer = b""
    with webpeer.tls_socket(web.server) as tls:
        # False: the server answered early and closed; read what it said.
        fuzzing.send_in_pieces(rng, tls, data, sizes=(1, 50, 1500, 16384), pause_chance=0.05)
        deadline = time.monotonic() + ANSWER_DEADLINE
        while time.monotonic() < deadline:
            tls.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = tls.recv(65536)
            except TimeoutError:
                break
            except (ConnectionError, ssl.SSLError):
                return answer, True
            if not chunk:
                return answer, True
            answer += chunk
            if not head and _complete(answer):
                return answer, True
    return answer, False


def _statuses(answer: bytes) -> list[int]:
    return [int(code) for code in _STATUS.findall(answer)]


def _check_answer(path: str, answer: bytes, closed: bool, withheld: bool) -> None:
    assert closed, f"no whole answer and no close within {ANSWER_DEADLINE}s: {answer[:300]!r}"
    if not answer:
        return  # closed unanswered: a request the server dropped (or never saw whole)
    assert _STATUS.match(answer), answer[:300]
    statuses = _statuses(answer)
    for status in statuses:
        if status == 503 and urlsplit(path).path == "/readyz":
            continue
        assert 100 <= status < 500, f"{status} for {path[:200]}: {answer[:600]!r}"
    assert statuses or withheld, answer[:300]


def _valid_stow(web: Web, rng: random.Random) -> None:
    chosen = rng.sample(web.study, rng.randint(1, 3))
    body, content_type = webpeer.multipart_body(i.path for i in chosen)
    basic = base64.b64encode(f"rad:{webpeer.PASSWORD}".encode()).decode()
    credentials = rng.choice([f"Cookie: __Host-pacs_edge_session={web.cookie}",
                              f"Authorization: Basic {basic}"])
    head = ("POST /dicom-web/studies HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Accept: application/dicom+json\r\n{credentials}\r\nConnection: close\r\n")
    answer, closed = _exchange(web, rng, head.encode() + b"\r\n" + body)
    assert closed and _statuses(answer)[:1] == [200], answer[:600]
    for instance in chosen:
        web.stored[instance.sop_instance_uid] = instance


def _healthy(web: Web, step: int, what: str) -> None:
    server = web.server
    assert server.running, f"serve died at step {step} ({what}):\n{server.log()[-3000:]}"
    started = time.monotonic()
    answer, _ = _exchange(web, random.Random(0),
                          b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert _statuses(answer)[:1] == [200], (what, answer[:300])
    assert time.monotonic() - started < HEALTH_SECONDS, what
    problems = fuzzing.unhandled(server)
    assert not problems, (what, problems)
    web.peak_rss_kb = max(web.peak_rss_kb, fuzzing.rss_kb(server.pid))


def _retrieved_identical(web: Web, tmp_path: Path) -> None:
    http = webpeer.session(web.server, "rad")
    for sop, sent in web.stored.items():
        url = (f"{webpeer.base_url(web.server)}/dicom-web/studies/{sent.study_uid}/series/"
               f"{sent.header.SeriesInstanceUID}/instances/{sop}")
        got = http.get(url, headers={"Accept": ANY_DICOM}, timeout=60)
        assert got.status_code == 200, got.text
        ((_, payload),) = webpeer.parts(got.headers["Content-Type"], got.content)
        copy = tmp_path / "wado.dcm"
        copy.write_bytes(payload)
        assert dicomgen.dataset_bytes(copy) == dicomgen.dataset_bytes(sent.path), sop


def test_https_server_answers_random_requests_without_5xx_and_keeps_every_stored_instance(
        web: Web, tmp_path: Path) -> None:
    rng = web.rng
    _valid_stow(web, rng)
    baseline_kb = fuzzing.rss_kb(web.server.pid)
    step, what = -1, ""
    try:
        for step in range(STEPS):
            if rng.random() < 0.1:
                what = "valid stow"
                _valid_stow(web, rng)
            else:
                data, path, withheld = _request(web, rng)
                what = repr(data[:300])
                answer, closed = _exchange(web, rng, data, head=data.startswith(b"HEAD "))
                _check_answer(path, answer, closed, withheld)
            _healthy(web, step, what)
    except AssertionError as exc:
        raise AssertionError(f"PACS_EDGE_FUZZ_SEED={fuzzing.SEED} step {step}: {exc}\n"
                             f"request: {what}") from exc
    _retrieved_identical(web, tmp_path)
    growth = web.peak_rss_kb - baseline_kb
    assert growth < RSS_GROWTH_KB, f"serve grew by {growth} KiB over {STEPS} steps"
