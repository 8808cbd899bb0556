"""The orders schema and its state table, on a real SQLite index (migration 0006)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from appliance.services.order_states import (
    FINAL,
    TRANSITIONS,
    OrderTransitionError,
    OrderTrigger,
    apply_sync,
    next_state,
    path,
)
from appliance.store import database
from appliance.store import order_rows as store
from appliance.store.index import Index
from appliance.store.order_rows import Demographics, OrderDetails, OrderStatus, PatientKey

ALL_PAIRS = [(state, trigger) for state in OrderStatus for trigger in OrderTrigger]


@pytest.mark.parametrize(("state", "trigger"), [p for p in ALL_PAIRS if p in TRANSITIONS])
def test_order_transition_allowed(state: OrderStatus, trigger: OrderTrigger) -> None:
    assert next_state(state, trigger) is TRANSITIONS[(state, trigger)]


@pytest.mark.parametrize(("state", "trigger"), [p for p in ALL_PAIRS if p not in TRANSITIONS])
def test_order_transition_refused(state: OrderStatus, trigger: OrderTrigger) -> None:
    with pytest.raises(OrderTransitionError):
        next_state(state, trigger)


def test_no_move_out_of_a_final_state() -> None:
    assert not [pair for pair in TRANSITIONS if pair[0] in FINAL]


@pytest.mark.parametrize(("state", "target", "moves"), [
    (OrderStatus.SCHEDULED, OrderStatus.SCHEDULED, []),
    (OrderStatus.SCHEDULED, OrderStatus.IN_PROGRESS, [OrderTrigger.START]),
    (OrderStatus.SCHEDULED, OrderStatus.COMPLETED, [OrderTrigger.START, OrderTrigger.COMPLETE]),
    (OrderStatus.SCHEDULED, OrderStatus.DISCONTINUED, [OrderTrigger.DISCONTINUE]),
    (OrderStatus.IN_PROGRESS, OrderStatus.DISCONTINUED, [OrderTrigger.DISCONTINUE]),
    (OrderStatus.COMPLETED, OrderStatus.COMPLETED, []),
])
def test_a_reported_status_is_reached_by_the_fewest_moves_discontinue_before_cancel(
        state: OrderStatus, target: OrderStatus, moves: list[OrderTrigger]) -> None:
    assert path(state, target) == moves


@pytest.mark.parametrize(("state", "target", "named"), [
    (OrderStatus.DISCONTINUED, OrderStatus.COMPLETED, "complete"),
    (OrderStatus.COMPLETED, OrderStatus.DISCONTINUED, "discontinue"),
    (OrderStatus.IN_PROGRESS, OrderStatus.SCHEDULED, "change"),
])
def test_a_status_the_table_cannot_reach_is_refused_naming_the_move_into_it(
        state: OrderStatus, target: OrderStatus, named: str) -> None:
    with pytest.raises(OrderTransitionError) as refused:
        path(state, target)
    assert (refused.value.state, refused.value.trigger) == (state.value, named)


def _new(conn: sqlite3.Connection, accession: str, patient: str = "P1") -> int:
    return store.insert_order(
        conn, accession_number=accession, placer_order_number=f"PL{accession}",
        filler_order_number="", study_uid=f"1.2.3.{len(accession)}{accession[-1:]}",
        details=OrderDetails(modality="CT", sps_start_date="20240102", sps_start_time="0930"),
        patient=PatientKey(patient), demographics=Demographics("DOE^JANE", "19700101", "F"),
        at=1.0)


def test_order_rows_round_trip_and_transitions_are_recorded(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Index(tmp_path / "index.db") as index:
            assert index.writer is not None
            await index.writer.submit_sync(lambda c: _new(c, "A1"))
            order = await database.run_sync(index.reader, store.find_order, "A1")
            assert order is not None and order.status is OrderStatus.SCHEDULED
            assert order.details.sps_start_time == "0930" and order.images_received == 0
            await index.writer.submit_sync(
                lambda c: apply_sync(c, order, OrderTrigger.START, source="mpps"))
            # A stale read (still SCHEDULED) cannot move the order a second time.
            with pytest.raises(OrderTransitionError):
                await index.writer.submit_sync(
                    lambda c: apply_sync(c, order, OrderTrigger.CANCEL, source="hl7"))
            moved = await database.run_sync(index.reader, store.find_order, "A1")
            assert moved is not None and moved.status is OrderStatus.IN_PROGRESS
            steps = await database.run_sync(index.reader, store.transitions, moved.id)
            assert [(t.from_state, t.to_state, t.source) for t in steps] == [
                ("SCHEDULED", "IN PROGRESS", "mpps")]

    asyncio.run(scenario())


def test_status_outside_the_four_is_refused_by_the_schema(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Index(tmp_path / "index.db") as index:
            assert index.writer is not None
            order_id = await index.writer.submit_sync(lambda c: _new(c, "A1"))
            with pytest.raises(Exception, match="index write failed"):
                await index.writer.submit_sync(lambda c: c.execute(
                    "UPDATE orders SET status = 'CANCELLED' WHERE id = ?", (order_id,)))

    asyncio.run(scenario())


def test_merged_away_patient_resolves_along_merges_in_their_order(tmp_path: Path) -> None:
    a, b, c, d = (PatientKey(p, "HOSP") for p in "ABCD")

    async def scenario() -> None:
        async with Index(tmp_path / "index.db") as index:
            writer = index.writer
            assert writer is not None

            async def merge(prior: PatientKey, surviving: PatientKey) -> None:
                await writer.submit_sync(
                    lambda conn: store.merge_patient(conn, prior, surviving, 1.0))

            async def current(*keys: PatientKey) -> list[PatientKey | None]:
                return [await database.run_sync(index.reader, store.surviving_patient, key)
                        for key in keys]

            assert await current(a) == [None]
            await merge(a, b)
            await merge(b, c)  # a chain: A -> B -> C
            assert await current(a, b, c) == [c, c, None]
            await merge(c, a)  # A named as the surviving one later: current again
            assert await current(a, b, c) == [None, a, a]
            await merge(d, PatientKey("D"))  # identity is ID and issuer
            assert await current(d, PatientKey("D")) == [PatientKey("D"), None]

    asyncio.run(scenario())
