"""The tiering state machine: every allowed pair moves, every other pair is refused."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from appliance.store.index import Index
from appliance.store.tiering import (
    TRANSITIONS,
    TierState,
    TierTransitionError,
    Trigger,
    apply,
    next_state,
)

ALL_PAIRS = list(itertools.product(TierState, Trigger))
ALLOWED = [pair for pair in ALL_PAIRS if pair in TRANSITIONS]
REFUSED = [pair for pair in ALL_PAIRS if pair not in TRANSITIONS]


@pytest.mark.parametrize(("state", "trigger"), ALLOWED, ids=lambda v: str(v))
def test_allowed_pair_moves_to_its_target(state: TierState, trigger: Trigger) -> None:
    assert next_state(state, trigger) is TRANSITIONS[(state, trigger)]


@pytest.mark.parametrize(("state", "trigger"), REFUSED, ids=lambda v: str(v))
def test_missing_pair_is_refused(state: TierState, trigger: Trigger) -> None:
    with pytest.raises(TierTransitionError):
        next_state(state, trigger)


def test_the_designed_lifecycle_is_reachable() -> None:
    path = [Trigger.REPLICATE, Trigger.VERIFIED, Trigger.EVICT, Trigger.RECALL,
            Trigger.RECALLED, Trigger.EVICT]
    state = TierState.LOCAL
    seen = [state]
    for trigger in path:
        state = next_state(state, trigger)
        seen.append(state)
    assert [s.value for s in seen] == ["local", "replicating", "replicated", "evicted",
                                       "recalling", "replicated", "evicted"]


def test_a_damaged_pack_sends_a_replicated_study_back_to_replication() -> None:
    """Scrub's trigger: a replicated study replicates again; in every other state it is
    accepted and changes nothing (a scrub's commit never fails on the study's state)."""
    assert next_state(TierState.REPLICATED, Trigger.DAMAGED) is TierState.LOCAL
    for state in set(TierState) - {TierState.REPLICATED}:
        assert next_state(state, Trigger.DAMAGED) is state
    assert next_state(next_state(TierState.REPLICATED, Trigger.DAMAGED),
                      Trigger.REPLICATE) is TierState.REPLICATING


def test_eviction_needs_a_verified_pack_first() -> None:
    for state in (TierState.LOCAL, TierState.REPLICATING, TierState.RECALLING):
        with pytest.raises(TierTransitionError):
            next_state(state, Trigger.EVICT)


async def test_each_transition_is_one_committed_row(tmp_path: Path) -> None:
    async with Index(tmp_path / "index.sqlite3") as index:
        assert index.writer is not None

        async def seed(conn):  # type: ignore[no-untyped-def]
            await conn.execute("INSERT INTO patients (patient_id) VALUES ('p')")
            await conn.execute(
                "INSERT INTO studies (patient_fk, study_uid, first_received_at,"
                " last_received_at, last_access_at, tier_changed_at) VALUES (1, '1.2', 0, 0, 0, 0)"
            )

        await index.writer.submit(seed)
        for trigger in (Trigger.REPLICATE, Trigger.VERIFIED):
            await index.writer.submit(lambda conn, t=trigger: apply(conn, 1, t))
        with pytest.raises(TierTransitionError):
            await index.writer.submit(
                lambda conn: apply(conn, 1, Trigger.EVICT, expect=TierState.LOCAL))
    db = sqlite3.connect(f"file:{tmp_path / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT from_state, to_state, trigger FROM tier_transitions ORDER BY id").fetchall()
        state = db.execute("SELECT tier_state FROM studies WHERE id = 1").fetchone()
    finally:
        db.close()
    assert rows == [("local", "replicating", "replicate"),
                    ("replicating", "replicated", "verified")]
    assert state == ("replicated",)
