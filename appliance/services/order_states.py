"""The order (scheduled procedure step) state machine: one table of allowed moves.

    SCHEDULED ──start──▶ IN PROGRESS ──complete──▶ COMPLETED
        │  ▲                  │
        │  └─change (XO)      └──discontinue──▶ DISCONTINUED
        ├──cancel (CA)───────────────────────▶ DISCONTINUED
        └──discontinue (DC)──────────────────▶ DISCONTINUED

COMPLETED and DISCONTINUED are final: no trigger leaves them. A cancel (CA)
is only possible before the step started (HL7: an order in process cannot
be cancelled, only discontinued). `change` is a self-loop: details change,
the status does not. Triggers come from HL7 order control codes (the order
service) and from MPPS (N-CREATE IN PROGRESS = start, N-SET COMPLETED =
complete, N-SET DISCONTINUED = discontinue).

A pair not in the table is refused (OrderTransitionError), as tiering.py
refuses one; each applied move is one `order_transitions` row written in the
same transaction as the status (store/orders.py `set_status`).
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from appliance.base.errors import PacsEdgeError
from appliance.store import order_rows as order_store
from appliance.store.order_rows import OrderStatus

if TYPE_CHECKING:  # transaction bodies pass the connection on to the store
    import sqlite3


class OrderTrigger(enum.StrEnum):
    START = "start"              # MPPS N-CREATE with status IN PROGRESS
    COMPLETE = "complete"        # MPPS N-SET COMPLETED
    DISCONTINUE = "discontinue"  # HL7 DC, or MPPS N-SET DISCONTINUED
    CANCEL = "cancel"            # HL7 CA: withdrawn before it started
    CHANGE = "change"            # HL7 XO: details replaced


TRANSITIONS: dict[tuple[OrderStatus, OrderTrigger], OrderStatus] = {
    (OrderStatus.SCHEDULED, OrderTrigger.START): OrderStatus.IN_PROGRESS,
    (OrderStatus.SCHEDULED, OrderTrigger.CANCEL): OrderStatus.DISCONTINUED,
    (OrderStatus.SCHEDULED, OrderTrigger.DISCONTINUE): OrderStatus.DISCONTINUED,
    (OrderStatus.SCHEDULED, OrderTrigger.CHANGE): OrderStatus.SCHEDULED,
    (OrderStatus.IN_PROGRESS, OrderTrigger.COMPLETE): OrderStatus.COMPLETED,
    (OrderStatus.IN_PROGRESS, OrderTrigger.DISCONTINUE): OrderStatus.DISCONTINUED,
}

FINAL = frozenset({OrderStatus.COMPLETED, OrderStatus.DISCONTINUED})


class OrderTransitionError(PacsEdgeError):
    """`trigger` is not allowed in the order's current status."""

    def __init__(self, state: str, trigger: str) -> None:
        final = state in {s.value for s in FINAL}
        super().__init__(
            f"order: {trigger!r} is not allowed in status {state!r}",
            hint="a completed or discontinued order is final; send a new order" if final
            else "the order is in progress: discontinue it (DC) instead")
        self.state = state
        self.trigger = trigger


def next_state(state: OrderStatus | str, trigger: OrderTrigger) -> OrderStatus:
    try:
        return TRANSITIONS[(OrderStatus(state), trigger)]
    except (KeyError, ValueError):
        raise OrderTransitionError(str(state), trigger.value) from None


def path(state: OrderStatus, target: OrderStatus) -> list[OrderTrigger]:
    """The fewest triggers that move an order from `state` to `target` (none when it is
    there), for a RIS that reports a status rather than a move. Equally short ways are
    told apart by trigger order: a discontinue before a cancel, as the RIS's DC and CA
    both end the order and only the discontinue also ends a started one. Refused
    (OrderTransitionError, naming the move into `target`) when the table has no way."""
    reached: dict[OrderStatus, list[OrderTrigger]] = {state: []}
    frontier = [state]
    while frontier and target not in reached:
        following = []
        for current in frontier:
            for trigger in OrderTrigger:
                step = TRANSITIONS.get((current, trigger))
                if step is not None and step not in reached:
                    reached[step] = [*reached[current], trigger]
                    following.append(step)
        frontier = following
    if target not in reached:
        into = next(trigger for trigger in OrderTrigger
                    if target in {to for (_, by), to in TRANSITIONS.items() if by is trigger})
        raise OrderTransitionError(state.value, into.value)
    return reached[target]


def apply_sync(conn: sqlite3.Connection, order: order_store.Order, trigger: OrderTrigger,
               *, source: str, at: float | None = None) -> OrderStatus:
    """Move `order` by `trigger` inside the caller's transaction (Writer.submit_sync);
    returns the new status. Refused if the order changed since it was read."""
    target = next_state(order.status, trigger)
    if not order_store.set_status(conn, order.id, expect=order.status, target=target,
                                  trigger=trigger.value, source=source,
                                  at=time.time() if at is None else at):
        current = order_store.find_order(conn, order.accession_number)
        raise OrderTransitionError(current.status.value if current else "gone", trigger.value)
    return target
