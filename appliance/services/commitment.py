"""Storage Commitment decisions (push model, PS3.4 Annex J): what the box takes responsibility for.

A success in a commitment report is a promise like a C-STORE acknowledgement:
the modality may delete its copy. So an instance is committed only when

- the index holds it (else `UNKNOWN`: Failure Reason 0x0112), of the SOP
  class the request names (else `CLASS_MISMATCH`: 0x0119);
- its bytes are intact: for a local instance, the SHA-256 of the stored
  file's dataset equals the one recorded at ingest (read now, not trusted);
  for an evicted instance, it sits in a verified pack that no scrub found
  damaged (else `DAMAGED`: 0x0110);
- with `[workflow] commit_requires_cloud`, it is also in such a verified pack.
  Until it is, the commitment waits (the sync agent replicates stable
  studies); after `commit_cloud_wait_hours` it is reported `NOT_IN_CLOUD`
  (0x0110) so the modality does not wait forever and keeps its copy.

The request is a committed row (appliance/store/commitment_rows.py) before the
N-ACTION is acknowledged, so a restart between request and report still
answers. The report is decided when it is sent (what is true then is what
is promised), delivered by the DIMSE edge on the requesting association if
still open, else on a new one; this module says when to try again and when
to give up.

Threads: `decide_blocking` reads files, so it runs in the caller's thread
(an association's or the reporter's) and reaches the index through the bridge.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

from appliance.base import logsafe
from appliance.base.bridge import LoopBridge
from appliance.base.config import WorkflowConfig
from appliance.base.errors import PacsEdgeError
from appliance.base.uids import is_valid_uid
from appliance.services.peers import Allowlist, Peer
from appliance.store import commitment_rows as commitments
from appliance.store import database
from appliance.store.commitment_rows import Commitment, RequestedItem, StoredInstance
from appliance.store.files import FileStore, hash_dataset
from appliance.store.index import Index

log = logging.getLogger(__name__)

PERMISSION = "commit"
# Items per request: a modality commits a study or a series at a time; this bounds
# the memory and the time one request can take (the N-ACTION answers 0x0213 beyond).
MAX_ITEMS = 50_000


class Refusal(enum.Enum):
    NOT_PERMITTED = "peer lacks permission 'commit'"
    INVALID_REQUEST = "request does not fit the Storage Commitment SOP class"
    TOO_MANY_ITEMS = "more items than one request may hold"


class CommitmentRefused(PacsEdgeError):
    """The N-ACTION cannot be accepted at all; `reason` is PHI-free and loggable."""

    def __init__(self, refusal: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.refusal = refusal
        self.reason = reason


class Verdict(enum.Enum):
    """What the report says of one requested instance."""

    COMMITTED = "committed"
    UNKNOWN = "unknown"                # no such instance in the index
    CLASS_MISMATCH = "class_mismatch"  # stored under another SOP class
    DAMAGED = "damaged"                # the stored copy is not what the index recorded
    NOT_IN_CLOUD = "not_in_cloud"      # commit_requires_cloud, and no verified pack in time


@dataclass(frozen=True)
class Report:
    """The decided answer to one commitment, item by item in request order."""

    commitment: Commitment
    verdicts: tuple[Verdict, ...]
    study_uids: frozenset[str]

    @property
    def committed(self) -> int:
        return sum(1 for v in self.verdicts if v is Verdict.COMMITTED)

    @property
    def failed(self) -> int:
        return len(self.verdicts) - self.committed


class CommitmentService:
    def __init__(self, index: Index, files: FileStore, allowlist: Allowlist,
                 config: WorkflowConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.files = files
        self.allowlist = allowlist
        self.config = config
        self.clock = clock

    # --- the request ---------------------------------------------------------------------

    def permitted(self, calling_ae: str) -> Peer:
        peer = self.allowlist.by_ae_title(calling_ae)
        if peer is None or not peer.may(PERMISSION):
            raise CommitmentRefused(Refusal.NOT_PERMITTED, Refusal.NOT_PERMITTED.value)
        return peer

    async def request(self, calling_ae: str, transaction_uid: str,
                      items: Sequence[RequestedItem], *, hold_seconds: float) -> Commitment:
        """Validate and commit a request; durable on return. The caller holds it for
        `hold_seconds` (its first report attempt, on the requesting association): the
        reporter does not pick it up before, so one report is in flight at a time."""
        self.permitted(calling_ae)
        if not is_valid_uid(transaction_uid):
            raise CommitmentRefused(Refusal.INVALID_REQUEST, "Transaction UID is missing or"
                                    " not a valid UID")
        if not items:
            raise CommitmentRefused(Refusal.INVALID_REQUEST, "Referenced SOP Sequence is"
                                    " missing or empty")
        if len(items) > MAX_ITEMS:
            raise CommitmentRefused(Refusal.TOO_MANY_ITEMS,
                                    f"{len(items)} items; at most {MAX_ITEMS} per request")
        if not all(is_valid_uid(i.sop_class_uid) and is_valid_uid(i.sop_uid) for i in items):
            raise CommitmentRefused(Refusal.INVALID_REQUEST, "a Referenced SOP Sequence item"
                                    " lacks a valid SOP Class or SOP Instance UID")
        now = self.clock()
        assert self.index.writer is not None
        recorded = await self.index.writer.submit_sync(
            lambda conn: commitments.record_request(
                conn, calling_ae=calling_ae, transaction_uid=transaction_uid, items=items,
                now=now, first_attempt_at=now + hold_seconds))
        if recorded is None:
            raise CommitmentRefused(Refusal.INVALID_REQUEST, "Transaction UID already names a"
                                    " request for other instances")
        commitment_id, new = recorded
        commitment = await self._load(commitment_id)
        log.info("storage commitment requested commitment=%d items=%d new=%s calling=%s",
                 commitment.id, len(commitment.items), new, calling_ae)
        return commitment

    # --- the decision --------------------------------------------------------------------

    def decide_blocking(self, commitment: Commitment, bridge: LoopBridge) -> Report | None:
        """The report as of now, or None while instances wait for the cloud."""
        uids = [item.sop_uid for item in commitment.items]
        stored = bridge.call(self._stored(uids))
        waited = self.clock() - commitment.requested_at
        cloud_deadline_passed = waited > self.config.commit_cloud_wait_hours * 3600
        verdicts: list[Verdict | None] = []
        for item in commitment.items:
            verdict = self._verdict_from_index(item, stored.get(item.sop_uid))
            if (verdict is None and self.config.commit_requires_cloud
                    and not stored[item.sop_uid].in_verified_pack):
                if not cloud_deadline_passed:
                    return None  # nothing is read before every item can be decided
                verdict = Verdict.NOT_IN_CLOUD
            verdicts.append(verdict)
        # Local instances: read the file now. Hash each file once, even if requested twice.
        intact: dict[str, bool] = {}
        for item, verdict in zip(commitment.items, verdicts, strict=True):
            if verdict is None and item.sop_uid not in intact:
                intact[item.sop_uid] = self._intact(stored[item.sop_uid])
        missing = [uid for uid, ok in intact.items() if not ok]
        if missing:
            # Evicted meanwhile by the sync agent? Then its verified pack answers for it.
            again = bridge.call(self._stored(missing))
            for uid in missing:
                row = again.get(uid)
                intact[uid] = row is not None and not row.is_local and row.in_verified_pack
        decided = tuple(
            v if v is not None else (Verdict.COMMITTED if intact[item.sop_uid] else Verdict.DAMAGED)
            for item, v in zip(commitment.items, verdicts, strict=True))
        for item, verdict in zip(commitment.items, decided, strict=True):
            if verdict is Verdict.DAMAGED:
                log.error("storage commitment: stored copy does not match the index"
                          " instance=%s commitment=%d", logsafe.ref(item.sop_uid), commitment.id)
        studies = frozenset(stored[i.sop_uid].study_uid for i, v in zip(
            commitment.items, decided, strict=True) if v is Verdict.COMMITTED)
        return Report(commitment, decided, studies)

    def _verdict_from_index(self, item: RequestedItem, row: StoredInstance | None
                            ) -> Verdict | None:
        """The verdict the index alone gives, or None if the bytes must be checked."""
        if row is None:
            return Verdict.UNKNOWN
        if row.sop_class_uid != item.sop_class_uid:
            return Verdict.CLASS_MISMATCH
        if not row.is_local:
            return Verdict.COMMITTED if row.in_verified_pack else Verdict.DAMAGED
        return None

    def _intact(self, row: StoredInstance) -> bool:
        try:
            return hash_dataset(self.files.absolute(row.path), row.dataset_offset) == row.sha256
        except OSError:
            return False

    # --- delivery bookkeeping ------------------------------------------------------------

    async def reported(self, report: Report) -> None:
        """The peer took the report: the commitment is answered (durable on return)."""
        now = self.clock()
        outcomes = [v.value for v in report.verdicts]
        assert self.index.writer is not None
        await self.index.writer.submit_sync(
            lambda conn: commitments.mark_answered(conn, report.commitment.id, outcomes, now))
        log.info("storage commitment answered commitment=%d committed=%d failed=%d",
                 report.commitment.id, report.committed, report.failed)

    async def not_delivered(self, commitment: Commitment, error: str, *,
                            retry_now: bool = False) -> bool:
        """A report could not be delivered: schedule a retry (at once with `retry_now`:
        on a new association). Returns True if the box gave up on it instead."""
        now = self.clock()
        assert self.index.writer is not None
        if now - commitment.requested_at > self.config.commit_give_up_hours * 3600:
            await self.index.writer.submit_sync(
                lambda conn: commitments.abandon(conn, commitment.id, error=error, now=now))
            log.error("storage commitment abandoned: report undeliverable commitment=%d"
                      " attempts=%d error=%s", commitment.id, commitment.attempts + 1, error)
            return True
        later = now if retry_now else now + self.config.commit_retry_seconds
        await self.index.writer.submit_sync(
            lambda conn: commitments.note_attempt(conn, commitment.id, error=error,
                                                  next_attempt_at=later))
        log.warning("storage commitment report not delivered commitment=%d error=%s",
                    commitment.id, error)
        return False

    async def not_decided(self, commitment: Commitment) -> None:
        """Instances wait for a verified cloud pack: look again a retry interval later."""
        later = self.clock() + self.config.commit_retry_seconds
        assert self.index.writer is not None
        await self.index.writer.submit_sync(
            lambda conn: commitments.note_attempt(
                conn, commitment.id, error="waiting for verified cloud packs",
                next_attempt_at=later, counts=False))

    async def claim(self, commitment: Commitment, *, hold_seconds: float) -> bool:
        """Take a due commitment for one delivery attempt of at most `hold_seconds`;
        False if it is answered or another attempt holds it."""
        now = self.clock()
        assert self.index.writer is not None
        return await self.index.writer.submit_sync(
            lambda conn: commitments.claim(conn, commitment.id, now=now,
                                           until=now + hold_seconds))

    async def due(self, *, horizon: float, skip_aes: Collection[str] = ()) -> list[Commitment]:
        """Due commitments, none of `skip_aes`'; `horizon`: the longest hold of an attempt
        (report_hold_seconds)."""
        return await database.run_sync(self.index.reader, partial(
            commitments.due, skip_aes=skip_aes), self.clock(), horizon)

    async def _load(self, commitment_id: int) -> Commitment:
        found = await database.run_sync(self.index.reader, commitments.load, commitment_id)
        if found is None:
            raise PacsEdgeError(f"storage commitment {commitment_id} vanished after commit")
        return found

    async def _stored(self, sop_uids: Sequence[str]) -> dict[str, StoredInstance]:
        return await database.run_sync(self.index.reader, commitments.stored_instances,
                                       list(sop_uids))
