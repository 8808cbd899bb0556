"""StorePeer: a pynetdicom Storage SCP, the C-MOVE destination of the retrieve tests.

It keeps the raw dataset bytes of every C-STORE it gets (`arrivals`, by SOP
Instance UID, one entry per arrival), so a test can compare them byte for byte
with what was stored, and the length of the largest P-DATA-TF PDU it read
(`largest_pdu`). Two hooks make a sender's trouble on purpose:
`stall(uid, nth_arrival)` returns how long to sit on the response (seconds: a
response that goes missing for the sender), and `abort_on(uid, nth_arrival)`
aborts the association instead of answering. Listens on 127.0.0.1, a free port.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

from conftest import HOST
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import AllStoragePresentationContexts

SUCCESS = 0x0000


class StorePeer:
    def __init__(self, ae_title: str = "PYDEST", *, max_pdu: int = 0,
                 transfer_syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES,
                 stall: Callable[[str, int], float] | None = None,
                 abort_on: Callable[[str, int], bool] | None = None) -> None:
        self.ae_title = ae_title
        self.ae = AE(ae_title)
        self.ae.maximum_pdu_size = max_pdu
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, list(transfer_syntaxes))
        self.stall = stall
        self.abort_on = abort_on
        self.arrivals: dict[str, list[bytes]] = defaultdict(list)
        self.largest_pdu = 0
        self._lock = threading.Lock()
        self.port = 0

    def __enter__(self) -> StorePeer:
        server = self.ae.start_server((HOST, 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                    (evt.EVT_PDU_RECV, self._on_pdu)])
        self.port = int(server.server_address[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.ae.shutdown()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {uid: len(got) for uid, got in self.arrivals.items()}

    def _on_pdu(self, event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            with self._lock:
                self.largest_pdu = max(self.largest_pdu, event.pdu.pdu_length)

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.arrivals[uid].append(event.encoded_dataset(include_meta=False))
            nth = len(self.arrivals[uid])
        delay = self.stall(uid, nth) if self.stall else 0.0
        if delay:
            time.sleep(delay)
        if self.abort_on is not None and self.abort_on(uid, nth):
            event.assoc.abort()
        return SUCCESS
