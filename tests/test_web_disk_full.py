"""The web on a full disk. STOW-RS: 503 with Retry-After (the box's condition, not the
request's), never 500 or 409, nothing stored; the same upload is stored once space is
freed. Reads with a session go on, as C-FIND and C-GET do."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dcmtk
import dicomgen
import webpeer
from conftest import EdgeServer
from smalldisk import NEEDS_ROOT, fill, no_reserve, tmpfs

STOW = "/dicom-web/studies"
OUT_OF_RESOURCES = 0xA700

pytestmark = NEEDS_ROOT


def post(server: EdgeServer, user: str, paths: list[Path]) -> tuple[int, dict[str, str], bytes]:
    body, content_type = webpeer.multipart_body(paths)
    answer = webpeer.session(server, user).post(
        webpeer.base_url(server) + STOW, data=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    return answer.status_code, dict(answer.headers), answer.content


def failures(body: bytes) -> list[tuple[str, int]]:
    """(SOP Instance UID, FailureReason) of each FailedSOPSequence item."""
    return [(item["00081155"].get("Value", [""])[0], item["00081197"]["Value"][0])
            for item in json.loads(body).get("00081198", {}).get("Value", [])]


def test_stow_on_a_full_disk_answers_503_with_retry_after_and_stores_after_space_is_freed(
        tmp_path: Path) -> None:
    study = dicomgen.make_studies(tmp_path / "study", seed=31, series_per_study=1,
                                  instances_per_series=2, size=64)
    paths = [i.path for i in study]
    with tmpfs(tmp_path / "disk", 48) as disk:
        server = EdgeServer(no_reserve(webpeer.web_home(disk / "home", dcmtk.free_port())))
        server.log_path = tmp_path / "serve.log"  # not on the disk that fills
        server.start()
        try:
            webpeer.add_user(server, "rad", "radiologist")
            webpeer.add_user(server, "gateway", "radiologist")
            # rad's password is verified (and remembered) while there is room.
            assert webpeer.session(server, "rad").get(
                webpeer.base_url(server) + STOW).status_code in (200, 204)
            filler = fill(disk)

            # Authenticated already: the ingest refuses each instance for want of space.
            status, headers, body = post(server, "rad", paths)
            assert status == 503, body
            assert headers.get("Retry-After")
            # Each failure names its instance (from the upload: nothing of it reached disk).
            assert failures(body) == [(i.sop_instance_uid, OUT_OF_RESOURCES) for i in study]

            # A first login cannot record itself in the index: still 503, not 500.
            status, headers, body = post(server, "gateway", paths)
            assert status == 503, body
            assert headers.get("Retry-After") and b"disk is full" in body
            assert "Traceback" not in server.log()

            filler.unlink()
            status, _headers, body = post(server, "gateway", paths)
            assert status == 200, body
        finally:
            server.stop()
        assert not server.unclean_stops, server.unclean_stops


def test_a_session_keeps_reading_while_the_disk_is_full(tmp_path: Path) -> None:
    """Each use of a session is recorded (for the idle limit) at most every
    session_idle_minutes / 10; on a full disk that record cannot be written, and the
    session must still admit: the viewer keeps working."""
    with tmpfs(tmp_path / "disk", 48) as disk:
        server = EdgeServer(no_reserve(webpeer.web_home(disk / "home", dcmtk.free_port())))
        server.configure(auth={"session_idle_minutes": 0.1})  # a use is recorded after 0.6 s
        server.log_path = tmp_path / "serve.log"
        server.start()
        try:
            webpeer.add_user(server, "rad", "radiologist")
            http = webpeer.session(server, None)
            http.headers["Origin"] = webpeer.base_url(server)
            login = http.post(f"{webpeer.base_url(server)}/login", allow_redirects=False,
                              data={"name": "rad", "password": webpeer.PASSWORD, "next": "/"})
            assert login.status_code == 303 and "__Host-pacs_edge_session" in http.cookies
            filler = fill(disk)
            time.sleep(1.0)  # past the 0.6 s after which the next use is recorded
            answer = http.get(webpeer.base_url(server) + STOW, allow_redirects=False)
            assert answer.status_code in (200, 204), answer.text
            filler.unlink()
        finally:
            server.stop()
        assert not server.unclean_stops, server.unclean_stops
