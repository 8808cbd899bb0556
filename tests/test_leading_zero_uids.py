"""UIDs with a leading zero in a component are stored and answer on every path.

PS3.5 9.1 forbids "1.2.03", but real modalities and archives have written such UIDs
for decades, and dcmtk, Orthanc and dcm4chee store them. The box refused them with
0xC000 Cannot Understand, which a modality takes for a permanent failure: the study
never arrived. A leading zero is harmless in a path, so it is accepted now
(appliance/base/uids.py) and the UID is kept exactly as sent: stored by dcmtk's
storescu, found by findscu, sent by C-MOVE to a storescp and by C-GET, served by
QIDO-RS and WADO-RS, and given back byte-exact after replicate, evict and recall.
"""

from __future__ import annotations

from pathlib import Path

import dcmtk
import dicomgen
import pytest
import webpeer
from cget import c_get_studies
from conftest import EdgeServer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from syncagent import evict, sync_once, tier_state

# pydicom (in dcmtk's and dicomweb-client's answers) warns about each such UID it reads.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# A GE-style UID: "0969" is a component with a leading zero; so is the last one.
STUDY = "1.2.840.113619.2.55.3.604688119.0969.1700000000.101"
SERIES = "1.2.840.113619.2.55.3.604688119.0969.1700000000.102"
SOPS = ["1.2.840.113619.2.55.3.604688119.0969.1700000000.103.01",
        "1.2.840.113619.2.55.3.604688119.0969.1700000000.103.2"]


def write(folder: Path, sop_uid: str, number: int) -> Path:
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop_uid, STUDY, SERIES
    ds.PatientName, ds.PatientID, ds.Modality = "ZERO^LEADING", "LZ1", "OT"
    ds.InstanceNumber = number
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_leading_zero_uids_are_stored_and_retrieved_on_every_path(
        tmp_path: Path, storescp: dcmtk.StoreSCP) -> None:
    sent = {sop: write(tmp_path, sop, n) for n, sop in enumerate(SOPS, start=1)}
    expected = {sop: dicomgen.dataset_bytes(path) for sop, path in sent.items()}
    with webpeer.running_web_server(tmp_path) as server:
        dcmtk.storescu(server.port, list(sent.values())).check()
        found = dcmtk.findscu(server.port, {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES,
                                            "SOPInstanceUID": ""}, level="IMAGE").check()
        assert sorted(found.values("SOPInstanceUID")) == sorted(SOPS)

        server.add_peer("storescp", storescp.ae_title, storescp.port, allow="store")
        dcmtk.movescu(server.port, {"StudyInstanceUID": STUDY}, storescp.ae_title).check()
        moved = {str(dicomgen.read_header(p).SOPInstanceUID): dicomgen.dataset_bytes(p)
                 for p in storescp.files()}
        assert moved == expected

        client = webpeer.dicomweb(server, "rad")
        [study] = client.search_for_studies(search_filters={"StudyInstanceUID": STUDY})
        assert study["0020000D"]["Value"] == [STUDY]
        wado = client.retrieve_instance(STUDY, SERIES, SOPS[0])
        assert wado.SOPInstanceUID == SOPS[0]

        assert_c_get(server, expected)
        sync_once(server.home)
        evict(server.home, STUDY)
        assert tier_state(server, STUDY) == "evicted"
        server.cli("recall", STUDY)
        assert_c_get(server, expected)


def assert_c_get(server: EdgeServer, expected: dict[str, bytes]) -> None:
    arrived, finals = c_get_studies(server.port, [STUDY],
                                    {(SECONDARY_CAPTURE, ExplicitVRLittleEndian)})
    assert finals == [0x0000]
    assert arrived == {sop: [data] for sop, data in expected.items()}
