"""A bound on the PDUs an association's DUL holds for sending, and the DUL's turn to read.

pynetdicom sends every PDU from its DUL thread: `dul.send_pdu()` puts the
primitive on `to_provider_queue` (a queue.Queue without a limit) and returns at
once. A producer that answers faster than the peer reads (a C-FIND with many
matches, on a TLS association or with responses larger than the peer's maximum
PDU, find_scp.py; the Modality Worklist answer, worklist_scp.py) queued its
whole answer: 800 responses of 24 KB held ~19 MB for one association, and a peer
that stops reading decides how much. Worse, the DUL reads its socket only in a
pass that found nothing to send (compat.run_dul_reactor calls
`_process_recv_primitive()` first, which turns a queued primitive into an event,
and `_is_transport_event()`, the read, only when it returned False), so a
C-CANCEL waited behind the whole answer.

`wait_for_send_room(assoc)`, called before each PDU (or message) is queued,
returns at once while fewer than SEND_BACKLOG PDUs wait. At the limit it waits
until the DUL has sent them all and begun a pass with nothing to send: that pass
reads the socket if the peer sent anything (a C-CANCEL, an A-ABORT), before the
producer queues the next burst. Waiting for the queue to be empty is not enough:
DT-1 takes the PDU off the queue before writing it, so a producer woken then
refills the queue before the DUL's next pass looks at it, and the read never
comes. Each such pass is counted by a wrapper around the DUL object's
`_process_recv_primitive` (installed on that object only, at the first call
for the association) that notifies a Condition; the waiting thread sleeps on it,
with no polling beyond a look at the association's state every RECHECK seconds.

Bound: SEND_BACKLOG (32) queued PDUs, each at most the peer's maximum PDU length
(or, with none, one response: find_scp.py caps PDUs at 4 MiB, a C-FIND identifier
is a few KB), so ~512 KB per association at a 16 KB maximum PDU; 32 lets a burst
amortise the read turn (one pass per 32 PDUs) without measurable cost.

It returns False, at once or within RECHECK, when the association ends: aborted
(by the peer, or an A-P-ABORT because the connection closed), no longer
established, its DUL stopped or killed. A peer that stops reading ends too:
every accepted socket has `network_timeout` as its timeout (transport.py), so the
DUL's blocked write fails, the connection closes (Evt17: A-P-ABORT) and the
waiting thread returns False within RECHECK of that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

SEND_BACKLOG = 32  # PDUs queued for the DUL before a producer waits
RECHECK = 0.1  # seconds between looks at the association's state while waiting

_install_lock = threading.Lock()


class ReadTurns:
    """Counts the DUL's passes that found nothing to send (each then reads the socket)."""

    def __init__(self, process: Callable[[], bool]) -> None:
        self.changed = threading.Condition()
        self.count = 0
        self._process = process

    def process(self) -> bool:
        """The DUL's `_process_recv_primitive`, counted when it found nothing queued."""
        if self._process():
            return True
        with self.changed:
            self.count += 1
            self.changed.notify_all()
        return False


def read_turns(dul: Any) -> ReadTurns:
    """The DUL's ReadTurns, installed on this DUL object the first time (its reactor
    looks the method up on every pass)."""
    turns: ReadTurns | None = getattr(dul, "pacs_edge_read_turns", None)
    if turns is not None:
        return turns
    with _install_lock:
        turns = getattr(dul, "pacs_edge_read_turns", None)
        if turns is None:
            turns = ReadTurns(dul._process_recv_primitive)
            dul._process_recv_primitive = turns.process
            dul.pacs_edge_read_turns = turns
        return turns


def association_live(assoc: Any) -> bool:
    """Whether `assoc` can still send: established, not aborted, its DUL running.
    Looks only (`acse.is_aborted` peeks; `is_release_requested` would consume)."""
    dul = assoc.dul
    return bool(assoc.is_established and not dul._kill_thread and dul.is_alive()
                and not assoc.acse.is_aborted())


def wait_for_send_room(assoc: Any) -> bool:
    """Wait while the DUL of `assoc` holds SEND_BACKLOG PDUs or more, until it has sent
    them and had its turn to read; True to go on queueing, False when the association
    has ended (the producer stops: pynetdicom answers the peer)."""
    dul = assoc.dul
    turns = read_turns(dul)
    seen = turns.count  # before the look at the queue: no read turn can slip between
    if dul.to_provider_queue.qsize() < SEND_BACKLOG:
        return True
    with turns.changed:
        # Only this thread queues, so the next pass that finds the queue empty is the
        # first after the burst went out: the read turn.
        while turns.count == seen:
            if not association_live(assoc):
                return False
            turns.changed.wait(RECHECK)
    return association_live(assoc)
