"""Prefetch: which priors the rules choose, the priors' state table, and their rows.

The end-to-end runs (an HL7 order, Azurite, dcmqrscp as the remote archive) are in
tests/test_prefetch.py; here the choice itself, case by case.
"""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest

from appliance.base.config import PrefetchConfig, config_from_mapping
from appliance.base.errors import ConfigError
from appliance.services.prefetch_rules import Candidate, OrderContext, choose_priors, regions
from appliance.store.index import Index
from appliance.store.order_rows import Demographics, OrderDetails, PatientKey, insert_order
from appliance.store.prefetch_rows import (
    TRANSITIONS,
    NewPrior,
    PrefetchPrior,
    PrefetchTransitionError,
    PriorState,
    PriorTrigger,
    RequestTrigger,
    Retries,
    Source,
    advance,
    end_for_cancelled_order,
    held_study_uids,
    insert_request,
    mark_planned,
    next_state,
    priors_of,
    request_by_id,
    resume_interrupted,
    retry_due,
    retry_failed,
    transitions_of,
)

TODAY = date(2026, 12, 4)
RULES = PrefetchConfig()
CT_HEAD = OrderContext(modality="CT", procedure="CT HEAD W/O CONTRAST", exclude_study_uid="1.9")


def study(uid: str, when: str, modalities: tuple[str, ...] = ("CT",),
          parts: tuple[str, ...] = ("HEAD",), description: str = "",
          source: Source = Source.LOCAL) -> Candidate:
    return Candidate(uid, when, modalities, parts, description, source)


def chosen(candidates: list[Candidate], order: OrderContext = CT_HEAD,
           **rules: object) -> list[str]:
    config = dataclasses.replace(RULES, **rules)  # type: ignore[arg-type]
    return [c.study_uid for c in choose_priors(candidates, order, config, today=TODAY)]


def test_the_newest_matching_priors_up_to_max_priors() -> None:
    candidates = [study("1.1", "20200101"), study("1.2", "20251103"), study("1.3", "20240607"),
                  study("1.4", "20230101")]
    assert chosen(candidates) == ["1.2", "1.3", "1.4"]
    assert chosen(candidates, max_priors=1) == ["1.2"]


def test_the_ordered_study_is_never_its_own_prior() -> None:
    assert chosen([study("1.9", "20261204"), study("1.1", "20250101")]) == ["1.1"]


def test_same_modality_means_the_orders_modality() -> None:
    candidates = [study("1.1", "20250101", ("MR",)), study("1.2", "20240101", ("CT", "SR"))]
    assert chosen(candidates) == ["1.2"]
    assert chosen(candidates, modalities=("any",)) == ["1.1", "1.2"]
    assert chosen(candidates, modalities=("MR", "PT")) == ["1.1"]
    # An order without a modality: "same" cannot narrow.
    assert chosen(candidates, OrderContext(procedure="HEAD")) == ["1.1", "1.2"]


def test_body_part_region_of_the_procedure_text() -> None:
    candidates = [study("1.1", "20250101", parts=("CHEST",)),
                  study("1.2", "20240101", parts=("BRAIN",)),
                  study("1.3", "20230101", parts=(), description="CT CRANIUM"),
                  study("1.4", "20220101", parts=(), description="outside study")]
    # BRAIN and CRANIUM are the head; a prior that names no body part is kept.
    assert chosen(candidates, max_priors=10) == ["1.2", "1.3", "1.4"]
    assert chosen(candidates, max_priors=10, body_part="any") == ["1.1", "1.2", "1.3", "1.4"]
    # A procedure that names no region does not narrow.
    unnamed = OrderContext(modality="CT", procedure="FOLLOW-UP")
    assert chosen(candidates, unnamed, max_priors=10) == ["1.1", "1.2", "1.3", "1.4"]


def test_regions_group_the_words_for_one_part_of_the_body() -> None:
    assert regions("MR BRAIN") == regions("HEAD") == {"head"}
    assert regions("ABDOMEN PELVIS") == {"abdomen", "pelvis"}
    assert regions("XR knee left") == {"lower limb"}
    assert regions("FOLLOW-UP") == set()
    # The lumbar spine is spine and abdomen: an L-spine MR finds an abdomen CT's LSPINE
    # series, and a spine order finds every part of the spine.
    assert regions("LSPINE") == regions("L-SPINE") == {"abdomen", "spine"}
    assert regions("MR L-SPINE") == {"spine"}
    assert regions("CSPINE") & regions("MR WHOLE SPINE")
    spine = OrderContext(modality="MR", procedure="MR L-SPINE")
    assert chosen([study("1.1", "20250101", ("MR",), ("LSPINE",)),
                   study("1.2", "20240101", ("MR",), ("KNEE",))], spine) == ["1.1"]


def test_age_limit_and_undated_priors_last() -> None:
    candidates = [study("1.1", "20150101"), study("1.2", ""), study("1.3", "20250101")]
    assert chosen(candidates) == ["1.3", "1.2"]
    assert chosen(candidates, max_age_years=0.0) == ["1.3", "1.1", "1.2"]


@pytest.mark.parametrize(("today", "years", "kept", "left_out"), [
    # Three years back from 4 Dec 2026 is 4 Dec 2023, 1096 days (29 Feb 2024 between).
    (TODAY, 3.0, "20231204", "20231203"),
    (date(2028, 3, 1), 1.0, "20270301", "20270228"),  # 366 days back, 29 Feb 2028 between
    (date(2028, 2, 29), 1.0, "20270228", "20270227"),  # no 29 Feb 2027: the 28th
    (TODAY, 0.5, "20260604", "20260603"),  # a fraction: days of an average year (182.6)
])
def test_a_prior_exactly_max_age_years_old_is_kept_whatever_leap_days_lie_between(
        today: date, years: float, kept: str, left_out: str) -> None:
    """A prior dated N years before today is N years old, not older: counting 365.25 days
    a year left out the one of that very day whenever more leap days than a quarter per
    year lay between (a three-year span holding a 29 February, most of them)."""
    config = dataclasses.replace(RULES, max_age_years=years)
    picked = choose_priors([study("1.1", kept), study("1.2", left_out)], CT_HEAD, config,
                           today=today)
    assert [c.study_uid for c in picked] == ["1.1"]


def test_the_index_copy_wins_over_the_remote_archives() -> None:
    candidates = [study("1.1", "20250101", source=Source.REMOTE),
                  study("1.1", "20250101", source=Source.CLOUD),
                  study("1.2", "20240101", source=Source.REMOTE)]
    picked = choose_priors(candidates, CT_HEAD, RULES, today=TODAY)
    assert [(c.study_uid, c.source) for c in picked] == [("1.1", Source.CLOUD),
                                                         ("1.2", Source.REMOTE)]


@pytest.mark.parametrize(("key", "value"), [
    ("modalities", []), ("body_part", "left"), ("max_priors", 0), ("keep_local_days", 0),
    ("nightly_at", "25:00"), ("nightly_at", "7pm"), ("max_age_years", -1),
    ("associations", 0), ("associations", 9), ("retry_attempts", -1), ("retry_attempts", 21),
    ("retry_base_seconds", 0), ("retry_base_seconds", 3601),
])
def test_bad_prefetch_config_names_the_key(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(tmp_path, {"prefetch": {key: value}})
    assert caught.value.key == f"prefetch.{key}"


def test_prefetch_is_on_by_default() -> None:
    assert RULES.enabled and RULES.modalities == ("same",) and RULES.nightly_at == "20:00"


# --- the priors' state table -----------------------------------------------------------

ALL_PAIRS = list(itertools.product(PriorState, PriorTrigger))


@pytest.mark.parametrize(("state", "trigger"), [p for p in ALL_PAIRS if p in TRANSITIONS],
                         ids=str)
def test_allowed_prior_pair_moves_to_its_target(state: PriorState,
                                                trigger: PriorTrigger) -> None:
    assert next_state(state, trigger) is TRANSITIONS[(state, trigger)]


@pytest.mark.parametrize(("state", "trigger"), [p for p in ALL_PAIRS if p not in TRANSITIONS],
                         ids=str)
def test_missing_prior_pair_is_refused(state: PriorState, trigger: PriorTrigger) -> None:
    with pytest.raises(PrefetchTransitionError):
        next_state(state, trigger)


def test_done_is_final_and_failed_only_retries() -> None:
    assert [t for t in PriorTrigger if (PriorState.DONE, t) in TRANSITIONS] == []
    assert [t for t in PriorTrigger if (PriorState.FAILED, t) in TRANSITIONS] == [
        PriorTrigger.RETRY]


def _held(now: float) -> Callable[[sqlite3.Connection], set[str]]:
    """held_study_uids at `now` for requests made with a hold of 1000 s."""
    return lambda c: held_study_uids(c, now, keep_local_seconds=1000.0)


async def test_prior_rows_hold_and_retry(tmp_path: Path) -> None:
    patient = PatientKey("P1", "HOSP")
    async with Index(tmp_path / "index.sqlite3") as index:
        writer = index.writer
        assert writer is not None

        def plan(conn: sqlite3.Connection) -> int:
            request = insert_request(conn, patient, RequestTrigger.MANUAL, hold_until=2000.0,
                                     at=1000.0)
            assert request is not None
            mark_planned(conn, request, [
                NewPrior("1.1", "20250101", ("CT",), Source.LOCAL),
                NewPrior("1.2", "20240101", ("CT",), Source.CLOUD),
                NewPrior("1.3", "20230101", ("CT",), Source.REMOTE)], limit=3, at=1000.0)
            return request

        request = await writer.submit_sync(plan)
        priors = {p.study_uid: p for p in await writer.submit_sync(
            lambda c: priors_of(c, [request]))}
        await writer.submit_sync(lambda c: advance(c, priors["1.1"].id, PriorTrigger.LOCAL))
        await writer.submit_sync(lambda c: advance(c, priors["1.2"].id,
                                                   PriorTrigger.REHYDRATE))
        await writer.submit_sync(lambda c: advance(c, priors["1.3"].id, PriorTrigger.MOVE))
        await writer.submit_sync(lambda c: advance(
            c, priors["1.3"].id, PriorTrigger.FAIL, failure_kind="move_failed", error="x"))
        # The cloud prior's process died mid-way: it starts over; the remote one retries.
        assert await writer.submit_sync(lambda c: resume_interrupted(c, Source.CLOUD)) == 1
        assert await writer.submit_sync(retry_failed) == (0, 1)
        with pytest.raises(PrefetchTransitionError):
            await writer.submit_sync(lambda c: advance(
                c, priors["1.1"].id, PriorTrigger.RECALL))
        after = {p.study_uid: p for p in await writer.submit_sync(
            lambda c: priors_of(c, [request]))}
        assert {uid: p.state for uid, p in after.items()} == {
            "1.1": "done", "1.2": "pending", "1.3": "pending"}
        assert after["1.2"].rehydrate_requested_at is not None
        assert await writer.submit_sync(lambda c: transitions_of(c, priors["1.2"].id)) == [
            ("pending", "rehydrating", "rehydrate"), ("rehydrating", "pending", "resume")]
        # Held until hold_until, whatever their state (but failed).
        assert await writer.submit_sync(_held(1999.0)) == {
            "1.1", "1.2", "1.3"}
        assert await writer.submit_sync(_held(2000.0)) == set()


async def test_a_hold_set_before_the_clock_stepped_back_ends_but_one_for_a_later_order_holds(
        tmp_path: Path) -> None:
    """A hold runs keep_local_days past the order's start, or past the request when it
    has none: a manual one made while the clock was a year ahead held its priors out
    of every eviction, the disk's watermark too, for a year after the correction."""
    year, keep = 365 * 86400.0, 7 * 86400.0
    async with Index(tmp_path / "index.sqlite3") as index:
        writer = index.writer
        assert writer is not None

        def plan(conn: sqlite3.Connection) -> None:
            for uid, needed in (("1.1", None), ("1.2", 1000.0 + year)):
                request = insert_request(
                    conn, PatientKey(f"P{uid}", "HOSP"), RequestTrigger.MANUAL,
                    hold_until=max(needed or 0.0, 1000.0 + year) + keep, needed_at=needed,
                    at=1000.0 + year)
                assert request is not None
                mark_planned(conn, request, [NewPrior(uid, "20250101", ("CT",), Source.LOCAL)],
                             limit=1, at=1000.0 + year)

        await writer.submit_sync(plan)
        assert await writer.submit_sync(
            lambda c: held_study_uids(c, 1000.0, keep_local_seconds=keep)) == {"1.2"}


async def test_a_failure_that_may_pass_is_retried_with_backoff_until_the_attempts_end(
    tmp_path: Path,
) -> None:
    """A failed C-MOVE is due again after the base wait, then after twice that, and so
    on for `attempts`; then it waits for `prefetch retry`, which gives the attempts back.
    A failure that cannot pass (no remote archive) is not retried; nor is a request
    whose order was cancelled."""
    retries = Retries(attempts=2, base_seconds=60.0)
    async with Index(tmp_path / "index.sqlite3") as index:
        writer = index.writer
        assert writer is not None

        def plan(conn: sqlite3.Connection) -> tuple[int, dict[str, int]]:
            request = insert_request(conn, PatientKey("P1", ""), RequestTrigger.MANUAL,
                                     hold_until=9e9, at=1000.0)
            assert request is not None
            mark_planned(conn, request, [NewPrior("1.3", "", ("CT",), Source.REMOTE),
                                         NewPrior("1.4", "", ("CT",), Source.REMOTE)],
                         limit=3, error_kind="remote_unreachable", error="down", retries=retries,
                         at=1000.0)
            return request, {p.study_uid: p.id for p in priors_of(conn, [request])}

        request, ids = await writer.submit_sync(plan)

        def fail(uid: str, kind: str, at: float) -> Callable[[sqlite3.Connection],
                                                             PrefetchPrior]:
            def run(conn: sqlite3.Connection) -> PrefetchPrior:
                advance(conn, ids[uid], PriorTrigger.MOVE, at=at)
                advance(conn, ids[uid], PriorTrigger.FAIL, failure_kind=kind, error="x",
                        retries=retries, at=at)
                [prior] = [p for p in priors_of(conn, [request]) if p.id == ids[uid]]
                return prior
            return run

        failed = await writer.submit_sync(fail("1.3", "move_failed", 1000.0))
        assert (failed.state, failed.attempts, failed.retry_at) == ("failed", 0, 1060.0)
        hopeless = await writer.submit_sync(fail("1.4", "no_remote_archive", 1000.0))
        assert hopeless.retry_at is None
        assert await writer.submit_sync(lambda c: retry_due(c, at=1059.0)) == (0, 0)
        # The request's C-FIND failed too: it is chosen again at the same time.
        assert await writer.submit_sync(lambda c: retry_due(c, at=1060.0)) == (1, 1)
        again = await writer.submit_sync(fail("1.3", "move_failed", 1100.0))
        assert (again.attempts, again.retry_at) == (1, 1220.0)  # doubled
        assert await writer.submit_sync(lambda c: retry_due(c, at=1220.0)) == (0, 1)
        last = await writer.submit_sync(fail("1.3", "move_failed", 1300.0))
        assert (last.state, last.attempts, last.retry_at) == ("failed", 2, None)
        assert await writer.submit_sync(lambda c: retry_due(c, at=9e8)) == (0, 0)
        assert await writer.submit_sync(retry_failed) == (0, 2)
        fresh = await writer.submit_sync(fail("1.3", "move_failed", 2000.0))
        assert (fresh.attempts, fresh.retry_at) == (0, 2060.0)


async def test_a_retry_set_while_the_clock_was_ahead_is_due_once_it_is_corrected(
    tmp_path: Path,
) -> None:
    """A request and a prior failed while the wall clock ran a year ahead: their retry
    is due at once after NTP steps the clock back, not a year later; a retry due in
    10 s on a right clock still waits its 10 s."""
    retries = Retries(attempts=3, base_seconds=10.0)
    ahead = 2e9  # the clock a year ahead when they failed
    corrected = ahead - 365 * 86400.0
    async with Index(tmp_path / "index.sqlite3") as index:
        writer = index.writer
        assert writer is not None

        def fail_at(at: float) -> Callable[[sqlite3.Connection], None]:
            def run(conn: sqlite3.Connection) -> None:
                request = insert_request(conn, PatientKey(f"P{at}", ""), RequestTrigger.MANUAL,
                                         hold_until=9e9, at=at)
                assert request is not None
                mark_planned(conn, request, [NewPrior(f"1.{at}", "", ("CT",), Source.REMOTE)],
                             limit=3, error_kind="remote_unreachable", error="down",
                             retries=retries, at=at)
                [prior] = priors_of(conn, [request])
                advance(conn, prior.id, PriorTrigger.MOVE, at=at)
                advance(conn, prior.id, PriorTrigger.FAIL, failure_kind="move_failed",
                        error="x", retries=retries, at=at)
            return run

        await writer.submit_sync(fail_at(ahead))
        assert await writer.submit_sync(lambda c: retry_due(c, at=corrected)) == (1, 1)
        await writer.submit_sync(fail_at(corrected))  # due at corrected + 10
        assert await writer.submit_sync(lambda c: retry_due(c, at=corrected + 9)) == (0, 0)
        assert await writer.submit_sync(lambda c: retry_due(c, at=corrected + 10)) == (1, 1)


async def test_a_cancelled_order_ends_its_prefetch(tmp_path: Path) -> None:
    """The hold ends; what has not started fails `order_cancelled` and stays failed
    through `retry` and a restart; a step under way is left to finish; a choice that
    was under way when the order was cancelled records nothing."""
    patient = PatientKey("P1", "HOSP")
    async with Index(tmp_path / "index.sqlite3") as index:
        writer = index.writer
        assert writer is not None

        def plan(conn: sqlite3.Connection) -> tuple[int, int]:
            order = insert_order(
                conn, accession_number="A-1", placer_order_number="", filler_order_number="",
                study_uid="1.9", details=OrderDetails(modality="CT"), patient=patient,
                demographics=Demographics(), at=0.0)
            request = insert_request(conn, patient, RequestTrigger.ORDER, hold_until=2000.0,
                                     order_id=order, at=1000.0)
            assert request is not None
            mark_planned(conn, request, [
                NewPrior("1.1", "20250101", ("CT",), Source.LOCAL),
                NewPrior("1.2", "20240101", ("CT",), Source.CLOUD),
                NewPrior("1.3", "20230101", ("CT",), Source.REMOTE),
                NewPrior("1.4", "20220101", ("CT",), Source.REMOTE),
                NewPrior("1.6", "20200101", ("CT",), Source.CLOUD)], limit=5, at=1000.0)
            by_uid = {p.study_uid: p.id for p in priors_of(conn, [request])}
            advance(conn, by_uid["1.1"], PriorTrigger.LOCAL)
            advance(conn, by_uid["1.2"], PriorTrigger.RECALL)
            advance(conn, by_uid["1.4"], PriorTrigger.MOVE)
            advance(conn, by_uid["1.4"], PriorTrigger.FAIL, failure_kind="move_failed")
            advance(conn, by_uid["1.6"], PriorTrigger.REHYDRATE)
            return order, request

        order, request = await writer.submit_sync(plan)
        assert await writer.submit_sync(_held(1500.0)) == {
            "1.1", "1.2", "1.3", "1.6"}
        assert await writer.submit_sync(
            lambda c: end_for_cancelled_order(c, order, at=1500.0)) == request

        async def states() -> dict[str, tuple[str, str]]:
            return {p.study_uid: (p.state, p.failure_kind) for p in await writer.submit_sync(
                lambda c: priors_of(c, [request]))}

        assert await states() == {"1.1": ("done", ""), "1.2": ("recalling", ""),
                                  "1.3": ("failed", "order_cancelled"),
                                  "1.4": ("failed", "order_cancelled"),
                                  "1.6": ("failed", "order_cancelled")}
        # A worker that read the rehydrating prior before finds its next step refused.
        six = {p.study_uid: p.id for p in await writer.submit_sync(
            lambda c: priors_of(c, [request]))}["1.6"]
        with pytest.raises(PrefetchTransitionError):
            await writer.submit_sync(lambda c: advance(c, six, PriorTrigger.ONLINE))
        ended = await writer.submit_sync(lambda c: request_by_id(c, request))
        assert ended is not None
        assert (ended.state, ended.error_kind, ended.hold_until) == (
            "failed", "order_cancelled", 1500.0)
        assert await writer.submit_sync(_held(1500.0)) == set()
        assert await writer.submit_sync(retry_failed) == (0, 0)
        # The recall's process died: at the next start it fails instead of starting over.
        assert await writer.submit_sync(lambda c: resume_interrupted(c, Source.CLOUD)) == 1
        assert (await states())["1.2"] == ("failed", "order_cancelled")
        # A choice finishing after the cancellation records nothing.
        await writer.submit_sync(lambda c: mark_planned(
            c, request, [NewPrior("1.5", "20210101", ("CT",), Source.REMOTE)], limit=10))
        assert "1.5" not in await states()
        assert await writer.submit_sync(
            lambda c: request_by_id(c, request)) == ended

