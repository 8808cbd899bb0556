"""Reactors that wait for work instead of polling: the acceptor's two threads per association.

pynetdicom 3.0.4 runs two loops per association, and both poll: the DUL thread
sleeps 1 ms whenever a pass found nothing to do, and the association thread
sleeps 1 ms before every pass. Each C-STORE pays that latency on the way in
(P-DATA read -> message queued -> handler) and on the way out (response queued
-> DUL sends it), and every open connection burns ~2% of a core doing nothing.

Here both loops block until something happens (appliance.base.compat holds the
loops, which reach into pynetdicom's internals):

- EdgeDUL waits in poll() on its socket and an eventfd, which is set when a
  primitive is queued to send (`send_pdu`), when another thread queues an event
  (a PDU the C-STORE send lane handed over, a closed transport) or when the
  reactor is told to stop;
- the association reactor waits on an Event that its queues set: a decoded
  DIMSE message, an A-RELEASE/A-ABORT indication from the DUL, the DUL ending,
  `kill()`.

The DUL also hands a received P-DATA-TF straight to the association's
C-STORE receiver (store_receiver.py), which serves a C-STORE in this thread,
or to DIMSE, without pynetdicom's PDU objects and a pass through its state
machine (compat.read_pdu).

Both still wake every compat.REACTOR_IDLE_WAIT seconds to look at their timers
(ARTIM, the network timeout), as upstream's passes did every millisecond.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine

from appliance.base import compat
from appliance.dimse.store_receiver import StoreReceiver


class WakingQueue(queue.Queue[Any]):
    """A queue that calls `wake` after each put (under the queue's lock: cheap calls only)."""

    def __init__(self, wake: Callable[[], None], replaces: queue.Queue[Any]) -> None:
        super().__init__()
        self._wake = wake
        while True:  # what was queued already (the socket's "connection open" event)
            try:
                self.queue.append(replaces.get_nowait())
            except queue.Empty:
                break

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._wake()


class EdgeDUL(DULServiceProvider):
    """A DUL whose reactor blocks while idle (see the module docstring)."""

    pacs_edge_wakeup: compat.Wakeup
    pacs_edge_on_end: Callable[[], None]
    pacs_edge_receiver: StoreReceiver | None

    def run(self) -> None:
        try:
            compat.run_dul_reactor(self, self.pacs_edge_wakeup)
        finally:
            if self.pacs_edge_receiver is not None:
                self.pacs_edge_receiver.close()
            self.pacs_edge_on_end()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.pacs_edge_wakeup.set()

    def _read_pdu_data(self) -> None:
        compat.read_pdu(self, self._receive, self._receiving)

    def _receive(self, pdvs: list[tuple[int, Any]]) -> bool:
        receiver = self.pacs_edge_receiver
        return receiver is not None and receiver.receive(pdvs)

    def _receiving(self) -> bool:
        receiver = self.pacs_edge_receiver
        return receiver is not None and receiver.receiving

    def stop_dul(self) -> bool:
        return compat.stop_dul_reactor(self, self.pacs_edge_wakeup)

    def kill_dul(self) -> None:
        compat.kill_dul_reactor(self, self.pacs_edge_wakeup)


class EdgeStateMachine(StateMachine):
    """pynetdicom's state machine, with a local A-ABORT before the A-ASSOCIATE-RQ.

    A stopping server aborts every connection it has (AE.shutdown), also one whose
    peer has not sent its A-ASSOCIATE-RQ yet (Sta2). There is no association to abort
    then, and PS3.8's table has no A-ABORT request (Evt15) in Sta2: pynetdicom raised
    InvalidEventError, which ended the DUL thread with a traceback. The connection is
    closed instead, as the ARTIM timer's expiry closes it in Sta2 (AA-2)."""

    def do_action(self, event: str) -> None:
        if event == "Evt15" and self.current_state == "Sta2":
            with contextlib.suppress(queue.Empty):
                self.dul.to_provider_queue.get(block=False)  # the A-ABORT: never sent
            event = "Evt18"
        super().do_action(event)


def make_waiting(assoc: Any, receiver: StoreReceiver | None = None) -> threading.Event:
    """Turn a new (not yet started) acceptor association's DUL into an EdgeDUL (which
    gives its C-STOREs to `receiver`, if any) and its queues into waking ones; returns
    the Event its association reactor waits on."""
    wake = threading.Event()
    dul = assoc.dul
    dul.__class__ = EdgeDUL  # built by Association.__init__; EdgeDUL only overrides methods
    dul.state_machine.__class__ = EdgeStateMachine  # as the DUL: methods only
    dul.pacs_edge_receiver = receiver
    wakeup = compat.Wakeup()
    dul.pacs_edge_wakeup = wakeup
    dul.pacs_edge_on_end = wake.set

    def from_elsewhere() -> None:
        # The DUL's own events need no wake-up: it is awake, and reads the queue next.
        if threading.current_thread() is not dul:
            wakeup.set()

    dul.event_queue = WakingQueue(from_elsewhere, dul.event_queue)
    dul.to_user_queue = WakingQueue(wake.set, dul.to_user_queue)
    assoc.dimse.msg_queue = WakingQueue(wake.set, assoc.dimse.msg_queue)
    return wake
