"""A pynetdicom C-GET client that keeps what arrives: the byte-exactness checks of the
randomized tiering test and of the power-loss tests."""

from __future__ import annotations

from collections.abc import Sequence

from conftest import EDGE_AE, HOST, TEST_AE
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]


def c_get_studies(port: int, study_uids: Sequence[str], storage: set[tuple[str, str]]
                  ) -> tuple[dict[str, list[bytes]], list[int | None]]:
    """C-GET each study on one association, proposing each (SOP class, transfer syntax) of
    `storage` with the SCP role: the dataset bytes of every arrival by SOP Instance UID,
    and each C-GET's final status (None when none came)."""
    arrived: dict[str, list[bytes]] = {}

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        arrived.setdefault(uid, []).append(event.encoded_dataset(include_meta=False))
        return 0x0000

    ae = AE(TEST_AE)
    ae.dimse_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class, syntax in sorted(storage):
        ae.add_requested_context(sop_class, [syntax])
    roles = [build_role(sop_class, scp_role=True) for sop_class in {s for s, _ in storage}]
    assoc = ae.associate(HOST, port, ae_title=EDGE_AE, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    finals: list[int | None] = []
    try:
        for study_uid in study_uids:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = study_uid
            final = None
            for status, _ in assoc.send_c_get(identifier,
                                              StudyRootQueryRetrieveInformationModelGet):
                final = status
            finals.append(int(final.Status) if final is not None and "Status" in final
                          else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return arrived, finals
