"""The per-study tiering state machine: one table of allowed transitions.

    local ──replicate──▶ replicating ──verified──▶ replicated ──evict──▶ evicted
      ▲                      │                      │   ▲                 │
      └────────failed────────┘      new_instance ───┘   └──recalled── recalling ◀──recall──┘
      ▲                                                                   │
      └────────────────────────────── (recall) failed ──▶ evicted ◀──────┘
      ▲                                                     │
      └──damaged (scrub: a pack holding local files)── replicated

`amended` (an instance left the study for another, or its patient changed: the next
version says so) moves as `new_instance` does.

A transition not in the table is refused (TierTransitionError), as
pynetdicom's fsm.py refuses an event its state does not accept. Every
applied transition is one committed row in `tier_transitions`, in the same
transaction as the state change, so a crashed agent can tell on restart what
it was doing: `replicating` rolls back to `local` (the pack is unverified and
a fresh version is uploaded), `recalling` rolls back to `evicted`.

Invariant the agent keeps: a study's local files are deleted only after its
transition to `evicted` is committed, and that transition requires every
instance to be in a verified pack.
"""

from __future__ import annotations

import enum
import sqlite3
import time

import aiosqlite

from appliance.base.errors import PacsEdgeError
from appliance.store import database


class TierState(enum.StrEnum):
    LOCAL = "local"
    REPLICATING = "replicating"
    REPLICATED = "replicated"
    EVICTED = "evicted"
    RECALLING = "recalling"


class Trigger(enum.StrEnum):
    REPLICATE = "replicate"        # the agent starts uploading a new pack version
    VERIFIED = "verified"          # the pack was read back and matches
    FAILED = "failed"              # upload/recall failed, or a crash left it half done
    NEW_INSTANCE = "new_instance"  # an instance arrived after the study was replicated
    AMENDED = "amended"            # the cloud's copy must be told a change (store/amendments.py)
    EVICT = "evict"                # local files are about to be deleted
    RECALL = "recall"              # someone needs the files of an evicted study
    RECALLED = "recalled"          # every instance is back on disk and verified
    DAMAGED = "damaged"            # scrub found a pack damaged; local instances re-upload


TRANSITIONS: dict[tuple[TierState, Trigger], TierState] = {
    (TierState.LOCAL, Trigger.REPLICATE): TierState.REPLICATING,
    (TierState.REPLICATING, Trigger.VERIFIED): TierState.REPLICATED,
    (TierState.REPLICATING, Trigger.FAILED): TierState.LOCAL,
    (TierState.REPLICATING, Trigger.NEW_INSTANCE): TierState.REPLICATING,
    (TierState.REPLICATED, Trigger.NEW_INSTANCE): TierState.LOCAL,
    (TierState.REPLICATED, Trigger.EVICT): TierState.EVICTED,
    (TierState.EVICTED, Trigger.RECALL): TierState.RECALLING,
    (TierState.EVICTED, Trigger.NEW_INSTANCE): TierState.EVICTED,
    (TierState.RECALLING, Trigger.RECALLED): TierState.REPLICATED,
    (TierState.RECALLING, Trigger.FAILED): TierState.EVICTED,
    (TierState.RECALLING, Trigger.NEW_INSTANCE): TierState.RECALLING,
    (TierState.LOCAL, Trigger.NEW_INSTANCE): TierState.LOCAL,
    # An instance left the study for another, or its patient changed: its next version
    # says so, as a new instance's next version adds it.
    (TierState.REPLICATED, Trigger.AMENDED): TierState.LOCAL,
    (TierState.LOCAL, Trigger.AMENDED): TierState.LOCAL,
    (TierState.REPLICATING, Trigger.AMENDED): TierState.REPLICATING,
    (TierState.EVICTED, Trigger.AMENDED): TierState.EVICTED,
    (TierState.RECALLING, Trigger.AMENDED): TierState.RECALLING,
    # A scrub found a pack damaged and took its local instances out of it: they
    # need a new version, as new instances do. Evicted instances stay (at risk).
    (TierState.REPLICATED, Trigger.DAMAGED): TierState.LOCAL,
    (TierState.LOCAL, Trigger.DAMAGED): TierState.LOCAL,
    (TierState.REPLICATING, Trigger.DAMAGED): TierState.REPLICATING,
    (TierState.EVICTED, Trigger.DAMAGED): TierState.EVICTED,
    (TierState.RECALLING, Trigger.DAMAGED): TierState.RECALLING,
}


class TierTransitionError(PacsEdgeError):
    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"tiering: {trigger!r} is not allowed in state {state!r}",
                         hint="another process changed the study meanwhile; retry the pass")
        self.state = state
        self.trigger = trigger


def next_state(state: TierState | str, trigger: Trigger) -> TierState:
    try:
        return TRANSITIONS[(TierState(state), trigger)]
    except (KeyError, ValueError):
        raise TierTransitionError(str(state), trigger.value) from None


async def apply(conn: aiosqlite.Connection, study_id: int, trigger: Trigger,
                *, expect: TierState | None = None) -> TierState:
    """Apply `trigger` to a study inside the caller's transaction; returns the new state.

    With `expect`, refuse unless the study is in that state (a guard against a
    concurrent change by the other process between read and write).
    """
    return await database.run_sync(conn, apply_sync, study_id, trigger, expect)


def state_of(conn: sqlite3.Connection, study_id: int) -> TierState:
    """The study's tiering state as the caller's transaction sees it."""
    row = database.query_one(conn, "SELECT tier_state FROM studies WHERE id = ?", (study_id,))
    if row is None:
        raise PacsEdgeError(f"tiering: no study with id {study_id}")
    return TierState(row[0])


def apply_sync(conn: sqlite3.Connection, study_id: int, trigger: Trigger,
               expect: TierState | None = None) -> TierState:
    """`apply` on the sqlite3 connection itself, in its thread (Writer.submit_sync)."""
    current = state_of(conn, study_id)
    if expect is not None and current is not expect:
        raise TierTransitionError(current.value, trigger.value)
    target = next_state(current, trigger)
    if target is current:
        return current  # a self-loop (e.g. more instances while local) is not a transition
    now = time.time()
    conn.execute(
        "UPDATE studies SET tier_state = ?, tier_changed_at = ? WHERE id = ?",
        (target.value, now, study_id),
    )
    conn.execute(
        "INSERT INTO tier_transitions (study_fk, from_state, to_state, trigger, at)"
        " VALUES (?, ?, ?, ?, ?)",
        (study_id, current.value, target.value, trigger.value, now),
    )
    return target
