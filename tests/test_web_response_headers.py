"""Every DICOMweb answer is no-store, every answer nosniff and HTTPS-only for browsers
(HSTS) (appliance/http/response_headers.py).

A real `pacs-edge serve` with HTTPS, a study stored with storescu whose Patient Name and
Study Description hold markup, and curl as the client. QIDO matches and metadata carry
names, IDs and birth dates: a reading-room browser must not keep them in its disk cache,
and no answer may be taken for a page by a browser that sniffs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pytest
import webpeer
from conftest import EdgeServer
from pydicom import dcmread

HOSTILE_NAME = "EVIL<img src=x onerror=alert(1)>^JOHN"
HOSTILE_DESCRIPTION = "<script>alert(2)</script>"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[dicomgen.GeneratedInstance]:
    made = dicomgen.make_study(tmp_path_factory.mktemp("headers-data"), seed=341,
                               series_per_study=1, instances_per_series=2)
    for item in made:
        ds = dcmread(item.path)
        ds.PatientName = HOSTILE_NAME
        ds.StudyDescription = HOSTILE_DESCRIPTION
        ds.save_as(item.path)
    return made


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory,
        study: list[dicomgen.GeneratedInstance]) -> Iterator[EdgeServer]:
    with webpeer.running_web_server(tmp_path_factory.mktemp("headers")) as server:
        dcmtk.storescu(server.port, [i.path for i in study]).check()
        yield server


def test_every_dicomweb_answer_is_no_store_and_nosniff(
        web: EdgeServer, study: list[dicomgen.GeneratedInstance]) -> None:
    first = study[0]
    s, se = first.study_uid, str(first.header.SeriesInstanceUID)
    i = str(first.header.SOPInstanceUID)
    reads = [
        "/dicom-web/studies?includefield=all",
        f"/dicom-web/studies/{s}/series",
        f"/dicom-web/studies/{s}/series/{se}/instances",
        "/dicom-web/instances",
        f"/dicom-web/studies/{s}/metadata",
        f"/dicom-web/studies/{s}/series/{se}/metadata",
        f"/dicom-web/studies/{s}/series/{se}/instances/{i}/metadata",
        f"/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/1",
        "/dicom-web/studies/1.2.3.4/metadata",  # 404
        "/dicom-web/studies/not-a-uid",  # 400
        "/dicom-web/nothing-here",  # 404 of the router
    ]
    for path in reads:
        answer = webpeer.curl(web, path, user="rad", headers={"Accept-Encoding": "gzip"})
        assert answer.headers.get("cache-control") == "no-store", (path, answer.status)
        assert answer.headers.get("x-content-type-options") == "nosniff", path
    names = webpeer.curl(web, "/dicom-web/studies?includefield=all", user="rad")
    assert names.status == 200 and b"EVIL<img" in names.body  # the value as stored
    assert names.headers["content-type"].startswith("application/dicom+json")


def test_stow_answer_is_no_store(web: EdgeServer, study: list[dicomgen.GeneratedInstance],
                                 tmp_path: Path) -> None:
    body, content_type = webpeer.multipart_body([study[0].path])
    upload = tmp_path / "upload.multipart"
    upload.write_bytes(body)
    answer = webpeer.curl(web, "/dicom-web/studies", user="rad", method="POST",
                          headers={"Content-Type": content_type,
                                   "Accept": "application/dicom+json"}, data_file=upload)
    assert answer.status == 200, answer.body[:200]
    assert answer.headers.get("cache-control") == "no-store"
    assert answer.headers.get("x-content-type-options") == "nosniff"


def test_pages_and_probes_are_nosniff(web: EdgeServer) -> None:
    for path, user in (("/login", None), ("/healthz", None), ("/readyz", None), ("/", "rad"),
                       ("/status", "rad")):
        answer = webpeer.curl(web, path, user=user)
        assert answer.headers.get("x-content-type-options") == "nosniff", (path, answer.status)


def test_every_answer_tells_browsers_to_use_https_only(
        web: EdgeServer, study: list[dicomgen.GeneratedInstance]) -> None:
    answers = [webpeer.curl(web, path, user=user) for path, user in (
        ("/login", None), ("/healthz", None), ("/", "rad"), ("/status", "rad"),
        (f"/dicom-web/studies/{study[0].study_uid}/metadata", "rad"),
        ("/dicom-web/studies", None),  # 401
        ("/dicom-web/nothing-here", "rad"))]  # 404 of the router
    assert {a.status for a in answers} >= {200, 401, 404}
    for answer in answers:
        assert answer.headers.get("strict-transport-security") == "max-age=31536000", \
            answer.status
