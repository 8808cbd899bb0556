"""DIMSE operations counted from the messages themselves, whatever service answers them.

Every request the box receives and every final response it sends passes
pynetdicom's EVT_DIMSE_RECV / EVT_DIMSE_SENT notifications, so one pair of
handlers counts C-ECHO, C-STORE, C-FIND (worklist queries as C-FIND-MWL),
C-MOVE, C-GET and the N- services (MPPS, Storage Commitment) alike, by status
class, with the time from request to final response. Pending responses
(C-FIND matches, C-MOVE progress) are not final and are not counted.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from pynetdicom import evt
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from appliance.base.metrics import DIMSE_OPERATIONS, DIMSE_SECONDS, status_class
from appliance.dimse.dicom_status import PENDING_CODES

# Requests waiting for their final response, per association, by message ID.
_started: weakref.WeakKeyDictionary[Any, dict[int, tuple[str, float]]] = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def _service(message: Any) -> str:
    """C_STORE_RQ -> C-STORE (the class names are pynetdicom's, one per message type)."""
    return type(message).__name__.rsplit("_", 1)[0].replace("_", "-")


def on_request(event: Any) -> None:
    message = event.message
    if not type(message).__name__.endswith("_RQ"):
        return
    command = message.command_set
    message_id = getattr(command, "MessageID", None)
    if message_id is None:
        return  # a C-CANCEL-RQ: it names the operation it cancels, which is timed already
    service = _service(message)
    if service == "C-FIND" and command.AffectedSOPClassUID == ModalityWorklistInformationFind:
        service = "C-FIND-MWL"  # a modality's worklist query, not a Q/R query
    with _lock:
        _started.setdefault(event.assoc, {})[int(message_id)] = (
            service, time.monotonic())


def on_response(event: Any) -> None:
    message = event.message
    if not type(message).__name__.endswith("_RSP"):
        return
    command = message.command_set
    status = int(command.Status)
    if status in PENDING_CODES:
        return
    with _lock:
        begun = _started.get(event.assoc, {}).pop(int(command.MessageIDBeingRespondedTo), None)
    if begun is None:
        return  # a response to a request this box sent (C-STORE sub-operations)
    service, at = begun
    DIMSE_OPERATIONS.labels(service, status_class(status)).inc()
    DIMSE_SECONDS.labels(service).observe(time.monotonic() - at)


def event_handlers() -> list[tuple[Any, Any]]:
    return [(evt.EVT_DIMSE_RECV, on_request), (evt.EVT_DIMSE_SENT, on_response)]
