"""Private SOP classes (`[dicom] extra_storage_classes`): a modality or a legacy PACS
sends objects of classes the standard does not list (Siemens' CSA Non-Image with every
MR study, vendors' 3D models, raw data). A box that stores only the standard storage
classes rejects their presentation contexts, so they are never stored, and a migration
from such a PACS ends with those studies incomplete. With their UIDs configured the box
stores them like any instance and gives them back byte-identical.

Real `pacs-edge serve`; pynetdicom as the modality and as the workstation (dcmtk's
storescu would need a configuration file to propose a class it does not know)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dicomgen
import pytest
from conftest import HOST, TEST_AE, EdgeServer, run_pacs_edge
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage


@pytest.fixture
def private_instance(tmp_path: Path) -> dicomgen.GeneratedInstance:
    """An MR study's companion object of the Siemens CSA Non-Image class."""
    like = dicomgen.make_study(tmp_path / "study", seed=91, series_per_study=1,
                               instances_per_series=1)[0]
    ds = dicomgen.read_header(like.path)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CSA_NON_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = dicomgen.make_uid(91, "csa")
    ds.SeriesInstanceUID = dicomgen.make_uid(91, "csa-series")
    ds.Modality, ds.SeriesNumber = "MR", 99
    ds.add_new(0x00291010, "OB", b"SV10" + bytes(range(60)))  # a private block's value
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    return dicomgen.write_instance(ds, tmp_path / "csa.dcm", ExplicitVRLittleEndian)


def store(server: EdgeServer, instance: dicomgen.GeneratedInstance) -> int | None:
    """C-STORE `instance` in its own syntax; the status, or None when the box accepted
    no context for its class."""
    ae = AE(ae_title=TEST_AE)
    ae.add_requested_context(Verification)  # an association either way
    ae.add_requested_context(instance.sop_class_uid, [instance.transfer_syntax])
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        if instance.sop_class_uid not in {cx.abstract_syntax for cx in assoc.accepted_contexts}:
            return None
        status = assoc.send_c_store(instance.path)
        return int(status.Status)
    finally:
        assoc.release()
        ae.shutdown()


def get_study(server: EdgeServer, study_uid: str, sop_class: str) -> list[bytes]:
    """C-GET the study with a storage context for `sop_class`: the datasets received."""
    received: list[bytes] = []

    def on_store(event: Any) -> int:
        received.append(event.request.DataSet.getvalue())
        return 0x0000

    ae = AE(ae_title=TEST_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title,
                         ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
        final = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))[-1]
        assert int(final[0].Status) == 0x0000, final
    finally:
        assoc.release()
        ae.shutdown()
    return received


def test_a_configured_private_class_is_stored_and_retrieved_byte_identical(
        edge_server_factory: Callable[..., EdgeServer],
        private_instance: dicomgen.GeneratedInstance) -> None:
    server = edge_server_factory(start=False)
    server.configure(dicom={"extra_storage_classes": [CSA_NON_IMAGE]})
    server.start()
    assert store(server, private_instance) == 0x0000
    back = get_study(server, private_instance.study_uid, CSA_NON_IMAGE)
    assert back == [dicomgen.dataset_bytes(private_instance.path)]


def test_a_private_class_not_configured_is_refused_at_negotiation(
        edge_server_factory: Callable[..., EdgeServer],
        private_instance: dicomgen.GeneratedInstance) -> None:
    server = edge_server_factory()
    assert store(server, private_instance) is None


def test_a_service_class_listed_as_a_storage_class_stops_serve_saying_so(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(start=False)
    server.configure(dicom={"extra_storage_classes": [str(Verification)]})
    started = run_pacs_edge("serve", "--home", str(server.home), "--dicom-port", "0",
                            check=False, timeout=60)
    assert started.returncode != 0
    assert "a service of this box, not a storage class" in started.stderr, started.stderr


def test_config_check_refuses_a_service_class_listed_as_a_storage_class(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """What stops serve stops `config check` too, whole or on the file alone (the Ansible
    role's validate step): it passed such a config, and the restart left the box down."""
    server = edge_server_factory(start=False)
    config = server.home / "pacs-edge.toml"
    server.configure(dicom={"extra_storage_classes": [str(Verification)]})
    whole = server.cli("config", "check", check=False)
    alone = run_pacs_edge("config", "check", "--config-file", str(config), "--home",
                          str(server.home), check=False)
    for checked in (whole, alone):
        assert checked.returncode == 2, checked.stdout + checked.stderr
        assert ("extra_storage_classes lists 1.2.840.10008.1.1, a service of this box"
                in checked.stdout + checked.stderr)
