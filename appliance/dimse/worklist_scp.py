"""Modality Worklist SCP on the wire (C-FIND on 1.2.840.10008.5.1.4.31, PS3.4 K.6).

Thin, like the Query/Retrieve C-FIND handler it sits beside: permission and
matching are the worklist service's; this maps its results to statuses,
streams the matches as Pending responses (no more queued for the DUL than
send_queue.SEND_BACKLOG PDUs: pynetdicom's own C-FIND SCP queues each one without
waiting) and audits the query.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from appliance.audit import Auditor
from appliance.base import logsafe
from appliance.base.bridge import LoopBridge
from appliance.base.errors import QueryError
from appliance.dimse.dicom_status import QUERY_STATUS, Status
from appliance.dimse.identifier_decoding import read_identifier
from appliance.dimse.send_queue import wait_for_send_room
from appliance.services.worklist import WorklistRefused, WorklistService

log = logging.getLogger(__name__)

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"


def _encodes(identifier: Dataset, implicit: bool, little_endian: bool) -> bool:
    """Whether pydicom can encode `identifier` (an order's value that its VR cannot hold,
    a non-ASCII modality say, raises one of many types)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little_endian
    try:
        write_dataset(fp, identifier)
    except Exception:
        return False
    return True


class WorklistScp:
    def __init__(self, service: WorklistService, bridge: LoopBridge, audit: Auditor) -> None:
        self.service = service
        self.bridge = bridge
        self.audit = audit

    def on_find(self, event: Any, label: str) -> Iterator[tuple[int, Dataset | None]]:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            self.service.permitted(calling)
        except WorklistRefused as exc:
            log.warning("worklist refused reason=%s %s", exc.message, label)
            self.audit.refused(event.assoc, "worklist", exc.message)
            yield Status.REFUSED_NOT_AUTHORIZED, None
            return
        try:
            matches = self.bridge.call(self.service.find(calling, read_identifier(event, label)))
        except QueryError as exc:
            log.warning("worklist query refused reason=%s %s", exc.message, label)
            self._audit(event, None, exc.message)
            yield QUERY_STATUS[exc.kind], None
            return
        except Exception as exc:
            log.error("worklist query failed error=%s %s", type(exc).__name__, label)
            self._audit(event, None, f"worklist C-FIND failed: {type(exc).__name__}")
            yield Status.UNABLE_TO_PROCESS, None
            return
        log.info("worklist answered matches=%d %s", len(matches), label)
        self._audit(event, len(matches))
        syntax = event.context.transfer_syntax
        for match in matches:
            # pynetdicom queues each response for the DUL without waiting: bounded here,
            # and the DUL reads between bursts so a C-CANCEL is seen (send_queue.py).
            if not wait_for_send_room(event.assoc):
                return  # the association has ended
            if event.is_cancelled:
                yield Status.CANCEL, None
                return
            if not _encodes(match, syntax.is_implicit_VR, syntax.is_little_endian):
                # pynetdicom would end the whole answer with a failure at this item.
                log.warning("worklist item left out: a value cannot be encoded study=%s %s",
                            logsafe.ref(str(match.get("StudyInstanceUID", ""))), label)
                continue
            yield Status.PENDING, match

    def _audit(self, event: Any, matches: int | None, reason: str = "") -> None:
        raw = event.request.Identifier
        self.audit.queried(
            event.assoc, sop_class_uid=MODALITY_WORKLIST_FIND,
            identifier=raw.getvalue() if raw is not None else b"",
            transfer_syntax=str(event.context.transfer_syntax), matches=matches, reason=reason)
