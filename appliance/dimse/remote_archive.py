"""The remote archive a prefetch asks for priors the box does not hold: C-FIND, then C-MOVE.

`[prefetch] remote_archive` names a peer of the allowlist (an older PACS, a
regional archive). For a patient, the box asks it at STUDY level of the Study
Root model for every study of the Patient ID, and, for the studies whose
answer has no Modalities in Study (dcmqrscp and many older archives do not
keep it), at SERIES level for their modalities and body parts, which the
rules need. A prior it chooses is moved with a C-MOVE whose destination is
the box's own AE title: the archive sends the instances to the box like any
modality, through the same ingest (durable before each acknowledgement), so
when the C-MOVE's final response arrives, every instance it counts as
completed is in the index.

The peer needs a port (where it listens) and permission `store` (its
sub-operations are C-STOREs to the box); its own configuration must know the
box's AE title, host and port as a move destination.

Issuer of Patient ID: the C-FIND sends the issuer as a return key only; an
archive that answers an issuer other than the request's is not the same
patient and its studies are dropped; an answer without an issuer is kept
(older archives hold one issuer and do not record it).

Every call is blocking (pynetdicom): the prefetch service runs them in a
thread. Failures raise RemoteArchiveError with a PrefetchFailure kind; the
messages name the peer and the status, never a patient or a UID.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.base.config import Config, DicomConfig
from appliance.base.errors import PrefetchFailure, RemoteArchiveError
from appliance.dimse.dicom_status import PENDING_CODES, Status
from appliance.dimse.scu import rejected_for_good, requested_association
from appliance.dimse.tls import client_context
from appliance.services.peers import Allowlist, Peer
from appliance.services.prefetch import ArchiveFactory, MoveOutcome
from appliance.services.prefetch_rules import Candidate
from appliance.store.order_rows import PatientKey
from appliance.store.prefetch_rows import Source
from provisioning.certs import TlsPaths

log = logging.getLogger(__name__)



class RemoteArchive:
    """One remote archive peer, seen from the box as a C-FIND / C-MOVE SCU."""

    def __init__(self, peer: Peer, config: DicomConfig, *,
                 tls_client: ssl.SSLContext | None = None) -> None:
        self.peer = peer
        self.config = config
        self.tls_client = tls_client

    @property
    def ae_title(self) -> str:
        return self.peer.ae_title

    @property
    def host(self) -> str:
        return self.peer.host

    @classmethod
    def from_allowlist(cls, name: str, allowlist: Allowlist, config: DicomConfig, *,
                       tls_client: ssl.SSLContext | None = None) -> RemoteArchive:
        """The peer named `name`; RemoteArchiveError (NO_REMOTE_ARCHIVE) when it cannot
        serve as one."""
        peer = allowlist.peers().get(name)
        if peer is None or not peer.port:
            raise RemoteArchiveError(
                PrefetchFailure.NO_REMOTE_ARCHIVE,
                f"remote archive {name!r} is not a peer with a port",
                hint=f"pacs-edge peers add {name} --ae-title AE --host HOST --port PORT"
                     " --allow store (or fix [prefetch] remote_archive)")
        if not peer.may("store"):
            raise RemoteArchiveError(
                PrefetchFailure.NO_REMOTE_ARCHIVE,
                f"remote archive {name!r} may not store to this box: its C-MOVE would fail",
                hint=f"give peer {name} permission store (pacs-edge peers add ... --allow store)")
        return cls(peer, config, tls_client=tls_client)

    # --- C-FIND -----------------------------------------------------------------------

    def find_priors(self, patient: PatientKey) -> list[Candidate]:
        """Every study the archive holds for the patient, as prior candidates."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient.patient_id
        query.IssuerOfPatientID = ""
        for keyword in ("StudyInstanceUID", "StudyDate", "StudyDescription",
                        "ModalitiesInStudy"):
            setattr(query, keyword, "")
        with self._association(StudyRootQueryRetrieveInformationModelFind) as assoc:
            answers = self._find(assoc, query)
            found = []
            wildcard = any(c in patient.patient_id for c in "*?")
            for answer in answers:
                issuer = str(answer.get("IssuerOfPatientID", "") or "")
                uid = str(answer.get("StudyInstanceUID", "") or "")
                if not uid or (issuer and issuer != patient.issuer):
                    continue
                # The ID is a matching key, in which * and ? are wildcards: an ID holding
                # them matched other patients' studies, which were fetched as priors.
                answered = str(answer.get("PatientID", "") or "").strip()
                if answered != patient.patient_id and (answered or wildcard):
                    continue
                modalities = _values(answer.get("ModalitiesInStudy"))
                parts: tuple[str, ...] = ()
                if not modalities:
                    modalities, parts = self._series_of(assoc, uid)
                found.append(Candidate(uid, str(answer.get("StudyDate", "") or ""), modalities,
                                       parts, str(answer.get("StudyDescription", "") or ""),
                                       Source.REMOTE))
        log.info("remote archive answered peer=%s studies=%d", self.peer.name, len(found))
        return found

    def _series_of(self, assoc: Any, study_uid: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        query.BodyPartExamined = ""
        modalities, parts = set(), set()
        for answer in self._find(assoc, query):
            modalities.update(_values(answer.get("Modality")))
            parts.update(_values(answer.get("BodyPartExamined")))
        return tuple(sorted(modalities)), tuple(sorted(parts))

    def _find(self, assoc: Any, query: Dataset) -> list[Dataset]:
        answers = []
        for status, identifier in self._sent(
                assoc, "C-FIND", PrefetchFailure.REMOTE_UNREACHABLE,
                lambda: assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)):
            code = _status(status)
            if code is None:
                raise self._no_final("C-FIND", PrefetchFailure.REMOTE_UNREACHABLE)
            if code in PENDING_CODES:
                if identifier is not None:
                    answers.append(identifier)
            elif code != Status.SUCCESS:
                raise RemoteArchiveError(
                    PrefetchFailure.REMOTE_UNREACHABLE,
                    f"remote archive {self.peer.name!r} answered the C-FIND with status"
                    f" {_hex(code)}", hint="check the archive's log")
        return answers

    # --- C-MOVE -----------------------------------------------------------------------

    def move_study(self, study_uid: str) -> MoveOutcome:
        """Ask the archive to send one study to this box; the final counts."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        final: Dataset | None = None
        code = None
        with self._association(StudyRootQueryRetrieveInformationModelMove) as assoc:
            for status, _ in self._sent(
                    assoc, "C-MOVE", PrefetchFailure.MOVE_FAILED,
                    lambda: assoc.send_c_move(query, self.config.ae_title,
                                              StudyRootQueryRetrieveInformationModelMove)):
                code = _status(status)
                if code is None:
                    break
                if code not in PENDING_CODES:
                    final = status
        if final is None or code is None:
            raise self._no_final("C-MOVE", PrefetchFailure.MOVE_FAILED)
        outcome = MoveOutcome(
            status=code, completed=int(final.get("NumberOfCompletedSuboperations", 0) or 0),
            failed=int(final.get("NumberOfFailedSuboperations", 0) or 0),
            warning=int(final.get("NumberOfWarningSuboperations", 0) or 0))
        log.info("remote archive moved peer=%s status=%s completed=%d failed=%d warning=%d",
                 self.peer.name, _hex(code), outcome.completed, outcome.failed,
                 outcome.warning)
        if code not in (Status.SUCCESS, Status.SUBOPERATIONS_COMPLETE_WITH_FAILURES):
            raise RemoteArchiveError(
                PrefetchFailure.MOVE_FAILED,
                f"remote archive {self.peer.name!r} answered the C-MOVE with status"
                f" {_hex(code)} (completed {outcome.completed}, failed {outcome.failed})",
                hint="the archive must know this box's AE title, host and port as a move"
                     " destination")
        return outcome

    # --- association ------------------------------------------------------------------

    def _sent(self, assoc: Any, service: str, kind: PrefetchFailure,
              send: Callable[[], Iterator[tuple[Dataset, Dataset | None]]],
              ) -> Iterator[tuple[Dataset, Dataset | None]]:
        """A request's responses (pynetdicom sends it when `send` is called). pynetdicom
        raises RuntimeError for a request on an association no longer established: the
        archive aborted or closed it since its last response (between the study C-FIND
        and a series one), which is the archive gone, not a bug."""
        try:
            return send()
        except RuntimeError as exc:
            if assoc.is_established:
                raise
            raise RemoteArchiveError(
                kind, f"remote archive {self.peer.name!r} closed the association before the"
                f" {service}", hint="the association was aborted or timed out; see the"
                " archive's log") from exc

    def _no_final(self, service: str, kind: PrefetchFailure) -> RemoteArchiveError:
        """pynetdicom's empty status: the association was aborted, the response did not
        come within [dicom] dimse_timeout or could not be read; no status of the archive's."""
        return RemoteArchiveError(
            kind, f"remote archive {self.peer.name!r} ended the {service} without a final"
            " status", hint="the association was aborted or timed out; see the archive's log")

    def _association(self, context: Any) -> AbstractContextManager[Any]:
        if self.peer.tls and self.tls_client is None:
            raise RemoteArchiveError(
                PrefetchFailure.NO_REMOTE_ARCHIVE,
                f"remote archive {self.peer.name!r} is marked TLS but this box has TLS off",
                hint="set [dicom] tls_port")
        return requested_association(
            self.config, self.peer, [(context, None)],
            tls_client=self.tls_client if self.peer.tls else None, refused=self._refused)

    def _refused(self, assoc: Any, unreachable: str) -> RemoteArchiveError:
        rejection = rejected_for_good(assoc)
        why = (f"cannot be reached: {unreachable}" if unreachable
               else f"rejected the association for good ({rejection})" if rejection
               else "refused or did not answer the association")
        return RemoteArchiveError(
            PrefetchFailure.REMOTE_UNREACHABLE,
            f"remote archive {self.peer.name!r} at {self.peer.host}:{self.peer.port} {why}",
            hint="check that it runs and knows this box's AE title")


def configured_archive(config: Config, allowlist: Allowlist) -> ArchiveFactory:
    """The `[prefetch] remote_archive` peer, looked up at each use (peers change live);
    None when none is configured."""
    name = config.prefetch.remote_archive
    if not name:
        return None

    def archive() -> RemoteArchive:
        tls = None
        if config.dicom.tls_port:
            paths = TlsPaths(config.home)
            tls = client_context(cert=paths.node_cert, key=paths.node_key, ca=paths.ca_cert)
        return RemoteArchive.from_allowlist(name, allowlist, config.dicom, tls_client=tls)

    return archive


def _status(status: Dataset | None) -> int | None:
    """The response's status; None for pynetdicom's empty one (see _no_final)."""
    return int(status.Status) if status is not None and "Status" in status else None


def _hex(code: int) -> str:
    return f"0x{code:04X}"


def _values(value: Any) -> tuple[str, ...]:
    """A CS value of one or several items (pydicom: str or MultiValue) as sorted codes."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(sorted({str(v).strip().upper() for v in items if str(v).strip()}))
