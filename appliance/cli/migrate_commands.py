"""`pacs-edge migrate`: pull a legacy PACS into the box, and watch it happen.

`start` records a run (its options included) and drives it in the foreground
with a progress bar on a terminal; a crash, a reboot or Ctrl-C leaves the run
as it was, and `resume` continues it with the same options. `status` and
`failures` read the index, so they work from another terminal while a run
goes on; `pause` and `cancel` change the run's row, which its workers read
before each study. The driving process claims the run (migration_rows.claim_run):
`status` tells a run whose process was killed (interrupted) from one that goes on,
and a second `resume` beside a live one is refused. The walk itself is
appliance/services/legacy_migration.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

from appliance.audit import Auditor
from appliance.base.config import MAX_QUERY_LIMIT, MAX_RATE_PER_HOUR, Config
from appliance.base.errors import MigrationError
from appliance.base.human import human_time
from appliance.base.logsetup import setup_logging
from appliance.cli.common import audit_change, err, expected_errors, home_option, load, out
from appliance.cli.migrate_verify import verify
from appliance.services.legacy_migration import Migration, Window, check_peer, days_between
from appliance.services.peers import Allowlist
from appliance.store import database
from appliance.store import migration_rows as rows
from appliance.store.index import Index
from appliance.store.leases import Holder

DEFAULT_SINCE = "1990-01-01"


@click.group()
def migrate() -> None:
    """Pull the studies of a legacy PACS into the box (C-FIND, then C-MOVE or C-GET)."""


migrate.add_command(verify)


@migrate.command("start")
@home_option
@click.option("--from", "peer_name", required=True,
              help="The legacy PACS: a peer of the allowlist (pacs-edge peers add).")
@click.option("--since", default=DEFAULT_SINCE, show_default=True,
              help="First study date, YYYY-MM-DD.")
@click.option("--until", default=None, help="Last study date, YYYY-MM-DD (default: today).")
@click.option("--modality", default="", help="Only studies with these modalities: CT,MR.")
@click.option("--via", type=click.Choice(["move", "get"]), default=None,
              help="C-MOVE to this box (default) or C-GET ([migrate] via).")
@click.option("--rate", type=click.IntRange(0, MAX_RATE_PER_HOUR), default=None,
              help="At most N studies per hour ([migrate] rate_per_hour; 0: no limit).")
@click.option("--associations", type=click.IntRange(1, 32), default=None,
              help="Studies transferred at once ([migrate] associations).")
@click.option("--window", default=None,
              help="Only transfer between these local times, e.g. 20:00-06:00.")
@click.option("--query-limit", type=click.IntRange(2, MAX_QUERY_LIMIT), default=None,
              help="The legacy PACS's C-FIND result limit ([migrate] query_limit).")
@expected_errors
def start(home: Path | None, peer_name: str, since: str, until: str | None, modality: str,
          via: str | None, rate: int | None, associations: int | None, window: str | None,
          query_limit: int | None) -> None:
    """Start migrating from a legacy PACS; runs until done (resume after any stop)."""
    config = load(home)
    options = config.with_overrides(migrate={
        "via": via, "rate_per_hour": rate, "associations": associations, "window": window,
        "query_limit": query_limit}).migrate
    peer = Allowlist(config.peers_path).peers().get(peer_name)
    if peer is None:
        raise MigrationError(f"no peer named {peer_name!r} in the allowlist",
                             hint="pacs-edge peers list; pacs-edge peers add NAME ...")
    check_peer(peer, options.via)
    modalities = tuple(m.strip().upper() for m in modality.split(",") if m.strip())
    days = days_between(since, until or date.today().strftime("%Y%m%d"))
    settings = rows.RunSettings(peer_name, options.via, days[0], days[-1], modalities,
                                options.associations, options.rate_per_hour, options.window,
                                options.query_limit)

    driver = Holder.new()

    async def create() -> int:
        async with Index(config.index.path) as index:
            assert index.writer is not None
            return await index.writer.submit_sync(
                lambda conn: rows.create_run(conn, settings, days, driver=driver))

    run_id = asyncio.run(create())
    audit_change(config, f"migration run {run_id} started from peer {peer_name}",
                 security=False)
    out.print(f"migration run {run_id}: {len(days)} days from {days[0]} to {days[-1]} from"
              f" {peer_name} via C-{options.via.upper()}", highlight=False)
    _drive(config, run_id, driver)


@migrate.command("resume")
@home_option
@click.option("--retry-failed", is_flag=True,
              help="Try the failed days and studies again (attempts start over).")
@expected_errors
def resume(home: Path | None, retry_failed: bool) -> None:
    """Continue the latest run where it stopped (after a crash, reboot, pause or Ctrl-C)."""
    config = load(home)
    driver = Holder.new()

    async def prepare() -> int:
        async with Index(config.index.path) as index:
            assert index.writer is not None
            run = await database.run_sync(index.reader, rows.latest_run)
            if run is None:
                raise MigrationError("no migration to resume",
                                     hint="pacs-edge migrate start --from NAME")
            await index.writer.submit_sync(lambda conn: rows.claim_run(conn, run.id, driver))
            if retry_failed:
                count = await index.writer.submit_sync(
                    lambda conn: rows.retry_failed(conn, run.id))
                if count:
                    out.print(f"{count} failed days and studies will be tried again")
            run = await database.run_sync(index.reader, rows.run_by_id, run.id)
            assert run is not None
            if run.state is rows.RunState.DONE and retry_failed:
                # Nothing was failed: sending the operator to --retry-failed again would loop.
                raise MigrationError(f"migration run {run.id} is done, with nothing failed",
                                     hint="`pacs-edge migrate verify` checks it against the"
                                          " legacy PACS; `migrate start` begins a new run")
            if run.state is rows.RunState.DONE:
                raise MigrationError(f"migration run {run.id} is done",
                                     hint="`migrate resume --retry-failed` retries its"
                                          " failures; `migrate start` begins a new run")
            await index.writer.submit_sync(
                lambda conn: rows.change_run(conn, run.id, rows.RunTrigger.RESUME))
            return run.id

    run_id = asyncio.run(prepare())
    audit_change(config, f"migration run {run_id} resumed", security=False)
    _drive(config, run_id, driver)


def _change(home: Path | None, trigger: rows.RunTrigger) -> None:
    config = load(home)

    async def change() -> tuple[int, rows.RunState]:
        async with Index(config.index.path) as index:
            assert index.writer is not None
            run = await database.run_sync(index.reader, rows.latest_run)
            if run is None:
                raise MigrationError("no migration run yet",
                                     hint="pacs-edge migrate start --from NAME")
            state = await index.writer.submit_sync(
                lambda conn: rows.change_run(conn, run.id, trigger))
            return run.id, state

    run_id, state = asyncio.run(change())
    audit_change(config, f"migration run {run_id} {state.value}", security=False)
    out.print(f"migration run {run_id} {state.value}; a running `migrate` process stops"
              " after the studies it is transferring", highlight=False)


@migrate.command("pause")
@home_option
@expected_errors
def pause(home: Path | None) -> None:
    """Stop the running migration after its current studies (`migrate resume` goes on)."""
    _change(home, rows.RunTrigger.PAUSE)


@migrate.command("cancel")
@home_option
@expected_errors
def cancel(home: Path | None) -> None:
    """End the migration for good (what it stored stays in the box)."""
    _change(home, rows.RunTrigger.CANCEL)


@migrate.command("status")
@home_option
@click.option("--json", "as_json", is_flag=True)
@expected_errors
def status(home: Path | None, as_json: bool) -> None:
    """Studies done, failed and remaining of the latest run."""
    run, summary = asyncio.run(_latest(load(home)))
    report = _report(run, summary)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table(show_header=False, box=None)
    s = run.settings
    table.add_row("run", f"{run.id} ({_state_text(run)})")
    if run.waiting is not None:
        table.add_row("waiting", _waiting_text(run))
    table.add_row("from", f"{s.peer} via C-{s.via.upper()}, {s.since_day} to {s.until_day}"
                  + (f", {','.join(s.modalities)}" if s.modalities else ""))
    table.add_row("throttle", f"{s.associations} at once"
                  + (f", {s.rate_per_hour} studies/hour" if s.rate_per_hour else "")
                  + (f", only {s.time_window}" if s.time_window else ""))
    table.add_row("days listed", f"{summary.days_done} of {summary.days_total}"
                  + (f", {summary.days_failed} failed" if summary.days_failed else ""))
    table.add_row("studies", f"{summary.studies_done} done, {summary.studies_failed} failed,"
                  f" {summary.studies_pending} remaining of {summary.studies_found} found")
    if summary.undated:
        table.add_row("no study date", _UNDATED_TEXT[summary.undated].format(
            summary.undated_found))
    table.add_row("instances", f"{summary.instances_received} in the box of"
                  f" {summary.instances_expected} listed"
                  + (f" ({summary.shared_instances} share a UID with another study)"
                     if summary.shared_instances else ""))
    for label, text in _pace_rows(run, summary):
        table.add_row(label, text)
    if summary.next_attempt_at:
        table.add_row("next retry", human_time(summary.next_attempt_at))
    out.print(table)
    if out.is_terminal:
        total = max(summary.studies_found, 1)
        out.print(ProgressBar(total=total, completed=summary.studies_done + summary.studies_failed,
                              width=50))
    _print_warnings(summary)
    if summary.studies_failed or summary.days_failed:
        err.print("some studies failed: `pacs-edge migrate failures` lists them", highlight=False)


def _pace_rows(run: rows.Run, summary: rows.RunSummary) -> list[tuple[str, str]]:
    """The pace of the last PACE_WINDOW_SECONDS and, while a process drives the run, how
    long the studies found so far still take at that pace."""
    minutes = f"{rows.PACE_WINDOW_SECONDS / 60:.0f} minutes"
    driven = run.state is rows.RunState.RUNNING and not run.interrupted
    pace = summary.pace
    if pace is None:
        if not (driven and summary.studies_pending):
            return []
        if summary.finished_lately:  # one: a pace needs two, and the run is not stalled
            return [("pace", f"1 study finished in the last {minutes}: too few to tell")]
        rate, window = run.settings.rate_per_hour, run.settings.time_window
        why = ""
        if Window(window).seconds_until_open(datetime.now()):
            why = f" (outside --window {window} now)"
        elif rate and 3600 / rate >= rows.PACE_WINDOW_SECONDS:
            why = f" (--rate {rate}: a study starts every {60 / rate:.0f} min)"
        return [("pace", f"no studies finished in the last {minutes}{why}")]
    out = [("pace", f"{pace.studies_per_hour:.0f} studies/hour,"
                    f" {pace.instances_per_hour:.0f} instances/hour (last {minutes})")]
    eta = summary.eta_seconds
    if driven and eta is not None:
        more = (f"; {summary.days_pending} days still to list"
                if summary.days_pending else "")
        window = f"; longer, as it works only {run.settings.time_window}" if (
            run.settings.time_window) else ""
        out.append(("time left", f"{_duration(eta)} for the {summary.studies_pending}"
                                 f" studies found so far{more}{window}"))
    return out


def _duration(seconds: float) -> str:
    """A time left, as rounded as it is uncertain: 'about 2 h 05 min'."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 60:
        return f"about {minutes} min"
    hours, minutes = divmod(minutes, 60)
    return (f"about {hours} h {minutes:02d} min" if hours < 48
            else f"about {hours // 24} days {hours % 24} h")


# The listing of the studies without a StudyDate, by its state ({} = studies it found).
_UNDATED_TEXT = {"pending": "studies listed after the days", "done": "{} studies found",
                 "failed": "studies not listed: `pacs-edge migrate failures` says why"}


def _print_warnings(summary: rows.RunSummary) -> None:
    for warning in summary.warnings:
        err.print(f"warning: {warning}", highlight=False)


# What a run's driver waits for, as `migrate status` names it.
_WAITING_FOR = {rows.Waiting.SERVE: "pacs-edge serve (this box's DICOM port)",
                rows.Waiting.LEGACY: "the legacy PACS"}


def _waiting_text(run: rows.Run) -> str:
    """'for pacs-edge serve ... since 2026-12-06 17:20:05 EST (12 min): why'."""
    assert run.waiting is not None
    since = run.waiting_since or time.time()
    return (f"for {_WAITING_FOR[run.waiting]} since"
            f" {human_time(since)}"
            f" ({_duration(time.time() - since).removeprefix('about ')}), no study counted"
            f" as failed meanwhile: {run.waiting_reason}")


def _state_text(run: rows.Run) -> str:
    if run.interrupted:
        return ("interrupted: no process is running it; `pacs-edge migrate resume`"
                " continues it")
    pid = run.driver_pid
    return (run.state.value + (f", process {pid}" if pid is not None else "")
            + (f": {run.stop_reason}" if run.stop_reason else ""))


@migrate.command("failures")
@home_option
@click.option("--json", "as_json", is_flag=True)
@expected_errors
def failures(home: Path | None, as_json: bool) -> None:
    """Days and studies that failed (or wait for a retry), with the reason."""
    config = load(home)

    async def read() -> list[rows.Failure]:
        async with Index(config.index.path) as index:
            run = await database.run_sync(index.reader, rows.latest_run)
            if run is None:
                raise MigrationError("no migration run yet",
                                     hint="pacs-edge migrate start --from NAME")
            return await database.run_sync(index.reader, rows.failures, run.id)

    found = asyncio.run(read())
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(f) for f in found], indent=2))
        return
    if not found:
        out.print("no failures")
        return
    table = Table("day", "study", "attempts", "kind", "instances", "reason")
    for f in found:
        expected = "?" if f.expected_instances is None else str(f.expected_instances)
        counts = "" if f.what == "day" else f"{f.received_instances}/{expected}"
        table.add_row(f.day or "(no date)", f.study_uid or "(the day's query)",
                      str(f.attempts), f.error_kind, counts, f.last_error)
    out.print(table)


async def _latest(config: Config) -> tuple[rows.Run, rows.RunSummary]:
    async with Index(config.index.path) as index:
        run = await database.run_sync(index.reader, rows.latest_run)
        if run is None:
            raise MigrationError("no migration run yet", hint="pacs-edge migrate start --from NAME")
        return run, await database.run_sync(index.reader, rows.summary, run.id)


def _report(run: rows.Run, summary: rows.RunSummary) -> dict[str, Any]:
    return {"run": run.id, "state": run.state.value, "interrupted": run.interrupted,
            "process": run.driver_pid, "settings": dataclasses.asdict(run.settings),
            "stop_reason": run.stop_reason or None,
            "waiting": None if run.waiting is None else {
                "for": run.waiting.value, "since": run.waiting_since,
                "reason": run.waiting_reason},
            "days": {"total": summary.days_total, "listed": summary.days_done,
                     "failed": summary.days_failed, "pending": summary.days_pending},
            "studies": {"found": summary.studies_found, "done": summary.studies_done,
                        "failed": summary.studies_failed, "remaining": summary.studies_pending},
            "undated": {"listing": summary.undated or None, "found": summary.undated_found},
            "warnings": list(summary.warnings),
            "instances": {"listed": summary.instances_expected,
                          "received": summary.instances_received,
                          "shared_uid": summary.shared_instances},
            "pace": None if summary.pace is None else dataclasses.asdict(summary.pace),
            "eta_seconds": summary.eta_seconds,
            "next_retry_at": summary.next_attempt_at,
            "created_at": run.created_at, "finished_at": run.finished_at}


def _drive(config: Config, run_id: int, driver: Holder) -> None:
    """Run the migration in this process (`driver`, which claimed the run) until done,
    paused or cancelled; the claim is released however it ends, but a kill."""
    from appliance.cli.migrate_setup import (  # pynetdicom: only this command
        legacy_audit,
        legacy_source,
        move_destination_probe,
    )

    setup_logging(config.log.level)

    async def drive() -> tuple[rows.RunState, rows.RunSummary, MigrationError | None]:
        async with Index(config.index.path) as index:
            assert index.writer is not None
            writer = index.writer
            run = await database.run_sync(index.reader, rows.run_by_id, run_id)
            assert run is not None
            try:
                with Auditor.for_home(config, process="migrate") as auditor:
                    source = legacy_source(config, run.settings, index, auditor)
                    migration = Migration(index, run, source, box_ae=config.dicom.ae_title,
                                          max_attempts=config.migrate.max_attempts,
                                          retry_base_seconds=config.migrate.retry_base_seconds,
                                          box_listening=move_destination_probe(
                                              config, run.settings),
                                          legacy_probe_seconds=config.migrate
                                          .legacy_probe_seconds,
                                          audit=legacy_audit(config, run.settings, auditor))
                    task = asyncio.create_task(migration.drive())
                    if err.is_terminal:
                        await _show_progress(index, run_id, task)
                    state = await task
            finally:
                await writer.submit_sync(lambda conn: rows.release_run(conn, run_id, driver))
            return (state, await database.run_sync(index.reader, rows.summary, run_id),
                    migration.stopped)

    state, summary, stopped = asyncio.run(drive())
    # What this process leaves behind, in the audit trail too: the record of a cut-over.
    audit_change(config, f"migration run {run_id} {state.value}: {summary.studies_done}"
                 f" studies done, {summary.studies_failed} failed, {summary.studies_pending}"
                 f" remaining of {summary.studies_found} found; {summary.instances_received}"
                 f" of {summary.instances_expected} instances in the box; days failed"
                 f" {summary.days_failed}" + (f"; {stopped.message}" if stopped else ""),
                 security=False)
    out.print(f"migration run {run_id} {state.value}: {summary.studies_done} studies done,"
              f" {summary.studies_failed} failed, {summary.studies_pending} remaining",
              highlight=False)
    _print_warnings(summary)
    if stopped is not None:
        raise stopped  # the run paused itself: what to fix, and exit code 2
    if summary.studies_failed or summary.days_failed:
        err.print("some failed: `pacs-edge migrate failures` lists them with the reason;"
                  " `pacs-edge migrate resume --retry-failed` tries them again", highlight=False)
        sys.exit(1)


async def _show_progress(index: Index, run_id: int, task: asyncio.Task[Any]) -> None:
    with Progress(TextColumn("migrating"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err,
                  transient=True) as progress:
        bar = progress.add_task("migrate", total=None, detail="listing days")
        while not task.done():
            s = await database.run_sync(index.reader, rows.summary, run_id)
            run = await database.run_sync(index.reader, rows.run_by_id, run_id)
            waiting = run.waiting if run is not None else None
            detail = (f"days {s.days_done + s.days_failed}/{s.days_total}"
                      + (f", {s.studies_failed} failed" if s.studies_failed else "")
                      + (f", {s.pace.studies_per_hour:.0f} studies/hour" if s.pace else "")
                      + (f", {_duration(s.eta_seconds)} left" if s.eta_seconds
                         is not None else "")
                      + (f", waiting for {_WAITING_FOR[waiting]} since"
                         f" {human_time(run.waiting_since, clock='%H:%M:%S')}"
                         if run is not None and waiting is not None and run.waiting_since
                         else ""))
            progress.update(bar, total=s.studies_found or None,
                            completed=s.studies_done + s.studies_failed, detail=detail)
            await asyncio.wait([task], timeout=0.5)
