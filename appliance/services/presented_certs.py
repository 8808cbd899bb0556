"""The expiry of the client certificate each TLS peer presents, kept in the index.

A peer's certificate is seen only when the peer calls. Kept in serve's memory
(a gauge), it was lost at every restart of serve, and with it the alert
PacsEdgePeerCertificateExpiring, until the peer called again; a peer whose
certificate has expired cannot (its TLS handshake fails), so the alert went
at the first restart after the moment it mattered most. The index keeps the
expiry each peer last presented (store/presented_cert_rows.py); the health
report reads it, so /metrics shows it from serve's start, whichever worker saw it.

The association does not wait for the write: it is posted to the loop and
committed with the next group (a locked index must not hold up an association
for a metric), and only when this process has not recorded that expiry for
that peer already, so a peer that calls all day costs one write per process.
A failed write is logged and tried again at the peer's next call.
"""

from __future__ import annotations

import logging
import threading
from functools import partial

from appliance.base.bridge import LoopBridge
from appliance.base.errors import IndexUnavailable, PacsEdgeError
from appliance.store.index import Index
from appliance.store.presented_cert_rows import record_presented

log = logging.getLogger(__name__)


class PresentedCertificates:
    def __init__(self, index: Index, bridge: LoopBridge) -> None:
        self._index = index
        self._bridge = bridge
        self._recorded: dict[str, float] = {}  # or being recorded, by this process
        self._lock = threading.Lock()  # association threads call `seen` at once

    def seen(self, peer: str, not_after: float) -> None:
        """Peer `peer` (allowlist name) presented a certificate valid until `not_after`:
        from an association's thread, recorded in the background unless known."""
        with self._lock:
            if self._recorded.get(peer) == not_after:
                return
            self._recorded[peer] = not_after
        self._bridge.post(self._record(peer, not_after))

    async def _record(self, peer: str, not_after: float) -> None:
        try:
            if self._index.writer is None:
                raise IndexUnavailable("the index is not open")
            await self._index.writer.submit_sync(
                partial(record_presented, peer=peer, not_after=not_after))
        except PacsEdgeError as exc:
            with self._lock:
                if self._recorded.get(peer) == not_after:
                    del self._recorded[peer]  # the next call tries again
            log.warning("peer certificate expiry not recorded peer=%s error=%s", peer,
                        type(exc).__name__)
