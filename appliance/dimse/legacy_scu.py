"""The box as a Query/Retrieve SCU of a legacy PACS: what `pacs-edge migrate` sends.

One `LegacySession` is one association to the legacy PACS (Study Root C-FIND and
C-MOVE), kept open for many requests: a migration worker lists, counts and moves
study after study on it, so the association set-up is paid once per worker, not
once per study (docs/conformance.md, "SCU roles").

C-MOVE sends each study to the box's own AE title: the legacy PACS opens its own
association to `pacs-edge serve` and the instances take the ordinary C-STORE
ingest (durable, byte-exact, prior versions). So the peer needs a port, the
permissions find, move and store (store: its sub-operations are C-STOREs to the
box), and its own configuration must know the box as a move destination.

C-GET (`--via get`) receives the instances over the migration's association:
each C-STORE sub-operation is spooled by pynetdicom into the store's spool folder
(SpoolRouter) and ingested by the same IngestService before it is acknowledged.
The contexts are proposed per SOP class of the study, one transfer syntax each,
in `GET_SYNTAXES` order: a PACS that looks for a context in the syntax an instance
is stored in sends it unchanged. dcmqrscp does not: it takes the first context it
accepted for the SOP class and converts (tests/legacypacs.py says how the tests
configure it). The peer needs permissions find and get.

Every call blocks (pynetdicom); the migration service runs them in worker
threads. Failures raise LegacyPeerError with a MigrationFailure kind; messages
name the peer and the DICOM status, never a patient or a UID.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from appliance.base.config import DicomConfig
from appliance.base.errors import (
    LegacyPeerError,
    MigrationError,
    MigrationFailure,
    PacsEdgeError,
    RejectedInstance,
)
from appliance.dimse.dicom_status import PENDING_CODES, Status
from appliance.dimse.handlers import REJECTION_STATUS
from appliance.dimse.scu import rejected_for_good, requested_association
from appliance.dimse.spooling import SpoolRouter
from appliance.services.ingest import ExpectedIdentity, IngestResult, IngestService
from appliance.services.legacy_migration import FindResult, RetrieveOutcome, StudyAnswer
from appliance.services.legacy_statuses import PERMANENT_STORE_REFUSALS
from appliance.services.peers import Peer

log = logging.getLogger(__name__)

# What a session (and the probe of a legacy PACS that went away) proposes.
_SESSION_CONTEXTS = (Verification, StudyRootQueryRetrieveInformationModelFind,
                     StudyRootQueryRetrieveInformationModelMove)
MAX_CONTEXTS = 127  # presentation contexts an association can carry, less the C-GET one
# Uncompressed first, then the compressed syntaxes archives use most, then the rest
# pynetdicom knows: see the docstring.
GET_SYNTAXES = tuple(dict.fromkeys([
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless,
    JPEG2000Lossless, JPEG2000, *ALL_TRANSFER_SYNTAXES]))
# When the legacy PACS does not say a study's SOP classes (dcmqrscp answers no SOP Class
# UID at image level): the image classes of the usual modalities, 10 syntaxes each.
DEFAULT_GET_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.20",
    "1.2.840.10008.5.1.4.1.1.128",
)

# A C-STORE sub-operation of a C-GET: (event) -> status to answer.
StoreHandler = Callable[[Any], int]


class LegacyPeer:
    """The legacy PACS of a migration, seen from the box as an SCU."""

    def __init__(self, peer: Peer, config: DicomConfig, *,
                 tls_client: ssl.SSLContext | None = None,
                 on_store: StoreHandler | None = None) -> None:
        if peer.tls and tls_client is None:
            raise MigrationError(f"peer {peer.name!r} is marked TLS but this box has TLS off",
                                 hint="set [dicom] tls_port (pacs-edge config check)")
        self.peer = peer
        self.config = config
        self.tls_client = tls_client
        self.on_store = on_store

    @contextmanager
    def session(self) -> Iterator[LegacySession]:
        """One association for C-FIND and C-MOVE requests, released at the end."""
        with self._association(_SESSION_CONTEXTS) as assoc:
            yield LegacySession(self, assoc)

    def probe(self) -> None:
        """Open an association and release it: whether the legacy PACS takes associations
        now (LegacyPeerError, unreachable, when it does not). It proposes the session's
        contexts: a legacy PACS that serves Query/Retrieve but not Verification (C-ECHO)
        takes them, and one that takes none rejects it either way."""
        with self._association(_SESSION_CONTEXTS):
            pass

    def get_study(self, study_uid: str, sop_classes: Sequence[str]) -> RetrieveOutcome:
        """C-GET one study on its own association, whose storage contexts are those of
        its SOP classes; the `on_store` handler answers each C-STORE sub-operation."""
        if self.on_store is None:
            raise MigrationError("this legacy peer was set up for C-MOVE only")
        on_store = self.on_store
        classes = list(dict.fromkeys(sop_classes)) or list(DEFAULT_GET_CLASSES)
        per_class = max(1, min(len(GET_SYNTAXES), MAX_CONTEXTS // max(len(classes), 1)))
        if len(classes) > MAX_CONTEXTS:
            raise LegacyPeerError(MigrationFailure.RETRIEVE_FAILED,
                                  f"study has {len(classes)} SOP classes: more than one C-GET"
                                  " association can carry", hint="migrate it --via move")
        contexts: list[tuple[str, list[str]]] = [
            (sop, [str(ts)]) for sop in classes for ts in GET_SYNTAXES[:per_class]]
        roles = [build_role(sop, scp_role=True) for sop in classes]
        query = _identifier("STUDY", StudyInstanceUID=study_uid)
        refused_for_good = 0  # written by this association's thread only

        def counted(event: Any) -> int:
            nonlocal refused_for_good
            status = on_store(event)
            refused_for_good += status in PERMANENT_STORE_REFUSALS
            return status

        with self._association([StudyRootQueryRetrieveInformationModelGet], extra=contexts,
                               roles=roles,
                               handlers=[(evt.EVT_C_STORE, counted)]) as assoc:
            self.check_accepted(assoc, StudyRootQueryRetrieveInformationModelGet, "C-GET")
            outcome = self._retrieve(
                assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), "C-GET")
        return dataclasses.replace(outcome, refused_for_good=refused_for_good)

    def _association(self, requested: Sequence[Any], *,
                     extra: Sequence[tuple[str, list[str]]] = (),
                     roles: Sequence[Any] = (),
                     handlers: Sequence[tuple[Any, Any]] = ()) -> AbstractContextManager[Any]:
        return requested_association(
            self.config, self.peer, [*((context, None) for context in requested), *extra],
            tls_client=self.tls_client if self.peer.tls else None, refused=self._refused,
            roles=roles, handlers=handlers)

    def check_accepted(self, assoc: Any, sop_class: Any, service: str) -> None:
        """LegacyPeerError, for the whole run, when the legacy PACS accepted no context of
        `sop_class` on `assoc`: it does not serve `service` to this box (a C-GET-only
        archive asked for C-MOVE, say), so every study would fail alike; pynetdicom
        would raise ValueError at the request."""
        if any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            return
        # A run keeps its --via (resume takes no options): the other way is a new run.
        other = {"C-MOVE": "; or `pacs-edge migrate cancel`, then `migrate start --via get`",
                 "C-GET": "; or `pacs-edge migrate cancel`, then `migrate start --via move`"}
        raise LegacyPeerError(
            MigrationFailure.RETRIEVE_FAILED if service != "C-FIND"
            else MigrationFailure.QUERY_FAILED,
            f"legacy PACS {self.peer.name!r} accepted no Study Root {service} context:"
            f" it does not serve {service} to this box",
            hint=f"allow this box's AE title {self.config.ae_title!r} {service} on the legacy"
                 f" PACS{other.get(service, '')}", rejected_for_good=True)

    def _refused(self, assoc: Any, unreachable: str) -> LegacyPeerError:
        where = f"legacy PACS {self.peer.name!r} at {self.peer.host}:{self.peer.port}"
        box = self.config.ae_title
        if rejection := rejected_for_good(assoc):
            return LegacyPeerError(
                MigrationFailure.UNREACHABLE,
                f"{where} rejected the association for good ({rejection})",
                hint=f"on the legacy PACS, allow this box's AE title {box!r} (from this box's"
                     f" address) to call its AE title {self.peer.ae_title!r}, or correct that"
                     f" AE title (`pacs-edge peers remove {self.peer.name}`, then `peers add`)",
                rejected_for_good=True)
        why = (f"cannot be reached: {unreachable}" if unreachable
               else "rejected the association" if assoc.is_rejected
               else "did not answer or aborted the association")
        return LegacyPeerError(
            MigrationFailure.UNREACHABLE, f"{where} {why}",
            hint=f"check that it runs and knows this box's AE title {box!r} as a calling AE")

    def _retrieve(self, responses: Iterator[tuple[Dataset, Dataset | None]],
                  service: str) -> RetrieveOutcome:
        final: Dataset | None = None
        for status, _ in responses:
            if status is None or "Status" not in status:
                break
            if int(status.Status) not in PENDING_CODES:
                final = status
        if final is None:
            raise LegacyPeerError(
                MigrationFailure.UNREACHABLE,
                f"legacy PACS {self.peer.name!r} ended the {service} without a final status",
                hint="the association was aborted or timed out: see the legacy PACS's log")
        return RetrieveOutcome(int(final.Status),
                               int(final.get("NumberOfCompletedSuboperations", 0) or 0),
                               int(final.get("NumberOfFailedSuboperations", 0) or 0),
                               int(final.get("NumberOfWarningSuboperations", 0) or 0))


class LegacySession:
    """Requests on one open association to the legacy PACS."""

    def __init__(self, legacy: LegacyPeer, assoc: Any) -> None:
        self.legacy = legacy
        self.assoc = assoc
        self.name = legacy.peer.name

    @property
    def alive(self) -> bool:
        return bool(self.assoc.is_established)

    def find_studies(self, day: str, *, time_range: str = "", modality: str = "",
                     limit: int) -> FindResult:
        """Studies of `day` (YYYYMMDD), within `time_range` (HHMMSS-HHMMSS) and of
        `modality` when given. `limited` when `limit` answers came, or the peer ended
        the query with a failure after some answers (its way of saying "too many")."""
        answers, failed = self._find(_listing_query(day, time_range, modality))
        if failed is not None and not answers:
            raise LegacyPeerError(MigrationFailure.QUERY_FAILED,
                                  f"legacy PACS {self.name!r} answered a study C-FIND with"
                                  f" status 0x{failed:04X}", hint="see the legacy PACS's log",
                                  status=failed)
        studies = [StudyAnswer(str(a.get("StudyInstanceUID", "") or ""),
                               str(a.get("StudyTime", "") or ""),
                               _values(a.get("ModalitiesInStudy")),
                               _integer(a.get("NumberOfStudyRelatedInstances")))
                   for a in answers]
        return FindResult([s for s in studies if s.study_uid],
                          limited=failed is not None or len(answers) >= limit)

    def series_of(self, study_uid: str) -> list[tuple[str, int | None]]:
        """(modality, NumberOfSeriesRelatedInstances or None) of each series of the study."""
        query = _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="",
                            Modality="", NumberOfSeriesRelatedInstances="")
        return [(str(a.get("Modality", "") or "").strip().upper(),
                 _integer(a.get("NumberOfSeriesRelatedInstances")))
                for a in self._checked_find(query, "series")]

    def instances_of(self, study_uid: str) -> list[tuple[str, str]]:
        """(SOP Instance UID, SOP Class UID) of every instance of the study."""
        return [(str(a.get("SOPInstanceUID", "") or ""), str(a.get("SOPClassUID", "") or ""))
                for a in self._checked_find(_instances_query(study_uid), "image")]

    def move_study(self, study_uid: str, destination: str) -> RetrieveOutcome:
        self.legacy.check_accepted(self.assoc, StudyRootQueryRetrieveInformationModelMove,
                                   "C-MOVE")
        query = _identifier("STUDY", StudyInstanceUID=study_uid)
        return self.legacy._retrieve(self._sent(self.assoc.send_c_move(
            query, destination, StudyRootQueryRetrieveInformationModelMove)), "C-MOVE")

    def _sent(self, responses: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """A request's responses, the request sent (pynetdicom sends it at the first
        response asked for). pynetdicom raises RuntimeError for a request on an
        association no longer established (the peer, or [dicom] network_timeout of
        silence, closed it since it was last checked): the legacy PACS gone, no bug."""
        try:
            first = next(responses, (None, None))
        except RuntimeError as exc:
            if self.assoc.is_established:
                raise
            raise LegacyPeerError(
                MigrationFailure.UNREACHABLE,
                f"legacy PACS {self.name!r} closed the association before a request",
                hint="the association was aborted or timed out: see its log") from exc
        return itertools.chain([first], responses)

    def _checked_find(self, query: Dataset, level: str) -> list[Dataset]:
        answers, failed = self._find(query)
        if failed is not None:
            raise LegacyPeerError(MigrationFailure.QUERY_FAILED,
                                  f"legacy PACS {self.name!r} answered a {level} C-FIND with"
                                  f" status 0x{failed:04X}", hint="see the legacy PACS's log",
                                  status=failed)
        return answers

    def _find(self, query: Dataset) -> tuple[list[Dataset], int | None]:
        """Answers, and the final status when it was not Success."""
        self.legacy.check_accepted(self.assoc, StudyRootQueryRetrieveInformationModelFind,
                                   "C-FIND")
        answers: list[Dataset] = []
        for status, identifier in self._sent(self.assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind)):
            if status is None or "Status" not in status:
                raise LegacyPeerError(
                    MigrationFailure.UNREACHABLE,
                    f"legacy PACS {self.name!r} ended a C-FIND without a final status",
                    hint="the association was aborted or timed out: see its log")
            code = int(status.Status)
            if code in PENDING_CODES:
                if identifier is not None:
                    answers.append(identifier)
            elif code != Status.SUCCESS:
                return answers, code
        return answers, None


def listing_identifier(day: str) -> bytes:
    """The study-level query of a day's listing (the first the walk sends), encoded as
    sent (implicit VR little endian): the audit record's ParticipantObjectQuery."""
    return encode(_listing_query(day), True, True) or b""


def instances_identifier() -> bytes:
    """The image-level query `instances_of` sends for each study, with its Study Instance
    UID left empty: the audit record of a `migrate verify` (one for all its studies)."""
    return encode(_instances_query(""), True, True) or b""


def _listing_query(day: str, time_range: str = "", modality: str = "") -> Dataset:
    return _identifier("STUDY", StudyDate=day, StudyTime=time_range,
                       ModalitiesInStudy=modality, StudyInstanceUID="",
                       NumberOfStudyRelatedInstances="")


def _instances_query(study_uid: str) -> Dataset:
    return _identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID="",
                       SOPInstanceUID="", SOPClassUID="")


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _integer(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _values(value: Any) -> tuple[str, ...]:
    """A CS value of one or several items (pydicom: str or MultiValue) as sorted codes."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(sorted({str(v).strip().upper() for v in items if str(v).strip()}))


_ANY_ADDRESS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def box_listening(config: DicomConfig) -> Callable[[], bool] | None:
    """Whether this box's own DICOM port takes a TCP connection now: where a C-MOVE's
    sub-operations go (the TLS port when plain DICOM is off). None when that port is 0
    (serve picks one at start and was told it on its command line: this process cannot
    know it)."""
    port = config.port if config.plain_enabled else config.tls_port
    if not port:
        return None
    address = (_ANY_ADDRESS.get(config.host, config.host), port)

    def probe() -> bool:
        try:
            with socket.create_connection(address, timeout=config.connect_timeout):
                return True
        except OSError:
            return False

    return probe


class GetReceiver:
    """The C-STORE sub-operations of a migration's C-GETs: each spooled instance goes
    through the box's ingest (durable before the response), as a C-STORE to the server
    would; `on_stored` hears of each stored one (the audit)."""

    def __init__(self, spools: SpoolRouter, ingest: IngestService, *, source_ae: str,
                 on_stored: Callable[[IngestResult], None]) -> None:
        self.spools = spools
        self.ingest = ingest
        self.source_ae = source_ae
        self.on_stored = on_stored

    def __call__(self, event: Any) -> int:
        spool = self.spools.claim(event.dataset_path)
        if spool is None:  # came on a context not accepted for storage: already aborted
            return int(Status.REFUSED_NOT_AUTHORIZED)
        request = event.request
        expected = ExpectedIdentity(sop_class_uid=str(request.AffectedSOPClassUID),
                                    sop_uid=str(request.AffectedSOPInstanceUID))
        try:
            result = self.ingest.ingest_spool_blocking(spool, source_ae=self.source_ae,
                                                       expected=expected)
        except RejectedInstance as exc:
            log.warning("migrated instance refused reason=%s", exc.reason)
            return int(REJECTION_STATUS[exc.kind])
        except PacsEdgeError as exc:
            log.error("migrated instance not stored reason=%s", exc.message)
            return int(Status.PROCESSING_FAILURE)
        self.on_stored(result)
        return int(Status.SUCCESS)
