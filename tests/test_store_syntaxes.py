"""Every transfer syntax a modality may offer is stored as received, byte for byte."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
from conftest import EdgeServer
from pynetdicom import AE


def stored_rows(home: Path) -> dict[str, tuple[str, str]]:
    """sop_uid -> (path, transfer_syntax) from the server's index."""
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT sop_uid, path, transfer_syntax FROM instances").fetchall()
    finally:
        db.close()
    return {sop: (path, ts) for sop, path, ts in rows}


def assert_stored_as_sent(server: EdgeServer, instances: list[dicomgen.GeneratedInstance]) -> None:
    rows = stored_rows(server.home)
    for inst in instances:
        path, ts = rows[inst.sop_instance_uid]
        assert ts == inst.transfer_syntax
        stored = server.home / "store" / path
        assert dicomgen.dataset_bytes(stored) == dicomgen.dataset_bytes(inst.path), ts
        assert str(pydicom.dcmread(stored, stop_before_pixels=True)
                   .file_meta.TransferSyntaxUID) == ts


def test_storescu_stores_every_syntax_dcmtk_can_send_byte_exact(
    edge_server: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance]
) -> None:
    sendable = [i for ts, i in syntax_set.items() if ts not in dcmtk.HTJ2K_SYNTAXES]
    result = dcmtk.storescu(edge_server.port, [i.path for i in sendable]).check()
    assert result.store_responses() == ["Success"] * len(sendable)
    assert_stored_as_sent(edge_server, sendable)


def test_pynetdicom_stores_htj2k_as_received(
    edge_server: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance]
) -> None:
    htj2k = [i for ts, i in syntax_set.items() if ts in dcmtk.HTJ2K_SYNTAXES]
    assert htj2k
    ae = AE(ae_title=dcmtk.TEST_AE)
    for inst in htj2k:
        ae.add_requested_context(inst.sop_class_uid, inst.transfer_syntax)
    assoc = ae.associate(edge_server.host, edge_server.port, ae_title=edge_server.ae_title)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(i.path)).Status for i in htj2k]
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(htj2k)
    assert_stored_as_sent(edge_server, htj2k)


def test_sixteen_concurrent_associations_all_store(
    edge_server: EdgeServer, tmp_path: Path
) -> None:
    instances = dicomgen.make_studies(tmp_path / "many", seed=21, patients=16,
                                      series_per_study=1, instances_per_series=4, size=32)
    by_patient = dicomgen.group_by(instances, "PatientID")
    assert len(by_patient) == 16
    results: dict[str, list[int]] = {}
    barrier = threading.Barrier(16, timeout=60)

    def sender(patient: str, batch: list[dicomgen.GeneratedInstance]) -> None:
        ae = AE(ae_title=dcmtk.TEST_AE)
        ae.add_requested_context(batch[0].sop_class_uid, batch[0].transfer_syntax)
        assoc = ae.associate(edge_server.host, edge_server.port, ae_title=edge_server.ae_title)
        try:
            barrier.wait()  # all 16 associations are open at the same time
            results[patient] = [int(assoc.send_c_store(pydicom.dcmread(i.path)).Status)
                                for i in batch]
        finally:
            assoc.release()

    threads = [threading.Thread(target=sender, args=item) for item in by_patient.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(statuses == [0x0000] * 4 for statuses in results.values()), results
    assert len(results) == 16
    assert len(stored_rows(edge_server.home)) == len(instances)
