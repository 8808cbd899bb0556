"""A dataset whose Specific Character Set does not match its bytes, or is missing.

Real writers send Latin-1 names under ISO_IR 192, or no (0008,0005) at all, or a
broken ISO 2022 escape. The box stores each byte-exact (WADO-RS gives the sent
bytes back) and answers C-FIND (dcmtk findscu), QIDO-RS and WADO-RS metadata
(dicomweb-client) without an error. Bytes the declared set cannot read are read
as Latin-1 (appliance/services/dicom_json.latin1_fallback), the same in the index
and in the metadata: "Weiß^Jörg" matches `Weiß*`, where it was "Wei\\ufffd^J\\ufffdrg"
and matched nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import dcmtk
import dicomgen
import pynetdicom
import pytest
import webpeer
from conftest import HOST, TEST_AE, EdgeServer
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

NAMES = {  # seed: (bytes of Patient's Name, Specific Character Set, what is answered)
    1: ("Weiß^Jörg".encode("latin-1"), "ISO_IR 192", "Weiß^Jörg"),
    2: ("Øre^Åse".encode("latin-1"), None, "Øre^Åse"),
    3: (b"Broken^\x1b$B;3ED\x1b", "\\ISO 2022 IR 87", None),  # no Latin-1: pydicom's reading
}
ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[EdgeServer, dict[int, dicomgen.GeneratedInstance]]]:
    folder = tmp_path_factory.mktemp("mislabelled")
    sent = {seed: dicomgen.make_mislabelled_instance(folder / str(seed), name,
                                                     charset=charset, seed=220 + seed)
            for seed, (name, charset, _) in NAMES.items()}
    with webpeer.running_web_server(folder) as server:
        dcmtk.storescu(server.port, [i.path for i in sent.values()]).check()
        yield server, sent


def test_mislabelled_names_are_stored_byte_exact_and_read_as_latin1_everywhere(
        box: tuple[EdgeServer, dict[int, dicomgen.GeneratedInstance]]) -> None:
    server, sent = box
    client = webpeer.dicomweb(server, "rad")
    for seed, (_, _, answered) in NAMES.items():
        instance = sent[seed]
        study = client.search_for_studies(search_filters={"StudyInstanceUID": instance.study_uid})
        [metadata] = client.retrieve_study_metadata(instance.study_uid)
        names = {study[0]["00100010"]["Value"][0]["Alphabetic"],
                 metadata["00100010"]["Value"][0]["Alphabetic"]}
        assert len(names) == 1, seed  # the index and the file read alike
        if answered is not None:
            assert names == {answered}
        retrieved = webpeer.session(server, "rad").get(
            f"{webpeer.base_url(server)}/dicom-web/studies/{instance.study_uid}",
            headers={"Accept": ANY}, timeout=60)
        assert retrieved.status_code == 200
        assert dicomgen.dataset_bytes(instance.path) in retrieved.content


def test_a_mislabelled_name_matches_a_query_in_any_character_set(
        box: tuple[EdgeServer, dict[int, dicomgen.GeneratedInstance]]) -> None:
    """findscu asks in UTF-8, pynetdicom in Latin-1: both find it, case-insensitively."""
    server, sent = box
    found = dcmtk.findscu(server.port, {"SpecificCharacterSet": "ISO_IR 192",
                                        "PatientName": "weiß*", "StudyInstanceUID": ""})
    assert found.check().values("StudyInstanceUID") == [sent[1].study_uid]
    assert found.values("PatientName") == ["Weiß^Jörg"]
    ae = AE(TEST_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 100"
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "WEIß*"
    query.StudyInstanceUID = ""
    latin = [ident for status, ident in assoc.send_c_find(
        query, StudyRootQueryRetrieveInformationModelFind) if status.Status == 0xFF00]
    assoc.release()
    assert [(str(i.PatientName), i.StudyInstanceUID) for i in latin] == [
        ("Weiß^Jörg", sent[1].study_uid)]
    everything = dcmtk.findscu(server.port, {"PatientName": "*", "StudyInstanceUID": ""})
    assert len(everything.check().responses) == len(NAMES)


def test_a_query_in_latin1_bytes_labelled_iso_ir_192_finds_the_study_stored_so(
        box: tuple[EdgeServer, dict[int, dicomgen.GeneratedInstance]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A modality that writes Latin-1 under ISO_IR 192 queries that way too: its query
    was read with U+FFFD for each such byte and matched nothing, while the stored name
    is indexed as Latin-1; both sides read it alike now. pydicom's remark on the bytes
    (a log line and a raw UserWarning on stderr) is one count line."""
    server, sent = box
    before = server.log()
    query = b"".join(struct.pack("<HHI", group, number, len(value)) + value
                     for group, number, value in (
                         (0x0008, 0x0005, b"ISO_IR 192"), (0x0008, 0x0052, b"STUDY "),
                         (0x0010, 0x0010, "Weiß*".encode("latin-1") + b" "),
                         (0x0020, 0x000D, b"")))
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *_: query)
    ae = AE(TEST_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ImplicitVRLittleEndian)
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    stand_in = Dataset()  # what pynetdicom is given; `query` is what it sends
    stand_in.QueryRetrieveLevel = "STUDY"
    try:
        found = [ident.StudyInstanceUID for status, ident in assoc.send_c_find(
            stand_in, StudyRootQueryRetrieveInformationModelFind) if status.Status == 0xFF00]
    finally:
        assoc.release()
    assert found == [sent[1].study_uid]
    logged = server.log()[len(before):]
    assert "UserWarning" not in logged and "Failed to decode" not in logged
