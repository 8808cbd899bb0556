"""WADO-RS: stored bytes out unchanged, metadata with bulk data URIs, frames, recall.

Real `pacs-edge serve` with HTTPS; data goes in with dcmtk's storescu (C-STORE)
and comes out through requests, dicomweb-client and curl.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
import webpeer
from conftest import EdgeServer
from pydicom import encaps
from syncagent import SyncAgent, evict, import_files, index_rows, sync_once, tier_state

from appliance.services import pixel_frames

ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
OCTETS = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory,
        syntax_set: dict[str, dicomgen.GeneratedInstance],
        small_study: list[dicomgen.GeneratedInstance]) -> Iterator[EdgeServer]:
    with webpeer.running_web_server(tmp_path_factory.mktemp("wado")) as server:
        dcmtk.storescu(server.port, [i.path for i in small_study]).check()
        import_files(server.home, *syntax_set.values())  # dcmtk cannot send HTJ2K
        yield server


def _url(server: EdgeServer, instance: dicomgen.GeneratedInstance, suffix: str = "") -> str:
    return (f"{webpeer.base_url(server)}/dicom-web/studies/{instance.study_uid}/series/"
            f"{instance.header.SeriesInstanceUID}/instances/{instance.sop_instance_uid}{suffix}")


def _dataset_bytes(folder: Path, payload: bytes) -> bytes:
    path = folder / "part.dcm"
    path.write_bytes(payload)
    return dicomgen.dataset_bytes(path)


def test_storescu_study_comes_back_by_wado_identical(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance], tmp_path: Path) -> None:
    got = webpeer.session(web, "rad").get(
        f"{webpeer.base_url(web)}/dicom-web/studies/{small_study[0].study_uid}",
        headers={"Accept": ANY})
    assert got.status_code == 200, got.text
    assert got.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    received = {_dataset_bytes(tmp_path, payload)
                for _, payload in webpeer.parts(got.headers["Content-Type"], got.content)}
    assert received == {dicomgen.dataset_bytes(i.path) for i in small_study}


def test_dicomweb_client_retrieves_a_series(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance]) -> None:
    client = webpeer.dicomweb(web, "rad")
    series_uid = str(small_study[0].header.SeriesInstanceUID)
    instances = client.retrieve_series(small_study[0].study_uid, series_uid,
                                       media_types=(("application/dicom", "*"),))
    expected = {i.sop_instance_uid for i in small_study
                if str(i.header.SeriesInstanceUID) == series_uid}
    assert {str(ds.SOPInstanceUID) for ds in instances} == expected


def test_stored_syntax_not_accepted_is_406_and_default_means_explicit_le(
        web: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance]) -> None:
    http = webpeer.session(web, "rad")
    jpeg = syntax_set["1.2.840.10008.1.2.4.50"]
    plain = syntax_set["1.2.840.10008.1.2.1"]
    default = 'multipart/related; type="application/dicom"'
    assert http.get(_url(web, jpeg), headers={"Accept": default}).status_code == 406
    assert http.get(_url(web, syntax_set["1.2.840.10008.1.2.2"]),
                    headers={"Accept": default}).status_code == 406  # big endian: no
    assert http.get(_url(web, plain), headers={"Accept": default}).status_code == 200
    named = f'{default}; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert http.get(_url(web, jpeg), headers={"Accept": named}).status_code == 200


def test_implicit_and_deflated_instances_are_reencoded_for_clients_wanting_explicit_le(
        web: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance]) -> None:
    client = webpeer.dicomweb(web, "rad")
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"):
        sent = syntax_set[ts]
        # No transfer-syntax parameter: PS3.18's default, Explicit VR Little Endian.
        got = client.retrieve_instance(sent.study_uid, str(sent.header.SeriesInstanceUID),
                                       sent.sop_instance_uid, media_types=("application/dicom",))
        assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1", ts
        original = pydicom.dcmread(sent.path)
        assert got.PixelData == original.PixelData, ts
        assert got.PatientName == original.PatientName, ts
        assert got.SOPInstanceUID == original.SOPInstanceUID, ts


def test_series_metadata_has_bulkdata_uris_and_is_cached_until_the_series_grows(
        web: EdgeServer, tmp_path: Path) -> None:
    study = dicomgen.make_study(tmp_path / "grow", seed=81, series_per_study=1,
                                instances_per_series=3)
    dcmtk.storescu(web.port, [i.path for i in study[:2]]).check()
    http = webpeer.session(web, "rad")
    url = (f"{webpeer.base_url(web)}/dicom-web/studies/{study[0].study_uid}/series/"
           f"{study[0].header.SeriesInstanceUID}/metadata")
    first = http.get(url, headers={"Accept": "application/dicom+json"})
    assert first.status_code == 200, first.text
    assert first.headers["Content-Encoding"] == "gzip"  # the cache file as it is
    body = first.json()
    assert len(body) == 2
    for item in body:
        assert item["00100010"]["vr"] == "PN"
        assert item["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")
    cached = list((web.home / "cache" / "metadata").rglob("*.json.gz"))
    assert any(json.loads(gzip.decompress(p.read_bytes())) == body for p in cached)

    dcmtk.storescu(web.port, [study[2].path]).check()
    grown = http.get(url, headers={"Accept": "application/dicom+json"}).json()
    assert {i["00080018"]["Value"][0] for i in grown} == {i.sop_instance_uid for i in study}
    for refusing_gzip in ("identity", "gzip;q=0, identity", "*, gzip;q=0"):
        plain = http.get(url, headers={"Accept": "application/dicom+json",
                                       "Accept-Encoding": refusing_gzip})
        assert "Content-Encoding" not in plain.headers, refusing_gzip
        assert plain.json() == grown


def test_study_and_instance_metadata(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance]) -> None:
    client = webpeer.dicomweb(web, "rad")
    study = client.retrieve_study_metadata(small_study[0].study_uid)
    assert sorted(i["00080018"]["Value"][0] for i in study) == sorted(
        i.sop_instance_uid for i in small_study)
    one = small_study[0]
    instance = client.retrieve_instance_metadata(
        one.study_uid, str(one.header.SeriesInstanceUID), one.sop_instance_uid)
    assert instance["0020000D"]["Value"] == [one.study_uid]


def test_frames_of_uncompressed_and_encapsulated_instances(
        web: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance]) -> None:
    http = webpeer.session(web, "rad")
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
               "1.2.840.10008.1.2.1.99"):
        sent = pydicom.dcmread(syntax_set["1.2.840.10008.1.2.1"].path)
        got = http.get(_url(web, syntax_set[ts], "/frames/1"), headers={"Accept": OCTETS})
        assert got.status_code == 200, (ts, got.text)
        ((headers, payload),) = webpeer.parts(got.headers["Content-Type"], got.content)
        assert headers["content-type"] == (
            "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1")
        original = pydicom.dcmread(syntax_set[ts].path)
        assert payload == _little_endian(original), ts
        assert len(payload) == len(sent.PixelData)
    for ts, media in (("1.2.840.10008.1.2.4.50", "image/jpeg"),
                      ("1.2.840.10008.1.2.4.80", "image/jls"),
                      ("1.2.840.10008.1.2.5", "image/dicom-rle"),
                      ("1.2.840.10008.1.2.4.90", "image/jp2")):
        original = pydicom.dcmread(syntax_set[ts].path)
        expected = encaps.get_frame(original.PixelData, 0, number_of_frames=1)
        for accept, part_type in ((f'multipart/related; type="{media}"', media),
                                  (OCTETS, "application/octet-stream")):
            got = http.get(_url(web, syntax_set[ts], "/frames/1"), headers={"Accept": accept})
            assert got.status_code == 200, (ts, got.text)
            ((headers, payload),) = webpeer.parts(got.headers["Content-Type"], got.content)
            assert headers["content-type"] == f"{part_type}; transfer-syntax={ts}"
            assert payload == expected, ts
        plain = http.get(_url(web, syntax_set[ts], "/frames/1"),
                         headers={"Accept": 'multipart/related; type="application/octet-stream"'})
        assert plain.status_code == 406, ts


def test_frames_of_an_uncompressed_ybr_full_422_cine_are_two_bytes_a_pixel(
        web: EdgeServer, tmp_path: Path) -> None:
    # Y Y Cb Cr per pair of pixels: frames were cut at 3 bytes a pixel, so frame 2 on
    # were misplaced and the last third of the cine answered 404 "truncated".
    cine = dicomgen.make_ybr_full_422_cine(tmp_path, frames=6)
    dcmtk.storescu(web.port, [cine.path]).check()
    data = pydicom.dcmread(cine.path).PixelData
    length = len(data) // 6
    got = webpeer.session(web, "rad").get(_url(web, cine, "/frames/1,2,5,6"),
                                          headers={"Accept": OCTETS})
    assert got.status_code == 200, got.text
    payloads = [payload for _, payload in webpeer.parts(got.headers["Content-Type"],
                                                         got.content)]
    assert payloads == [data[(n - 1) * length: n * length] for n in (1, 2, 5, 6)]


def test_frames_of_a_document_are_404_saying_it_has_no_pixel_data(
        web: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance],
        tmp_path: Path) -> None:
    """An Encapsulated PDF (or an SR) has no frames: 404 saying so, where it said "the
    image pixel module is incomplete", as of a damaged image."""
    pdf = dicomgen.make_encapsulated_pdf(tmp_path, syntax_set["1.2.840.10008.1.2.1"].header)
    dcmtk.storescu(web.port, [pdf.path]).check()
    got = webpeer.session(web, "rad").get(_url(web, pdf, "/frames/1"),
                                          headers={"Accept": OCTETS})
    assert got.status_code == 404
    assert "has no pixel data" in got.text, got.text


def _little_endian(ds: pydicom.Dataset) -> bytes:
    data = bytes(ds.PixelData)
    if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2":
        out = bytearray(data)
        out[0::2], out[1::2] = data[1::2], data[0::2]
        return bytes(out)
    return data


def test_frame_out_of_range_is_404_and_malformed_frame_list_400(
        web: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance]) -> None:
    http = webpeer.session(web, "rad")
    instance = syntax_set["1.2.840.10008.1.2.1"]
    for past_the_end in ("2", "1,2"):  # a 404, not an answer cut off after frame 1
        assert http.get(_url(web, instance, f"/frames/{past_the_end}"),
                        headers={"Accept": OCTETS}).status_code == 404, past_the_end
    for bad in ("0", "a", "1;2", "-1", "%C2%B2"):  # "²": a digit to isdigit(), not to int()
        assert http.get(_url(web, instance, f"/frames/{bad}"), headers={"Accept": OCTETS}
                        ).status_code == 400, bad


def _peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM in /proc status")


def test_frames_stream_in_bounded_memory_when_one_frame_is_named_many_times(
        tmp_path: Path) -> None:
    # 150 x a 2 MiB frame in one URL (one may name 4096): the answer must not be read
    # into memory whole before it is sent (it was: +300 MB here, +8 GB for a full URL).
    (instance,) = dicomgen.make_studies(tmp_path / "big", seed=77, patients=1,
                                        studies_per_patient=1, series_per_study=1,
                                        instances_per_series=1, modalities=("CT",),
                                        size=1024)
    frame = pydicom.dcmread(instance.path).PixelData
    with webpeer.running_web_server(tmp_path / "frames") as server:
        import_files(server.home, instance)
        http = webpeer.session(server, "rad")
        assert http.get(_url(server, instance, "/frames/1"), headers={"Accept": OCTETS}
                        ).status_code == 200
        before = _peak_rss(server.pid)
        got = http.get(_url(server, instance, "/frames/" + ",".join(["1"] * 150)),
                       headers={"Accept": OCTETS})
        peak = _peak_rss(server.pid)
    assert got.status_code == 200, got.text
    payloads = [payload for _, payload in webpeer.parts(got.headers["Content-Type"],
                                                         got.content)]
    assert len(payloads) == 150 and all(p == frame for p in payloads)
    assert peak - before < 100 << 20, f"peak RSS grew by {(peak - before) >> 20} MiB"


def _damaged_copy(original: dicomgen.GeneratedInstance, folder: Path, element: bytes,
                  replacement: bytes) -> dicomgen.GeneratedInstance:
    """A copy of `original` under a new SOP Instance UID, with the bytes `element` (an
    element's header, as encoded) replaced by `replacement` once."""
    ds = pydicom.dcmread(original.path)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    encoded = path.read_bytes()
    assert encoded.count(element) == 1
    path.write_bytes(encoded.replace(element, replacement))
    return dicomgen.GeneratedInstance(path, ds)


def test_instances_stored_with_values_pydicom_cannot_read_answer_4xx_or_as_stored(
        web: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance],
        tmp_path: Path) -> None:
    """Instances are stored as sent, checked only for the index's attributes. Where a
    value pydicom cannot read gets in the way (it raises one of many types), the answer
    says so with a 404, the rest of the instance's metadata still answers, and an
    instance that cannot be re-encoded goes as it was stored."""
    explicit = syntax_set["1.2.840.10008.1.2.1"]
    short_rows = _damaged_copy(explicit, tmp_path, b"\x28\x00\x10\x00US\x02\x00",
                               b"\x28\x00\x10\x00US\x03\x00\x00")  # 3 bytes of Rows
    unknown_vr = _damaged_copy(explicit, tmp_path, b"\x28\x00\x00\x01US",
                               b"\x28\x00\x00\x01UM")  # BitsAllocated
    implicit = _damaged_copy(syntax_set["1.2.840.10008.1.2"], tmp_path,
                             b"\x28\x00\x10\x00\x02\x00\x00\x00",
                             b"\x28\x00\x10\x00\x03\x00\x00\x00\x00")
    import_files(web.home, short_rows, unknown_vr, implicit)
    http = webpeer.session(web, "rad")
    for instance, error in ((short_rows, "BytesLengthException"),
                            (unknown_vr, "NotImplementedError")):
        for suffix in ("/frames/1", "/bulkdata/7FE00010"):
            got = http.get(_url(web, instance, suffix), headers={"Accept": OCTETS})
            assert got.status_code == 404, (suffix, got.text)
            assert f"pixel data cannot be read ({error})" in got.text
        got = http.get(_url(web, instance, "/bulkdata/00280100"), headers={"Accept": OCTETS})
        assert got.status_code == 404
        metadata = http.get(_url(web, instance, "/metadata"))
        assert metadata.status_code == 200
        assert metadata.json()[0]["00080018"]["Value"] == [instance.sop_instance_uid]
    got = http.get(_url(web, implicit), headers={"Accept": "multipart/related; "
                                                 'type="application/dicom"'})
    assert got.status_code == 200, got.text
    ((headers, payload),) = webpeer.parts(got.headers["Content-Type"], got.content)
    assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2"
    assert _dataset_bytes(tmp_path, payload) == dicomgen.dataset_bytes(implicit.path)
    assert "wado-rs instance sent in its stored syntax" in web.log()
    assert "Traceback" not in web.log()


def test_frames_of_an_instance_in_a_transfer_syntax_the_box_does_not_know_are_a_frame_error(
        syntax_set: dict[str, dicomgen.GeneratedInstance], tmp_path: Path) -> None:
    """A file whose File Meta names a valid UID that is no transfer syntax, stored before
    ingest refused such files (STOW-RS and import stored it as sent): its pixels cannot
    be read, a FrameError (404), not pydicom's ValueError (a 500)."""
    unknown = dicomgen.relabelled_copy(syntax_set["1.2.840.10008.1.2.1"].path,
                                       tmp_path / "unknown.dcm", "1.2.826.0.1.3680043")
    assert not pixel_frames.is_encapsulated("1.2.826.0.1.3680043")
    with pytest.raises(pixel_frames.FrameError, match="transfer syntax"):
        pixel_frames.read_frames(unknown, "1.2.826.0.1.3680043", [1])


def test_bulkdata_uri_of_the_metadata_answers_the_pixel_data(
        web: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance]) -> None:
    instance = syntax_set["1.2.840.10008.1.2.1"]
    http = webpeer.session(web, "rad")
    (meta,) = http.get(_url(web, instance, "/metadata")).json()
    got = http.get(meta["7FE00010"]["BulkDataURI"], headers={"Accept": OCTETS})
    assert got.status_code == 200, got.text
    ((_, payload),) = webpeer.parts(got.headers["Content-Type"], got.content)
    assert payload == bytes(pydicom.dcmread(instance.path).PixelData)


def test_bulkdata_of_pixel_data_answers_every_frame_past_the_frame_list_limit(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance], tmp_path: Path) -> None:
    """A long cine (or a slide level of many tiles) has more frames than a frame list may
    name (4096): the Pixel Data BulkDataURI answered the first 4096, with a 200."""
    ds = pydicom.dcmread(small_study[0].path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    frames = 5000
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    pixels = bytes(i % 251 for i in range(frames * 4))
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB"
    cine = dicomgen.write_instance(ds, tmp_path / "cine.dcm", pydicom.uid.ExplicitVRLittleEndian)
    import_files(web.home, cine)
    got = webpeer.session(web, "rad").get(_url(web, cine, "/bulkdata/7FE00010"),
                                          headers={"Accept": OCTETS})
    assert got.status_code == 200, got.text
    parts = [payload for _, payload in webpeer.parts(got.headers["Content-Type"], got.content)]
    assert (len(parts), b"".join(parts)) == (frames, pixels)


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian,
                                    pydicom.uid.ImplicitVRLittleEndian])
def test_float_pixel_data_of_a_parametric_map_is_in_its_metadata_and_frames(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance], tmp_path: Path,
        syntax: str) -> None:
    """A Parametric Map holds its pixels in Float Pixel Data (7FE0,0008): its metadata
    had no entry for it and its frames were 404 "no pixel data" (only 7FE0,0010 was
    looked for), so a viewer could not show it."""
    ds = pydicom.dcmread(small_study[0].path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.30"
    del ds.PixelData
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 16, 16, 32, 1
    ds.NumberOfFrames = 2
    pixels = bytes(i % 256 for i in range(16 * 16 * 4 * 2))
    ds.FloatPixelData = pixels
    pmap = dicomgen.write_instance(ds, tmp_path / "pmap.dcm", syntax)
    import_files(web.home, pmap)
    http = webpeer.session(web, "rad")
    [meta] = http.get(_url(web, pmap, "/metadata"), headers={"Accept": "application/dicom+json"}
                      ).json()
    assert meta["7FE00008"] == {"vr": "OF", "BulkDataURI": _url(web, pmap, "/bulkdata/7FE00008")}
    assert "7FE00010" not in meta
    frame = http.get(_url(web, pmap, "/frames/2"), headers={"Accept": OCTETS})
    assert frame.status_code == 200, frame.text
    [(_, second)] = webpeer.parts(frame.headers["Content-Type"], frame.content)
    assert second == pixels[16 * 16 * 4:]
    bulk = http.get(meta["7FE00008"]["BulkDataURI"], headers={"Accept": OCTETS})
    assert b"".join(p for _, p in webpeer.parts(bulk.headers["Content-Type"], bulk.content)
                    ) == pixels


def test_bad_uids_traversal_and_unknown_studies(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance]) -> None:
    for path in ("/dicom-web/studies/1.2.abc", "/dicom-web/studies/1.2.3/series/..%2F..",
                 "/dicom-web/studies/" + "1." * 40 + "1/metadata",
                 "/dicom-web/studies/1.2.3/series/1.2/instances/1..2/frames/1"):
        answer = webpeer.curl(web, path, user="rad")
        assert answer.status == 400, path
    # A leading zero is a UID real modalities write (appliance/base/uids.py): not found.
    leading_zero = webpeer.curl(web, "/dicom-web/studies/1.2.3/series/1.2/instances/01.2/frames/1",
                                user="rad")
    assert leading_zero.status == 404
    for path in ("/dicom-web/studies/../../../../etc/passwd",
                 "/dicom-web/studies/1.2.3/series/../../../../../etc/passwd",
                 "/dicom-web/studies/%2e%2e%2f%2e%2e%2fetc%2fpasswd/metadata"):
        traversal = webpeer.curl(web, path, user="rad", as_is=True,
                                 headers={"Accept": ANY})
        assert traversal.status in (400, 404), path
        assert b"root:" not in traversal.body, path
    unknown = webpeer.curl(web, "/dicom-web/studies/1.2.3.4.5", user="rad",
                           headers={"Accept": ANY})
    assert unknown.status == 404


def test_every_wado_read_is_audited_with_user_study_and_address(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance]) -> None:
    # Once per user, study and address per window (tests/test_web_audit.py): the
    # first read of this study by rad may be an earlier test's.
    one = small_study[0]
    client = webpeer.dicomweb(web, "rad")
    client.retrieve_instance_metadata(one.study_uid, str(one.header.SeriesInstanceUID),
                                      one.sop_instance_uid)
    line = webpeer.audit_line(web, '"WADO-RS ', one.study_uid, "web user rad")
    assert "127.0.0.1" in line


def test_evicted_study_comes_back_by_wado(tmp_path: Path,
                                         small_study: list[dicomgen.GeneratedInstance]) -> None:
    with webpeer.running_web_server(tmp_path) as server:
        server.stop()
        server.configure(sync={"stable_after_seconds": 3600.0, "recall_poll_seconds": 0.2,
                               "evict_after_days": 0.0, "recall_timeout_seconds": 60.0})
        server.start()
        agent = SyncAgent(server.home).start()
        try:
            study_uid = small_study[0].study_uid
            dcmtk.storescu(server.port, [i.path for i in small_study]).check()
            assert "replicated 1 study version" in sync_once(server.home).stdout
            evict(server.home, study_uid)
            assert tier_state(server, study_uid) == "evicted"
            got = webpeer.session(server, "rad").get(
                f"{webpeer.base_url(server)}/dicom-web/studies/{study_uid}",
                headers={"Accept": ANY}, timeout=120)
            assert got.status_code == 200, got.text
            received = {_dataset_bytes(tmp_path, payload) for _, payload
                        in webpeer.parts(got.headers["Content-Type"], got.content)}
            assert received == {dicomgen.dataset_bytes(i.path) for i in small_study}
            assert tier_state(server, study_uid) == "replicated"
        finally:
            assert agent.stop() == 0, agent.log()


def test_a_recall_slower_than_the_web_wait_is_503_ask_again_soon_then_the_study(
        tmp_path: Path, small_study: list[dicomgen.GeneratedInstance]) -> None:
    """A browser is not held for [sync] recall_timeout_seconds (600 s by default: a
    proxy times out first, the viewer shows a bare spinner): after [http]
    recall_wait_seconds the answer is 503 with a short Retry-After while the recall
    goes on (the viewer asks again: viewer_recall.py), and the study once it is back."""
    with webpeer.running_web_server(tmp_path) as server:
        server.stop()
        server.configure(sync={"recall_poll_seconds": 0.2, "recall_timeout_seconds": 30.0},
                         http={"recall_wait_seconds": 1.0})
        server.start()
        study_uid = small_study[0].study_uid
        dcmtk.storescu(server.port, [i.path for i in small_study]).check()
        assert "replicated 1 study version" in sync_once(server.home).stdout
        evict(server.home, study_uid)
        http = webpeer.session(server, "rad")
        url = _url(server, small_study[0], "/metadata")
        waiting = http.get(url, timeout=120)  # no sync agent yet: the recall cannot run
        assert waiting.status_code == 503, waiting.text
        assert waiting.headers["Retry-After"] == "2"
        assert "being recalled" in waiting.text
        assert waiting.elapsed.total_seconds() < 15
        agent = SyncAgent(server.home).start()  # picks up the request the read left
        try:
            back = http.get(url, timeout=120)
            assert back.status_code == 200, back.text
            assert back.json()[0]["00080018"]["Value"] == [small_study[0].sop_instance_uid]
            assert tier_state(server, study_uid) == "replicated"
        finally:
            assert agent.stop() == 0, agent.log()


def test_cached_series_metadata_of_an_evicted_study_is_answered_at_once_and_asks_the_recall(
        tmp_path: Path, small_study: list[dicomgen.GeneratedInstance]) -> None:
    """A series read before its study was evicted has its headers in the metadata cache:
    they are answered without waiting for the recall (the viewer lays the study out
    while the pixels come back), and the read asks for the recall, so frames follow."""
    with webpeer.running_web_server(tmp_path) as server:
        server.stop()
        server.configure(sync={"recall_poll_seconds": 0.2}, http={"recall_wait_seconds": 30.0})
        server.start()
        one = small_study[0]
        dcmtk.storescu(server.port, [i.path for i in small_study]).check()
        http = webpeer.session(server, "rad")
        series = (f"{webpeer.base_url(server)}/dicom-web/studies/{one.study_uid}/series/"
                  f"{one.header.SeriesInstanceUID}/metadata")
        before = http.get(series)
        assert before.status_code == 200
        assert "replicated 1 study version" in sync_once(server.home).stdout
        evict(server.home, one.study_uid)
        cached = http.get(series, timeout=120)  # no sync agent: the recall cannot run
        assert cached.status_code == 200, cached.text
        assert cached.elapsed.total_seconds() < 10  # not the 30 s recall wait
        assert cached.json() == before.json()
        assert index_rows(server.home, "SELECT state FROM recall_requests") == [("pending",)]
        assert tier_state(server, one.study_uid) == "evicted"
        agent = SyncAgent(server.home).start()
        try:
            frame = http.get(_url(server, one, "/frames/1"), headers={"Accept": OCTETS},
                             timeout=120)
            assert frame.status_code == 200, frame.text
            assert tier_state(server, one.study_uid) == "replicated"
        finally:
            assert agent.stop() == 0, agent.log()


def test_a_wado_read_stamps_the_study_last_access_for_eviction(
        web: EdgeServer, tmp_path: Path) -> None:
    study = dicomgen.make_study(tmp_path / "touch", seed=83, series_per_study=1,
                                instances_per_series=1)
    dcmtk.storescu(web.port, [study[0].path]).check()
    query = f"SELECT last_access_at FROM studies WHERE study_uid = '{study[0].study_uid}'"
    ((before,),) = index_rows(web.home, query)
    for _ in range(3):  # stamped once, however many reads follow
        got = webpeer.session(web, "rad").get(_url(web, study[0], "/metadata"))
        assert got.status_code == 200
    ((after,),) = index_rows(web.home, query)
    assert after > before


def test_head_is_405_on_every_dicomweb_read_and_sends_no_body(
        web: EdgeServer, small_study: list[dicomgen.GeneratedInstance]) -> None:
    """aiohttp would run GET for HEAD (read, audit, stream a whole study): refused."""
    http = webpeer.session(web, "rad")
    one = small_study[0]
    study = f"{webpeer.base_url(web)}/dicom-web/studies/{one.study_uid}"
    for url in (_url(web, one), _url(web, one, "/metadata"), _url(web, one, "/frames/1"),
                _url(web, one, "/bulkdata/7FE00010"), f"{study}/metadata",
                f"{study}/series/{one.header.SeriesInstanceUID}/metadata",
                f"{study}/series", f"{webpeer.base_url(web)}/dicom-web/instances"):
        got = http.head(url, headers={"Accept": "*/*"})
        assert got.status_code == 405, url
        assert got.headers["Allow"] == "GET", url
        assert got.content == b""
    for url in (study, f"{webpeer.base_url(web)}/dicom-web/studies"):  # also STOW-RS
        assert http.head(url).headers["Allow"] == "GET,POST"
    assert http.get(_url(web, one, "/metadata")).status_code == 200


def test_series_metadata_of_an_instance_holding_nan_is_json_a_browser_parses(
        web: EdgeServer, tmp_path: Path) -> None:
    (sent,) = dicomgen.make_study(tmp_path / "nan", seed=95, series_per_study=1,
                                  instances_per_series=1)
    ds = pydicom.dcmread(sent.path)
    ds.add_new(0x00189087, "FD", float("nan"))  # Diffusion b-value
    ds.add_new(0x00201041, "DS", "1e400")  # SliceLocation: overflows a float
    ds.save_as(tmp_path / "nan.dcm", enforce_file_format=True)
    dcmtk.storescu(web.port, [tmp_path / "nan.dcm"]).check()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    url = f"{_url(web, sent).rsplit('/instances/', 1)[0]}/metadata"
    for address in (url, _url(web, sent, "/metadata"),
                   f"{webpeer.base_url(web)}/dicom-web/studies/{sent.study_uid}/metadata"):
        got = webpeer.session(web, "rad").get(address,
                                              headers={"Accept": "application/dicom+json"})
        assert got.status_code == 200
        (item,) = json.loads(got.text, parse_constant=refuse)
        assert item["00189087"] == {"vr": "FD"}
        assert item["00201041"] == {"vr": "DS"}
