"""Prefetch against a remote archive that aborts the association mid-query.

The archive is a pynetdicom Query/Retrieve SCP in the test process, on
127.0.0.1 and a free port: it answers a patient's studies at STUDY level
without Modalities in Study (so the box asks their series), and aborts where
the test says. What the box must do: fail the request (or the prior) with a
reason that says what happened, retried later, no traceback and no patient
or UID in its log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import HOST
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.base.config import DicomConfig, PrefetchConfig
from appliance.base.errors import RemoteArchiveError
from appliance.dimse.remote_archive import RemoteArchive
from appliance.services.peers import Peer
from appliance.services.prefetch import PrefetchService
from appliance.store import database
from appliance.store import prefetch_rows as rows
from appliance.store.index import Index
from appliance.store.order_rows import PatientKey

PATIENT = PatientKey("ABORT-PAT-9", "HOSP")  # distinctive: the log must never hold it
STUDY_UID = "1.2.826.0.1.3680043.9.7777.1"
DEADLINE = 20.0


class AbortingArchive:
    """A Study Root C-FIND / C-MOVE SCP holding one study of PATIENT; `abort_on` names
    the request it aborts instead of answering: "SERIES" (its series C-FIND), "MOVE"
    (its C-MOVE) or "" (none). `associations` are the ones it accepted."""

    def __init__(self, abort_on: str = "") -> None:
        self.abort_on = abort_on
        self.associations: list[Any] = []
        self.ae = AE("ABORTING")
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        self.port = 0

    def __enter__(self) -> AbortingArchive:
        server = self.ae.start_server((HOST, 0), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._on_find), (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_ACCEPTED, lambda event: self.associations.append(event.assoc))])
        self.port = int(server.server_address[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.ae.shutdown()

    def peer(self) -> Peer:
        return Peer("archive", self.ae.ae_title, HOST, self.port, frozenset({"store"}))

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        level = str(event.identifier.QueryRetrieveLevel)
        if level == self.abort_on:
            event.assoc.abort()
            return
        answer = Dataset()
        answer.QueryRetrieveLevel = level
        answer.PatientID = PATIENT.patient_id
        answer.StudyInstanceUID = STUDY_UID
        if level == "STUDY":
            answer.StudyDate = (date.today() - timedelta(days=30)).strftime("%Y%m%d")
        else:
            answer.SeriesInstanceUID = STUDY_UID + ".1"
            answer.Modality = "CT"
        yield 0xFF00, answer

    def _on_move(self, event: Any) -> Iterator[Any]:
        if self.abort_on == "MOVE":
            event.assoc.abort()
            return
        yield None, None  # no such destination: 0xA801


def study_query(level: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level
    query.StudyInstanceUID = STUDY_UID if level == "SERIES" else ""
    query.PatientID = PATIENT.patient_id
    return query


async def planned(tmp_path: Path, archive: AbortingArchive,
                  ) -> tuple[Index, PrefetchService, rows.PrefetchRequest]:
    index = Index(tmp_path / "index.sqlite3")
    await index.open()
    service = PrefetchService(index, PrefetchConfig(modalities=["any"]),
                              archive=lambda: RemoteArchive(archive.peer(), DicomConfig()))
    request_id = await service.request_manual(PATIENT)
    [pending] = await database.run_sync(index.reader, rows.pending_requests)
    await service.plan(pending)
    request = await database.run_sync(index.reader, rows.request_by_id, request_id)
    assert request is not None
    return index, service, request


def assert_quiet_log(caplog: pytest.LogCaptureFixture) -> None:
    """No traceback, no patient and no UID in what the appliance logged."""
    records = [r for r in caplog.records if r.name.startswith(("appliance", "sync"))]
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    text = "\n".join(r.getMessage() for r in records)
    assert PATIENT.patient_id not in text and STUDY_UID not in text, text


async def test_an_archive_aborting_the_series_query_fails_the_request_saying_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The archive answers the study, then aborts the series C-FIND asked for its
    modalities: pynetdicom yields an empty status, which was read as the archive's
    answer 0xC000 ("answered the C-FIND with status 0xC000", a status it never sent).
    The request fails as remote_unreachable, saying the query ended without an answer,
    with its automatic retry set."""
    caplog.set_level(logging.INFO)
    with AbortingArchive(abort_on="SERIES") as archive:
        index, _, request = await planned(tmp_path, archive)
    try:
        assert (request.state, request.error_kind) == ("failed", "remote_unreachable")
        assert request.retry_at is not None
        assert "ended the C-FIND without a final status" in request.error, request.error
        assert "0xC000" not in request.error
    finally:
        await index.close()
    assert_quiet_log(caplog)


async def test_an_archive_aborting_the_move_fails_the_prior_saying_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A C-MOVE the archive aborts: pynetdicom's empty status was taken for a final
    0xC000 ("answered the C-MOVE with status 0xC000 (completed 0, failed 0)", with the
    hint to check the archive's move destinations). The prior fails as move_failed,
    saying the move ended without a final status, with its automatic retry set."""
    caplog.set_level(logging.INFO)
    with AbortingArchive(abort_on="MOVE") as archive:
        index, service, request = await planned(tmp_path, archive)
        try:
            assert request.state == "planned"
            assert await service.move_remote() == 1
            [prior] = await database.run_sync(index.reader, rows.priors_of, [request.id])
        finally:
            await index.close()
    assert (prior.state, prior.failure_kind) == ("failed", "move_failed")
    assert prior.retry_at is not None
    assert "ended the C-MOVE without a final status" in prior.error, prior.error
    assert_quiet_log(caplog)


def test_a_query_on_an_association_the_archive_aborted_is_unreachable_not_a_crash() -> None:
    """The archive aborts between the study C-FIND and the series one: pynetdicom raises
    RuntimeError for a request on an association no longer established, which crashed
    the choose pass: a traceback, the request left pending (asked again at the next pass,
    with no backoff) and the requests after it not chosen in that pass. Where the abort
    lands is a race on the wire; here the test aborts once the study C-FIND has ended,
    then asks the series."""
    with AbortingArchive() as server:
        archive = RemoteArchive(server.peer(), DicomConfig())
        with archive._association(StudyRootQueryRetrieveInformationModelFind) as assoc:
            assert [a.StudyInstanceUID for a in archive._find(assoc, study_query("STUDY"))] \
                == [STUDY_UID]
            [accepted] = server.associations
            accepted.abort()
            deadline = time.monotonic() + DEADLINE
            while assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not assoc.is_established
            with pytest.raises(RemoteArchiveError) as raised:
                archive._find(assoc, study_query("SERIES"))
    assert raised.value.kind.value == "remote_unreachable"
    assert "closed the association before the C-FIND" in raised.value.message
