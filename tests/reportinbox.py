"""N-EVENT-REPORTs received by a pynetdicom peer, handed to the test only once the peer's
response has gone out.

pynetdicom calls the N-EVENT-REPORT handler before it sends the response. A test that
took the report from the handler and released the association at once raced that
response: pynetdicom then logs "Invalid event 'Evt9' for the current state 'Sta7'",
aborts, and leaves the association's socket open (a ResourceWarning that fails a later
test). Here the report is queued when the response's P-DATA PDU has been sent.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pynetdicom import evt

SUCCESS = 0x0000
T = TypeVar("T")


class ReportInbox(Generic[T]):
    def __init__(self, read: Callable[[evt.Event], T]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._answering: dict[int, T] = {}
        self._reports: queue.Queue[T] = queue.Queue()

    @property
    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """For `evt_handlers` of AE.associate and AE.start_server."""
        return [(evt.EVT_N_EVENT_REPORT, self._on_report), (evt.EVT_PDU_SENT, self._on_pdu)]

    def get(self, timeout: float) -> T:
        """The next report; queue.Empty after `timeout` seconds."""
        return self._reports.get(timeout=timeout)

    def empty(self) -> bool:
        """No report received, answered or not."""
        with self._lock:
            return not self._answering and self._reports.empty()

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        with self._lock:
            self._answering[id(event.assoc)] = self._read(event)
        return SUCCESS, None

    def _on_pdu(self, event: evt.Event) -> None:
        if type(event.pdu).__name__ != "P_DATA_TF":
            return
        with self._lock:
            report = self._answering.pop(id(event.assoc), None)
        if report is not None:
            self._reports.put(report)
