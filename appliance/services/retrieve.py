"""Retrieve decisions (C-MOVE, C-GET): who may retrieve, to where, and which instances.

This is the service half of retrieve; the wire half is appliance/dimse/move_get.py,
which decodes the request, sends the files and reports counts. Here:

- `plan()` answers "may this peer do this, and what exactly is to be sent?":
  the calling AE must hold the permission (`move` or `get`: decided by
  `Allowlist.authorize`, which raises NotAuthorized), a C-MOVE
  destination must be a known peer (the allowlist is also the address book:
  the box never sends to an AE it was not told about), and the identifier
  is mapped to index rows by hierarchical retrieve rules (PS3.4 C.4.2.2.1):
  the unique key of the requested level is required (a UID list is fine),
  unique keys of the levels above narrow the match when present.
- Matched instances whose study is not on local disk (evicted or being
  recalled) name their study in `recall_studies`: `await_studies()` asks the
  sync agent for them (a row in `recall_requests`, see sync/recall.py) and
  waits, while the wire side sends Pending responses; the caller then plans
  again. The appliance never talks to the cloud itself: cloud credentials
  stay in the sync agent's process. Instances still not on disk after that
  (recall failed or timed out, or a file is gone) are `unavailable` and the
  wire side counts them as failed sub-operations.
- A planned file may be gone when it is read: the eviction commits, then
  deletes, and either may come between the plan and the read. The wire side
  sends the rest, then asks `replan_gone()`: a study evicted meanwhile is
  named in `recall_studies` as above (recalled, waited for within the same
  bound, then sent); a file missing from a study still on local disk is a
  damaged store, `unavailable` (failed), for fsck.
- `record_access()` stamps the studies' last access time as a retrieve
  starts, which eviction uses to pick the least recently used studies.

A request that cannot be served at all raises NotAuthorized or RetrieveRefused
(appliance.base.errors); the latter's `kind` says why in domain terms and the
edge maps that to a DICOM status.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from appliance.base.errors import RetrieveRefusal, RetrieveRefused
from appliance.base.uids import is_valid_uid, normalise_uid
from appliance.services.peers import Allowlist, Peer
from appliance.store import recall_requests
from appliance.store.files import FileStore
from appliance.store.index import Index, InstanceLocation

log = logging.getLogger(__name__)

# Tiering states whose files are not (completely) on local disk.
NOT_LOCAL_STATES = frozenset({"evicted", "recalling"})
RECALL_POLL_SECONDS = 0.2
# Number Of ... Sub-operations are US (PS3.7 E.1): a retrieve cannot report more.
MAX_SUBOPERATIONS = 65535


class RetrieveModel(enum.Enum):
    PATIENT_ROOT = "patient root"
    STUDY_ROOT = "study root"


class Action(enum.Enum):
    MOVE = "move"
    GET = "get"


@dataclass(frozen=True)
class RetrieveKeys:
    """The UID/ID lists a retrieve identifier selects on (empty: not constrained)."""

    patient_ids: tuple[str, ...] = ()
    issuer: str = ""  # Issuer of Patient ID, with a PatientID of the Patient Root model
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Instance:
    """One sub-operation: the stored file and what a C-STORE needs to announce it."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    path: Path


@dataclass(frozen=True)
class RecallWait:
    done: bool  # every requested study is back on local disk
    errors: tuple[str, ...]  # why recalls failed (PHI-free)


@dataclass(frozen=True)
class Plan:
    requester: Peer
    destination: Peer | None  # C-MOVE only
    instances: tuple[Instance, ...]  # to send, in study/series/instance order
    unavailable: tuple[Instance, ...]  # matched but not on local disk: failed sub-operations
    recall_studies: tuple[str, ...] = ()  # evicted studies a recall would make available

    @property
    def total(self) -> int:
        return len(self.instances) + len(self.unavailable)


# Query/Retrieve levels each model allows, with the key each level requires.
_LEVEL_KEYS = {
    RetrieveModel.PATIENT_ROOT: {
        "PATIENT": "PatientID",
        "STUDY": "StudyInstanceUID",
        "SERIES": "SeriesInstanceUID",
        "IMAGE": "SOPInstanceUID",
    },
    RetrieveModel.STUDY_ROOT: {
        "STUDY": "StudyInstanceUID",
        "SERIES": "SeriesInstanceUID",
        "IMAGE": "SOPInstanceUID",
    },
}
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def parse_identifier(model: RetrieveModel, identifier: Dataset) -> RetrieveKeys:
    """Map a C-MOVE/C-GET identifier to index keys (hierarchical retrieve, PS3.4 C.4.2.2.1)."""
    levels = _LEVEL_KEYS[model]
    level = _single(identifier, "QueryRetrieveLevel").upper()
    if level not in levels:
        raise RetrieveRefused(
            RetrieveRefusal.INVALID_IDENTIFIER,
            f"query/retrieve level {level or '(missing)'!r} is not one of {', '.join(levels)} "
            f"in the {model.value} model",
        )
    required = levels[level]
    values: dict[str, tuple[str, ...]] = {}
    # The requested level and every level above it; keys below the level are ignored.
    for keyword in list(levels.values())[: list(levels).index(level) + 1]:
        found = _values(identifier, keyword)
        if keyword != required and len(found) > 1:
            raise RetrieveRefused(RetrieveRefusal.INVALID_IDENTIFIER,
                                  f"{keyword} above the retrieve level must be a single value")
        if keyword in _UID_KEYS and not all(is_valid_uid(v) for v in found):
            raise RetrieveRefused(RetrieveRefusal.INVALID_IDENTIFIER,
                                  f"{keyword} is not a valid UID")
        values[keyword] = found
    if not values[required]:
        raise RetrieveRefused(RetrieveRefusal.INVALID_IDENTIFIER,
                              f"{required} is required at the {level} level")
    # A patient is a Patient ID and its issuer (C-FIND answers two patients sharing an ID
    # under two issuers apart): a workstation moving the one it was answered must not be
    # sent the other's images too.
    issuers = _values(identifier, "IssuerOfPatientID") if "PatientID" in values else ()
    if len(issuers) > 1:
        raise RetrieveRefused(RetrieveRefusal.INVALID_IDENTIFIER,
                              "IssuerOfPatientID must be a single value")
    return RetrieveKeys(
        patient_ids=values.get("PatientID", ()),
        issuer=issuers[0] if issuers else "",
        study_uids=values.get("StudyInstanceUID", ()),
        series_uids=values.get("SeriesInstanceUID", ()),
        sop_uids=values.get("SOPInstanceUID", ()),
    )


class RetrieveService:
    def __init__(self, allowlist: Allowlist, index: Index, files: FileStore, *,
                 recall_timeout: float = 600.0) -> None:
        self.allowlist = allowlist
        self.index = index
        self.files = files
        self.recall_timeout = recall_timeout

    async def plan(
        self,
        *,
        calling_ae: str,
        action: Action,
        model: RetrieveModel,
        identifier: Dataset,
        move_destination: str | None = None,
    ) -> Plan:
        """Decide whether and what to retrieve; raises NotAuthorized or RetrieveRefused."""
        requester = self.allowlist.authorize(calling_ae, action.value)
        destination = None
        if action is Action.MOVE:
            destination = self.allowlist.by_ae_title(move_destination or "")
            if destination is None:
                raise RetrieveRefused(
                    RetrieveRefusal.UNKNOWN_DESTINATION,
                    f"move destination {(move_destination or '').strip()!r} is not a known peer",
                    hint="add it with `pacs-edge peers add` (its host and port are where "
                    "the box sends)",
                )
            if not destination.callable:
                raise RetrieveRefused(
                    RetrieveRefusal.UNKNOWN_DESTINATION,
                    f"move destination {destination.ae_title!r} has no port: the box does"
                    " not know where it listens",
                    hint=f"give peer {destination.name!r} the port its Storage SCP listens"
                    " on (pacs-edge peers remove, then add with --port)",
                )
        keys = parse_identifier(model, identifier)
        rows = await self.index.locate(
            patient_ids=keys.patient_ids, issuers=(keys.issuer,) if keys.issuer else (),
            study_uids=keys.study_uids,
            series_uids=keys.series_uids, sop_uids=keys.sop_uids,
        )
        if len(rows) > MAX_SUBOPERATIONS:
            raise RetrieveRefused(
                RetrieveRefusal.TOO_MANY_MATCHES,
                f"{len(rows)} instances match; at most {MAX_SUBOPERATIONS} per retrieve",
                hint="retrieve at STUDY or SERIES level in several requests",
            )
        # One stat per instance: off the loop, which serves every association's queries.
        ready, unavailable = await asyncio.to_thread(self._split, rows)
        recall = tuple(sorted({row.study_uid for row in rows
                               if row.tier_state in NOT_LOCAL_STATES}))
        return Plan(requester, destination, tuple(ready), tuple(unavailable), recall)

    async def await_studies(self, study_uids: Sequence[str], *, requested_by: str,
                            wait: float) -> RecallWait:
        """Ask for these evicted studies (C-MOVE/C-GET or WADO-RS) and wait for them."""
        await recall_requests.request_recall(self.index, study_uids, requested_by)
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            waiting, errors = await recall_requests.recall_progress(self.index, study_uids)
            if not waiting or errors or asyncio.get_running_loop().time() >= deadline:
                return RecallWait(done=not waiting, errors=tuple(errors))
            await asyncio.sleep(RECALL_POLL_SECONDS)

    async def replan_gone(self, plan: Plan, gone: Sequence[Instance]) -> Plan:
        """A plan for `gone`, instances of `plan` whose file was not there when it was to
        be sent, from the index as it is now: on local disk again (a recall came back)
        to send; their study evicted (or being recalled) since the plan, named in
        `recall_studies`; or missing from a study on local disk, `unavailable`."""
        studies = sorted({i.study_uid for i in gone})
        wanted = {i.sop_uid for i in gone}
        rows = [row for row in await self.index.locate(study_uids=studies)
                if row.sop_uid in wanted]
        ready, unavailable = await asyncio.to_thread(self._split, rows)
        found = {row.sop_uid for row in rows}
        unavailable += [i for i in gone if i.sop_uid not in found]  # moved or deleted
        recall = tuple(sorted({row.study_uid for row in rows
                               if row.tier_state in NOT_LOCAL_STATES}))
        damaged = sum(1 for i in unavailable if i.sop_uid in found and i.study_uid not in recall)
        if recall:
            log.info("files gone since the plan, their study evicted meanwhile: recall"
                     " studies=%d files=%d", len(recall),
                     sum(1 for row in rows if row.tier_state in NOT_LOCAL_STATES))
        if damaged:
            log.error("stored files missing from studies on local disk: their sub-operations"
                      " fail (run pacs-edge fsck) files=%d", damaged)
        return Plan(plan.requester, plan.destination, tuple(ready), tuple(unavailable),
                    recall)

    async def record_access(self, plan: Plan) -> None:
        """Stamp the last access time of the retrieved studies (eviction order)."""
        studies = sorted({i.study_uid for i in plan.instances})
        await self.index.touch_studies(studies)

    def _split(self, rows: Sequence[InstanceLocation]) -> tuple[list[Instance], list[Instance]]:
        """(on local disk, not on local disk) in index order."""
        ready: list[Instance] = []
        unavailable: list[Instance] = []
        for row in rows:
            instance = Instance(
                sop_uid=row.sop_uid,
                sop_class_uid=row.sop_class_uid,
                transfer_syntax=row.transfer_syntax,
                study_uid=row.study_uid,
                path=self.files.absolute(row.path),
            )
            local = row.tier_state not in NOT_LOCAL_STATES and instance.path.is_file()
            (ready if local else unavailable).append(instance)
        return ready, unavailable


def _values(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    """The non-empty values of a (possibly multi-valued) element, padding stripped."""
    try:
        value = identifier.get(keyword)
    except Exception as exc:  # a malformed element: pydicom converts lazily
        raise RetrieveRefused(RetrieveRefusal.INVALID_IDENTIFIER,
                              f"{keyword} cannot be decoded") from exc
    if value is None or value == "":
        return ()
    items: Sequence[object] = value if isinstance(value, Sequence) and not isinstance(
        value, str) else [value]
    cleaned = (normalise_uid(v).strip() for v in items)
    return tuple(v for v in cleaned if v)


def _single(identifier: Dataset, keyword: str) -> str:
    found = _values(identifier, keyword)
    return found[0] if len(found) == 1 else ""
