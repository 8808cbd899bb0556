"""STOW-RS: uploads go through the durable ingest path and come back byte for byte.

One real `pacs-edge serve` with HTTPS for the module; clients are requests (raw
multipart bodies, so the files travel exactly as they are on disk),
dicomweb-client, and dcmtk's getscu for the C-GET round trip.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
import requests
import webpeer
from conftest import EdgeServer

from appliance.store.spool import TEMP_SUFFIX

STOW = "/dicom-web/studies"
ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    with webpeer.running_web_server(tmp_path_factory.mktemp("stow")) as server:
        yield server


def _post(server: EdgeServer, paths: list[Path], *, url: str = STOW, user: str = "rad"
          ) -> tuple[int, dict]:
    body, content_type = webpeer.multipart_body(paths)
    answer = webpeer.session(server, user).post(
        webpeer.base_url(server) + url, data=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    is_json = answer.headers.get("Content-Type", "").startswith("application/dicom+json")
    return answer.status_code, answer.json() if is_json else {}


def _referenced(answer: dict) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.get("00081199", {}).get("Value", [])]


def _failures(answer: dict) -> list[int]:
    return [item["00081197"]["Value"][0] for item in answer.get("00081198", {}).get("Value", [])]


def test_every_transfer_syntax_round_trips_stow_to_wado_byte_identical(
        web: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance]) -> None:
    instances = list(syntax_set.values())
    status, answer = _post(web, [i.path for i in instances])
    assert status == 200, answer
    assert sorted(_referenced(answer)) == sorted(i.sop_instance_uid for i in instances)
    http = webpeer.session(web, "rad")
    for ts, sent in syntax_set.items():
        url = (f"{webpeer.base_url(web)}/dicom-web/studies/{sent.study_uid}/series/"
               f"{sent.header.SeriesInstanceUID}/instances/{sent.sop_instance_uid}")
        got = http.get(url, headers={"Accept": ANY})
        assert got.status_code == 200, (ts, got.text)
        ((headers, payload),) = webpeer.parts(got.headers["Content-Type"], got.content)
        assert headers["content-type"] == f"application/dicom; transfer-syntax={ts}"
        stored = web.home.parent / "got.dcm"
        stored.write_bytes(payload)
        assert dicomgen.dataset_bytes(stored) == dicomgen.dataset_bytes(sent.path), ts


def test_instances_larger_than_the_buffered_head_round_trip_identical(
        web: EdgeServer, tmp_path: Path) -> None:
    study = dicomgen.make_study(tmp_path / "big", seed=77, series_per_study=1,
                                instances_per_series=2, size=512)  # 512 KiB each
    status, answer = _post(web, [i.path for i in study])
    assert status == 200, answer
    got = webpeer.session(web, "rad").get(
        f"{webpeer.base_url(web)}/dicom-web/studies/{study[0].study_uid}",
        headers={"Accept": ANY})
    assert got.status_code == 200
    received = set()
    for _, payload in webpeer.parts(got.headers["Content-Type"], got.content):
        path = tmp_path / "part.dcm"
        path.write_bytes(payload)
        received.add(dicomgen.dataset_bytes(path))
    assert received == {dicomgen.dataset_bytes(i.path) for i in study}


def test_stowed_study_comes_back_by_cget_identical(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance], tmp_path: Path) -> None:
    status, answer = _post(web, [i.path for i in small_study])
    assert status == 200, answer
    got = dcmtk.getscu(web.port, {"StudyInstanceUID": small_study[0].study_uid},
                       tmp_path / "got").check()
    assert got.output.count("Sending C-STORE Response (Success)") == len(small_study)
    received = {dicomgen.dataset_bytes(p) for p in (tmp_path / "got").iterdir()}
    assert received == {dicomgen.dataset_bytes(i.path) for i in small_study}


def test_dicomweb_client_stores_and_a_second_store_is_idempotent(
        web: EdgeServer, tmp_path: Path) -> None:
    study = dicomgen.make_study(tmp_path / "study", seed=71, series_per_study=1,
                                instances_per_series=2)
    client = webpeer.dicomweb(web, "rad")
    datasets = [pydicom.dcmread(i.path) for i in study]
    first = client.store_instances(datasets)
    again = client.store_instances(datasets)
    for answer in (first, again):
        uids = [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence]
        assert sorted(uids) == sorted(i.sop_instance_uid for i in study)
    found = client.search_for_instances(study_instance_uid=study[0].study_uid)
    assert len(found) == len(study)


def test_partly_failed_upload_is_202_with_failure_reasons(web: EdgeServer,
                                                           tmp_path: Path) -> None:
    (good,) = dicomgen.make_study(tmp_path / "study", seed=72, series_per_study=1,
                                  instances_per_series=1)
    garbage = dicomgen.make_garbage_payload(tmp_path)
    status, answer = _post(web, [good.path, garbage])
    assert status == 202, answer
    assert _referenced(answer) == [good.sop_instance_uid]
    assert _failures(answer) == [0xC000]


# A valid UID that is no transfer syntax, and a real one the box's contexts do not list
# (Encapsulated Uncompressed Explicit VR Little Endian: pynetdicom 3.0.4 has it not).
NOT_A_TRANSFER_SYNTAX, UNLISTED_TRANSFER_SYNTAX = "1.2.3.4", "1.2.840.10008.1.2.1.98"


def test_instances_in_a_transfer_syntax_the_box_does_not_take_fail_with_0xC122(
        web: EdgeServer, tmp_path: Path) -> None:
    """Stored as sent, such an instance could be retrieved by no DICOM peer (no context
    carries its syntax) nor its frames served: PS3.18 I.2-2's 0xC122 refuses it, and
    the good instance beside it is stored (202)."""
    good, first, second = dicomgen.make_study(tmp_path / "study", seed=79,
                                              series_per_study=1, instances_per_series=3)
    bad = [dicomgen.relabelled_copy(g.path, tmp_path / f"{ts}.dcm", ts)
           for g, ts in ((first, NOT_A_TRANSFER_SYNTAX), (second, UNLISTED_TRANSFER_SYNTAX))]
    status, answer = _post(web, [good.path, *bad])
    assert status == 202, answer
    assert _referenced(answer) == [good.sop_instance_uid]
    assert _failures(answer) == [0xC122, 0xC122]
    named = [item["00081155"]["Value"] for item in answer["00081198"]["Value"]]
    assert named == [[first.sop_instance_uid], [second.sop_instance_uid]]
    found = webpeer.dicomweb(web, "rad").search_for_instances(
        study_instance_uid=good.study_uid)
    assert [ds["00080018"]["Value"] for ds in found] == [[good.sop_instance_uid]]
    assert "Traceback" not in web.log()


def test_nothing_stored_is_409(web: EdgeServer, tmp_path: Path) -> None:
    status, answer = _post(web, [dicomgen.make_truncated_instance(tmp_path)])
    assert status == 409, answer
    assert _failures(answer) == [0xC000]


def test_a_part_content_type_naming_no_media_type_is_0xC000_not_a_500(
        web: EdgeServer, tmp_path: Path) -> None:
    """"," or "application/dicom; q=0" name no media type: that part fails, the rest of
    the upload is stored and reported."""
    first, second = dicomgen.make_study(tmp_path / "study", seed=78, series_per_study=1,
                                        instances_per_series=2)
    body = bytearray()
    for path, part_type in ((first.path, "application/dicom"), (second.path, ","),
                            (second.path, "application/dicom; q=0")):
        body += f"--b0undary\r\nContent-Type: {part_type}\r\n\r\n".encode()
        body += path.read_bytes() + b"\r\n"
    body += b"--b0undary--\r\n"
    answer = webpeer.session(web, "rad").post(
        webpeer.base_url(web) + STOW, data=bytes(body),
        headers={"Content-Type": webpeer.STOW_TYPE.format("b0undary")})
    assert answer.status_code == 202, answer.text
    assert _referenced(answer.json()) == [first.sop_instance_uid]
    assert _failures(answer.json()) == [0xC000, 0xC000]
    assert "Traceback" not in web.log()


def test_a_truncated_instance_fails_under_the_uids_of_its_file_meta(
        web: EdgeServer, tmp_path: Path) -> None:
    truncated = dicomgen.make_truncated_instance(tmp_path)
    meta = pydicom.filereader.read_file_meta_info(truncated)
    bad = dicomgen.make_bad_uid_instance(tmp_path, kind="traversal")  # File Meta's too
    status, answer = _post(web, [truncated, bad])
    assert status == 409, answer
    failed, refused = answer["00081198"]["Value"]
    assert failed["00081150"]["Value"] == [meta.MediaStorageSOPClassUID]
    assert failed["00081155"]["Value"] == [meta.MediaStorageSOPInstanceUID]
    assert refused["00081150"]["Value"] == [pydicom.uid.CTImageStorage]
    assert refused["00081155"] == {"vr": "UI"}  # not a UID: never echoed


def test_an_unknown_vr_in_the_uids_is_refused_not_an_error(web: EdgeServer,
                                                            tmp_path: Path) -> None:
    """pydicom raises NotImplementedError reading a UID whose VR it does not know: the
    upload is refused (0xC000), it is not a 500."""
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=74, series_per_study=1,
                                      instances_per_series=1)
    data = instance.path.read_bytes()
    at = data.index(b"\x08\x00\x18\x00UI", 144)  # the dataset's SOP Instance UID
    damaged = tmp_path / "unknown-vr.dcm"
    damaged.write_bytes(data[:at + 4] + b"UM" + data[at + 6:])
    status, answer = _post(web, [damaged])
    assert status == 409, answer
    assert _failures(answer) == [0xC000]
    assert "Traceback" not in web.log()


def test_instance_of_another_study_than_the_url_names_is_refused(
        web: EdgeServer, tmp_path: Path) -> None:
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=73, series_per_study=1,
                                      instances_per_series=1)
    other = dicomgen.make_uid(73, "another-study")
    status, answer = _post(web, [instance.path], url=f"{STOW}/{other}")
    assert status == 409, answer
    assert _failures(answer) == [0xA900]
    assert answer["00081198"]["Value"][0]["00081155"]["Value"] == [instance.sop_instance_uid]


def test_an_instance_that_cannot_be_understood_is_0xC000_also_under_its_study_url(
        web: EdgeServer, tmp_path: Path) -> None:
    bad = dicomgen.make_bad_uid_instance(tmp_path, kind="letters")  # its study UID is good
    with pydicom.config.disable_value_validation():
        study = pydicom.dcmread(bad, stop_before_pixels=True).StudyInstanceUID
    status, answer = _post(web, [bad], url=f"{STOW}/{study}")
    assert status == 409, answer
    assert _failures(answer) == [0xC000]  # not 0xA900: nothing says it is of another study


def test_bad_uid_instance_is_refused_and_nothing_lands_outside_the_store(
        web: EdgeServer, tmp_path: Path) -> None:
    bad = dicomgen.make_bad_uid_instance(tmp_path, kind="traversal")
    status, answer = _post(web, [bad])
    assert status == 409, answer
    assert not list(web.home.parent.glob("**/passwd*"))


def test_wrong_content_types_are_415(web: EdgeServer, tmp_path: Path) -> None:
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=74, series_per_study=1,
                                      instances_per_series=1)
    for content_type in ("application/dicom", "application/json",
                         'multipart/related; type="application/dicom+json"; boundary=x'):
        answer = webpeer.curl(web, STOW, user="rad", method="POST", data_file=instance.path,
                              headers={"Content-Type": content_type})
        assert answer.status == 415, content_type


def test_an_accept_header_admitting_no_json_answer_is_406_and_nothing_is_stored(
        web: EdgeServer, tmp_path: Path) -> None:
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=75, series_per_study=1,
                                      instances_per_series=1)
    body, content_type = webpeer.multipart_body([instance.path])
    url = webpeer.base_url(web) + STOW
    session = webpeer.session(web, "rad")
    refused = session.post(url, data=body, headers={"Content-Type": content_type,
                                                    "Accept": "application/dicom+xml"})
    assert refused.status_code == 406
    assert "application/dicom+json" in refused.text
    found = session.get(f"{webpeer.base_url(web)}/dicom-web/studies",
                        params={"StudyInstanceUID": instance.study_uid},
                        headers={"Accept": "application/dicom+json"})
    assert found.status_code == 200 and found.json() == [], found.text
    for accept in ("application/json", "application/dicom+xml, application/dicom+json;q=0.5",
                   "*/*"):
        stored = session.post(url, data=body, headers={"Content-Type": content_type,
                                                       "Accept": accept})
        assert stored.status_code == 200, (accept, stored.text)


def test_malformed_multipart_is_400(web: EdgeServer, tmp_path: Path) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"this is not multipart at all\r\n")
    answer = webpeer.curl(web, STOW, user="rad", method="POST", data_file=body,
                          headers={"Content-Type": webpeer.STOW_TYPE.format("abc")})
    assert answer.status == 400
    missing = webpeer.curl(web, STOW, user="rad", method="POST", data_file=body,
                           headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert missing.status == 400


@pytest.mark.parametrize("part_head", [
    b"".join(b"X-Header-%d: v\r\n" % n for n in range(200)),  # aiohttp reads 128 at most
    b"X-Long: " + b"a" * 10_000 + b"\r\n",  # a line over 8190 bytes
    b"not a header line\r\n",  # no colon
], ids=["too-many-lines", "line-too-long", "no-colon"])
def test_a_part_with_malformed_headers_is_400_not_a_server_error(
        web: EdgeServer, tmp_path: Path, part_head: bytes) -> None:
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=75, series_per_study=1,
                                      instances_per_series=1)
    body = (b"--abc\r\nContent-Type: application/dicom\r\n" + part_head + b"\r\n"
            + instance.path.read_bytes() + b"\r\n--abc--\r\n")
    answer = webpeer.session(web, "rad").post(
        webpeer.base_url(web) + STOW, data=body,
        headers={"Content-Type": webpeer.STOW_TYPE.format("abc")})
    assert answer.status_code == 400, answer.text
    assert "Traceback" not in web.log()


def test_a_body_that_does_not_decode_as_its_content_encoding_says_is_400(
        web: EdgeServer, tmp_path: Path) -> None:
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=76, series_per_study=1,
                                      instances_per_series=1)
    body, content_type = webpeer.multipart_body([instance.path])  # not gzip
    answer = webpeer.session(web, "rad").post(
        webpeer.base_url(web) + STOW, data=body,
        headers={"Content-Type": content_type, "Content-Encoding": "gzip"})
    assert answer.status_code == 400, answer.text
    # aiohttp reads on what the handler left of the body after the 400 and meets the
    # error again: one line, no traceback.
    web.wait_for_log("http request malformed error=ContentEncodingError")
    assert "Traceback" not in web.log()


def test_an_upload_of_more_parts_than_the_limit_is_413(web: EdgeServer, tmp_path: Path
                                                       ) -> None:
    # 20,001 parts of one byte: a 200 KB body, each part ~1 KiB of answer held in memory
    # (a body of max_request_mb of them took ~100x its size before the cap).
    body = tmp_path / "body"
    body.write_bytes(b"--b\r\n\r\nX\r\n" * 20_001 + b"--b--\r\n")
    answer = webpeer.curl(web, STOW, user="rad", method="POST", data_file=body,
                          headers={"Content-Type": webpeer.STOW_TYPE.format("b")})
    assert answer.status == 413 and b"more than 20000 instances" in answer.body


def test_referring_physician_may_not_store(web: EdgeServer, tmp_path: Path) -> None:
    webpeer.add_user(web, "ref-stow", "referring", referring="WHO^EVER")
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=75, series_per_study=1,
                                      instances_per_series=1)
    status, _ = _post(web, [instance.path], user="ref-stow")
    assert status == 403


def test_stow_is_audited_with_user_and_address(web: EdgeServer, tmp_path: Path) -> None:
    (instance,) = dicomgen.make_study(tmp_path / "study", seed=76, series_per_study=1,
                                      instances_per_series=1)
    status, _ = _post(web, [instance.path])
    assert status == 200
    line = webpeer.audit_line(web, instance.study_uid, "web user rad")
    assert "127.0.0.1" in line


def test_an_upload_trickling_in_under_the_idle_timeout_is_408_and_its_spool_removed(
        tmp_path: Path) -> None:
    """10 bytes every 0.1 s never stalls for idle_timeout (1 s here), but is far below
    MIN_UPLOAD_RATE: it is cut after about one idle_timeout of waiting, not years."""
    with webpeer.running_web_server(tmp_path, idle_timeout=1.0) as server, \
            webpeer.tls_socket(server) as tls:
        tls.sendall(webpeer.stow_first_part_head("rad", 1_000_000) + b"\0" * 4096)
        tls.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 15
        while b"\r\n\r\n" not in answer:
            assert time.monotonic() < deadline, "the trickle was never cut"
            with contextlib.suppress(ssl.SSLWantReadError):
                answer += tls.recv(4096)
            with contextlib.suppress(ssl.SSLWantWriteError, OSError):
                tls.sendall(b"\0" * 10)
            time.sleep(0.1)  # the client's pace is what is tested
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        while list((server.home / "store").rglob(f"*{TEMP_SUFFIX}")):
            assert time.monotonic() < deadline, "the spool stayed"
            time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_during_stow_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    """A 200 is a promise: uploads run back to back until the server is SIGKILLed
    between or inside them; after a restart every instance of an acknowledged
    upload comes back by C-GET byte for byte, and fsck finds the store consistent."""
    study = dicomgen.make_study(tmp_path / "study", seed=77, series_per_study=4,
                                instances_per_series=40, size=128)
    batches = [[i.path for i in study[n:n + 4]] for n in range(0, len(study), 4)]
    acked: list[Path] = []
    with webpeer.running_web_server(tmp_path) as server, \
            webpeer.session(server, "rad") as client:

        def upload() -> None:
            for batch in batches:
                body, content_type = webpeer.multipart_body(batch)
                try:
                    answer = client.post(webpeer.base_url(server) + STOW, data=body,
                                         headers={"Content-Type": content_type}, timeout=60)
                except requests.ConnectionError:
                    return
                if answer.status_code != 200:
                    return
                acked.extend(batch)

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        deadline = time.monotonic() + 120
        while len(acked) < 40:
            assert uploader.is_alive(), "the uploads ended before the kill"
            assert time.monotonic() < deadline, "the uploads made no progress"
            time.sleep(0.01)
        server.kill()
        uploader.join(60)
        assert 40 <= len(acked) < len(study), "the kill did not land mid-run"

        server.start()
        got = dcmtk.getscu(server.port, {"StudyInstanceUID": study[0].study_uid},
                           tmp_path / "got").check()
        received = {dicomgen.dataset_bytes(p) for p in (tmp_path / "got").iterdir()}
        assert {dicomgen.dataset_bytes(p) for p in acked} <= received, got.output[-2000:]
        fsck = server.cli("fsck", check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert "consistent" in fsck.stdout
